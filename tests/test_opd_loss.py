"""Draft-OPD loss: vectorised == loop reference (both poolings), a
hand-computed case, the ablation switches, the sparse-target densifier,
gradients, and the accept mask of the head being trained."""

from __future__ import annotations

import itertools
from math import log

import pytest
import torch

from worker.train.losses import (
    densify_topk,
    forward_kl,
    opd_loss,
    opd_loss_reference,
    replay_accepted,
    reverse_kl,
    teacher_top1,
)


def _random_batch(g: torch.Generator, B: int = 5, K: int = 4, V: int = 9, sparse: bool = False):
    q_logp = torch.log_softmax(torch.randn(B, K + 1, V, generator=g) * 2, -1)
    if sparse:
        top = torch.randn(B, K + 1, V, generator=g).log_softmax(-1).topk(4, dim=-1)
        p_logp = densify_topk(top.indices, top.values, V)
    else:
        p_logp = torch.log_softmax(torch.randn(B, K + 1, V, generator=g) * 2, -1)
    num_draft = torch.randint(0, K + 1, (B,), generator=g)
    num_draft[0] = K  # at least one full block
    num_accepted = (torch.rand(B, generator=g) * (num_draft + 1)).long().clamp(max=num_draft)
    num_accepted[0] = K  # and one with every draft accepted (bonus row)
    return q_logp, p_logp, num_accepted, num_draft


@pytest.mark.parametrize(
    "mode,gamma,sparse,pool",
    list(itertools.product(["opd", "forward_kl_all", "reverse_kl_all"], [0.8, 1.0], [False, True], ["token", "stream"])),
)
def test_vectorised_matches_reference(mode: str, gamma: float, sparse: bool, pool: str) -> None:
    g = torch.Generator().manual_seed(hash((mode, gamma, sparse)) % 2**31)
    for _ in range(3):
        q, p, n, k = _random_batch(g, sparse=sparse)
        bw = torch.rand(q.shape[0], generator=g)
        for kwargs in ({}, {"block_weight": bw}, {"lam_acc": 2.0, "lam_rej": 0.5}, {"lam_rej": 0.0}):
            fast = opd_loss(q, p, p, n, k, gamma=gamma, mode=mode, pool=pool, **kwargs)
            ref = opd_loss_reference(q, p, p, n, k, gamma=gamma, mode=mode, pool=pool, **kwargs)
            for a, b in zip(fast, ref, strict=True):
                torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode,pool", list(itertools.product(["opd", "forward_kl_all", "reverse_kl_all"], ["token", "stream"])))
def test_separate_stream_targets(mode: str, pool: str) -> None:
    """Each stream reads its own target: one call with (p_acc, p_rej) gives the
    accepted stream of a call on p_acc alone and the rejected stream of a call
    on p_rej alone, and matches the reference."""
    g = torch.Generator().manual_seed(7)
    q, p_acc, n, k = _random_batch(g)
    p_rej = _random_batch(g, sparse=True)[1]
    bw = torch.rand(q.shape[0], generator=g)
    kw = dict(mode=mode, block_weight=bw, lam_acc=2.0, lam_rej=0.5, pool=pool)
    both = opd_loss(q, p_acc, p_rej, n, k, **kw)
    torch.testing.assert_close(both.loss_acc, opd_loss(q, p_acc, p_acc, n, k, **kw).loss_acc)
    torch.testing.assert_close(both.loss_rej, opd_loss(q, p_rej, p_rej, n, k, **kw).loss_rej)
    if pool == "stream":
        torch.testing.assert_close(both.loss, (2.0 * both.loss_acc + 0.5 * both.loss_rej) / 2.5)
    for a, b in zip(both, opd_loss_reference(q, p_acc, p_rej, n, k, **kw), strict=True):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-6)


# Hand-computed case: V = 2, K = 2, the same three rows in two blocks.
P = [[0.8, 0.2], [0.5, 0.5], [0.3, 0.7]]
Q = [[0.5, 0.5], [0.9, 0.1], [0.6, 0.4]]
FWD0 = 0.8 * log(0.8 / 0.5) + 0.2 * log(0.2 / 0.5)  # KL(p0‖q0) ≈ 0.192745
FWD1 = 0.5 * log(0.5 / 0.9) + 0.5 * log(0.5 / 0.1)  # KL(p1‖q1) ≈ 0.510826
REV0 = 0.5 * log(0.5 / 0.8) + 0.5 * log(0.5 / 0.2)  # KL(q0‖p0) ≈ 0.223144
REV1 = 0.9 * log(0.9 / 0.5) + 0.1 * log(0.1 / 0.5)  # KL(q1‖p1) ≈ 0.368064


def _tiny():
    q = torch.tensor([Q, Q]).log()
    p = torch.tensor([P, P]).log()
    # block A: slot 1 accepted, slot 2 rejected (recovered token at row 1; row 2 unused)
    # block B: slot 1 rejected (recovered token at row 0)
    return q, p, p, torch.tensor([1, 0]), torch.tensor([2, 2])  # one target for both streams


def test_hand_computed_value() -> None:
    assert FWD0 == pytest.approx(0.192745, abs=1e-6) and FWD1 == pytest.approx(0.510826, abs=1e-6)
    assert REV0 == pytest.approx(0.223144, abs=1e-6) and REV1 == pytest.approx(0.368064, abs=1e-6)
    # accepted stream: A rows 0, 1; B row 0          -> (FWD0 + FWD1 + FWD0) / 3
    # rejected stream: A row 1 (slot 2, weight 0.8); B row 0 (slot 1, weight 1), row 1 (slot 2, weight 0.8)
    l_acc = (FWD0 + FWD1 + FWD0) / 3
    l_rej = (0.8 * REV1 + 1.0 * REV0 + 0.8 * REV1) / (0.8 + 1.0 + 0.8)
    assert l_acc == pytest.approx(0.298772, abs=1e-6) and l_rej == pytest.approx(0.312325, abs=1e-6)
    for fn in (opd_loss, opd_loss_reference):
        out = fn(*_tiny())
        assert out.loss_acc.item() == pytest.approx(l_acc, rel=1e-5)
        assert out.loss_rej.item() == pytest.approx(l_rej, rel=1e-5)
        # pooled by token (the default): 3 accepted rows of weight 1, rejected rows of weight 0.8 + 1 + 0.8
        assert out.loss.item() == pytest.approx((3 * l_acc + 2.6 * l_rej) / 5.6, rel=1e-5)
        # pooled by stream: the mean of the two streams' means
        assert fn(*_tiny(), pool="stream").loss.item() == pytest.approx((l_acc + l_rej) / 2, rel=1e-5)
        # λ_rej = 0 (the official EAGLE-3 recipe's): the accepted stream alone
        assert fn(*_tiny(), lam_rej=0.0).loss.item() == pytest.approx(l_acc, rel=1e-5)


def test_ablation_switches() -> None:
    base = opd_loss(*_tiny())
    no_decay = opd_loss(*_tiny(), gamma=1.0)
    assert no_decay.loss_acc.item() == pytest.approx(base.loss_acc.item())
    assert no_decay.loss_rej.item() == pytest.approx((REV1 + REV0 + REV1) / 3, rel=1e-5)
    fwd_all = opd_loss(*_tiny(), mode="forward_kl_all")
    assert fwd_all.loss_acc.item() == pytest.approx(base.loss_acc.item())
    assert fwd_all.loss_rej.item() == pytest.approx((0.8 * FWD1 + FWD0 + 0.8 * FWD1) / 2.6, rel=1e-5)
    rev_all = opd_loss(*_tiny(), mode="reverse_kl_all")
    assert rev_all.loss_acc.item() == pytest.approx((REV0 + REV1 + REV0) / 3, rel=1e-5)
    assert rev_all.loss_rej.item() == pytest.approx(base.loss_rej.item())
    weighted = opd_loss(*_tiny(), lam_acc=3.0, lam_rej=1.0, pool="stream")
    assert weighted.loss.item() == pytest.approx(
        (3 * base.loss_acc.item() + base.loss_rej.item()) / 4, rel=1e-5
    )
    by_token = opd_loss(*_tiny(), lam_acc=3.0, lam_rej=1.0)  # λ scales each row's weight
    assert by_token.loss.item() == pytest.approx(
        (3 * 3 * base.loss_acc.item() + 2.6 * base.loss_rej.item()) / (9 + 2.6), rel=1e-5
    )
    with pytest.raises(ValueError, match="mode"):
        opd_loss(*_tiny(), mode="sft")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pool"):
        opd_loss(*_tiny(), pool="block")  # type: ignore[arg-type]


def test_all_accepted_and_empty_blocks() -> None:
    q, p, _, _, k = _tiny()
    out = opd_loss(
        q, p, p, torch.tensor([2, 2]), k
    )  # every draft accepted: bonus row 2 joins the accepted stream
    assert out.loss_rej.item() == 0.0
    fwd2 = 0.3 * log(0.3 / 0.6) + 0.7 * log(0.7 / 0.4)
    assert out.loss_acc.item() == pytest.approx((FWD0 + FWD1 + fwd2) / 3, rel=1e-5)
    assert out.loss.item() == pytest.approx(out.loss_acc.item(), rel=1e-5)  # no rejected row: the accepted mean
    stream = opd_loss(q, p, p, torch.tensor([2, 2]), k, pool="stream")
    assert stream.loss.item() == pytest.approx(out.loss_acc.item() / 2, rel=1e-5)  # (λ·L_acc + λ·0) / 2λ
    k0 = opd_loss(q, p, p, torch.tensor([0, 0]), torch.tensor([0, 0]))  # K = 0 blocks: only the target's own row
    assert k0.loss_acc.item() == pytest.approx(FWD0, rel=1e-5) and k0.loss_rej.item() == 0.0
    with pytest.raises(ValueError):
        opd_loss(q, p, p, torch.tensor([3, 0]), k)


def test_densify_topk() -> None:
    ids = torch.tensor([[0, 2], [1, -1]])
    lp = torch.tensor([[0.5, 0.3], [0.9, 0.05]]).log()
    spread = densify_topk(ids, lp, 4).exp()
    torch.testing.assert_close(spread, torch.tensor([[0.5, 0.1, 0.3, 0.1], [0.1 / 3, 0.9, 0.1 / 3, 0.1 / 3]]))
    renorm = densify_topk(ids, lp, 4, tail="renorm").exp()
    torch.testing.assert_close(renorm, torch.tensor([[0.625, 0.0, 0.375, 0.0], [0.0, 1.0, 0.0, 0.0]]))
    # float16 rounding can make a full top-k overshoot 1: still a distribution
    full = densify_topk(torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.51]]).log(), 2).exp()
    assert full.sum().item() == pytest.approx(1.0)
    # both KL directions finite on a spread target
    q = torch.randn(2, 4).log_softmax(-1)
    assert (
        torch.isfinite(forward_kl(spread.log(), q)).all()
        and torch.isfinite(reverse_kl(spread.log(), q)).all()
    )


def test_gradients_flow_and_padding_is_inert() -> None:
    g = torch.Generator().manual_seed(0)
    B, K, V = 3, 3, 6
    top = torch.randn(B, K + 1, V, generator=g).log_softmax(-1).topk(3, dim=-1)
    n, k = torch.tensor([1, 3, 0]), torch.tensor([3, 3, 1])
    for mode, tail in (("opd", "spread"), ("forward_kl_all", "renorm")):
        logits = torch.randn(B, K + 1, V, generator=g, requires_grad=True)
        p = densify_topk(top.indices, top.values, V, tail=tail)
        p[2, 2:] = float("nan")  # block 2 drafted 1 token: rows 2.. are padding with garbage
        q = logits.log_softmax(-1)
        q = torch.cat([q[:2], torch.cat([q[2:, :2], torch.full_like(q[2:, 2:], float("-inf"))], 1)])
        out = opd_loss(q, p, p, n, k, mode=mode)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        grad = logits.grad
        assert grad is not None and torch.isfinite(grad).all(), mode
        assert grad[0, :3].abs().sum() > 0 and grad[1].abs().sum() > 0
        assert grad[0, 3].abs().sum() == 0  # row past block 0's recovered token and drafted tokens
        assert grad[2, 2:].abs().sum() == 0  # padding


def test_descent_reduces_loss() -> None:
    g = torch.Generator().manual_seed(1)
    q, p, n, k = _random_batch(g, sparse=True)
    logits = q.clone().requires_grad_(True)
    first = opd_loss(logits.log_softmax(-1), p, p, n, k).loss.item()
    for _ in range(50):
        (grad,) = torch.autograd.grad(opd_loss(logits.log_softmax(-1), p, p, n, k).loss, logits)
        with torch.no_grad():
            logits -= 20.0 * grad  # the loss is a mean over ~30 rows: per-row gradients are small
    assert opd_loss(logits.log_softmax(-1), p, p, n, k).loss.item() < 0.2 * first


# ---- the accept mask of the head being trained ------------------------------------------


def test_teacher_top1_is_the_logged_argmax() -> None:
    ids = torch.tensor([[[3, 1, -1], [-1, 2, -2], [-2, -2, -2]]])  # row 1: top-1 outside the draft vocab
    lp = torch.tensor([[[0.2, 0.5, 0.1], [0.6, 0.3, 0.0], [0.0, 0.0, 0.0]]]).log()
    assert teacher_top1(ids, lp).tolist() == [[1, -1, -1]]


def test_replay_accepted_is_the_leading_agreement() -> None:
    # 3 blocks, K = 3: argmax q per row below; the teacher's choice per row in `top1`
    q = torch.full((3, 4, 5), -5.0)
    for b, row in enumerate([[0, 1, 2, 3], [0, 4, 2, 3], [1, 1, 2, 3]]):
        for j, v in enumerate(row):
            q[b, j, v] = 0.0
    top1 = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3], [-1, 1, 2, 3]])
    # block 0: every draft agrees (3, the bonus row 3 is not a draft); block 1: a mismatch at row 1
    # stops the count even though row 2 agrees again; block 2: teacher outside the draft vocab at row 0
    assert replay_accepted(q, top1, torch.tensor([3, 3, 3])).tolist() == [3, 1, 0]
    assert replay_accepted(q, top1, torch.tensor([2, 0, 3])).tolist() == [2, 0, 0]  # only drafted rows count
    # the loss on that prefix: fast == reference
    p = torch.log_softmax(torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0)), -1)
    n = replay_accepted(q, top1, torch.tensor([3, 3, 3]))
    k = torch.tensor([3, 3, 3])
    for a, b in zip(opd_loss(q.log_softmax(-1), p, p, n, k), opd_loss_reference(q.log_softmax(-1), p, p, n, k), strict=True):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-6)
