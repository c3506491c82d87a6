"""The Redis pointer that says which drafter version the servers serve (the
version contract between the worker and the servers: docs/architecture.md).
The version directories it names are `service.checkpoints.store`'s.

Redis (`ns` = namespace, default "draftloop"):

- key `{ns}:drafter:current`: the version servers must serve, JSON
  `{"kind": "eagle3", "version": N, "path": "<dir>", "pinned": bool, "updated_at": "<ISO-8601 UTC>"}`
- channel `{ns}:drafter:updates`: the same JSON, published each time the key
  changes (a wake-up: servers re-read the key, and also poll it)
- key `{ns}:drafter:latest`: the newest automatically published version
  (same JSON, pinned false); "unpin" moves the pointer back to it
- key `{ns}:drafter:cooldown:{kind}:{version}` (with a TTL): a version the
  regression guard rolled back (`rollback_version`); until it expires, an
  automatic publish of that version moves nothing

Pinning: an operator pin (`pinned=True`) always moves the pointer. While the
pointer is pinned, an automatic publish (`pinned=False`) only records itself in
`latest` and leaves the pointer where it is; it also never moves an unpinned
pointer to an older version (a redelivered task publishing a stale result).
Both checks run inside one Lua script, so concurrent publishers cannot race.

Imports no torch and no web framework: the worker and the API both use it."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from redis import Redis

from .store import DEFAULT_KIND, MANIFEST_FILE, list_versions, version_path

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "draftloop"

# KEYS: pointer, latest, channel, the version's cool-down key. ARGV: payload JSON,
# pinned ("1"/"0"), version. Returns 1 when the pointer moved (and was published),
# 0 when it stayed, 2 when the version is cooling down after a rollback (nothing recorded).
_PUBLISH_LUA = """
local version = tonumber(ARGV[3])
if ARGV[2] == '1' then
  redis.call('SET', KEYS[1], ARGV[1])
  redis.call('PUBLISH', KEYS[3], ARGV[1])
  return 1
end
if redis.call('EXISTS', KEYS[4]) == 1 then return 2 end
local latest = redis.call('GET', KEYS[2])
local ok, old = pcall(cjson.decode, latest or '')
local old_version = ok and type(old) == 'table' and tonumber(old['version']) or nil
if old_version == nil or old_version <= version then
  redis.call('SET', KEYS[2], ARGV[1])
end
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok2, c = pcall(cjson.decode, cur)
  if ok2 and type(c) == 'table' then
    if c['pinned'] == true then return 0 end
    if tonumber(c['version']) ~= nil and tonumber(c['version']) > version then return 0 end
  end
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('PUBLISH', KEYS[3], ARGV[1])
return 1
"""

# KEYS: pointer, latest, channel. ARGV: updated_at. Points at `latest` (unpinned)
# and returns the new pointer JSON; nil (nothing changed) when there is no latest.
_UNPIN_LUA = """
local latest = redis.call('GET', KEYS[2])
if not latest then return nil end
local ok, obj = pcall(cjson.decode, latest)
if not ok or type(obj) ~= 'table' then return nil end
obj['pinned'] = false
obj['updated_at'] = ARGV[1]
local raw = cjson.encode(obj)
redis.call('SET', KEYS[1], raw)
redis.call('PUBLISH', KEYS[3], raw)
return raw
"""


# KEYS: pointer, latest, channel, the bad version's cool-down key. ARGV: the bad
# version, the payload JSON to go back to, cool-down seconds. Only while the pointer
# still names the bad version, unpinned: 1 (moved back, announced); else 0.
_ROLLBACK_LUA = """
local ok, c = pcall(cjson.decode, redis.call('GET', KEYS[1]) or '')
if not ok or type(c) ~= 'table' or c['pinned'] == true or tonumber(c['version']) ~= tonumber(ARGV[1]) then
  return 0
end
redis.call('SET', KEYS[4], '1', 'EX', ARGV[3])
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[2])
redis.call('PUBLISH', KEYS[3], ARGV[2])
return 1
"""


def pointer_key(namespace: str = DEFAULT_NAMESPACE) -> str:
    """The key holding the pointer servers follow."""
    return f"{namespace}:drafter:current"


def latest_key(namespace: str = DEFAULT_NAMESPACE) -> str:
    """The key holding the newest automatically published version."""
    return f"{namespace}:drafter:latest"


def updates_channel(namespace: str = DEFAULT_NAMESPACE) -> str:
    """The pub/sub channel announcing each pointer change."""
    return f"{namespace}:drafter:updates"


def cooldown_key(version: int, kind: str = DEFAULT_KIND, namespace: str = DEFAULT_NAMESPACE) -> str:
    """The key that keeps a rolled-back version from being published again for a while."""
    return f"{namespace}:drafter:cooldown:{kind}:{int(version)}"


def pointer_payload(
    version: int, path: str | Path, pinned: bool = False, kind: str = DEFAULT_KIND
) -> dict[str, Any]:
    """The pointer's JSON object for `version` in `path`, stamped now."""
    return {
        "kind": kind,
        "version": int(version),
        "path": str(Path(path).resolve()),
        "pinned": bool(pinned),
        "updated_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
    }


def publish_version(
    redis: Redis,
    version: int,
    path: str | Path,
    pinned: bool = False,
    kind: str = DEFAULT_KIND,
    namespace: str = DEFAULT_NAMESPACE,
) -> bool:
    """Point the servers at checkpoint `version` in `path` (SET, then PUBLISH).

    Call only once the checkpoint directory is durable (renamed into place).
    `pinned=False` (the worker): does not move a pinned pointer nor an unpinned
    one that names a newer version; the version is still recorded as the
    latest automatic one. `pinned=True` (an operator): always moves it.
    Returns whether the pointer moved. Raises FileNotFoundError when `path`
    holds no manifest, redis.RedisError when Redis fails."""
    if not (Path(path) / MANIFEST_FILE).is_file():
        raise FileNotFoundError(f"{path}: no {MANIFEST_FILE}; publish only a complete checkpoint directory")
    payload = json.dumps(pointer_payload(version, path, pinned, kind))
    keys = [pointer_key(namespace), latest_key(namespace), updates_channel(namespace)]
    keys.append(cooldown_key(version, kind, namespace))
    args = (payload, "1" if pinned else "0", str(int(version)))
    outcome = int(redis.eval(_PUBLISH_LUA, len(keys), *keys, *args))
    if outcome == 1:
        log.info("drafter pointer -> %s v%d%s (%s)", kind, version, " (pinned)" if pinned else "", path)
    elif outcome == 2:
        log.warning("drafter %s v%d not published: it was rolled back and is cooling down", kind, version)
    else:
        log.info("drafter %s v%d recorded; the pointer stays (pinned or newer)", kind, version)
    return outcome == 1


def rollback_version(
    redis: Redis,
    bad_version: int,
    to_version: int,
    to_path: str | Path,
    cooldown_s: int,
    kind: str = DEFAULT_KIND,
    namespace: str = DEFAULT_NAMESPACE,
) -> bool:
    """Move the pointer from `bad_version` back to `to_version` (unpinned; `latest`
    too, so an unpin does not bring the bad one back) and keep `bad_version` from
    being published automatically for `cooldown_s` seconds. Atomic, and a no-op
    unless the pointer still names `bad_version` unpinned (another server rolled
    back first, an operator pinned, or a newer version arrived). Returns whether it moved."""
    payload = json.dumps(pointer_payload(to_version, to_path, False, kind))
    keys = [pointer_key(namespace), latest_key(namespace), updates_channel(namespace)]
    keys.append(cooldown_key(bad_version, kind, namespace))
    args = (str(int(bad_version)), payload, str(int(cooldown_s)))
    moved = bool(redis.eval(_ROLLBACK_LUA, len(keys), *keys, *args))
    if moved:
        log.warning(
            "drafter pointer rolled back %s v%d -> v%d; v%d cools down for %d s",
            kind, bad_version, to_version, bad_version, cooldown_s,
        )  # fmt: skip
    return moved


def decode_pointer(raw: bytes | str | None) -> dict[str, Any] | None:
    """A pointer JSON (from the key or a channel message) as a dict; None when
    absent or unreadable (logged)."""
    if raw is None:
        return None
    try:
        obj = json.loads(raw)
    except (TypeError, ValueError):
        log.warning("ignoring an unreadable drafter pointer: %r", raw[:200])
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("version"), int):
        log.warning("ignoring a drafter pointer without an integer version: %r", obj)
        return None
    return obj


def read_pointer(redis: Redis, namespace: str = DEFAULT_NAMESPACE) -> dict[str, Any] | None:
    """The current pointer, or None when there is none (or it is unreadable)."""
    return decode_pointer(redis.get(pointer_key(namespace)))


def read_latest(redis: Redis, namespace: str = DEFAULT_NAMESPACE) -> dict[str, Any] | None:
    """The newest automatically published version, or None."""
    return decode_pointer(redis.get(latest_key(namespace)))


def unpin(
    redis: Redis, checkpoint_dir: str | Path, kind: str = DEFAULT_KIND, namespace: str = DEFAULT_NAMESPACE
) -> dict[str, Any] | None:
    """Follow the newest version again: the pointer moves (unpinned) to the
    latest automatically published version, atomically; when Redis has no
    record of one, to the newest complete version on disk; with no version at
    all the pointer is deleted. Returns the new pointer."""
    keys = [pointer_key(namespace), latest_key(namespace), updates_channel(namespace)]
    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    raw = redis.eval(_UNPIN_LUA, len(keys), *keys, now)
    if raw is not None:
        pointer = decode_pointer(raw)
    else:
        versions = list_versions(checkpoint_dir, kind)
        if not versions:
            redis.delete(pointer_key(namespace))
            log.info("drafter pointer removed (unpinned, no version on disk)")
            return None
        pointer = pointer_payload(versions[-1], version_path(checkpoint_dir, versions[-1], kind), kind=kind)
        raw = json.dumps(pointer)
        pipe = redis.pipeline(transaction=True)
        pipe.set(keys[0], raw)
        pipe.publish(keys[2], raw)
        pipe.execute()
    log.info("drafter pointer unpinned -> %s", pointer)
    return pointer
