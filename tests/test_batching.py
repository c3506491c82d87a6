"""Continuous batching is exact: the serving loop's batched step (one ragged
target forward for every running sequence, chunked prefill) emits the tokens
single-stream `Engine.generate` emits, in float32, with sequences of mixed
prompt lengths and draft lengths joining and leaving mid-batch; a failing
sequence fails alone."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

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
    seq: Sequence | None = None

    @property
    def tokens(self) -> list[int]:
        return [t for out in self.outputs if isinstance(out, StepOutput) for t in out.token_ids]

    @property
    def error(self) -> BaseException | None:
        return next((out for out in self.outputs if isinstance(out, BaseException)), None)


def run_loop(engine: Engine, jobs: list[Job], swaps: dict[int, Drafter] | None = None) -> int:
    """Drive the engine's own batched iteration (`Engine._iterate`) on this
    thread, each job joining at its iteration, the serving drafter swapped at
    the iterations of `swaps` -> the number of iterations."""
    engine._active = deque()
    pending = sorted(jobs, key=lambda job: job.join)
    iteration = 0
    with torch.inference_mode():
        while pending or engine._active:
            if swaps and iteration in swaps:
                engine.set_drafter(swaps[iteration])
            while pending and pending[0].join <= iteration:
                job = pending.pop(0)
                job.seq = Sequence(f"job-{jobs.index(job)}", list(job.prompt), job.params, job.outputs.append)
                engine._active.append(job.seq)
            if engine._active:
                engine._iterate()
            iteration += 1
            assert iteration < 2000
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
    single = Engine(target.model, drafter, target.eos_token_ids, k, prefill_chunk=chunk)
    want = [single.generate(j.prompt, j.params) for j in jobs]
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


def test_a_batch_mixing_drafters_after_a_hot_swap(target) -> None:
    """ngram serves the first sequences; eagle3 (taps of three layers) those that
    start after the swap: one forward carries both, each gets its own taps."""
    ngram, head = NgramDrafter(), random_head_drafter(target)
    params = [replace(GREEDY, max_tokens=n) for n in (30, 30, 20, 16, 12)]
    jobs = mixed_jobs(target, params)
    engine = Engine(target.model, ngram, target.eos_token_ids, 4)
    run_loop(engine, jobs, swaps={5: head})
    kinds = [job.seq.drafter.kind for job in jobs]
    assert "ngram" in kinds and "eagle3" in kinds
    for i, job in enumerate(jobs):
        want = Engine(target.model, job.seq.drafter, target.eos_token_ids, 4).generate(job.prompt, job.params)
        assert job.error is None and job.tokens == want, f"sequence {i} ({kinds[i]})"


def test_batched_sampling_equals_single_stream_with_the_same_seed(target) -> None:
    """Each sequence draws from its own generator in the same order as alone, and
    the batched logits are bit-identical, so seeded sampled output is the same;
    single-stream sampling is lossless (test_sampling.py), so the batch is too."""
    base = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=20)
    params = [replace(base, seed=s, max_tokens=n) for s, n in ((1, 20), (2, 6), (3, 14), (4, 20))]
    assert_same_as_single_stream(target, random_head_drafter(target), 3, mixed_jobs(target, params))


def long_prompt(target, length: int) -> list[int]:
    ids = [t for prompt in heldout_prompt_ids(target.tokenizer) for t in prompt]
    assert len(ids) >= length
    return ids[:length]


def test_chunked_prefill_gives_the_same_tokens_and_never_stalls_decodes(target, monkeypatch) -> None:
    """A 600-token prompt prefilled 64 tokens per iteration while others decode:
    same tokens and prompt log-probs as one whole-prompt prefill; no forward
    carries more than one chunk of prompt rows, and decodes run beside the chunks."""
    from service import batching

    chunk, calls = 64, []

    def spy(model, parts):
        calls.append([(p.tokens.shape[0], p.logit_rows) for p in parts])
        return ragged_forward(model, parts)

    monkeypatch.setattr(batching, "ragged_forward", spy)
    echo = SamplingParams(temperature=0.0, max_tokens=8, echo=True, logprobs=2)
    jobs = [
        *mixed_jobs(target, [GREEDY, replace(GREEDY, max_tokens=40)]),
        Job(long_prompt(target, 600), echo, join=2),
    ]
    assert_same_as_single_stream(target, NgramDrafter(), 4, jobs, chunk=chunk)
    ref = Engine(target.model, NgramDrafter(), target.eos_token_ids, 4, prefill_chunk=chunk)
    with torch.inference_mode():
        first = ref.start(Sequence("ref", jobs[2].prompt, echo, lambda _: None))
    assert jobs[2].outputs[0].prompt_logprobs == first.prompt_logprobs
    assert jobs[2].outputs[0].prompt_top_logprobs == first.prompt_top_logprobs
    # prompt chunks: parts longer than a verify pass (K+1 = 5) or whose LM head skips rows
    prompt_rows = [sum(t for t, rows in call if t > 5 or rows < t) for call in calls]
    assert max(prompt_rows) <= chunk
    beside = [
        call for call in calls if any(t == chunk for t, _ in call) and any(t == r <= 5 for t, r in call)
    ]
    assert len(beside) >= 3  # decode steps shared the forwards that carried prompt chunks


class Faulty(Drafter):
    """ngram, except that job-1's drafting raises and job-2 drafts a token id
    outside the vocabulary (the batched forward itself raises)."""

    kind = "ngram"

    def __init__(self, vocab_size: int) -> None:
        self.inner, self.vocab_size = NgramDrafter(), vocab_size

    def propose(self, seq, k, params, gen) -> Proposal:
        if seq.request_id == "job-1":
            raise RuntimeError("drafter bug")
        if seq.request_id == "job-2":
            return Proposal([self.vocab_size + 7], None, [0.0])
        return self.inner.propose(seq, k, params, gen)


def test_a_failing_sequence_fails_alone(target) -> None:
    prompts = heldout_prompt_ids(target.tokenizer)
    jobs = [Job(list(prompts[i]), replace(GREEDY, max_tokens=12), join=i % 2) for i in range(5)]
    want = [
        Engine(target.model, NgramDrafter(), target.eos_token_ids, 4).generate(j.prompt, j.params)
        for j in jobs
    ]
    engine = Engine(
        target.model, Faulty(target.model.cfg.vocab_size), target.eos_token_ids, 4, metrics=Metrics()
    )
    run_loop(engine, jobs)
    assert isinstance(jobs[1].error, RuntimeError)
    assert isinstance(jobs[2].error, IndexError)  # from the embedding, found by running the parts one by one
    for i in (0, 3, 4):
        assert jobs[i].error is None and jobs[i].tokens == want[i], f"sequence {i}"
    errors = engine.metrics.registry.get_sample_value("draftloop_requests_total", {"finish_reason": "error"})
    assert errors == 2


def test_the_serving_thread_batches_concurrent_submissions(target) -> None:
    """The real loop (`start_loop`, `submit`): same tokens as single-stream; a
    cancelled sequence leaves and the others are unaffected."""
    import queue

    prompts = heldout_prompt_ids(target.tokenizer)
    params = [replace(GREEDY, max_tokens=n) for n in (16, 5, 12, 16)]
    want = [
        Engine(target.model, NgramDrafter(), target.eos_token_ids, 4).generate(list(p), q)
        for p, q in zip(prompts, params)
    ]
    engine = Engine(target.model, NgramDrafter(), target.eos_token_ids, 4, metrics=Metrics(), max_num_seqs=3)
    done: queue.Queue[int] = queue.Queue()
    jobs = [Job(list(p), q) for p, q in zip(prompts, params)]
    seqs = []
    for i, job in enumerate(jobs):

        def emit(out, job=job, i=i):
            job.outputs.append(out)
            if isinstance(out, BaseException) or out.finish_reason is not None:
                done.put(i)

        seqs.append(Sequence(f"job-{i}", job.prompt, job.params, emit))
    cancelled = Sequence("cancelled", list(prompts[5]), replace(GREEDY, max_tokens=500), lambda _: None)
    engine.submit(cancelled)
    for seq in seqs:
        engine.submit(seq)
    cancelled.cancelled = True
    engine.start_loop()
    try:
        finished = {done.get(timeout=120) for _ in jobs}
    finally:
        engine.stop_loop()
    assert finished == set(range(len(jobs)))
    for i, (job, tokens) in enumerate(zip(jobs, want)):
        assert job.tokens == tokens, f"sequence {i}"
    assert (
        engine.metrics.registry.get_sample_value("draftloop_requests_total", {"finish_reason": "abort"}) == 1
    )


class FixedDraft(Drafter):
    """Drafts one token from a fixed q (uniform over `ids`): cheap, and a q that
    overlaps the target's top tokens, so drafts are both accepted and rejected."""

    kind = "fixed"

    def __init__(self, ids: list[int], vocab_size: int) -> None:
        self.q = torch.zeros(vocab_size)
        self.q[ids] = 1.0 / len(ids)

    def propose(self, seq, k, params, gen) -> Proposal:
        token = int(torch.multinomial(self.q, 1, generator=gen))
        return Proposal([token], self.q.view(1, -1).clone(), [float(self.q[token].log())])


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's statistic of counts (V,) against probs (V,) over the cells with p > 0."""
    expected = probs * counts.sum()
    assert counts[expected == 0].sum() == 0, "emitted a token the target gives probability 0"
    cells = expected > 0
    return float(((counts[cells] - expected[cells]) ** 2 / expected[cells]).sum())


def test_batched_rejection_sampling_follows_the_target(target) -> None:
    """300 seeded sequences, batched: the first token follows the
    target's (top-5) distribution, and so does the second -- drawn through
    verification of a draft from q != p -- given the most frequent first token
    (chi-square, 4 degrees of freedom: 18.5 is the 0.1% critical value)."""
    from service.sampling import target_probs

    model, n = target.model, 300
    prompt = target.tokenizer.encode("Once upon a time, there was a")
    base = SamplingParams(temperature=1.0, top_k=5, max_tokens=3)  # the second token comes from a verify step
    with torch.inference_mode():
        p1 = target_probs(model(torch.tensor(prompt), model.new_cache(len(prompt)))[0][-1:], base)[0]  # (V,)
        mode = int(p1.argmax())
        ctx = torch.tensor([*prompt, mode])
        p2 = target_probs(model(ctx, model.new_cache(len(ctx)))[0][-1:], base)[0]  # (V,)
    drafter = FixedDraft(torch.topk(p2, 5).indices.tolist(), model.cfg.vocab_size)
    jobs = [Job(prompt, replace(base, seed=seed)) for seed in range(n)]
    engine = Engine(model, drafter, target.eos_token_ids, 1)
    run_loop(engine, jobs)
    assert all(job.error is None and len(job.tokens) == 3 for job in jobs)
    firsts = torch.bincount(torch.tensor([job.tokens[0] for job in jobs]), minlength=p1.shape[0]).float()
    seconds = [job.tokens[1] for job in jobs if job.tokens[0] == mode]
    counts = torch.bincount(torch.tensor(seconds), minlength=p2.shape[0]).float()
    assert chi_square(firsts, p1) < 18.5
    assert len(seconds) > 60 and chi_square(counts, p2) < 18.5
    assert 0 < engine.stats.num_accepted_tokens < engine.stats.num_draft_tokens  # both paths of the rule ran


def test_adaptive_speculation_stays_exact_and_drafts_only_where_it_pays(target) -> None:
    """DRAFTLOOP_SPECULATION=adaptive in the batched loop: the same tokens as
    single-stream decoding whatever K it picks; on a curve where a row costs a
    whole step nobody drafts, on a flat one everybody does."""
    from service.speculation import DraftLengthPolicy

    params = [replace(GREEDY, max_tokens=n) for n in (24, 3, 17, 9)]
    want = [Engine(target.model, NgramDrafter(), target.eos_token_ids, 4).generate(j.prompt, j.params)
            for j in mixed_jobs(target, params)]  # fmt: skip
    for curve, drafts in (([(1, 1.0), (64, 64.0)], False), ([(1, 1.0), (64, 1.0)], True)):
        policy = DraftLengthPolicy("adaptive", curve)
        engine = Engine(target.model, NgramDrafter(), target.eos_token_ids, 4, metrics=Metrics(), speculation=policy)
        jobs = mixed_jobs(target, params)
        run_loop(engine, jobs)
        assert [j.tokens for j in jobs] == want
        chosen = engine.metrics.registry.get_sample_value("draftloop_draft_length_sum")
        assert (chosen > 0) == drafts and (engine.stats.num_drafts > 0) == drafts


def test_a_seeded_sampled_sequence_drafts_its_cap_under_adaptive_speculation(target) -> None:
    """Its random draws follow its drafts, so it must not draft by the batch:
    alone or beside others, the same tokens (choice j of n = a request with seed + j)."""
    from service.speculation import DraftLengthPolicy

    sampled = SamplingParams(temperature=1.0, max_tokens=12, seed=7)
    curve = [(1, 1.0), (5, 1.0), (6, 6.0), (64, 64.0)]  # 5 rows free, then full price: K depends on the batch
    prompts = heldout_prompt_ids(target.tokenizer)
    runs = []
    for others in (0, 3):
        engine = Engine(target.model, NgramDrafter(), target.eos_token_ids, 4, metrics=Metrics(),
                        speculation=DraftLengthPolicy("adaptive", curve))  # fmt: skip
        jobs = [Job(list(prompts[0]), sampled)] + [Job(list(prompts[i + 1]), GREEDY) for i in range(others)]
        run_loop(engine, jobs)
        runs.append(jobs[0].tokens)
    assert runs[0] == runs[1] and len(runs[0]) > 0
    # the rule itself: on that curve a batch of 4 leaves the greedy ones at K = 0, the seeded one at its cap
    engine = Engine(target.model, NgramDrafter(), target.eos_token_ids, 4, speculation=DraftLengthPolicy("adaptive", [(1, 1.0), (64, 64.0)]))
    seqs = [Sequence(f"s{i}", list(prompts[0]), p, lambda _: None) for i, p in enumerate([sampled, GREEDY, GREEDY])]
    for seq in seqs:
        seq.drafter, seq.cache, seq.tokens = NgramDrafter(), SimpleNamespace(capacity=1000), [*seq.prompt_ids, 1]
    assert engine.draft_lengths(seqs) == [4, 0, 0]
