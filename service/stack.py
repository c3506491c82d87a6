"""`draftloop up`: the whole loop on one machine — Redis (started if none
answers), the server, one Celery worker and beat — as child processes that
stop together. Docker Compose does the same in production (docker/)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from .config import DEFAULT_MODEL, Settings
from .modelstore import fetch_default_model

log = logging.getLogger(__name__)

# glibc malloc: at most two arenas per process. With its default (8 per core) the
# server's threads (engine loop, HTTP pool, block-log writer) each grow an arena
# and RSS creeps up under steady traffic (docs/results.md, soak). An explicit
# setting in the environment wins.
ALLOCATOR_ENV = {"MALLOC_ARENA_MAX": "2"}


def allocator_env() -> dict[str, str]:
    """ALLOCATOR_ENV, less what the environment already sets."""
    return {k: v for k, v in ALLOCATOR_ENV.items() if k not in os.environ}


def ensure_redis(url: str) -> subprocess.Popen | None:
    """Ping Redis; when nothing answers on a local URL, start a throwaway redis-server."""
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        client.ping()
        return None
    except redis.RedisError:
        pass
    host, port = client.connection_pool.connection_kwargs["host"], client.connection_pool.connection_kwargs["port"]
    if host not in ("127.0.0.1", "localhost") or shutil.which("redis-server") is None:
        raise SystemExit(f"Redis at {url} does not answer; start it (or install redis-server)")
    log.info("starting redis-server on %s:%s", host, port)
    proc = subprocess.Popen(
        ["redis-server", "--bind", host, "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(50):
        try:
            client.ping()
            return proc
        except redis.RedisError:
            time.sleep(0.1)
    raise SystemExit("redis-server did not come up")


def commands(settings: Settings) -> dict[str, list[str]]:
    py = sys.executable
    schedule = Path(settings.cache_dir) / "celerybeat-schedule"
    return {
        "server": [py, "-m", "service.cli", "serve"],
        "worker": [py, "-m", "celery", "-A", "worker.app", "worker", "--concurrency", "1", "--loglevel", "INFO"],
        "beat": [py, "-m", "celery", "-A", "worker.app", "beat", "--loglevel", "INFO", "--schedule", str(schedule)],
    }


def thread_envs(settings: Settings, cpus: int | None = None) -> dict[str, dict[str, str]]:
    """Per-process OpenMP threads on a CPU: the server and the worker each get half
    the cores. Two torch processes that both take every core (OpenMP's default)
    slow each other many times over whenever the worker trains while the server
    decodes (docs/results.md). An explicit OMP_NUM_THREADS in the environment wins."""
    from .runtime import pick_device

    if "OMP_NUM_THREADS" in os.environ or pick_device(settings.device).type != "cpu":
        return {}
    half = str(max(1, (cpus or os.cpu_count() or 2) // 2))
    return {"server": {"OMP_NUM_THREADS": half}, "worker": {"OMP_NUM_THREADS": half}}


def up(settings: Settings) -> int:
    if settings.target_model == DEFAULT_MODEL:
        fetch_default_model(settings.cache_dir, progress=log.info)
    Path(settings.cache_dir).mkdir(parents=True, exist_ok=True)
    redis_proc = ensure_redis(settings.redis_url)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **allocator_env())
    threads = thread_envs(settings)
    procs: dict[str, subprocess.Popen] = {}
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        for name, cmd in commands(settings).items():
            log.info("starting %s: %s", name, " ".join(cmd))
            procs[name] = subprocess.Popen(cmd, env={**env, **threads.get(name, {})})
        log.info(
            "draftloop is up: http://%s:%d/v1/completions, metrics at /metrics; Ctrl-C stops everything",
            settings.host,
            settings.port,
        )
        while not stopping:
            for name, p in procs.items():
                if p.poll() is not None:
                    log.error("%s exited with code %s; stopping the stack", name, p.returncode)
                    stopping = True
            time.sleep(0.5)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + 30
        for p in procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
        if redis_proc is not None:
            redis_proc.terminate()
    return 0
