"""A Redis lock so that two updates never train the same drafter at once (two
workers, or a beat tick that arrives while the previous update still runs)."""

from __future__ import annotations

import logging
import threading
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
def training_lock(
    r: redis.Redis, name: str, timeout_s: float = DEFAULT_LOCK_TIMEOUT_S, renew_every_s: float | None = None
) -> Iterator[bool]:
    """`with training_lock(r, drafter_name) as acquired:` — never waits; yields
    whether this caller holds the lock (if not, skip the update).

    With `renew_every_s`, a daemon thread resets the lock's TTL to `timeout_s`
    every `renew_every_s` seconds while it is held: a short `timeout_s` then
    frees the lock soon after a holder is killed (SIGKILL, OOM, lost machine)
    instead of after the task's whole time limit."""
    # thread_local=False: the renewing thread must see the token the acquiring thread got
    lock = r.lock(lock_key(name), timeout=timeout_s, blocking=False, thread_local=False)
    acquired = bool(lock.acquire(blocking=False))
    stop = threading.Event()
    renewer = None
    if acquired and renew_every_s is not None:
        renewer = threading.Thread(target=_renew, args=(lock, name, renew_every_s, stop), daemon=True)
        renewer.start()
    try:
        yield acquired
    finally:
        stop.set()
        if renewer is not None:
            renewer.join(timeout=5.0)
        if acquired:
            try:
                lock.release()
            except LockError:  # expired and maybe taken by someone else: nothing of ours to free
                log.warning("training lock %s expired before release", name)


def _renew(lock, name: str, every_s: float, stop: threading.Event) -> None:
    while not stop.wait(every_s):
        try:
            lock.reacquire()
        except LockError:
            log.error("training lock %s was lost (expired and taken over); not renewing it", name)
            return
        except redis.RedisError as e:  # Redis hiccup: try again next period, the TTL covers a few misses
            log.warning("training lock %s: renewal failed (%s)", name, e)
