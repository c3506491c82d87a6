"""Blocks served in-process: an engine block sink that keeps what the Redis
block log would, for benchmarks and tests that train without Redis."""

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


def serve_for_blocks(
    target, drafter, k: int, prompts: Sequence[Sequence[int]], params, first_seed: int, tag: str
) -> tuple[BlockCollector, dict[str, Any]]:
    """Serve `prompts` through the real engine with `drafter` (request i sampled
    with seed first_seed + i, id f"{tag}-{i}") into a BlockCollector: the blocks
    the Redis log would hold, for benchmarks that train in-process. `target` is
    a service.runtime.Target, `params` the requests' SamplingParams."""
    from dataclasses import replace

    from service.engine import Engine

    collector = BlockCollector(target.model_id)
    engine = Engine(target.model, drafter, target.eos_token_ids, k, block_sink=collector)
    t0, tokens = time.perf_counter(), 0
    for i, ids in enumerate(prompts):
        tokens += len(engine.generate(list(ids), replace(params, seed=first_seed + i), request_id=f"{tag}-{i}"))
    stats = {
        "requests": len(prompts),
        "tokens": tokens,
        "blocks": len(collector.records),
        "tau": round(engine.stats.tau, 4),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return collector, stats
