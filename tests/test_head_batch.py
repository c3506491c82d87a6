"""The EAGLE-3 head's draft steps batched across sequences (`service.drafting`,
`service.drafters.lockstep`, `service.drafters.eagle3.runner`): every
sequence's proposal (tokens, q, log-probs, sources) and its generator's draws
equal those of drafting it alone, over several draft -> verify -> commit
rounds with mixed prompt lengths, draft lengths, sampling, penalties, a hybrid
whose lookup goes first and two heads in one batch; each draft step is one
head forward per head, not one per sequence; a failing sequence fails alone."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch

from service import drafting
from service.drafters.base import Drafter, Proposal
from service.drafters.eagle3 import Eagle3Drafter
from service.drafters.eagle3.runner import HeadCall, HeadRunner
from service.drafters.hybrid import HybridDrafter
from service.drafters.lockstep import run_lockstep
from service.drafters.ngram import NgramDrafter
from service.engine import Engine, Sequence
from service.penalties import Penalties
from service.sampling import SamplingParams, make_generator

from .test_eagle3 import TINY, tiny_head, tiny_target

GREEDY = SamplingParams(temperature=0.0, max_tokens=64)
SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=64, seed=11)


@dataclass
class Case:
    drafter: Drafter
    prompt: list[int]
    params: SamplingParams
    ks: tuple[int, ...]  # the draft length of each round (cycled)
    first: int | None = None  # the first generated token (None: the target's argmax)


def _seq(case: Case, i: int, taps: list[torch.Tensor], first: int, capacity: int) -> Sequence:
    seq = Sequence(f"s{i}", list(case.prompt), case.params, lambda _: None)
    seq.drafter, seq.capacity, seq.tokens = case.drafter, capacity, [*case.prompt, first]
    seq.gen = make_generator(case.params.seed if case.params.seed is not None else 0)
    case.drafter.begin(seq, taps)
    return seq


def assert_same(a: Proposal, b: Proposal | BaseException, where: str) -> None:
    assert isinstance(b, Proposal), f"{where}: {b!r}"
    assert a.tokens == b.tokens and a.logprobs == b.logprobs and a.sources == b.sources, where
    same_q = a.probs is None if b.probs is None else a.probs is not None and torch.equal(a.probs, b.probs)
    assert same_q, where


def alone_vs_lockstep(model, cases: list[Case], rounds: int, accept) -> list[list[Proposal]]:
    """Two copies of every sequence: one drafts alone (`propose`), the other in
    lock-step with all the others (`drafting.draft`); both must propose the same
    each round. Verification: the target's forward on [last] + drafts, then
    `accept(round, i, drafts, logits)` -> (accepted, next token); both copies
    commit the same. -> the proposals, per round."""
    capacity = max(len(c.prompt) for c in cases) + rounds * 8 + 16
    engine = Engine(model, cases[0].drafter, set(), 8)
    alone, batched, caches = [], [], []
    for i, case in enumerate(cases):
        cache = model.new_cache(capacity)
        logits, _, taps = model(torch.tensor(case.prompt), cache, hidden_layers=case.drafter.hidden_layers)
        first = int(logits[-1].argmax()) if case.first is None else case.first
        alone.append(_seq(case, i, taps, first, capacity))
        batched.append(_seq(case, i, taps, first, capacity))
        caches.append(cache)
    history = []
    for r in range(rounds):
        ks = [c.ks[r % len(c.ks)] for c in cases]
        want = [
            s.drafter.propose(s, k, s.params, s.gen) if k else Proposal([], None, [])
            for s, k in zip(alone, ks)
        ]
        got = drafting.draft(engine, batched, ks)
        for i, (a, b) in enumerate(zip(want, got)):
            assert_same(a, b.proposal, f"round {r}, sequence {i}")
        for i, (sa, sb, cache, p) in enumerate(zip(alone, batched, caches, want)):
            start = cache.length
            ids = torch.tensor([sa.tokens[-1], *p.tokens])
            logits, _, taps = model(ids, cache, hidden_layers=sa.drafter.hidden_layers)
            n, nxt = accept(r, i, p.tokens, logits)
            cache.rollback(start + 1 + n)
            for s in (sa, sb):
                s.tokens += [*p.tokens[:n], nxt]
                s.drafter.commit(s, n, taps)
        history.append(want)
    for i, (sa, sb) in enumerate(zip(alone, batched)):
        assert torch.equal(sa.gen.get_state(), sb.gen.get_state()), (
            f"sequence {i}: its generator drew otherwise"
        )
    return history


def forced_accept(r: int, i: int, drafts: list[int], logits: torch.Tensor) -> tuple[int, int]:
    """An accept/reject schedule that varies the catch-up rows (random heads are rarely right)."""
    n = min(len(drafts), (r + i) % 4)
    return n, (7 * r + 5 * i + 3) % TINY.vocab_size


def greedy_accept(r: int, i: int, drafts: list[int], logits: torch.Tensor) -> tuple[int, int]:
    best = logits.argmax(-1).tolist()
    n = 0
    while n < len(drafts) and drafts[n] == best[n]:
        n += 1
    return n, best[n]


# then first token 5: the lookup matches [5] and proposes [6, 50, 5], the head drafts after them
LOOKUP_PROMPT = [*range(20, 30), 5, 6, 50]


def tiny_cases(target) -> list[Case]:
    model = target.model
    full = Eagle3Drafter(tiny_head(target, seed=1), model, min_confidence=0.0)  # drafts every slot
    other = Eagle3Drafter(tiny_head(target, seed=2), model, min_confidence=0.05)  # a second head; stops early
    other.stop_thresholds = (0.2, 0.02, 0.01)
    hybrid = HybridDrafter(full, NgramDrafter(), min_match=1)  # shares `full`'s head: batches with it
    gen = torch.Generator().manual_seed(3)
    prompt = lambda n: torch.randint(0, TINY.vocab_size, (n,), generator=gen).tolist()
    penalised = replace(GREEDY, penalties=Penalties.build(0.7, 0.4, {5: 3.0, 9: -2.0}))
    return [
        Case(full, prompt(5), GREEDY, (4, 1, 3)),
        Case(full, prompt(23), SAMPLED, (4, 4, 2)),
        Case(full, prompt(2), GREEDY, (0, 2, 4, 1)),
        Case(full, prompt(11), penalised, (3,)),
        Case(hybrid, LOOKUP_PROMPT, GREEDY, (4,), first=5),
        Case(hybrid, prompt(9), replace(SAMPLED, seed=5, top_k=8), (4, 2)),
        Case(other, prompt(17), GREEDY, (4, 1)),
        Case(other, prompt(8), replace(SAMPLED, seed=7), (3, 0)),
        Case(NgramDrafter(), LOOKUP_PROMPT, GREEDY, (4,), first=5),  # no head: drafts alone beside them
    ]


def test_lockstep_drafting_equals_drafting_alone():
    target = tiny_target()
    with torch.inference_mode():
        history = alone_vs_lockstep(target.model, tiny_cases(target), rounds=6, accept=forced_accept)
    sources = [p.sources or "" for round_ in history for p in round_]
    assert any(
        s.startswith("n") and "e" in s for s in sources
    )  # the hybrid's lookup went first, then its head
    lengths = {len(p.tokens) for round_ in history for p in round_}
    assert {0, 1, 4} <= lengths


def test_runner_computes_head_step():
    """The serving runner is `Eagle3Head.step` (checked against the training
    unroll in test_eagle3.py) for many sequences at once: same hidden, same
    draft-vocab logits, same cache contents (up to the linears' kernels)."""
    target = tiny_target()
    head = tiny_head(target)
    runner, cfg = HeadRunner(head), head.cfg
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 0), (1, 9), (3, 4)]  # (rows, start)
    calls, want = [], []
    with torch.inference_mode():
        for rows, start in shapes:
            hidden = torch.randn(rows, cfg.hidden_size, generator=gen)
            tokens = torch.randint(0, TINY.vocab_size, (rows,), generator=gen)
            caches = [torch.randn(cfg.num_kv_heads, 32, cfg.head_dim, generator=gen) for _ in range(2)]
            ref = [c.clone() for c in caches]
            out = head.step(hidden, tokens, ref[0], ref[1], start)[-1:]
            want.append((out, head.logits(out), ref))
            calls.append(HeadCall(runner, hidden, tokens, caches[0], caches[1], start))
        got = runner.forward(calls)
    for (hidden, logits, ref), out, call in zip(want, got, calls):
        torch.testing.assert_close(out.hidden, hidden)
        torch.testing.assert_close(out.logits, logits)
        torch.testing.assert_close(call.k_cache, ref[0])
        torch.testing.assert_close(call.v_cache, ref[1])


def test_each_draft_step_is_one_head_forward_per_head(monkeypatch):
    """A batch of sequences on two heads: the catch-up and every later step run
    as one forward per head over all its sequences, never one per sequence."""
    target = tiny_target()
    cases = [c for c in tiny_cases(target) if isinstance(c.drafter, Eagle3Drafter)]
    for c in cases:
        c.drafter.min_confidence, c.drafter.stop_thresholds, c.ks = 0.0, (), (4,)  # every slot
    calls: list[tuple[int, int]] = []  # (runner, sequences in the forward)
    real = HeadRunner.forward

    def spy(self, requests):
        calls.append((id(self), len(requests)))
        return real(self, requests)

    monkeypatch.setattr(HeadRunner, "forward", spy)
    with torch.inference_mode():
        alone_vs_lockstep(target.model, cases, rounds=1, accept=forced_accept)
    per_seq = [n for _, n in calls if n == 1]
    batched = [(runner, n) for runner, n in calls if n > 1]
    assert len(per_seq) == len(cases) * 4  # the copies drafting alone: one forward per step and sequence
    assert len({runner for runner, _ in batched}) == 2  # two heads, one forward each per step
    assert sorted(n for _, n in batched) == [2] * 4 + [4] * 4  # 4 steps (catch-up + 3) per head


def test_engine_iterations_batch_the_head(monkeypatch):
    """The serving loop drafts through the lock-step: its head forwards carry
    several sequences, and there are far fewer of them than sequence steps."""
    from .test_batching import Job, run_loop

    target = tiny_target()
    drafter = Eagle3Drafter(tiny_head(target), target.model, min_confidence=0.0)
    sizes: list[int] = []
    real = HeadRunner.forward
    monkeypatch.setattr(HeadRunner, "forward", lambda self, reqs: sizes.append(len(reqs)) or real(self, reqs))
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    jobs = [Job(list(range(3 + i, 9 + 2 * i)), params) for i in range(4)]
    engine = Engine(target.model, drafter, set(), 4)
    run_loop(engine, jobs)
    batched = list(sizes)
    want = [Engine(target.model, drafter, set(), 4).generate(j.prompt, j.params) for j in jobs]
    assert [j.tokens for j in jobs] == want
    assert max(batched) == 4 and len(batched) < sum(batched) / 2


def test_a_failing_head_step_fails_its_sequence_alone(monkeypatch, caplog):
    """A batched forward raises (one sequence's draft step cannot run): the steps
    are rerun one by one, that sequence fails alone, the others draft as alone."""
    target = tiny_target()
    model = target.model
    cases = [c for c in tiny_cases(target) if isinstance(c.drafter, Eagle3Drafter)][:4]
    ks = [4] * len(cases)

    def fresh() -> list[Sequence]:
        seqs = []
        for i, case in enumerate(cases):
            cache = model.new_cache(64)
            logits, _, taps = model(
                torch.tensor(case.prompt), cache, hidden_layers=case.drafter.hidden_layers
            )
            seqs.append(_seq(case, i, taps, int(logits[-1].argmax()), 64))
        return seqs

    with torch.inference_mode():
        alone = fresh()
        want = [s.drafter.propose(s, k, s.params, s.gen) for s, k in zip(alone, ks)]
        seqs = fresh()
    bad, real = seqs[2].draft_state.k, HeadRunner.forward

    def faulty(self, requests):
        if any(
            r.k_cache is bad and r.rows == 1 for r in requests
        ):  # its first draft step, after the catch-up
            raise RuntimeError("head step failed")
        return real(self, requests)

    monkeypatch.setattr(HeadRunner, "forward", faulty)
    with torch.inference_mode():
        got = drafting.draft(Engine(model, cases[0].drafter, set(), 4), seqs, ks)
    assert isinstance(got[2].proposal, RuntimeError)
    for i in (0, 1, 3):
        assert_same(want[i], got[i].proposal, f"sequence {i}")
    assert "running them one by one" in caplog.text
    assert all(d.seconds > 0 for d in got)


def test_run_lockstep_keeps_a_generators_own_exception():
    def broken():
        yield from ()
        raise ValueError("drafter bug")

    def empty():
        return Proposal([1], None, [0.0])
        yield  # a generator that needs no head step

    (first, _), (second, _) = run_lockstep([broken(), empty()])
    assert isinstance(first, ValueError) and second.tokens == [1]


@pytest.mark.slow
def test_lockstep_equals_alone_on_the_real_model(target):
    """float32, the default model, an untrained head drafting every slot: the
    batched head rows give bit for bit the proposals of drafting alone."""
    from .reference import heldout_prompt_ids
    from .test_batching import random_head_drafter

    drafter = random_head_drafter(target)
    prompts = [list(p) for p in heldout_prompt_ids(target.tokenizer)[:5]]
    params = [GREEDY, SAMPLED, GREEDY, replace(GREEDY, penalties=Penalties.build(0.5, 0.5, None)), GREEDY]
    ks = [(4,), (4, 2), (1, 4), (3,), (0, 4)]
    cases = [Case(drafter, p, q, k) for p, q, k in zip(prompts, params, ks)]
    with torch.inference_mode():
        alone_vs_lockstep(target.model, cases, rounds=3, accept=greedy_accept)
