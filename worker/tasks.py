"""Celery tasks: `opd_update`, the self-improvement step beat runs every
DRAFTLOOP_OPD_INTERVAL_S seconds (DESIGN §1, §7, §8).

One run, under the Redis training lock (a run that finds it held returns at once):
1. No loadable eagle3 checkpoint for this target yet: the SFT bootstrap
   (`worker.sft.train_sft`) trains one, it is published (version 1 on a fresh
   store), and the run ends.
2. Fewer than DRAFTLOOP_OPD_MIN_BLOCKS blocks waiting for the consumer group
   (undelivered + pending, from XINFO GROUPS; nothing is consumed): return.
3. Read the blocks with consumer group `opd` -- this consumer's pending entries
   first (a run that crashed left them), then new ones, up to `MAX_BLOCKS`.
4. Train from the version the servers serve (the Redis pointer; without one,
   the newest loadable version on disk): `worker.opd.opd_update`, held-out
   requests by a fixed hash of their ids.
5. Publish version N+1 (checkpoint written atomically, then the pointer) only
   when the held-out E[τ] is not worse than the serving version's.
6. Write the run's JSON report (`<checkpoint_dir>/reports/<UTC time>-v<N>.json`,
   atomically), then XACK the blocks. A crash anywhere before the ack leaves
   them pending, and the next run trains on them; a crash between the report
   and the ack is recognised (same pending entries as the last report) and
   only acks.

Report fields: kind ("opd" | "sft_bootstrap"), status ("published" |
"not_published" | "bootstrapped" | "no_usable_blocks"), published, pointer_moved
(when published; false if an operator pinned the pointer), base_version,
new_version, checkpoint, started_at, duration_s, stream, group, entries {count,
first_id, last_id}, blocks {records, used, empty, no_context, stale,
too_short, undecodable, train_blocks, train_requests, heldout_blocks,
heldout_requests}, loss {epochs, first, last, heldout_before, heldout_after},
tau_before, tau_after, eval {before, after}, train {steps, seconds,
stopped_early}, config.

Settings: DRAFTLOOP_REDIS_URL, _CHECKPOINT_DIR, _BLOCK_STREAM, _OPD_MIN_BLOCKS,
_TARGET_MODEL (and the rest of the target's), _OPD_TRAIN (a JSON object of
`worker.opd.OPDConfig` overrides) and _SFT_BOOTSTRAP (of `worker.sft.SFTConfig`
overrides for the bootstrap; tests use a tiny one)."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import redis
from celery import Task

from service import blocklog, checkpoints
from service.config import Settings, get_settings
from service.drafters import eagle3

from .app import OPD_UPDATE_TASK, TASK_SOFT_TIME_LIMIT_S, app
from .lock import training_lock
from .train.config import OPDConfig, SFTConfig
from .train.opd import opd_update as run_opd, save_update

log = logging.getLogger(__name__)

GROUP = "opd"
# One consumer name for every worker: the training lock already serialises runs,
# and a run after a crash must find the crashed run's pending entries as its own.
CONSUMER = "trainer"
LOCK_NAME = "eagle3"
LOCK_TTL_S = 30.0  # renewed every LOCK_RENEW_S while held, so a killed trainer frees it within 30 s
LOCK_RENEW_S = 5.0
MAX_BLOCKS = 4096  # per run; the rest waits for the next one
TRAIN_BUDGET_S = 0.5 * TASK_SOFT_TIME_LIMIT_S  # training stops early past this, leaving time to evaluate and save
REPORTS_DIR = "reports"

_target_cache: dict[str, Any] = {}


# ---------------------------------------------------------------------------
# configuration


def opd_config(settings: Settings) -> OPDConfig:
    return OPDConfig(**{"max_seconds": TRAIN_BUDGET_S, **settings.opd_train})


def sft_config(settings: Settings) -> SFTConfig:
    return SFTConfig(**settings.sft_bootstrap)


def get_target(settings: Settings):
    """The target, loaded once per worker process."""
    if settings.target_model not in _target_cache:
        from service.runtime import load_target

        _target_cache.clear()
        _target_cache[settings.target_model] = load_target(settings)
    return _target_cache[settings.target_model]


# ---------------------------------------------------------------------------
# reading blocks


def waiting_blocks(r: redis.Redis, stream: str, group: str = GROUP, at_least: int | None = None) -> tuple[int, int]:
    """(undelivered, pending) entries of the consumer group, without consuming
    anything. When Redis cannot tell the lag (after deletions), undelivered
    entries are counted with XRANGE, up to `at_least` (None: all)."""
    for g in r.xinfo_groups(stream):
        if _s(g["name"]) != group:
            continue
        lag = g.get("lag")
        if lag is None:
            last = _s(g["last-delivered-id"])
            lag = len(r.xrange(stream, min=f"({last}", max="+", count=at_least))
        return int(lag), int(g["pending"])
    return 0, 0


def read_entries(
    r: redis.Redis, stream: str, group: str, consumer: str, max_entries: int
) -> tuple[list[tuple[str, blocklog.BlockRecord]], list[str]]:
    """This consumer's pending entries, then new ones, up to `max_entries`
    -> ((id, record) list, ids that cannot be used: trimmed or undecodable)."""
    raw: list[tuple[str, dict | None]] = []
    last = "0"
    while len(raw) < max_entries:  # pending: page through this consumer's PEL
        got = r.xreadgroup(group, consumer, {stream: last}, count=min(1000, max_entries - len(raw)))
        batch = got[0][1] if got else []
        if not batch:
            break
        raw += [(_s(i), f) for i, f in batch]
        last = raw[-1][0]
    while len(raw) < max_entries:  # then new entries
        got = r.xreadgroup(group, consumer, {stream: ">"}, count=min(1000, max_entries - len(raw)))
        batch = got[0][1] if got else []
        if not batch:
            break
        raw += [(_s(i), f) for i, f in batch]
    entries, bad = [], []
    for eid, f in raw:
        if not f:  # trimmed away while pending
            bad.append(eid)
            continue
        try:
            entries.append((eid, blocklog.decode(f)))
        except blocklog.SchemaError as e:
            log.warning("skipping block record %s: %s", eid, e)
            bad.append(eid)
    return entries, bad


def ack_all(r: redis.Redis, stream: str, group: str, ids: list[str], chunk: int = 1000) -> int:
    return sum(blocklog.ack(r, stream, group, ids[i : i + chunk]) for i in range(0, len(ids), chunk))


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


# ---------------------------------------------------------------------------
# versions and reports


def current_checkpoint(r: redis.Redis, settings: Settings, target) -> tuple[int, eagle3.Eagle3Head] | None:
    """(version, head) the servers serve: the pointer's version; without a
    usable pointer, the newest version on disk that loads for this target."""
    pointer = checkpoints.read_pointer(r)
    tried = set()
    if pointer is not None and pointer.get("kind", checkpoints.DEFAULT_KIND) == checkpoints.DEFAULT_KIND:
        version = int(pointer["version"])
        local = checkpoints.version_path(settings.checkpoint_dir, version)
        path = local if (local / checkpoints.MANIFEST_FILE).is_file() or not pointer.get("path") else Path(pointer["path"])
        tried.add(version)
        try:
            head, _ = eagle3.load_head(path, target.model, target.model_id)
            return version, head
        except eagle3.CheckpointError as e:
            log.error("the published drafter v%d does not load (%s); using the newest loadable one", version, e)
    for version in reversed(checkpoints.list_versions(settings.checkpoint_dir)):
        if version in tried:
            continue
        try:
            head, _ = eagle3.load_head(checkpoints.version_path(settings.checkpoint_dir, version), target.model, target.model_id)
        except eagle3.CheckpointError as e:
            log.warning("skipping eagle3 v%d: %s", version, e)
            continue
        if pointer is None:  # servers have nothing to follow yet: point them at it
            checkpoints.publish_version(r, version, checkpoints.version_path(settings.checkpoint_dir, version))
        return version, head
    return None


def write_report(checkpoint_dir: Path, version: int, report: dict[str, Any]) -> Path:
    """`<checkpoint_dir>/reports/<UTC time>-v<version>.json`, written atomically."""
    folder = Path(checkpoint_dir) / REPORTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    path = folder / f"{stamp}-v{version}.json"
    tmp = folder / f".tmp-{uuid.uuid4().hex}.json"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    eagle3.fsync_path(tmp)
    os.replace(tmp, path)
    eagle3.fsync_path(folder)
    log.info("report %s", path)
    return path


def latest_report(checkpoint_dir: Path) -> dict[str, Any] | None:
    folder = Path(checkpoint_dir) / REPORTS_DIR
    paths = sorted(folder.glob("*-v*.json")) if folder.is_dir() else []
    for p in reversed(paths):
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------
# one update


def bootstrap(r: redis.Redis, settings: Settings, target, progress=None) -> dict[str, Any]:
    """The SFT bootstrap: train the first drafter, publish it, report."""
    from worker.prompts import sharegpt_prompts

    from .train.sft import train_sft

    t0, started = time.perf_counter(), _now()
    cfg = sft_config(settings)
    log.info("no eagle3 drafter for %s yet: running the SFT bootstrap (%s)", target.model_id, asdict(cfg))
    if progress:
        progress("bootstrap", num_prompts=cfg.num_prompts, train_steps=cfg.train_steps)
    result = train_sft(target, list(sharegpt_prompts("train", limit=cfg.num_prompts)), settings.checkpoint_dir, settings.cache_dir, cfg)
    version = int(result.checkpoint.name.removeprefix("v"))
    moved = checkpoints.publish_version(r, version, result.checkpoint)
    report = {
        "kind": "sft_bootstrap",
        "status": "bootstrapped",
        "published": True,
        "pointer_moved": moved,
        "base_version": None,
        "new_version": version,
        "checkpoint": str(result.checkpoint),
        "target_model": target.model_id,
        "started_at": started,
        "duration_s": round(time.perf_counter() - t0, 2),
        "tau_before": None,
        "tau_after": result.tau,
        "loss": {"last": result.history[-1]["loss"] if result.history else None},
        "config": asdict(cfg),
    }
    write_report(settings.checkpoint_dir, version, report)
    return report


def run_update(r: redis.Redis, settings: Settings, target=None, progress=None) -> dict[str, Any]:
    """One opd_update run (the caller holds the training lock). Returns a
    summary: the report, or {"status": "waiting" | "already_done", ...}."""
    target = target or get_target(settings)
    stream, t0, started = settings.block_stream, time.perf_counter(), _now()
    current = current_checkpoint(r, settings, target)
    if current is None:
        return bootstrap(r, settings, target, progress)
    version, head = current

    blocklog.ensure_group(r, stream, GROUP)
    undelivered, pending = waiting_blocks(r, stream, GROUP, at_least=settings.opd_min_blocks)
    if undelivered + pending < settings.opd_min_blocks:
        log.info("opd: %d blocks waiting (%d pending), fewer than %d: nothing to do", undelivered + pending, pending, settings.opd_min_blocks)
        return {"status": "waiting", "blocks_waiting": undelivered + pending, "min_blocks": settings.opd_min_blocks, "version": version}
    if pending:
        done = _finished_but_unacked(r, settings, stream)
        if done is not None:
            return done

    if progress:
        progress("reading", version=version)
    entries, bad = read_entries(r, stream, GROUP, CONSUMER, MAX_BLOCKS)
    ids = sorted([eid for eid, _ in entries] + bad, key=_id_key)
    records = [rec for _, rec in entries]
    contexts = {rid: ctx.tokens for rid, ctx in blocklog.read_contexts(r, stream, (rec.request_id for rec in records)).items()}
    log.info("opd: read %d block records (%d unusable) for v%d", len(records), len(bad), version)

    cfg = opd_config(settings)
    result = run_opd(head, target.model, records, contexts, version, target.model_id, cfg, progress)
    report: dict[str, Any] = {
        "kind": "opd",
        "base_version": version,
        "new_version": None,
        "checkpoint": None,
        "target_model": target.model_id,
        "started_at": started,
        "stream": stream,
        "group": GROUP,
        "entries": {"count": len(ids), "first_id": ids[0] if ids else None, "last_id": ids[-1] if ids else None},
        "blocks": {
            **result.stats.as_dict(),
            "undecodable": len(bad),
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
        "train": {"steps": result.train.steps, "seconds": round(result.train.seconds, 2), "stopped_early": result.train.stopped_early},
        "config": asdict(cfg),
    }
    report_version = version
    if result.train_blocks == 0:
        report["status"], report["published"] = "no_usable_blocks", False
    elif result.improved:
        if progress:
            progress("publishing", tau_before=result.before.tau, tau_after=result.after.tau)
        path = save_update(
            result,
            settings.checkpoint_dir,
            target.model_id,
            version,
            {"config": asdict(cfg), "stream": stream, "entries": report["entries"], "eval": report["eval"], "loss": report["loss"]},
        )
        new_version = int(path.name.removeprefix("v"))
        report["pointer_moved"] = checkpoints.publish_version(r, new_version, path)
        report.update(status="published", published=True, new_version=new_version, checkpoint=str(path))
        report_version = new_version
    else:
        report["status"], report["published"] = "not_published", False
        log.info("opd: not publishing: held-out E[τ] %s -> %s", result.before.tau, result.after.tau)
    report["duration_s"] = round(time.perf_counter() - t0, 2)
    write_report(settings.checkpoint_dir, report_version, report)
    acked = ack_all(r, stream, GROUP, ids)  # only now: the outcome is on disk (and in the pointer)
    log.info(
        "opd: %s (v%d -> %s), E[τ] %s -> %s, %d blocks acked, %.1f s",
        report["status"], version, report["new_version"], result.before.tau, result.after.tau, acked, report["duration_s"],
    )
    return report


def _finished_but_unacked(r: redis.Redis, settings: Settings, stream: str) -> dict[str, Any] | None:
    """A run that wrote its report but died before XACK leaves exactly its
    entries pending: ack them instead of training on them twice."""
    last = latest_report(settings.checkpoint_dir)
    if not last or last.get("kind") != "opd" or last.get("stream") != stream:
        return None
    info = r.xpending(stream, GROUP)
    e = last.get("entries") or {}
    if info["pending"] and (info["pending"], _s(info["min"]), _s(info["max"])) == (e.get("count"), e.get("first_id"), e.get("last_id")):
        ids = [_s(x["message_id"]) for x in r.xpending_range(stream, GROUP, min="-", max="+", count=info["pending"])]
        acked = ack_all(r, stream, GROUP, ids)
        log.warning("opd: the last run (%s) finished but did not ack; acked its %d entries", last.get("status"), acked)
        return {"status": "already_done", "acked": acked, "report": last}
    return None


# ---------------------------------------------------------------------------
# the Celery task


@app.task(bind=True, name=OPD_UPDATE_TASK, acks_late=True)
def opd_update(self: Task) -> dict[str, Any]:
    """Beat's periodic Draft-OPD update (module docstring)."""
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
