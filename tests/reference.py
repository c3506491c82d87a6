"""Target-only greedy outputs on held-out prompts, computed once per test
session and shared by every drafter's losslessness test."""

from __future__ import annotations

from functools import lru_cache

from service.drafters.none import NoDrafter
from service.engine import Engine
from worker.prompts import chat_ids, sharegpt_prompts
from service.sampling import SamplingParams

NUM_PROMPTS = 20
MAX_NEW_TOKENS = 64
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS)


@lru_cache(maxsize=1)
def heldout_prompt_ids(tokenizer) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(chat_ids(tokenizer, p)) for p in sharegpt_prompts("heldout", limit=NUM_PROMPTS))


@lru_cache(maxsize=1)
def greedy_reference(target) -> tuple[tuple[int, ...], ...]:
    engine = Engine(target.model, NoDrafter(), target.eos_token_ids, 0)
    return tuple(tuple(engine.generate(list(ids), GREEDY)) for ids in heldout_prompt_ids(target.tokenizer))


def outputs_with(target, drafter, k: int) -> tuple[tuple[tuple[int, ...], ...], Engine]:
    engine = Engine(target.model, drafter, target.eos_token_ids, k)
    outs = tuple(tuple(engine.generate(list(ids), GREEDY)) for ids in heldout_prompt_ids(target.tokenizer))
    return outs, engine
