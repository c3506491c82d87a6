"""The SFT bootstrap of the eagle3 head across beat ticks (`worker.update`
runs one tick per task while it lasts).

The first drafter is trained by SFT (`worker.train.sft.train_sft`) on a budget
(`BOOTSTRAP_DEFAULTS`: about an hour of CPU in all) spread over several
ticks, each of which fits one task:
1. Served requests' own (prompt, completion) tokens, read from the block log
   with the Draft-OPD consumer group and then acked, join the training pool:
   they are target-generated and in-distribution (blocks of any drafter kind
   may feed SFT; only Draft-OPD needs on-policy ones).
2. Generation continues over the ShareGPT train split for `gen_minutes`,
   cached (`worker.train.featstore`), then training resumes from the state in
   `<checkpoint_dir>/bootstrap/` for one slice (`tick_minutes`) under one
   cosine schedule over the whole budget.
3. The tick's head goes through the publish gate against the serving drafter
   (ngram before any eagle3 version, then the hybrid with the last published
   head), so every version it publishes beat the one serving before it; a
   refused head waits under `<checkpoint_dir>/unpublished/`.

Once the budget is spent the ticks are Draft-OPD updates. Raising the budget
(DRAFTLOOP_SFT_BOOTSTRAP='{"train_minutes": ...}') resumes the bootstrap."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from service import checkpoints
from service.blocklog import BlockConsumer, entry_id_key
from service.config import Settings
from service.drafters import eagle3

from .publish_gate import publish_decision, stage, unstage
from .reports import write_report
from .train.config import OPDConfig, SFTConfig

if TYPE_CHECKING:
    from service.runtime import Target

log = logging.getLogger(__name__)

STATE_DIR = "bootstrap"  # under the checkpoint dir: the trainer's state across ticks
MIN_SERVED_TOKENS = 8  # shorter completions teach the head next to nothing
Progress = Callable[..., None]
Pair = tuple[list[int], list[int]]  # (prompt ids, completion ids)


def state_dir(settings: Settings) -> Path:
    return Path(settings.checkpoint_dir) / STATE_DIR


def budget_spent(settings: Settings, cfg: SFTConfig) -> bool | None:
    """Whether the bootstrap's training budget is spent (None: it never trained)."""
    from .train.sft import Spent

    path = state_dir(settings) / "state.json"
    if not path.exists():
        return None
    return Spent(**json.loads(path.read_text())["spent"]).fraction(cfg) >= 1.0


def served_pairs(consumer: BlockConsumer, max_entries: int) -> tuple[list[Pair], list[str]]:
    """Served requests' (prompt, completion) tokens from the waiting block
    records (each request once, its logged context up to the first gap) ->
    (pairs, every entry id read, to ack once the tick's outcome is recorded)."""
    consumer.ensure_group()
    entries, bad = consumer.read(max_entries)
    ids = sorted([eid for eid, _ in entries] + bad, key=entry_id_key)
    pairs: list[Pair] = []
    for ctx in consumer.read_contexts(rec.request_id for _, rec in entries).values():
        prompt = ctx.prompt_ids
        if prompt is None:
            continue
        tokens = ctx.tokens.tolist()
        end = tokens.index(-1) if -1 in tokens else len(tokens)
        if end - len(prompt) >= MIN_SERVED_TOKENS:
            pairs.append((prompt, tokens[len(prompt) : end]))
    return pairs, ids


def run_tick(
    r: redis.Redis,
    settings: Settings,
    target: Target,
    consumer: BlockConsumer,
    cfg: SFTConfig,
    gate_cfg: OPDConfig,
    max_entries: int,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """One bootstrap tick: served pool, generation, a training slice, the gate -> its report."""
    from .prompts import sharegpt_prompts
    from .train.sft import train_sft

    t0, started = time.perf_counter(), datetime.now(timezone.utc).isoformat(timespec="seconds")
    before_eagle3 = checkpoints.read_pointer(r) is None and not checkpoints.list_versions(settings.checkpoint_dir)
    pairs, ids = served_pairs(consumer, max_entries)
    log.info("bootstrap tick: %d served requests join the pool (%d entries)", len(pairs), len(ids))
    if progress:
        progress("bootstrap", served=len(pairs), gen_minutes=cfg.gen_minutes, tick_minutes=cfg.tick_minutes)
    prompts = list(sharegpt_prompts("train", limit=cfg.num_prompts))
    result = train_sft(target, prompts, settings.checkpoint_dir, settings.cache_dir, cfg,
                       state_dir=state_dir(settings), served=pairs)  # fmt: skip
    version = int(result.checkpoint.name.removeprefix("v"))
    outcome = _outcome(r, settings, target, result.checkpoint, version, gate_cfg, before_eagle3)
    report = {
        "kind": "sft_bootstrap",
        **outcome,
        "base_version": None,
        "target_model": target.model_id,
        "started_at": started,
        "duration_s": round(time.perf_counter() - t0, 2),
        "tau_before": outcome["gate"]["incumbent_tau"],
        "tau_after": outcome["gate"]["candidate_tau"],
        "loss": {"last": result.history[-1]["loss"] if result.history else None},
        "bootstrap": {"finished": result.finished, "steps": len(result.history), "served_requests": len(pairs),
                      "entries": len(ids)},  # fmt: skip
        "config": asdict(cfg),
    }
    write_report(settings.checkpoint_dir, version, report)
    consumer.ack(ids)  # only now: their tokens are in the pool and the outcome on disk
    return report


def _outcome(
    r: redis.Redis, settings: Settings, target: Target, path: Path, version: int, gate_cfg: OPDConfig, before_eagle3: bool
) -> dict[str, Any]:
    """Publish the tick's checkpoint at `path` when the gate says so (it is out of
    the store meanwhile), else leave it under `unpublished/` -> the report's status,
    published, pointer_moved, new_version, checkpoint, gate."""
    staged = stage(path, settings.checkpoint_dir)
    head = eagle3.load_head(staged, target.model, target.model_id)[0]
    gate = publish_decision(r, settings, target, head, [], gate_cfg, before_eagle3=before_eagle3)
    if not gate.publish:
        log.info("bootstrap: not publishing v%d: %s", version, gate.reason)
        return {"status": "not_published", "published": False, "pointer_moved": False, "new_version": None,
                "checkpoint": str(staged), "gate": gate.as_dict()}  # fmt: skip
    moved = checkpoints.publish_version(r, version, unstage(staged, path))
    return {"status": "bootstrapped", "published": True, "pointer_moved": moved, "new_version": version,
            "checkpoint": str(path), "gate": gate.as_dict()}  # fmt: skip
