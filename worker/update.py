"""One Draft-OPD update of the eagle3 drafter from served traffic, as the
Celery task `worker.tasks.opd_update` runs it (the self-improvement loop,
docs/architecture.md).

One run, under the Redis training lock (the caller holds it):
1. While the SFT bootstrap lasts (no eagle3 version yet, or its budget is not
   spent): one bootstrap tick (`worker.bootstrap`): served requests' tokens
   join the pool, generation and a training slice, and the gate publishes the
   tick's head only when it beats the serving drafter (ngram for
   DRAFTLOOP_DRAFTER=auto before any version); a refused head stays under
   `<checkpoint_dir>/unpublished/`; the run ends.
2. Fewer than DRAFTLOOP_OPD_MIN_BLOCKS blocks waiting for the consumer group
   (undelivered + pending, from XINFO GROUPS; nothing is consumed): return.
3. Read the blocks with consumer group `opd` -- this consumer's pending entries
   first (a run that crashed left them), then new ones, up to `MAX_BLOCKS`.
4. Train from the version the servers serve (the Redis pointer; without one,
   the newest loadable version on disk): `worker.train.opd.opd_update`, held-out
   requests by a fixed hash of their ids; only the serving head's own blocks
   are on-policy (`worker.train.blocks.on_policy`).
5. Publish version N+1 (checkpoint written atomically, then the pointer) only
   when the gate decides so: real greedy decoding of the held-out requests'
   prompts (topped up from ShareGPT's held-out split) by the candidate and the
   serving drafter, a paired bootstrap interval of the τ gain above 0
   (`worker.train.gate`). The offline E[τ] before/after stay as diagnostics.
6. Write the run's JSON report (`worker.reports`), then XACK the blocks. A
   crash anywhere before the ack leaves them pending, and the next run trains
   on them; a crash between the report and the ack is recognised (same
   pending entries as the last report) and only acks.

Report fields: kind ("opd" | "sft_bootstrap"), status ("published" |
"not_published" | "bootstrapped" | "no_usable_blocks"), published, pointer_moved
(when published; false if an operator pinned the pointer), base_version,
new_version, checkpoint, started_at, duration_s, stream, group, entries {count,
first_id, last_id}, blocks {records, used, empty, no_context, stale,
too_short, off_policy, undecodable, train_blocks, train_requests,
heldout_blocks, heldout_requests}, loss {epochs, first, last, heldout_before,
heldout_after}, tau_before, tau_after, eval {before, after}, gate (the
decision: `worker.train.gate.GateResult`, with its interval), train {steps,
seconds, stopped_early, carried_optimizer}, replay {rows, top1_match: the
recomputed target's top-1 vs the logged one on the rows of the emitted
context}, config.

The AdamW state travels with the versions: a published version holds
`optimizer.safetensors` (sha256 in its manifest), and the next update resumes
from the serving version's when it is there and fits (else fresh, logged).

Settings: DRAFTLOOP_REDIS_URL, _CHECKPOINT_DIR, _BLOCK_STREAM, _OPD_MIN_BLOCKS,
_TARGET_MODEL (and the rest of the target's), _OPD_TRAIN (a JSON object of
`worker.train.config.OPDConfig` overrides) and _SFT_BOOTSTRAP (of `worker.train.config.SFTConfig`
overrides for the bootstrap; tests use a tiny one)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import redis

from service import checkpoints
from service.blocklog import TRAINING_GROUP, BlockConsumer, BlockRecord, entry_id_key
from service.config import Settings
from service.drafters import eagle3

from .app import TASK_SOFT_TIME_LIMIT_S
from . import bootstrap
from .publish_gate import publish_decision
from .train.config import OPDConfig, SFTConfig
from .train.loop import read_optimizer
from .train.opd import opd_update as run_opd, save_update
from .reports import latest_report, write_report

if TYPE_CHECKING:
    from service.runtime import Target

    from .train.opd import UpdateResult

log = logging.getLogger(__name__)

GROUP = TRAINING_GROUP
# One consumer name for every worker: the training lock already serialises runs,
# and a run after a crash must find the crashed run's pending entries as its own.
CONSUMER = "trainer"
MAX_BLOCKS = 4096  # per run; the rest waits for the next one
# training stops early past this, leaving time to evaluate and save
TRAIN_BUDGET_S = 0.5 * TASK_SOFT_TIME_LIMIT_S

# The bootstrap (`worker.bootstrap`): about an hour of CPU over several beat
# ticks, each fitting one task with time left for the gate: generation, then a
# training slice, of one cosine schedule over `train_minutes`.
BOOTSTRAP_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 128,
    "gen_minutes": 0.3 * TASK_SOFT_TIME_LIMIT_S / 60,
    "tick_minutes": 0.35 * TASK_SOFT_TIME_LIMIT_S / 60,
    "train_minutes": 30.0,
    "eval_prompts": 0,  # the gate evaluates every tick's head
}

Progress = Callable[..., None]  # progress(phase, **info)

_target_cache: dict[str, Any] = {}


# ---------------------------------------------------------------------------
# configuration


def opd_config(settings: Settings) -> OPDConfig:
    """The OPD training config: the task's time budget, then DRAFTLOOP_OPD_TRAIN overrides."""
    return OPDConfig(**{"max_seconds": TRAIN_BUDGET_S, **settings.opd_train})


def sft_config(settings: Settings) -> SFTConfig:
    """The SFT bootstrap config: a budget that fits one task, then DRAFTLOOP_SFT_BOOTSTRAP overrides."""
    return SFTConfig(**{**BOOTSTRAP_DEFAULTS, **settings.sft_bootstrap})


def get_target(settings: Settings) -> Target:
    """The target, loaded once per worker process."""
    if settings.target_model not in _target_cache:
        from service.runtime import load_target

        _target_cache.clear()
        _target_cache[settings.target_model] = load_target(settings)
    return _target_cache[settings.target_model]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------
# the serving version and the bootstrap


def current_checkpoint(
    r: redis.Redis, settings: Settings, target: Target
) -> tuple[int, eagle3.Eagle3Head, Path] | None:
    """(version, head, its directory) the servers serve: the pointer's version;
    without a usable pointer, the newest version on disk that loads for this
    target (published when there was no pointer, so the servers have one to follow)."""
    pointer = checkpoints.read_pointer(r)

    def load(path: Path) -> eagle3.Eagle3Head:
        return eagle3.load_head(path, target.model, target.model_id)[0]

    found = checkpoints.load_current(pointer, settings.checkpoint_dir, load)
    if found is None:
        return None
    if pointer is None:  # servers have nothing to follow yet: point them at it
        checkpoints.publish_version(r, found.version, found.path)
    return found.version, found.value, found.path


def _bootstrap_tick(
    r: redis.Redis, settings: Settings, target: Target, current: tuple | None, progress: Progress | None
) -> dict[str, Any] | None:
    """One tick of the SFT bootstrap while it lasts (`worker.bootstrap`) -> its
    report; None when the ticks are Draft-OPD updates: the budget is spent, or a
    version exists that no bootstrap trained (by hand, or imported)."""
    cfg = sft_config(settings)
    spent = bootstrap.budget_spent(settings, cfg)
    if spent or (spent is None and current is not None):
        return None
    if spent is None:
        log.info("no eagle3 drafter for %s yet: starting the SFT bootstrap (%s)", target.model_id, asdict(cfg))
    consumer = BlockConsumer(r, settings.block_stream, GROUP, CONSUMER)
    return bootstrap.run_tick(r, settings, target, consumer, cfg, opd_config(settings), MAX_BLOCKS, progress)


# ---------------------------------------------------------------------------
# one OPD update


@dataclass
class _Batch:
    """What one run read from the block log."""

    ids: list[str]  # every entry id read, usable or not, in stream order: acked at the end
    records: list[BlockRecord]
    contexts: dict[str, np.ndarray]  # request id -> (T,) int64 logged token ids, -1 where missing
    undecodable: int
    prompts: dict[str, list[int]]  # request id -> its prompt ids, where fully logged


def run_update(
    r: redis.Redis, settings: Settings, target: Target | None = None, progress: Progress | None = None
) -> dict[str, Any]:
    """One opd_update run (the caller holds the training lock). Returns a
    summary: the report, or {"status": "waiting" | "already_done", ...}."""
    target = target or get_target(settings)
    stream, t0, started = settings.block_stream, time.perf_counter(), _now()
    current = current_checkpoint(r, settings, target)
    tick = _bootstrap_tick(r, settings, target, current, progress)
    if tick is not None:
        return tick
    if current is None:  # the bootstrap is spent and the gate refused every head it trained
        log.warning("opd: no eagle3 version was ever published; raise DRAFTLOOP_SFT_BOOTSTRAP's train_minutes to train on")
        return {"status": "no_drafter", "bootstrap_spent": True}
    version, head, path = current

    consumer = BlockConsumer(r, stream, GROUP, CONSUMER)
    not_now = _nothing_to_train(consumer, settings, version)
    if not_now is not None:
        return not_now
    if progress:
        progress("reading", version=version)
    batch = _read_batch(consumer, version)

    cfg = opd_config(settings)
    opt_state = read_optimizer(path, checkpoints.read_manifest(path)) if cfg.carry_optimizer else None
    result = run_opd(
        head, target.model, batch.records, batch.contexts, version, target.model_id, cfg, progress, opt_state
    )
    report = _opd_report(result, batch, cfg, version, target.model_id, started, stream)
    report_version = _publish_if_better(r, settings, target, result, batch, report, cfg, progress)
    report["duration_s"] = round(time.perf_counter() - t0, 2)
    write_report(settings.checkpoint_dir, report_version, report)
    acked = consumer.ack(batch.ids)  # only now: the outcome is on disk (and in the pointer)
    log.info(
        "opd: %s (v%d -> %s), E[τ] %s -> %s, %d blocks acked, %.1f s",
        report["status"],
        version,
        report["new_version"],
        result.before.tau,
        result.after.tau,
        acked,
        report["duration_s"],
    )
    return report


def _nothing_to_train(consumer: BlockConsumer, settings: Settings, version: int) -> dict[str, Any] | None:
    """The run's summary when it ends before reading: too few blocks waiting,
    or the pending ones are a finished run's; None when there is work."""
    consumer.ensure_group()
    undelivered, pending = consumer.waiting(at_least=settings.opd_min_blocks)
    waiting = undelivered + pending
    if waiting < settings.opd_min_blocks:
        log.info(
            "opd: %d blocks waiting (%d pending), fewer than %d: nothing to do",
            waiting,
            pending,
            settings.opd_min_blocks,
        )
        return {
            "status": "waiting",
            "blocks_waiting": waiting,
            "min_blocks": settings.opd_min_blocks,
            "version": version,
        }
    if pending:
        return _finished_but_unacked(consumer, settings)
    return None


def _read_batch(consumer: BlockConsumer, version: int) -> _Batch:
    """Up to MAX_BLOCKS records (pending first) and their requests' token contexts."""
    entries, bad = consumer.read(MAX_BLOCKS)
    ids = sorted([eid for eid, _ in entries] + bad, key=entry_id_key)
    records = [rec for _, rec in entries]
    found = consumer.read_contexts(rec.request_id for rec in records)
    contexts = {rid: ctx.tokens for rid, ctx in found.items()}
    prompts = {rid: ctx.prompt_ids for rid, ctx in found.items() if ctx.prompt_ids is not None}
    log.info("opd: read %d block records (%d unusable) for v%d", len(records), len(bad), version)
    return _Batch(ids, records, contexts, len(bad), prompts)


def _opd_report(
    result: UpdateResult,
    batch: _Batch,
    cfg: OPDConfig,
    version: int,
    target_model: str,
    started: str,
    stream: str,
) -> dict[str, Any]:
    """The report of an OPD run, before its outcome (status, new version) is known."""
    ids = batch.ids
    return {
        "kind": "opd",
        "base_version": version,
        "new_version": None,
        "checkpoint": None,
        "target_model": target_model,
        "started_at": started,
        "stream": stream,
        "group": GROUP,
        "entries": {
            "count": len(ids),
            "first_id": ids[0] if ids else None,
            "last_id": ids[-1] if ids else None,
        },
        "blocks": {
            **result.stats.as_dict(),
            "undecodable": batch.undecodable,
            "train_blocks": result.train_blocks,
            "train_requests": result.train_requests,
            "heldout_blocks": result.after.blocks,
            "heldout_requests": result.heldout_requests,
        },
        "loss": {
            "epochs": result.train.epoch_loss,
            "first": result.train.history[0]["loss"] if result.train.history else None,
            "last": result.train.history[-1]["loss"] if result.train.history else None,
            "heldout_before": result.before.loss,
            "heldout_after": result.after.loss,
        },
        "tau_before": result.before.tau,
        "tau_after": result.after.tau,
        "eval": {"before": result.before.as_dict(), "after": result.after.as_dict()},
        "train": {
            "steps": result.train.steps,
            "seconds": round(result.train.seconds, 2),
            "stopped_early": result.train.stopped_early,
            "carried_optimizer": result.train.carried_optimizer,
        },
        "replay": result.replay,
        "config": asdict(cfg),
    }


def _publish_if_better(
    r: redis.Redis,
    settings: Settings,
    target: Target,
    result: UpdateResult,
    batch: _Batch,
    report: dict[str, Any],
    cfg: OPDConfig,
    progress: Progress | None,
) -> int:
    """Save and publish the trained head when the gate finds it better than the
    serving drafter on the held-out requests; records the outcome in `report`.
    Returns the version the report is filed under."""
    version = report["base_version"]
    if result.train_blocks == 0:
        report["status"], report["published"] = "no_usable_blocks", False
        return version
    if progress:
        progress("gating", requests=cfg.gate_requests, max_tokens=cfg.gate_max_tokens)
    served = [batch.prompts[rid] for rid in result.heldout_ids if rid in batch.prompts]
    gate = publish_decision(r, settings, target, result.head, served, cfg)
    report["gate"] = gate.as_dict()
    if not gate.publish:
        report["status"], report["published"] = "not_published", False
        log.info("opd: not publishing: %s (offline E[τ] %s -> %s)", gate.reason,
                 result.before.tau, result.after.tau)
        return version
    if progress:
        progress("publishing", tau_before=gate.incumbent_tau, tau_after=gate.candidate_tau)
    meta = {key: report[key] for key in ("config", "stream", "entries", "eval", "loss", "gate")}
    path = save_update(result, settings.checkpoint_dir, target.model_id, version, meta)
    new_version = int(path.name.removeprefix("v"))
    report["pointer_moved"] = checkpoints.publish_version(r, new_version, path)
    report.update(status="published", published=True, new_version=new_version, checkpoint=str(path))
    return new_version


def _finished_but_unacked(consumer: BlockConsumer, settings: Settings) -> dict[str, Any] | None:
    """A run that wrote its report but died before XACK leaves exactly its
    entries pending: ack them instead of training on them twice."""
    last = latest_report(settings.checkpoint_dir)
    if not last or last.get("kind") != "opd" or last.get("stream") != consumer.stream:
        return None
    pending = consumer.pending()
    reported = last.get("entries") or {}
    if pending.count and (pending.count, pending.first_id, pending.last_id) == (
        reported.get("count"), reported.get("first_id"), reported.get("last_id")
    ):
        acked = consumer.ack(consumer.pending_ids(pending.count))
        log.warning(
            "opd: the last run (%s) finished but did not ack; acked its %d entries", last.get("status"), acked
        )
        return {"status": "already_done", "acked": acked, "report": last}
    return None
