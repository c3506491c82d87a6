"""The soak in short (benchmarks/soak.py, about 3 minutes on one core): the
real stack -- a Redis of its own, `draftloop serve` with an API key, a Celery
worker -- under steady traffic from the official `openai` client while every
fault is injected once: kill -9 of the worker mid-update, a Redis restart,
clients that hang up mid-stream, a corrupt checkpoint and a randomised head
published through the pointer. No request may fail but the ones the soak cuts
off itself, and every fault must show in the report (and on /metrics where
the server has a series for it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from benchmarks.soak import soak

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary"),
]

FAULTS = ["worker_kill", "redis_restart", "update", "disconnects", "corrupt_checkpoint", "bad_drafter"]


def test_short_soak(settings, default_model_dir, tmp_path: Path) -> None:
    report = soak(minutes=0.5, out=tmp_path / "soak.json", clients=2, cache_dir=settings.cache_dir)
    req = report["requests"]
    assert req["failed"] == 0, req["failures_by_reason"]
    assert req["aborted_by_the_soak"] == 3 and req["ok"] >= 20 and 0 < req["streaming"] < req["ok"]
    faults = {f["fault"]: f for f in report["faults"]}
    assert list(faults) == FAULTS
    assert report["all_faults_in_report"], report["faults"]
    assert all(f["on_metrics"] for f in faults.values() if f["metric"] is not None), report["faults"]
    assert faults["worker_kill"]["blocks_read_not_acked"] > 0  # killed after reading, before acking
    assert faults["redis_restart"]["pointer_kept"]
    assert faults["bad_drafter"]["cooldown_set"] and report["versions"]["rolled_back"] == 1
    assert report["versions"]["refused"] == 1
    assert report["versions"]["serving_at_end"] == report["versions"]["pointer_at_end"]["version"]
    assert report["stream"]["within_cap"] and report["block_records"]["written"] > 0
    assert report["server_rss_bytes"]["end"] is not None
