"""Hot reload of the drafter (docs/architecture.md): follow the Redis pointer
of `service.checkpoints` and swap new versions into the engine while it serves.

A daemon thread subscribes to `{ns}:drafter:updates` and, as the fallback for
a missed message or a restarted Redis, re-reads `{ns}:drafter:current` every
`poll_interval_s` (and right after each (re)connect). When the pointer names
a version other than the serving one, the thread loads it -- off the decode
path; the eagle3 loader checks target id, shapes and sha256 -- and calls
`Engine.set_drafter`: new sequences use it, running ones finish on theirs.

- A checkpoint that fails to load is refused: the old drafter keeps serving,
  `draftloop_drafter_reloads_total{outcome="refused"}` counts it, the reason
  is logged, and the same (version, files) pair is not tried again; a
  directory whose files change (or appear) is tried once more.
- Redis down: the server keeps serving its drafter; the thread reconnects with
  exponential backoff (0.5 s doubling to `max_backoff_s`) and never dies.
- `reload_now`, `pin`, `unpin`: the synchronous operations of the admin API.
- Regression guard (`service.guard`, DRAFTLOOP_GUARD): after the pointer moves
  the server to a newer version of the same kind, each tick compares the
  per-request τ the new version serves with the old version's; when it is
  worse beyond the margin with confidence, the pointer goes back to the old
  version (`checkpoints.rollback_version`: atomic, with a cool-down before the
  bad version can be published again), `draftloop_drafter_rollbacks_total`
  counts it and the log says why. An operator pin ends the watch.

The reloader follows the pointer only when the server runs `DRAFTLOOP_DRAFTER`
`auto`, `hybrid` or `eagle3`; with an explicit other kind, `start` does nothing
(pins through the admin API still work). Each loaded version is served as
`runtime.serve_as` says (auto / hybrid: wrapped with prompt lookup). Imports no
web framework."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis import Redis, RedisError

from . import checkpoints
from .config import Settings
from .drafters import registry
from .drafters.base import Drafter
from .drafters.registry import Loader
from .engine import Engine, Sequence
from .guard import RegressionGuard, VersionKey
from .memory import release_freed_memory
from .metrics import Metrics
from .runtime import FOLLOWING_KINDS, Target, serve_as

log = logging.getLogger(__name__)

TRIMS_AFTER_SWAP = 3  # polls after a swap that return freed memory to the OS (service/memory.py)
TRIM_EVERY_S = 60.0  # and a trim this often: glibc keeps what serving frees (a soak's RSS crept 3 % in 15 min)


class ReloadError(Exception):
    """A reload the admin API asked for did not happen."""


class UnknownVersion(ReloadError, LookupError):
    """No complete checkpoint directory for that version."""


class CheckpointRefused(ReloadError):
    """The checkpoint exists but must not be served; the message says why."""


class PointerUnavailable(ReloadError):
    """Redis failed, so the pointer could not be read or written."""


@dataclass(frozen=True)
class Refusal:
    kind: str
    version: int
    path: str
    fingerprint: tuple | None  # the directory's files (name, mtime_ns, size) when refused
    reason: str


def fingerprint(path: Path) -> tuple | None:
    """Cheap identity of a checkpoint directory's contents (no hashing): the
    refusal memory retries a version only when this changes."""
    try:
        return tuple(
            sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in path.iterdir() if p.is_file())
        )
    except OSError:
        return None


class DrafterReloader:
    """Keeps `engine.drafter` at the version the Redis pointer names."""

    def __init__(
        self,
        engine: Engine,
        target: Target,
        settings: Settings,
        metrics: Metrics | None = None,
        *,
        namespace: str = checkpoints.DEFAULT_NAMESPACE,
        poll_interval_s: float = 5.0,
        max_backoff_s: float = 30.0,
        redis: Redis | None = None,
        loaders: Mapping[str, Loader] | None = None,  # None: the drafter registry
    ):
        # plain attribute copies, like BlockLogger.__init__'s: deliberate boilerplate
        self.engine = engine
        self.target = target
        self.settings = settings
        self.metrics = metrics
        self.namespace = namespace
        self.poll_interval_s = poll_interval_s
        self.max_backoff_s = max_backoff_s
        self.redis = redis or Redis.from_url(
            settings.redis_url, socket_timeout=5.0, socket_connect_timeout=2.0
        )
        self.loaders: Mapping[str, Loader] = loaders or registry.LOADERS
        self.follow = settings.drafter in FOLLOWING_KINDS
        self._lock = threading.RLock()  # one load + swap at a time (thread and admin API)
        self._refused: dict[tuple, Refusal] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._redis_ok = True
        self._trims_left = 0  # polls on which to trim freed memory (after a swap)
        self._next_trim = time.monotonic() + TRIM_EVERY_S
        self.guard: RegressionGuard | None = None
        if self.follow and settings.guard:
            self.guard = RegressionGuard(
                window=settings.guard_window,
                min_requests=settings.guard_min_requests,
                margin=settings.guard_margin,
                speed_margin=settings.guard_speed_margin,
                z=settings.guard_z,
            )
            engine.on_finish = self._observe

    # ---- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        if not self.follow:
            log.info("drafter hot reload off: DRAFTLOOP_DRAFTER=%s", self.settings.drafter)
            return
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="drafter-reloader", daemon=True)
        self._thread.start()
        log.info(
            "drafter hot reload on: channel %s, polling %s every %.1f s",
            checkpoints.updates_channel(self.namespace),
            checkpoints.pointer_key(self.namespace),
            self.poll_interval_s,
        )

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- the thread ----------------------------------------------------------
    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(checkpoints.updates_channel(self.namespace))
                self.check()  # catch up on whatever happened while not subscribed
                self.guard_tick()
                self._set_redis_ok(True)
                backoff = 0.5
                next_poll = time.monotonic() + self.poll_interval_s
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=min(0.5, self.poll_interval_s))
                    if (msg is not None and msg.get("type") == "message") or time.monotonic() >= next_poll:
                        self.check()  # a message is only a wake-up: the key is the truth
                        self.guard_tick()
                        self._trim_tick()
                        next_poll = time.monotonic() + self.poll_interval_s
            except RedisError as exc:
                self._set_redis_ok(False, exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
            except Exception:  # a bug must not end hot reload for the server's lifetime
                log.exception("drafter reloader: unexpected error; retrying in %.1f s", backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:
                        pass

    def _set_redis_ok(self, ok: bool, exc: Exception | None = None, backoff: float = 0.0) -> None:
        if ok and not self._redis_ok:
            log.info("drafter reloader: Redis reachable again")
        elif not ok:
            level = logging.WARNING if self._redis_ok else logging.DEBUG
            log.log(
                level,
                "drafter reloader: Redis unavailable (%s); serving on, retrying in %.1f s",
                exc,
                backoff,
            )
        self._redis_ok = ok

    # ---- following the pointer -------------------------------------------------
    def check(self) -> bool:
        """Read the pointer and apply it. Returns whether the drafter changed.
        Raises RedisError when Redis fails (the thread reconnects)."""
        with self._lock:
            pointer = checkpoints.read_pointer(self.redis, self.namespace)
            if pointer is None:
                return False
            return self._apply(pointer)

    def _apply(self, pointer: dict[str, Any]) -> bool:
        kind, version = checkpoints.pointer_kind(pointer), int(pointer["version"])
        if self._serving(kind, version):
            return False
        path = checkpoints.resolve_path(self.settings.checkpoint_dir, version, pointer.get("path"), kind)
        files = fingerprint(path)
        key = (kind, version, str(path), files)
        if key in self._refused:
            log.debug("drafter %s v%d was refused before and is unchanged; not retrying", kind, version)
            return False
        try:
            drafter = self._load(kind, version, path)
        except CheckpointRefused as exc:
            self._refused[key] = Refusal(kind, version, str(path), files, str(exc))
            return False
        old = self._version_key(self.engine.drafter)
        self._swap(drafter)
        self._watch_swap(old, (kind, str(version)), pinned=bool(pointer.get("pinned")))
        return True

    # ---- the regression guard -----------------------------------------------
    @staticmethod
    def _version_key(drafter: Drafter) -> VersionKey:
        return (drafter.checkpoint_kind or drafter.kind, str(drafter.version))

    def _observe(self, seq: Sequence) -> None:
        """Engine thread: a finished sequence's τ, for the version that drafted it."""
        if self.guard is not None and seq.drafter is not None:
            self.guard.observe(
                self._version_key(seq.drafter), seq.num_drafts, seq.num_accepted, seq.decode_tokens, seq.decode_s
            )

    def _watch_swap(self, old: VersionKey, new: VersionKey, pinned: bool) -> None:
        """Watch an automatic upgrade (same kind, a higher version whose
        predecessor is on disk); any other swap ends the watch."""
        if self.guard is None:
            return
        old_path = None
        if not pinned and old[0] == new[0] and old[1].isdigit() and int(old[1]) < int(new[1]):
            old_path = checkpoints.version_path(self.settings.checkpoint_dir, int(old[1]), old[0])
        if old_path is None or not checkpoints.is_complete(old_path):
            self.guard.stop_watching()
            return
        self.guard.watch(old, new, str(old_path))

    def guard_tick(self) -> None:
        """Act on the guard's verdict: keep the new version, wait, or roll the
        pointer back (then follow it). Raises RedisError when Redis fails (the
        watch goes on; the thread retries)."""
        guard = self.guard
        if guard is None:
            return
        with self._lock:  # not between an admin pin and its stop_watching
            watch, verdict = guard.watching, guard.verdict()
            if watch is None or verdict is None or verdict.decision == "wait":
                return
            kind, new_version, old_version = watch.new[0], int(watch.new[1]), int(watch.old[1])
            if verdict.decision == "keep":
                log.info("regression guard: keeping %s v%d: %s", kind, new_version, verdict.reason)
                guard.stop_watching()
                return
            log.warning(
                "regression guard: rolling back %s v%d to v%d: %s",
                kind, new_version, old_version, verdict.reason,
            )  # fmt: skip
            moved = checkpoints.rollback_version(
                self.redis, new_version, old_version, watch.old_path, self.settings.guard_cooldown_s,
                kind=kind, namespace=self.namespace,
            )  # fmt: skip
            guard.stop_watching()
            if moved and self.metrics is not None:
                self.metrics.drafter_rollbacks.labels(reason=verdict.label).inc()
            self.check()  # follow the pointer back now (another server may have moved it first)

    def _serving(self, kind: str, version: int) -> bool:
        serving = self.engine.drafter
        return (serving.checkpoint_kind or serving.kind) == kind and str(serving.version) == str(version)

    def _load(self, kind: str, version: int, path: Path) -> Drafter:
        """Load (never swap); any failure becomes CheckpointRefused, counted and logged."""
        t0 = time.perf_counter()
        try:
            loader = registry.loader_for(kind, self.loaders)
            if not path.is_dir():
                raise FileNotFoundError(f"{path}: no such checkpoint directory")
            drafter = loader(path, self.target)
            if str(drafter.version) != str(version):
                raise ValueError(
                    f"{path}: its manifest says version {drafter.version}, the pointer says {version}"
                )
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            if self.metrics is not None:
                self.metrics.drafter_reloads.labels(outcome="refused").inc()
            log.error(
                "drafter %s v%d refused, still serving %s v%s: %s",
                kind,
                version,
                self.engine.drafter.kind,
                self.engine.drafter.version,
                reason,
            )
            raise CheckpointRefused(reason) from exc
        log.info("drafter %s v%d loaded from %s in %.2f s", kind, version, path, time.perf_counter() - t0)
        return serve_as(self.settings, drafter)

    def _swap(self, drafter: Drafter) -> None:
        old = self.engine.drafter
        self.engine.set_drafter(drafter)
        if self.metrics is not None:
            self.metrics.drafter_reloads.labels(outcome="ok").inc()
        log.info("drafter swapped: %s v%s -> %s v%s", old.kind, old.version, drafter.kind, drafter.version)
        # the old drafter is freed once the sequences it still drafts for finish: trim on the next polls
        self._trims_left = TRIMS_AFTER_SWAP

    def _trim_tick(self) -> None:
        """Reloader thread: give freed memory back to the OS, on the polls after a
        swap (the old drafter) and once every TRIM_EVERY_S (what serving freed)."""
        now = time.monotonic()
        if self._trims_left > 0 or now >= self._next_trim:
            after_swap = self._trims_left > 0  # then collect too: the old drafter may sit in a cycle
            self._trims_left = max(self._trims_left - 1, 0)
            self._next_trim = now + TRIM_EVERY_S
            release_freed_memory(collect=after_swap)

    # ---- admin operations (synchronous) -----------------------------------------
    def _complete_path(self, version: int, kind: str) -> Path:
        if version not in checkpoints.list_versions(self.settings.checkpoint_dir, kind):
            raise UnknownVersion(
                f"no complete {kind} checkpoint v{version} in {self.settings.checkpoint_dir}"
            )
        return checkpoints.version_path(self.settings.checkpoint_dir, version, kind)

    def reload_now(self, version: int, kind: str = checkpoints.DEFAULT_KIND) -> Drafter:
        """Load version `version` and serve it now, without touching the pointer
        (the thread moves back to the pointer's version on its next check).
        Raises UnknownVersion or CheckpointRefused."""
        with self._lock:
            if self._serving(kind, version):
                return self.engine.drafter
            drafter = self._load(kind, version, self._complete_path(version, kind))
            self._swap(drafter)
            return drafter

    def pin(self, version: int, kind: str = checkpoints.DEFAULT_KIND) -> dict[str, Any]:
        """Serve `version` and pin the pointer to it (every server follows; the
        worker's new versions no longer move it). Loads first, so a refused
        checkpoint changes nothing. Returns the pointer. Raises UnknownVersion,
        CheckpointRefused or PointerUnavailable (nothing swapped)."""
        with self._lock:
            path = self._complete_path(version, kind)
            drafter = None if self._serving(kind, version) else self._load(kind, version, path)
            try:
                checkpoints.publish_version(
                    self.redis, version, path, pinned=True, kind=kind, namespace=self.namespace
                )
            except RedisError as exc:
                raise PointerUnavailable(f"Redis unavailable, the pin was not recorded: {exc}") from exc
            if drafter is not None:
                self._swap(drafter)
            if self.guard is not None:
                self.guard.stop_watching()  # the operator decides now
            return checkpoints.pointer_payload(version, path, pinned=True, kind=kind)

    def unpin(self, kind: str = checkpoints.DEFAULT_KIND) -> dict[str, Any] | None:
        """Follow the newest published version again (see checkpoints.unpin) and
        apply it now. Returns the new pointer. Raises PointerUnavailable."""
        with self._lock:
            try:
                pointer = checkpoints.unpin(self.redis, self.settings.checkpoint_dir, kind, self.namespace)
            except RedisError as exc:
                raise PointerUnavailable(f"Redis unavailable, nothing changed: {exc}") from exc
            if pointer is not None:
                self._apply(pointer)
            return pointer

    def status(self) -> dict[str, Any]:
        """What is served, what the pointer says, what exists on disk."""
        out: dict[str, Any] = {
            "serving": self.engine.drafter.describe(),
            "following": self.follow,
            "running": self.running,
            "versions": checkpoints.list_versions(self.settings.checkpoint_dir, checkpoints.DEFAULT_KIND),
            "refused": [
                {"version": r.version, "path": r.path, "reason": r.reason}
                for r in list(self._refused.values())
            ],
        }
        try:
            out["pointer"] = checkpoints.read_pointer(self.redis, self.namespace)
            out["latest_published"] = checkpoints.read_latest(self.redis, self.namespace)
            out["redis"] = "ok"
        except RedisError as exc:
            out.update(pointer=None, latest_published=None, redis=f"unavailable: {exc}")
        return out
