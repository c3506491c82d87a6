"""Blocks served in-process: an engine block sink that keeps what the Redis
block log would, for benchmarks and tests that train without Redis, and the
rollouts benchmarks train on (by default as a greedy evaluation decodes: all
K drafted, no confidence stop, temperature 0)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from service.blocklog import BlockRecord


class BlockCollector:
    """An in-process block sink (`Engine(block_sink=collector)`): keeps the block
    records and each request's token context exactly as the Redis block log
    would, for benchmarks and tests that train without Redis."""

    def __init__(self, target_model: str):
        self.target_model = target_model
        self.records: list[BlockRecord] = []
        self.contexts: dict[str, list[int]] = {}

    def __call__(self, obs) -> None:  # obs: service.engine.BlockObservation
        rec = BlockRecord.from_observation(obs, self.target_model)
        ctx = self.contexts.setdefault(obs.request_id, [])
        if obs.prompt_ids is not None:
            ctx[: len(obs.prompt_ids)] = obs.prompt_ids
        emitted = rec.emitted_tokens()
        ctx.extend([-1] * (rec.position + len(emitted) - len(ctx)))
        ctx[rec.position : rec.position + len(emitted)] = emitted
        self.records.append(rec)

    def clear(self) -> None:
        self.records.clear()
        self.contexts.clear()


def _stop_rules(drafter) -> list[tuple[Any, float, tuple[float, ...]]]:
    """The eagle3 stop rules in `drafter` (itself, or the head inside a hybrid), to restore."""
    parts = (drafter, getattr(drafter, "head", None))
    return [(p, p.min_confidence, p.stop_thresholds) for p in parts if hasattr(p, "stop_thresholds")]


def serve_for_blocks(
    target, drafter, k: int, prompts: Sequence[Sequence[int]], params, first_seed: int, tag: str, greedy_eval: bool = True
) -> tuple[BlockCollector, dict[str, Any]]:
    """Serve `prompts` through the real engine with `drafter` (request i sampled
    with seed first_seed + i, id f"{tag}-{i}") into a BlockCollector: the blocks
    the Redis log would hold, for benchmarks that train in-process. `target` is
    a service.runtime.Target, `params` the requests' SamplingParams.
    `greedy_eval` (default): roll out as the greedy evaluation (the gate)
    decodes -- every block drafts the full K (the drafter's confidence stop is
    off for the rollouts, then restored) at temperature 0 -- so the blocks are
    the drafter's own paths under the evaluated policy; False: `params` and the
    drafter's stop rule as served."""
    from dataclasses import replace

    from service.engine import Engine

    from .gate import full_length

    saved = _stop_rules(drafter) if greedy_eval else []
    if greedy_eval:
        full_length(drafter)
        params = replace(params, temperature=0.0)
    collector = BlockCollector(target.model_id)
    engine = Engine(target.model, drafter, target.eos_token_ids, k, block_sink=collector)
    t0, tokens = time.perf_counter(), 0
    try:
        for i, ids in enumerate(prompts):
            tokens += len(engine.generate(list(ids), replace(params, seed=first_seed + i), request_id=f"{tag}-{i}"))
    finally:
        for part, min_confidence, thresholds in saved:
            part.min_confidence, part.stop_thresholds = min_confidence, thresholds
    stats = {
        "requests": len(prompts),
        "tokens": tokens,
        "blocks": len(collector.records),
        "tau": round(engine.stats.tau, 4),
        "seconds": round(time.perf_counter() - t0, 1),
        "greedy_eval": greedy_eval,
    }
    return collector, stats
