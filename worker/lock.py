"""A Redis lock so that two updates never train the same drafter at once (two
workers, or a beat tick that arrives while the previous update still runs)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import redis
from redis.exceptions import LockError

log = logging.getLogger(__name__)

# Outlives the task hard time limit (worker.app.TASK_TIME_LIMIT_S = 2100 s), so a
# live trainer never loses its lock; a killed one frees it after this long.
DEFAULT_LOCK_TIMEOUT_S = 2400.0


def lock_key(name: str) -> str:
    return f"draftloop:lock:train:{name}"


@contextmanager
def training_lock(r: redis.Redis, name: str, timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> Iterator[bool]:
    """`with training_lock(r, drafter_name) as acquired:` — never waits; yields
    whether this caller holds the lock (if not, skip the update)."""
    lock = r.lock(lock_key(name), timeout=timeout_s, blocking=False)
    acquired = bool(lock.acquire(blocking=False))
    try:
        yield acquired
    finally:
        if acquired:
            try:
                lock.release()
            except LockError:  # expired and maybe taken by someone else: nothing of ours to free
                log.warning("training lock %s expired before release", name)
