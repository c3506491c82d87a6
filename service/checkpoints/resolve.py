"""From the Redis pointer to a drafter version on this machine: the one
resolver of a pointer's path, and the choice of the version to load when a
server or the worker starts (docs/architecture.md).

- `resolve_path`: this server's own copy `<checkpoint_dir>/<kind>/v{N}` when
  it is complete, else the path the publisher wrote (another mount).
- `load_current`: the pointer's version (pinned or not) when it names the
  wanted kind and loads; else the newest version on disk that loads.
- `read_pointer_at_startup`: the pointer, or None when there is none or Redis
  cannot be reached (logged: the reloader catches up once Redis is back).

Generic over what loading means (a serving drafter, a trainable head): the
caller passes the loader. Imports no torch and no web framework."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from redis import Redis, RedisError

from .pointer import DEFAULT_NAMESPACE, read_pointer
from .store import DEFAULT_KIND, CheckpointError, is_complete, list_versions, version_path

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Loaded(Generic[T]):
    """A version that loaded: where it came from and what the loader returned."""

    kind: str
    version: int
    path: Path
    value: T
    from_pointer: bool  # False: the newest loadable version on disk (no usable pointer)


def resolve_path(
    checkpoint_dir: str | Path, version: int, pointer_path: str | None = None, kind: str = DEFAULT_KIND
) -> Path:
    """This server's own copy of `version` when it is complete, else the path
    the publisher wrote in the pointer (when it wrote one)."""
    local = version_path(checkpoint_dir, version, kind)
    if is_complete(local) or not pointer_path:
        return local
    return Path(pointer_path)


def pointer_kind(pointer: dict[str, Any]) -> str:
    """The drafter kind a pointer names (old pointers without one: eagle3)."""
    return str(pointer.get("kind") or DEFAULT_KIND)


def read_pointer_at_startup(redis: Redis, namespace: str = DEFAULT_NAMESPACE) -> dict[str, Any] | None:
    """The pointer; None when there is none or Redis fails (logged as a
    warning: the start-up falls back to the newest version on disk)."""
    try:
        return read_pointer(redis, namespace)
    except RedisError as exc:
        log.warning(
            "drafter pointer unreadable (Redis: %s): starting from the newest version on disk; "
            "the reloader follows the pointer once Redis is back",
            exc,
        )
        return None


def load_newest(
    checkpoint_dir: str | Path,
    load: Callable[[Path], T],
    kind: str = DEFAULT_KIND,
    skip: Collection[int] = (),
) -> Loaded[T] | None:
    """The newest complete version of `kind` (not in `skip`) whose `load`
    succeeds; versions that raise CheckpointError are logged and skipped."""
    for version in reversed(list_versions(checkpoint_dir, kind)):
        if version in skip:
            continue
        path = version_path(checkpoint_dir, version, kind)
        try:
            return Loaded(kind, version, path, load(path), from_pointer=False)
        except CheckpointError as exc:
            log.warning("skipping %s checkpoint v%d: %s", kind, version, exc)
    return None


def load_current(
    pointer: dict[str, Any] | None,
    checkpoint_dir: str | Path,
    load: Callable[[Path], T],
    kind: str = DEFAULT_KIND,
) -> Loaded[T] | None:
    """The version the pointer names, pinned or not, when it is of `kind` and
    loads; otherwise (no pointer, another kind, or a refused checkpoint:
    logged) the newest loadable version on disk. None when nothing loads."""
    tried: set[int] = set()
    if pointer is not None and pointer_kind(pointer) == kind:
        version = int(pointer["version"])
        path = resolve_path(checkpoint_dir, version, pointer.get("path"), kind)
        tried.add(version)
        try:
            return Loaded(kind, version, path, load(path), from_pointer=True)
        except CheckpointError as exc:
            log.error(
                "the published drafter %s v%d does not load (%s); using the newest loadable one", kind, version, exc
            )
    return load_newest(checkpoint_dir, load, kind, skip=tried)
