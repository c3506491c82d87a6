"""Celery tasks: `opd_update`, the self-improvement step beat runs every
DRAFTLOOP_OPD_INTERVAL_S seconds. The task itself only takes the Redis
training lock (a run that finds it held returns at once), reports progress to
Celery and calls `worker.update.run_update`, which describes one run."""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Task

from service.config import get_settings

from .app import OPD_UPDATE_TASK, app
from .lock import training_lock
from .update import run_update

log = logging.getLogger(__name__)

LOCK_NAME = "eagle3"
LOCK_TTL_S = 30.0  # renewed every LOCK_RENEW_S while held, so a killed trainer frees it within 30 s
LOCK_RENEW_S = 5.0


@app.task(bind=True, name=OPD_UPDATE_TASK, acks_late=True)
def opd_update(self: Task) -> dict[str, Any]:
    """Beat's periodic Draft-OPD update (`worker.update`)."""
    settings = get_settings()
    r = redis.Redis.from_url(settings.redis_url, socket_timeout=30, socket_connect_timeout=5)

    def progress(phase: str, **info: Any) -> None:
        log.info("opd_update: %s %s", phase, info)
        if self.request.id:  # run by a worker, not called directly
            self.update_state(state="PROGRESS", meta={"phase": phase, **info})

    with training_lock(r, LOCK_NAME, timeout_s=LOCK_TTL_S, renew_every_s=LOCK_RENEW_S) as acquired:
        if not acquired:
            log.info("opd_update: another update holds the training lock; skipping")
            return {"status": "locked"}
        return run_update(r, settings, progress=progress)
