"""Session fixtures shared by the whole suite.

- `settings`: Settings for tests (model cache under the repo's `.cache/draftloop`
  unless DRAFTLOOP_CACHE_DIR says otherwise, a temporary checkpoint dir,
  ngram drafter, block log off).
- `default_model_dir`: the embedded default model, prepared once.
- `target`: the default model loaded in-process, once.
- `live_server` / `live_server_url`: one real `draftloop serve` process (uvicorn)
  on a free port for the whole session, stopped at the end.

Helpers for the test modules: `free_port`, `redis_or_skip` and `scratch_prefix`
(a real Redis and a key prefix of one's own), `redis_db` (a Redis database of one's own), `server_env` / `start_server` /
`stop_process`, `metric`."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from service.config import Settings

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = Path(os.environ.get("DRAFTLOOP_CACHE_DIR") or ROOT / ".cache" / "draftloop")
REDIS_HOST = "redis://127.0.0.1:6379"
SERVER_START_TIMEOUT_S = 300.0  # first run converts the default model (~20 s) on a slow CPU


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(
        cache_dir=CACHE_DIR,
        checkpoint_dir=tmp_path_factory.mktemp("checkpoints"),
        drafter="ngram",
        block_log=False,
        dtype="float32",  # the lossless tests compare with float32 references
    )


@pytest.fixture(scope="session")
def default_model_dir(settings: Settings) -> Path:
    from service.modelstore import fetch_default_model

    return fetch_default_model(settings.cache_dir, progress=log.info)


@pytest.fixture(scope="session")
def target(settings: Settings, default_model_dir: Path):
    from service.runtime import load_target

    return load_target(settings)


@dataclass
class LiveServer:
    url: str  # e.g. http://127.0.0.1:PORT
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_or_skip(url: str) -> redis.Redis:
    """A client of the Redis at `url`; skips the test when none answers."""
    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis at {url}: {exc}")
    return client


def scratch_prefix(client: redis.Redis, name: str) -> Iterator[str]:
    """A key prefix no other test uses (`name-<random>`); its keys are deleted
    afterwards. For fixtures: `yield from scratch_prefix(client, "test-x")`."""
    prefix = f"{name}-{uuid.uuid4().hex[:8]}"
    yield prefix
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)


@pytest.fixture
def redis_db() -> Iterator[str]:
    """A Redis database no one else uses (1-15, claimed in db 0), flushed afterwards:
    for tests that move the drafter pointer or run the worker, whose keys are global."""
    base = redis_or_skip(f"{REDIS_HOST}/0")
    owner = uuid.uuid4().hex
    for db in range(15, 0, -1):
        claim = f"draftloop:test:db:{db}"
        if base.set(claim, owner, nx=True, ex=1800):
            client = redis.Redis.from_url(f"{REDIS_HOST}/{db}")
            if client.dbsize() == 0:
                try:
                    yield f"{REDIS_HOST}/{db}"
                finally:
                    client.flushdb()
                    if base.get(claim) == owner.encode():
                        base.delete(claim)
                return
            base.delete(claim)
    pytest.skip("no free Redis database")


def _wait_healthy(server: LiveServer, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"the server exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"the server was not healthy after {timeout_s:.0f} s:\n{server.log_tail()}")


def server_env(cache_dir: Path, workdir: Path, **overrides: str) -> dict[str, str]:
    """The environment of a test server: this checkout importable, the shared model
    cache, a checkpoint dir of its own, ngram drafter, float32 and no block log unless overridden."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        "DRAFTLOOP_CACHE_DIR": str(cache_dir),
        "DRAFTLOOP_DRAFTER": "ngram",
        "DRAFTLOOP_CHECKPOINT_DIR": str(workdir / "checkpoints"),
        "DRAFTLOOP_BLOCK_LOG": "false",
        "DRAFTLOOP_DTYPE": "float32",  # not auto: outputs are compared with float32 references
        **overrides,
    }


def start_server(env: dict[str, str], workdir: Path, timeout_s: float = SERVER_START_TIMEOUT_S) -> LiveServer:
    """`python -m service.cli serve` on a free port, once healthy (its log in workdir)."""
    port = free_port()
    log_path = workdir / "server.log"
    cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    server = LiveServer(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        _wait_healthy(server, timeout_s)
    except BaseException:
        stop_process(proc)
        raise
    return server


def stop_process(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """Terminate `process` and wait for it; kill it if it lingers."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def metric(http: httpx.Client, name: str, **labels: str) -> float:
    """One sample of a server's /metrics (`http` has the server's base_url)."""
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(name)


@pytest.fixture(scope="session")
def live_server(
    settings: Settings, default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """`python -m service.cli serve` on a free port (one per session)."""
    workdir = tmp_path_factory.mktemp("live_server")
    server = start_server(server_env(settings.cache_dir, workdir), workdir)
    try:
        yield server
    finally:
        stop_process(server.process)


@pytest.fixture(scope="session")
def live_server_url(live_server: LiveServer) -> str:
    return live_server.url
