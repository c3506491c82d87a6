"""Continuous batching is exact: the serving loop's batched step (one ragged
target forward for every running sequence, chunked prefill) emits the tokens
single-stream `Engine.generate` emits, in float32, with sequences of mixed
prompt lengths and draft lengths joining and leaving mid-batch; a failing
sequence fails alone."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace

import pytest
import torch

from service.drafters import eagle3
from service.drafters.base import Drafter, Proposal
from service.drafters.ngram import NgramDrafter
from service.engine import Engine, Sequence, StepOutput
from service.metrics import Metrics
from service.ragged import RaggedPart, ragged_forward
from service.sampling import SamplingParams

from .reference import heldout_prompt_ids

GREEDY = SamplingParams(temperature=0.0, max_tokens=24)


@dataclass
class Job:
    prompt: list[int]
    params: SamplingParams
    join: int = 0  # the loop iteration the sequence arrives at
    outputs: list[StepOutput | BaseException] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return [t for out in self.outputs if isinstance(out, StepOutput) for t in out.token_ids]

    @property
    def error(self) -> BaseException | None:
        return next((out for out in self.outputs if isinstance(out, BaseException)), None)


def run_loop(engine: Engine, jobs: list[Job], max_iterations: int = 2000) -> int:
    """Drive the engine's own batched iteration (`Engine._iterate`) on this
    thread, each job joining at its iteration -> the number of iterations."""
    engine._active = deque()
    pending = sorted(enumerate(jobs), key=lambda item: item[1].join)
    iteration = 0
    with torch.inference_mode():
        while pending or engine._active:
            while pending and pending[0][1].join <= iteration:
                i, job = pending.pop(0)
                engine._active.append(Sequence(f"job-{i}", list(job.prompt), job.params, job.outputs.append))
            if engine._active:
                engine._iterate()
            iteration += 1
            assert iteration < max_iterations
    return iteration


def random_head_drafter(target) -> eagle3.Eagle3Drafter:
    """An untrained head that drafts every slot: exactness must not depend on its quality."""
    cfg = eagle3.Eagle3Config.for_target(target.model.cfg, draft_vocab_size=2048)
    head = eagle3.Eagle3Head(cfg)
    head.reset_parameters(torch.Generator().manual_seed(0))
    head.d2t.copy_(torch.arange(cfg.draft_vocab_size))
    return eagle3.Eagle3Drafter(head, target.model, min_confidence=0.0)


def mixed_jobs(target, params: list[SamplingParams]) -> list[Job]:
    """Prompts of different lengths; sequences join at different iterations."""
    prompts = heldout_prompt_ids(target.tokenizer)
    return [Job(list(prompts[i]), p, join=(0, 0, 3, 7, 12, 2)[i % 6]) for i, p in enumerate(params)]


def assert_same_as_single_stream(target, drafter, k: int, jobs: list[Job], chunk: int = 256) -> Engine:
    want = [Engine(target.model, drafter, target.eos_token_ids, k).generate(j.prompt, j.params) for j in jobs]
    engine = Engine(target.model, drafter, target.eos_token_ids, k, metrics=Metrics(), prefill_chunk=chunk)
    run_loop(engine, jobs)
    for i, (job, tokens) in enumerate(zip(jobs, want)):
        assert job.error is None, f"sequence {i}: {job.error!r}"
        assert job.tokens == tokens, f"sequence {i} differs from single-stream generate"
        assert job.outputs[-1].finish_reason is not None
    return engine


def test_ragged_forward_is_bit_identical_to_single_sequence_forward(target) -> None:
    model = target.model
    gen = torch.Generator().manual_seed(0)
    layers = (1, model.cfg.num_layers // 2, model.cfg.num_layers - 2)
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,), generator=gen) for n in (7, 40, 3)]
    rows = (5, 1, 3)  # K = 4, K = 0, K = 2
    want, parts = [], []
    with torch.inference_mode():
        for prompt, t in zip(prompts, rows):
            for out in (want, parts):
                cache = model.new_cache(64)
                model(prompt[:-t] if t < len(prompt) else prompt[:1], cache)
                if out is want:
                    logits, _, taps = model(prompt[-t:], cache, hidden_layers=layers)
                    want.append((logits, taps, cache.length))
                else:
                    parts.append(RaggedPart(prompt[-t:], cache, layers, t))
        got = ragged_forward(model, parts)
    for (logits, taps, length), out, part in zip(want, got, parts):
        assert torch.equal(out.logits, logits)
        assert all(torch.equal(a, b) for a, b in zip(out.taps, taps))
        assert part.cache.length == length


@pytest.mark.parametrize("kind", ["ngram", "eagle3"])
def test_batched_greedy_equals_single_stream(target, kind) -> None:
    """Mixed prompt lengths; different max_tokens, so sequences near their end
    draft fewer tokens (K differs per sequence); joins and leaves mid-batch."""
    drafter = NgramDrafter() if kind == "ngram" else random_head_drafter(target)
    params = [replace(GREEDY, max_tokens=n) for n in (24, 3, 17, 9, 30, 1)]
    engine = assert_same_as_single_stream(target, drafter, 4, mixed_jobs(target, params))
    assert engine.stats.num_drafts > 0
    samples = engine.metrics.registry.get_sample_value("draftloop_batch_size_count")
    biggest = engine.metrics.registry.get_sample_value("draftloop_batch_size_bucket", {"le": "2.0"})
    assert samples and biggest < samples  # some forwards carried more than two sequences


def test_batched_sampling_equals_single_stream_with_the_same_seed(target) -> None:
    """Each sequence draws from its own generator in the same order as alone, and
    the batched logits are bit-identical, so seeded sampled output is the same;
    single-stream sampling is lossless (test_sampling.py), so the batch is too."""
    base = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=20)
    params = [replace(base, seed=s, max_tokens=n) for s, n in ((1, 20), (2, 6), (3, 14), (4, 20))]
    assert_same_as_single_stream(target, random_head_drafter(target), 3, mixed_jobs(target, params))
