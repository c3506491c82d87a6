"""The processes of a soak run, each a child of the benchmark: a Redis of its
own (a free port, AOF on, so a restart keeps the stream and the pointer as a
production Redis would), a `draftloop serve` server and a Celery worker, and
the probes the report reads (/metrics, the server's RSS, Redis INFO)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

from service.stack import allocator_env

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, cond: Callable[[], object], timeout_s: float, every_s: float = 0.25) -> object:
    """Poll `cond` until truthy; TimeoutError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@dataclass
class Child:
    """A child process and its log file."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None

    def start(self) -> Child:
        with open(self.log_path, "ab") as f:
            self.process = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT)
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill9(self) -> None:
        if self.alive:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def stop(self, timeout_s: float = 30.0) -> None:
        if not self.alive:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill9()

    def tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def start_serve(workdir: Path, cache_dir: Path, env: dict[str, str], timeout_s: float = 300) -> tuple[Child, str]:
    """A `draftloop serve` child on a free port with `env` over this environment
    (this checkout importable, `cache_dir` as the model cache, a checkpoint dir
    in `workdir`), once /health answers. -> (the child, its base URL)."""
    port = free_port()
    full = {
        **os.environ, "PYTHONPATH": str(ROOT), "DRAFTLOOP_CACHE_DIR": str(cache_dir),
        "DRAFTLOOP_CHECKPOINT_DIR": str(workdir / "checkpoints"), **env,
    }  # fmt: skip
    cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    server = Child("server", cmd, full, workdir / "server.log").start()
    url = f"http://127.0.0.1:{port}"
    wait_healthy(server, url, timeout_s)
    return server, url


def wait_healthy(server: Child, url: str, timeout_s: float) -> None:
    """Until `url`/health answers 200; RuntimeError with its log tail if the server exits."""

    def healthy() -> bool:
        if not server.alive:
            raise RuntimeError(f"the server exited:\n{server.tail()}")
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for("the server to be healthy", healthy, timeout_s)


def rss_bytes(pid: int) -> int | None:
    """Resident set size of `pid` (Linux /proc), None when unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def scrape(url: str) -> dict[str, float]:
    """/metrics as {"name{k=v,...}": value} (labels sorted), plus {"name": sum over
    its label sets} for labelled samples; {} when unreachable."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            if labels:
                out[f"{s.name}{{{labels}}}"] = s.value
                out[s.name] = out.get(s.name, 0.0) + s.value
            else:
                out[s.name] = s.value
    return out


@dataclass
class SoakStack:
    """Redis, server and worker for one soak run, in `workdir`."""

    workdir: Path
    cache_dir: Path
    api_key: str = field(default_factory=lambda: f"sk-soak-{uuid.uuid4().hex}")
    server_env: dict[str, str] = field(default_factory=dict)  # extra DRAFTLOOP_* for the server
    worker_env: dict[str, str] = field(default_factory=dict)  # extra DRAFTLOOP_* for the worker

    def __post_init__(self) -> None:
        self.redis_port = free_port()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.checkpoint_dir = self.workdir / "checkpoints"
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.redis = redis.Redis(port=self.redis_port, socket_timeout=5, socket_connect_timeout=2)
        self.redis_proc: Child | None = None
        self.server: Child | None = None
        self.worker: Child | None = None
        self.worker_starts = 0

    # ---- environment ----------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "DRAFTLOOP_CACHE_DIR": str(self.cache_dir),
            "DRAFTLOOP_CHECKPOINT_DIR": str(self.checkpoint_dir),
            "DRAFTLOOP_REDIS_URL": self.redis_url,
            "DRAFTLOOP_DTYPE": "float32",
            **allocator_env(),
            **extra,
        }

    # ---- Redis ------------------------------------------------------------------
    def start_redis(self) -> None:
        if shutil.which("redis-server") is None:
            raise SystemExit("the soak needs redis-server on PATH")
        cmd = [
            "redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(self.workdir),
        ]  # fmt: skip
        self.redis_proc = Child("redis", cmd, dict(os.environ), self.workdir / "redis.log").start()
        wait_for("redis-server", self._pings, 10, 0.05)

    def _pings(self) -> bool:
        try:
            return bool(self.redis.ping())
        except redis.RedisError:
            return False

    def restart_redis(self, down_s: float) -> None:
        """SHUTDOWN (the AOF is flushed), `down_s` seconds down, then the same port again."""
        try:
            self.redis.shutdown()
        except redis.RedisError:
            pass  # the connection closes as it goes down
        self.redis_proc.process.wait(30)
        time.sleep(down_s)
        self.start_redis()

    # ---- server and worker ---------------------------------------------------------
    def start_server(self, timeout_s: float = 300.0) -> None:
        cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        env = self.env(DRAFTLOOP_API_KEYS=self.api_key, **self.server_env)
        self.server = Child("server", cmd, env, self.workdir / "server.log").start()
        wait_healthy(self.server, self.url, timeout_s)

    def start_worker(self) -> None:
        self.worker_starts += 1
        cmd = [
            sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--concurrency", "1", "--pool", "solo",
            "--loglevel", "INFO", "-n", f"soak-{uuid.uuid4().hex[:8]}@%h", "--without-gossip", "--without-mingle",
        ]  # fmt: skip
        log_path = self.workdir / f"worker-{self.worker_starts}.log"
        self.worker = Child("worker", cmd, self.env(**self.worker_env), log_path).start()

    def server_rss(self) -> int | None:
        return rss_bytes(self.server.process.pid) if self.server is not None and self.server.alive else None

    def redis_info(self) -> dict[str, int]:
        info = self.redis.info("memory")
        return {"used_memory": int(info["used_memory"]), "used_memory_peak": int(info["used_memory_peak"])}

    def stop(self) -> None:
        for child in (self.worker, self.server):
            if child is not None:
                child.stop()
        if self.redis_proc is not None and self.redis_proc.alive:
            try:
                self.redis.shutdown(nosave=True)
            except redis.RedisError:
                pass
            self.redis_proc.stop()
