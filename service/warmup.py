"""A start-up warm-up run, before the server reports ready.

A full batch of short dummy sequences goes through the real batched loop
(chunked prefill, drafting the full K, one ragged verify per step), so the
first requests do not pay for first-time allocations (prepacked kernels'
scratch, KV caches at batch width, the drafter's batch buffers), and the
server's resident memory after start-up already holds its working set: what
grows after that is growth (the soak's RSS goal), not warm-up. vLLM's profile
run does the same before it reports ready.

It runs on a throwaway Engine with the serving drafter and model but no
metrics and no block sink: no dummy token reaches /metrics, the guard or the
training stream."""

from __future__ import annotations

import logging
import time

from .drafters.base import Drafter
from .engine import Engine, Sequence
from .llama import LlamaModel
from .sampling import SamplingParams
from .speculation import DraftLengthPolicy

log = logging.getLogger(__name__)

WARMUP_TOKENS = 4  # decode steps per dummy sequence: enough to draft and verify at full width


def dummy_prompts(num_seqs: int, vocab_size: int) -> list[list[int]]:
    """`num_seqs` prompts of different lengths (16..76 tokens), each a repeated
    8-token span, so prompt lookup finds matches and drafts as an eagle3 head does."""
    prompts = []
    for i in range(num_seqs):
        length = 16 + 4 * (i % 16)
        span = [(100 + 7 * i + j) % vocab_size for j in range(8)]
        prompts.append((span * (length // 8 + 1))[:length])
    return prompts


def warm_up(
    model: LlamaModel,
    drafter: Drafter,
    *,
    num_speculative_tokens: int,
    max_num_seqs: int,
    prefill_chunk: int,
) -> float:
    """Decode `max_num_seqs` dummy sequences together, drafting the full K
    every step -> seconds taken."""
    t0 = time.perf_counter()
    engine = Engine(
        model,
        drafter,
        eos_token_ids=set(),
        num_speculative_tokens=num_speculative_tokens,
        max_num_seqs=max_num_seqs,
        prefill_chunk=prefill_chunk,
        speculation=DraftLengthPolicy("fixed"),
    )
    params = SamplingParams(temperature=0.0, max_tokens=WARMUP_TOKENS, ignore_eos=True)
    failed: list[str] = []

    def note(i: int, out: object) -> None:
        if isinstance(out, BaseException):
            failed.append(f"sequence {i}: {out!r}")

    for i, prompt in enumerate(dummy_prompts(max_num_seqs, model.cfg.vocab_size)):
        engine.submit(Sequence(f"warmup-{i}", prompt, params, emit=lambda out, i=i: note(i, out)))
    engine.run_until_idle()
    if failed:  # the first real request would fail the same way: say so now, at start-up
        raise RuntimeError(f"warm-up failed: {failed[0]}")
    seconds = time.perf_counter() - t0
    log.info("warm-up: %d sequences x %d tokens in %.2f s", max_num_seqs, WARMUP_TOKENS, seconds)
    return seconds
