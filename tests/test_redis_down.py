"""Redis unreachable while a real `draftloop serve` process serves (issue #4 (c)):
requests go on succeeding with the same greedy text, the block records that
cannot be written are counted in `draftloop_block_records_dropped_total`, and
once a Redis is back on the same port the writer resumes by itself
(`draftloop_block_records_written_total` and the stream grow again).

The server's Redis is a throwaway redis-server of this test, so stopping it
touches nothing else; the server's writer backs off at most 2 s between tries."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis

from service.config import Settings

from .conftest import LiveServer, free_port, metric, server_env, start_server, stop_process
from .throwaway_redis import AVAILABLE, start_redis, stop_redis, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not AVAILABLE, reason="needs the redis-server binary")]

MODEL = "smollm2-135m-instruct"
PROMPTS = ["The three primary colors are", "def add(a, b):\n    return", "Paris is the capital of"]
MAX_TOKENS = 12
STREAM = "draftloop:blocks"
WRITTEN = "draftloop_block_records_written_total"
DROPPED = "draftloop_block_records_dropped_total"


@pytest.fixture
def redis_port(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    client = start_redis(port, tmp_path)
    yield port
    stop_redis(client)  # whichever server is on the port by then


@pytest.fixture
def server(redis_port: int, settings: Settings, default_model_dir: Path, tmp_path: Path) -> Iterator[LiveServer]:
    env = server_env(
        settings.cache_dir,
        tmp_path,
        OMP_NUM_THREADS="1",  # the test process and the server share the cores
        DRAFTLOOP_DRAFTER="ngram",
        DRAFTLOOP_BLOCK_LOG="true",
        DRAFTLOOP_BLOCK_STREAM=STREAM,
        DRAFTLOOP_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
    )
    live = start_server(env, tmp_path)
    yield live
    stop_process(live.process)


def complete(client: openai.OpenAI, prompt: str) -> str:
    """A greedy completion that must come back whole (the client raises on any non-2xx)."""
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason in ("length", "stop") and r.usage.completion_tokens > 0
    assert choice.text.strip(), r
    return choice.text


def settle(http: httpx.Client, name: str, quiet_s: float = 0.5, timeout: float = 20.0) -> float:
    """A counter once it has not moved for `quiet_s` (the writer drains its queue
    within ms; after a failed write it backs off up to 2 s before the next try)."""
    deadline = time.monotonic() + timeout
    last = metric(http, name)
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = metric(http, name)
        if now == last:
            return now
        last = now
    raise AssertionError(f"{name} kept moving for {timeout:.0f} s")


def test_requests_succeed_while_redis_is_down_and_logging_resumes(
    server: LiveServer, redis_port: int, tmp_path: Path
) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
    http = httpx.Client(base_url=server.url, timeout=30)
    r = redis.Redis(port=redis_port, socket_timeout=1)

    # 1. Redis up: every request's verify steps reach the stream
    before = [complete(client, p) for p in PROMPTS]
    written_up = settle(http, WRITTEN)
    assert written_up >= len(PROMPTS) * 2, server.log_tail()  # >= 2 verify steps per request
    assert metric(http, DROPPED) == 0 and r.xlen(STREAM) == written_up

    # 2. Redis gone: the same requests succeed with the same text; their records are dropped and counted
    stop_redis(r)
    during = [complete(client, p) for p in PROMPTS]
    assert during == before, "greedy output changed while Redis was down"
    dropped_down = settle(http, DROPPED, quiet_s=2.5)
    assert dropped_down >= len(PROMPTS) * 2, server.log_tail()
    assert metric(http, WRITTEN) == written_up
    assert http.get("/health").status_code == 200

    # 3. A fresh, empty Redis on the same port: the writer reconnects by itself
    r = start_redis(redis_port, tmp_path)

    def delivered() -> bool:
        complete(client, PROMPTS[0])
        return r.xlen(STREAM) > 0

    assert wait_until(delivered, 20.0, every_s=0.5), f"block log did not resume:\n{server.log_tail()}"
    resumed, dropped = settle(http, WRITTEN), metric(http, DROPPED)
    assert resumed - written_up == r.xlen(STREAM) > 0
    # from now on every record is written, none dropped
    assert complete(client, PROMPTS[1]) == before[1]
    assert settle(http, WRITTEN) > resumed
    assert metric(http, WRITTEN) - written_up == r.xlen(STREAM)
    assert metric(http, DROPPED) == dropped
    http.close()
