"""The Celery app's configuration, and the training lock against a real Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from service.config import get_settings
from worker.app import OPD_UPDATE_TASK, TASK_SOFT_TIME_LIMIT_S, TASK_TIME_LIMIT_S, app
from worker.lock import lock_key, training_lock

from .conftest import redis_or_skip

ROOT = Path(__file__).resolve().parents[1]


def test_app_config() -> None:
    s = get_settings()
    c = app.conf
    assert c.broker_url == s.redis_url and c.result_backend == s.redis_url
    assert c.worker_prefetch_multiplier == 1
    assert c.task_acks_late is True and c.task_reject_on_worker_lost is True
    assert (c.task_soft_time_limit, c.task_time_limit) == (TASK_SOFT_TIME_LIMIT_S, TASK_TIME_LIMIT_S)
    assert TASK_SOFT_TIME_LIMIT_S < TASK_TIME_LIMIT_S < c.broker_transport_options["visibility_timeout"]
    assert c.task_serializer == c.result_serializer == "json" and list(c.accept_content) == ["json"]
    assert "worker.tasks" in c.include
    (entry,) = c.beat_schedule.values()
    assert entry["task"] == OPD_UPDATE_TASK == "worker.tasks.opd_update"
    assert entry["schedule"] == s.opd_interval_s


def test_app_reads_settings_from_env_and_imports_standalone() -> None:
    # A fresh interpreter: importing the app must not need worker.tasks (written later)
    # and must take the broker and the beat interval from DRAFTLOOP_* variables.
    code = (
        "import json; from worker.app import app; c = app.conf; "
        "print(json.dumps([c.broker_url, c.result_backend, c.beat_schedule['opd-update']['schedule']]))"
    )
    env = {**os.environ, "DRAFTLOOP_REDIS_URL": "redis://127.0.0.1:6390/3", "DRAFTLOOP_OPD_INTERVAL_S": "7.5"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == ["redis://127.0.0.1:6390/3", "redis://127.0.0.1:6390/3", 7.5]
    celery = Path(sys.executable).with_name("celery")
    res = subprocess.run(
        [str(celery), "-A", "worker.app", "inspect", "--help"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert res.returncode == 0, res.stderr


@pytest.fixture
def r() -> redis.Redis:
    return redis_or_skip(get_settings().redis_url)


def test_training_lock_excludes_a_second_holder(r: redis.Redis) -> None:
    name = f"test-{uuid.uuid4().hex}"
    with training_lock(r, name) as first:
        assert first
        t0 = time.perf_counter()
        with training_lock(r, name) as second:
            assert not second
        assert time.perf_counter() - t0 < 0.5  # never waits
        assert r.exists(lock_key(name))  # the loser did not release the holder's lock
    assert not r.exists(lock_key(name))
    with training_lock(r, name) as again:
        assert again


def test_expired_lock_is_taken_over_without_error(r: redis.Redis) -> None:
    name = f"test-{uuid.uuid4().hex}"
    with training_lock(r, name, timeout_s=0.1) as first:
        assert first
        time.sleep(0.2)  # a holder killed past its timeout
        with training_lock(r, name) as second:
            assert second
    # the second released its own lock; the stale holder's exit found nothing of its own and did not raise
    assert not r.exists(lock_key(name))


def test_renewed_lock_outlives_its_timeout_and_frees_after_the_holder(r: redis.Redis) -> None:
    name = f"test-{uuid.uuid4().hex}"
    with training_lock(r, name, timeout_s=0.5, renew_every_s=0.1) as held:
        assert held
        time.sleep(1.2)  # well past the timeout: only the renewals keep it
        assert r.exists(lock_key(name))
        with training_lock(r, name) as other:
            assert not other
        assert 0 < r.pttl(lock_key(name)) <= 500
    assert not r.exists(lock_key(name))
