"""The training backlog on /metrics (service/runtime.py `backlog_probe`): what
the consumer group has not read, and what it read and did not ack, read from
a real Redis at scrape time; Redis down leaves the last values."""

from __future__ import annotations

import redis

from service.blocklog import TRAINING_GROUP
from service.config import Settings
from service.metrics import Metrics
from service.runtime import backlog_probe


def gauge(metrics: Metrics, state: str) -> float | None:
    return metrics.registry.get_sample_value("draftloop_block_backlog", {"state": state})


def test_backlog_counts_undelivered_and_pending_entries(redis_db: str) -> None:
    r = redis.Redis.from_url(redis_db)
    stream = "test-backlog-stream"
    r.delete(stream)
    try:
        for i in range(5):
            r.xadd(stream, {"i": i})
        r.xgroup_create(stream, TRAINING_GROUP, id="0")
        metrics = Metrics()
        probe = backlog_probe(Settings(redis_url=redis_db, block_stream=stream), metrics)
        assert probe is not None
        probe()
        assert (gauge(metrics, "undelivered"), gauge(metrics, "pending")) == (5.0, 0.0)
        r.xreadgroup(TRAINING_GROUP, "a-worker", {stream: ">"}, count=3)  # read, then "killed": never acked
        probe()
        assert (gauge(metrics, "undelivered"), gauge(metrics, "pending")) == (2.0, 3.0)
    finally:
        r.delete(stream)


def test_backlog_keeps_its_last_values_when_redis_is_down_and_is_off_without_a_block_log() -> None:
    metrics = Metrics()
    probe = backlog_probe(Settings(redis_url="redis://127.0.0.1:1/0"), metrics)
    probe()  # refused connection: no exception, no value
    assert gauge(metrics, "pending") is None
    assert backlog_probe(Settings(block_log=False), metrics) is None
