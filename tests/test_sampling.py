"""Verification math: greedy acceptance rules and the losslessness of
rejection sampling (emitted tokens follow the target, not the draft)."""

import torch

from service.sampling import SamplingParams, greedy_verify, rejection_verify, target_probs

N = 20_000


def test_greedy_verify_accepts_matching_prefix():
    logits = torch.full((4, 5), -1.0)
    for pos, tok in enumerate([2, 3, 1, 4]):
        logits[pos, tok] = 1.0
    assert greedy_verify(torch.tensor([2, 3, 1]), logits) == (3, 4)  # all accepted + bonus
    assert greedy_verify(torch.tensor([2, 0, 1]), logits) == (1, 3)  # first mismatch at slot 1
    assert greedy_verify(torch.tensor([0, 3, 1]), logits) == (0, 2)
    assert greedy_verify(torch.tensor([], dtype=torch.long), logits[:1]) == (0, 2)


def test_target_probs_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = target_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    torch.testing.assert_close(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = target_probs(logits, SamplingParams(temperature=1.0, top_p=0.8))
    torch.testing.assert_close(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))  # 0.5 + 0.3 reaches 0.8
    p = target_probs(logits, SamplingParams(temperature=1.0, top_p=0.81))
    assert (p[0, :3] > 0).all() and p[0, 3] == 0
    hot = target_probs(logits, SamplingParams(temperature=2.0))
    assert hot[0, 3] > 0.05 and hot[0, 0] < 0.5  # temperature flattens


def _chi2_ok(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square statistic of counts against probs (cells with p > 0)."""
    exp = probs * counts.sum()
    mask = exp > 0
    assert counts[~mask].sum() == 0, "emitted a token the target gives probability 0"
    return float(((counts[mask] - exp[mask]) ** 2 / exp[mask]).sum())


def _first_token_counts(p, q, k, gen, draft_sampler) -> torch.Tensor:
    counts = torch.zeros(p.shape[-1])
    for _ in range(N):
        draft = draft_sampler(gen)
        n, nxt = rejection_verify(draft, q[:k], p, gen)
        first = int(draft[0]) if n > 0 else nxt
        counts[first] += 1
    return counts



def test_a_top_p_below_float32s_range_keeps_the_top_token():
    """top_p = 2.2e-311 (valid: > 0) is 0 once compared in float32; the nucleus
    still holds the most likely token instead of nothing (NaN, a 500; found by the fuzz)."""
    logits = torch.tensor([[0.5, 2.0, 1.0]])
    probs = target_probs(logits, SamplingParams(temperature=1.0, top_p=2.225073858507e-311))
    assert torch.equal(probs, torch.tensor([[0.0, 1.0, 0.0]]))

def test_rejection_sampling_follows_target_not_draft():
    gen = torch.Generator().manual_seed(0)
    p1 = torch.tensor([0.05, 0.4, 0.3, 0.2, 0.05])
    q1 = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.2])
    p = torch.stack([p1, torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2]), p1.flip(0)])  # (K+1=3, V)
    q = torch.stack([q1, q1.flip(0)])  # (K=2, V)

    def sampler(g):
        return torch.stack([torch.multinomial(q[i], 1, generator=g)[0] for i in range(2)])

    counts = _first_token_counts(p, q, 2, gen, sampler)
    # chi-square, 4 degrees of freedom: 18.5 is the 0.1% critical value
    assert _chi2_ok(counts, p1) < 18.5
    assert _chi2_ok(counts, q1) > 1000  # and clearly not the draft's distribution


def test_rejection_sampling_second_token_is_conditional_target():
    """Two-token sequences: the joint law of (x1, x2) must be p1(x1) * p2(x2)."""
    gen = torch.Generator().manual_seed(1)
    p1 = torch.tensor([0.6, 0.3, 0.1])
    p2 = torch.tensor([0.1, 0.2, 0.7])
    q1 = torch.tensor([0.2, 0.2, 0.6])
    q2 = torch.tensor([0.5, 0.4, 0.1])
    p = torch.stack([p1, p2, torch.tensor([1 / 3] * 3)])
    q = torch.stack([q1, q2])
    joint = torch.zeros(3, 3)
    for _ in range(N):
        d = torch.stack([torch.multinomial(q1, 1, generator=gen)[0], torch.multinomial(q2, 1, generator=gen)[0]])
        n, nxt = rejection_verify(d, q, p, gen)
        seq = [*d[:n].tolist(), nxt]
        if len(seq) < 2:  # rejected at slot 0: the second token comes from p2 in the next step
            seq.append(int(torch.multinomial(p2, 1, generator=gen)[0]))
        joint[seq[0], seq[1]] += 1
    expected = torch.outer(p1, p2).flatten()
    assert _chi2_ok(joint.flatten(), expected) < 26.1  # 8 dof, 0.1%


def test_deterministic_drafter_is_lossless():
    """q = None (prompt lookup): accept with probability p(x), else sample p without x."""
    gen = torch.Generator().manual_seed(2)
    p1 = torch.tensor([0.1, 0.6, 0.3])
    p = torch.stack([p1, p1])
    counts = torch.zeros(3)
    for _ in range(N):
        n, nxt = rejection_verify(torch.tensor([2]), None, p, gen)
        counts[2 if n else nxt] += 1
    assert _chi2_ok(counts, p1) < 13.8  # 2 dof, 0.1%


def test_seeded_generator_reproduces():
    p = torch.softmax(torch.randn(5, 50, generator=torch.Generator().manual_seed(3)), -1)
    q = torch.softmax(torch.randn(4, 50, generator=torch.Generator().manual_seed(4)), -1)
    d = torch.tensor([1, 2, 3, 4])
    runs = [[rejection_verify(d, q, p, torch.Generator().manual_seed(7)) for _ in range(1)] for _ in range(2)]
    assert runs[0] == runs[1]
