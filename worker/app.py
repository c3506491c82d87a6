"""The Celery app: `celery -A worker.app worker --concurrency 1` and
`celery -A worker.app beat`. Broker and result backend are the Redis of
settings.redis_url; beat enqueues `worker.tasks.opd_update` every
settings.opd_interval_s seconds.

Long GPU tasks: one at a time per worker (prefetch 1), acked only after they
finish and requeued if the worker process dies mid-task, so a crash never
loses an update; time limits stop a stuck one.

The trainer overrides (DRAFTLOOP_OPD_TRAIN, DRAFTLOOP_SFT_BOOTSTRAP) are
checked against the trainer configs here, so a typo fails at start-up, not
mid-task."""

from __future__ import annotations

from celery import Celery

from service.config import get_settings

from .train.config import check_trainer_settings

OPD_UPDATE_TASK = "worker.tasks.opd_update"
TASK_SOFT_TIME_LIMIT_S = 1800  # SoftTimeLimitExceeded: the task may still save a checkpoint
TASK_TIME_LIMIT_S = 2100  # then the process is killed
# The Redis broker redelivers an unacked task after this long; it must exceed the
# hard limit, or a long acks_late task would run twice.
VISIBILITY_TIMEOUT_S = TASK_TIME_LIMIT_S + 600

_settings = get_settings()
check_trainer_settings(_settings)

app = Celery("draftloop", broker=_settings.redis_url, backend=_settings.redis_url, include=["worker.tasks"])
app.conf.update(
    worker_prefetch_multiplier=1,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_soft_time_limit=TASK_SOFT_TIME_LIMIT_S,
    task_time_limit=TASK_TIME_LIMIT_S,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=24 * 3600,
    broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
    broker_connection_retry_on_startup=True,
    timezone="UTC",
    beat_schedule={
        "opd-update": {
            "task": OPD_UPDATE_TASK,
            "schedule": _settings.opd_interval_s,
            # a tick still queued when the next one comes is stale: drop it rather than pile up
            "options": {"expires": _settings.opd_interval_s},
        }
    },
)
