"""Throwaway `redis-server` processes for outage tests: start one on a port,
shut it down, start a fresh one on the same port."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

AVAILABLE = shutil.which("redis-server") is not None


def wait_until(cond: Callable[[], bool], timeout: float = 5.0, every_s: float = 0.02) -> bool:
    """Poll `cond` until it holds or `timeout` passes; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every_s)
    return cond()


def pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def start_redis(port: int, workdir: Path) -> redis.Redis:
    """A daemonized, empty, non-persistent redis-server on 127.0.0.1:`port`, and a
    client to it that fails fast while it is down."""
    subprocess.run(
        [
            "redis-server",
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "yes",
            "--dir", str(workdir),
            "--logfile", str(Path(workdir) / f"redis-{port}.log"),
        ],
        check=True,
    )
    client = redis.Redis(port=port, socket_timeout=1, retry=Retry(NoBackoff(), 0))
    assert wait_until(lambda: pings(client), 5.0), "throwaway redis-server did not come up"
    return client


def stop_redis(client: redis.Redis) -> None:
    try:
        client.shutdown(nosave=True)
    except redis.RedisError:
        pass  # already gone, or the connection closed as it went down
    assert wait_until(lambda: not pings(client), 5.0)
