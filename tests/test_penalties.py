"""Presence / frequency penalties and logit bias: the pure rule against a
plain per-row reference, losslessness of speculative decoding w.r.t. the
penalised target (greedy on the real model, token for token; sampled, a
chi-square on the joint law of the first two tokens), and a +100 bias forcing
its token."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from service.drafters.draft_model import DraftModelDrafter
from service.drafters.ngram import NgramDrafter
from service.drafters.none import NoDrafter
from service.engine import Engine
from service.penalties import Penalties, apply_penalties, prefix_counts
from service.sampling import SamplingParams, rejection_verify, target_probs

from .test_lossless_greedy import _hybrid
from .test_sampling import _chi2_ok


def reference_penalties(logits, history, drafted, pen: Penalties) -> torch.Tensor:
    """OpenAI's formula, one row and one token at a time."""
    out = logits.float().clone()
    for row in range(out.shape[0]):
        counts = Counter([*history, *drafted[:row]])
        for token, c in counts.items():
            out[row, token] -= c * pen.frequency + (c > 0) * pen.presence
        for token, bias in zip(pen.bias_ids, pen.bias_values):
            out[row, token] += bias
    return out


def test_prefix_counts_row_i_counts_history_and_drafts_before_it():
    ids, counts = prefix_counts([5, 2, 5], [2, 7, 9], rows=4)
    assert ids.tolist() == [2, 5, 7, 9]
    assert counts.tolist() == [[1, 2, 0, 0], [2, 2, 0, 0], [2, 2, 1, 0], [2, 2, 1, 1]]
    ids, counts = prefix_counts([], [], rows=2)
    assert ids.numel() == 0 and counts.shape == (2, 0)


@pytest.mark.parametrize(
    "pen",
    [
        Penalties(presence=0.7, frequency=0.4),
        Penalties(presence=-1.5, frequency=2.0, bias_ids=(3, 11), bias_values=(100.0, -5.5)),
        Penalties(bias_ids=(0,), bias_values=(-100.0,)),
    ],
)
def test_apply_penalties_matches_reference(pen: Penalties):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 16, generator=gen)  # K = 4 drafts
    history = torch.randint(0, 16, (12,), generator=gen).tolist()
    drafted = torch.randint(0, 16, (4,), generator=gen).tolist()
    got = apply_penalties(logits, history, drafted, pen)
    torch.testing.assert_close(got, reference_penalties(logits, history, drafted, pen))
    assert not torch.equal(got, logits)  # it did something, and on a copy
    assert torch.equal(logits, torch.randn(5, 16, generator=torch.Generator().manual_seed(0)))


def test_build_is_none_when_nothing_changes_a_logit():
    assert Penalties.build(0.0, None, None) is None
    assert Penalties.build(None, 0.0, {4: 0.0}) is None
    assert Penalties.build(0.5, None, None) == Penalties(presence=0.5)
    assert Penalties.build(None, None, {4: -2.0, 5: 0.0}) == Penalties(bias_ids=(4,), bias_values=(-2.0,))


# ---- sampled: the joint law of two tokens under penalties -----------------------------


def test_penalised_rejection_sampling_follows_the_penalised_target():
    """A drafter proposes two tokens from its penalised q (row 2 counting the
    first draft), the target rows are penalised as the engine does, and the
    first two emitted tokens must follow p1(a) * p2(b | a), where p2 counts a."""
    v, n = 5, 6000
    gen = torch.Generator().manual_seed(3)
    pen = Penalties(presence=0.6, frequency=0.9, bias_ids=(4,), bias_values=(0.8,))
    params = SamplingParams(temperature=0.9, penalties=pen)
    history = [1, 1, 3]
    target = torch.log(
        torch.tensor([[0.3, 0.3, 0.1, 0.2, 0.1], [0.1, 0.4, 0.3, 0.1, 0.1], [0.2] * 5])
    )  # (3, V)
    draft = torch.log(torch.tensor([[0.1, 0.5, 0.1, 0.2, 0.1], [0.3, 0.1, 0.1, 0.4, 0.1]]))  # (2, V)

    def p(row: int, seen: list[int]) -> torch.Tensor:  # (V,) the penalised target after `seen`
        return target_probs(apply_penalties(target[row : row + 1], [*history, *seen], [], pen), params)[0]

    joint = torch.zeros(v, v)
    for _ in range(n):
        drafted: list[int] = []
        qs = []
        for i in range(2):  # as the eagle3 / draft_model drafters: each slot counts the drafts before it
            q = target_probs(apply_penalties(draft[i : i + 1], [*history, *drafted], [], pen), params)[0]
            qs.append(q)
            drafted.append(int(torch.multinomial(q, 1, generator=gen)))
        scores = apply_penalties(target, history, drafted, pen)  # as Engine.step
        accepted, nxt = rejection_verify(
            torch.tensor(drafted), torch.stack(qs), target_probs(scores, params), gen
        )
        out = [*drafted[:accepted], nxt]
        if len(out) < 2:  # the next step (K = 0) samples the second token, counting the first
            out.append(int(torch.multinomial(p(1, out), 1, generator=gen)))
        joint[out[0], out[1]] += 1
    expected = torch.stack([p(0, [])[a] * p(1, [a]) for a in range(v)]).flatten()  # (V * V,)
    assert _chi2_ok(joint.flatten(), expected) < 51.2  # 24 dof, 0.1%
    plain = SamplingParams(temperature=0.9)
    unpenalised = torch.outer(
        target_probs(target[:1], plain)[0], target_probs(target[1:2], plain)[0]
    ).flatten()
    assert _chi2_ok(joint.flatten(), unpenalised) > 500  # the penalties really changed the law


# ---- greedy on the real model: speculative == target-only, with penalties ----------------

PROMPTS = [
    "Echo this: 7 7 7 7 7 7 7 7 7 7 7 7",
    "Count from 1 to 30, separated by commas.",
    "Write a short poem about the sea.",
]
PENALTIES = [
    # strong: prompt-lookup drafts of repeated tokens are accepted until the counts of
    # the drafts before a row tip it (counting only emitted tokens diverges on prompt 0)
    Penalties(presence=2.0, frequency=2.0),
    # rewards repetition: long accepted drafts; and a bias
    Penalties(presence=-1.0, frequency=-0.5, bias_ids=(28,), bias_values=(3.0,)),
]


def _prompts(target) -> list[list[int]]:
    from worker.prompts import chat_ids

    return [chat_ids(target.tokenizer, p) for p in PROMPTS]


def _naive_check(target, prompt: list[int], out: list[int], pen: Penalties) -> None:
    """Each emitted token is the argmax of the reference rule applied to the
    target's logits at its position (one forward over prompt + output)."""
    model = target.model
    ids = torch.tensor([*prompt, *out], dtype=torch.long)
    with torch.inference_mode():
        logits, _, _ = model(ids, model.new_cache(len(ids) + 1))  # (P + T, V)
    rows = logits[len(prompt) - 1 : len(prompt) - 1 + len(out)]  # row t predicts out[t]
    penalised = reference_penalties(rows, [], out, pen)  # row t counts out[:t]
    assert penalised.argmax(-1).tolist() == out


def _drafter(target, kind: str):
    if kind == "ngram":
        return NgramDrafter()
    if kind == "draft_model":
        return DraftModelDrafter(target.model, num_layers=4)
    return _hybrid(target, min_match=1)  # lookup + an untrained eagle3 head drafting every slot


@pytest.mark.parametrize("kind", ["ngram", "draft_model", "hybrid"])
def test_greedy_speculative_equals_target_only_with_penalties(target, kind):
    prompts = _prompts(target)
    plain = Engine(target.model, NoDrafter(), target.eos_token_ids, 0)
    drafter = _drafter(target, kind)
    spec = Engine(target.model, drafter, target.eos_token_ids, 4)
    changed = False
    for pen in PENALTIES:
        params = SamplingParams(temperature=0.0, max_tokens=16, penalties=pen)
        for prompt in prompts:
            want = plain.generate(prompt, params)
            assert spec.generate(prompt, params) == want
            if kind == "ngram":  # the reference itself, once
                _naive_check(target, prompt, want, pen)
                changed |= want != plain.generate(prompt, SamplingParams(temperature=0.0, max_tokens=16))
    assert changed or kind != "ngram"  # the penalties changed some output
    assert spec.stats.num_accepted_tokens > 0  # rows after accepted drafts were checked


@pytest.mark.parametrize("kind", ["ngram", "hybrid"])
def test_logit_bias_plus_100_forces_the_token(target, kind):
    prompt = _prompts(target)[2]
    forced = 1000
    pen = Penalties(bias_ids=(forced,), bias_values=(100.0,))
    engine = Engine(target.model, _drafter(target, kind), target.eos_token_ids, 4)
    for temperature in (0.0, 1.0):
        params = SamplingParams(temperature=temperature, max_tokens=6, seed=0, penalties=pen)
        assert engine.generate(prompt, params) == [forced] * 6
    banned = engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=4))
    pen = Penalties(bias_ids=(banned[0],), bias_values=(-100.0,))
    out = engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=4, penalties=pen))
    assert banned[0] not in out
