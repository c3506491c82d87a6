"""The Draft-OPD objective (DESIGN §7) as pure tensor functions, with a plain
loop-based reference beside the vectorised one (tested against each other).

One block = one logged verify step: K drafted tokens, n = num_accepted of them
accepted, and the target's distribution p at positions j = 0..K (row j
predicts the token after the prefix plus the first j drafted tokens). The
drafter is replayed at the same block start and gives q at the same K+1 rows.

Rule (j is 0-based; the drafted token at row j sits in slot j + 1 of the block):
- accepted stream: forward KL(p‖q) at rows 0..n — the n accepted drafted
  tokens and row n, where the recovered/bonus token was taken (the target's own
  state). Weight 1 each.
- rejected stream: reverse KL(q‖p) at rows n..K−1 when n < K — the first
  rejected drafted token and every later one — weighted γ^(slot−1) = γ^j. Row
  n thus lands in both streams when a rejection happened.
- each stream is a weighted mean over its rows in the whole batch (Σ w·KL / Σ w);
  an empty stream contributes 0. L = (λ_acc·L_acc + λ_rej·L_rej)/(λ_acc + λ_rej).

Ablations (DESIGN §7): `mode="forward_kl_all"` uses forward KL in both streams,
`mode="reverse_kl_all"` reverse KL in both (rows and weights unchanged, so only
the direction differs); `gamma=1` removes the decay.

q and p must index the same vocabulary (the full target vocabulary, or a
reduced draft vocabulary with the target ids mapped onto it). The logged
target is sparse top-k; `densify_topk` puts it back on the vocabulary."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

Mode = Literal["opd", "forward_kl_all", "reverse_kl_all"]
MODES: tuple[str, ...] = ("opd", "forward_kl_all", "reverse_kl_all")

# Floor for the target's mass outside its logged top-k, so reverse KL stays finite
# when the logged top-k (float16 log-probs) sums to ~1.
_MIN_TAIL_MASS = 1e-6


class OPDLoss(NamedTuple):
    loss: Tensor  # () the combined objective
    loss_acc: Tensor  # () accepted stream, for logging
    loss_rej: Tensor  # () rejected stream, for logging


def densify_topk(
    top_ids: Tensor, top_logprobs: Tensor, vocab_size: int, tail: Literal["spread", "renorm"] = "spread"
) -> Tensor:
    """Target log-probs on the whole vocabulary from a logged top-k.

    top_ids: (..., k) int, ids < 0 are ignored (e.g. target ids outside a reduced draft vocab)
    top_logprobs: (..., k) log p of those ids
    returns: (..., vocab_size) log-probs

    "spread" (default): the mass outside the top-k, 1 − Σ top-k (at least
    1e-6), is spread evenly over the other ids, so both KL directions stay
    finite and reverse KL still penalises draft mass outside the target's top-k.
    "renorm": the top-k is renormalised to sum 1 and everything else is −inf
    (forward KL only: reverse KL is infinite wherever q puts mass outside).
    A top-k that covers the whole vocabulary is just renormalised.
    """
    valid = top_ids >= 0
    # invalid entries go to a scratch column V, cut off at the end (no clash with a real id)
    ids = torch.where(valid, top_ids, torch.full_like(top_ids, vocab_size)).long()
    lp = torch.where(valid, top_logprobs.float(), torch.tensor(float("-inf")))
    if tail == "renorm":
        lse = torch.logsumexp(lp, dim=-1, keepdim=True)
        lp = lp - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # an empty row stays all −inf
        out = torch.full((*ids.shape[:-1], vocab_size + 1), float("-inf"))
        return out.scatter(-1, ids, lp)[..., :vocab_size]
    n_in = valid.sum(-1, keepdim=True)
    mass_in = lp.exp().sum(-1, keepdim=True)
    tail_mass = torch.where(
        n_in < vocab_size, (1.0 - mass_in).clamp(min=_MIN_TAIL_MASS), torch.zeros_like(mass_in)
    )
    # normalise top-k + tail to 1 even when float16 rounding makes the top-k overshoot
    log_total = torch.log(mass_in + tail_mass)
    tail_lp = torch.log(tail_mass / (vocab_size - n_in).clamp(min=1)) - log_total
    out = tail_lp.expand(*ids.shape[:-1], vocab_size + 1).clone()
    return out.scatter(-1, ids, lp - log_total)[..., :vocab_size]


def forward_kl(p_logp: Tensor, q_logp: Tensor) -> Tensor:
    """KL(p‖q) = Σ_v p (log p − log q) over the last dim; terms with p = 0 are 0."""
    p = p_logp.exp()
    safe_p_logp = torch.where(p > 0, p_logp, torch.zeros_like(p_logp))  # avoids 0·(−inf) = nan
    return (p * (safe_p_logp - q_logp)).sum(-1)


def reverse_kl(p_logp: Tensor, q_logp: Tensor) -> Tensor:
    """KL(q‖p) = Σ_v q (log q − log p) over the last dim; terms with q = 0 are 0."""
    return forward_kl(q_logp, p_logp)


def _check(q_logp: Tensor, p_logp: Tensor, num_accepted: Tensor, num_draft: Tensor, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if q_logp.shape != p_logp.shape or q_logp.dim() != 3:
        raise ValueError(
            f"q_logp and p_logp must both be (B, K+1, V): {tuple(q_logp.shape)} vs {tuple(p_logp.shape)}"
        )
    K = q_logp.shape[1] - 1
    if (num_draft < 0).any() or (num_draft > K).any():
        raise ValueError(f"num_draft must lie in 0..{K}")
    if (num_accepted < 0).any() or (num_accepted > num_draft).any():
        raise ValueError("num_accepted must lie in 0..num_draft")


def _combine(
    acc_sum: Tensor, acc_w: Tensor, rej_sum: Tensor, rej_w: Tensor, lam_acc: float, lam_rej: float
) -> OPDLoss:
    loss_acc = acc_sum / acc_w if acc_w > 0 else acc_sum * 0.0
    loss_rej = rej_sum / rej_w if rej_w > 0 else rej_sum * 0.0
    loss = (lam_acc * loss_acc + lam_rej * loss_rej) / (lam_acc + lam_rej)
    return OPDLoss(loss, loss_acc, loss_rej)


def opd_loss(
    q_logp: Tensor,
    p_logp: Tensor,
    num_accepted: Tensor,
    num_draft: Tensor,
    *,
    gamma: float = 0.8,
    lam_acc: float = 1.0,
    lam_rej: float = 1.0,
    mode: Mode = "opd",
    block_weight: Tensor | None = None,
) -> OPDLoss:
    """Draft-OPD loss of a batch of blocks (rule in the module docstring).

    q_logp: (B, K+1, V) drafter log-probs (grad flows here); rows past num_draft are padding
    p_logp: (B, K+1, V) target log-probs (e.g. from `densify_topk`)
    num_accepted: (B,) int, accepted drafted tokens of each block
    num_draft: (B,) int, drafted tokens of each block (≤ K)
    block_weight: (B,) optional per-block weight, e.g. to down-weight blocks of an older drafter
    """
    _check(q_logp, p_logp, num_accepted, num_draft, mode)
    B, K1, _ = q_logp.shape
    j = torch.arange(K1, device=q_logp.device)[None, :]  # (1, K+1)
    n = num_accepted.to(q_logp.device)[:, None]  # (B, 1)
    kd = num_draft.to(q_logp.device)[:, None]  # (B, 1)
    bw = torch.ones(B, 1, device=q_logp.device) if block_weight is None else block_weight.to(q_logp)[:, None]

    w_acc = (j <= n).to(q_logp.dtype) * bw  # (B, K+1): rows 0..n
    w_rej = ((j >= n) & (j < kd)).to(q_logp.dtype) * (gamma ** j.to(q_logp.dtype)) * bw  # rows n..K−1
    # Unused rows (padding) may hold −inf/nan: blank them before the KL, since even a
    # masked-out inf would turn into nan gradients (0·inf) on the way back.
    used = ((w_acc > 0) | (w_rej > 0))[..., None]  # (B, K+1, 1)
    q_in = torch.where(used, q_logp, torch.zeros_like(q_logp))
    p_in = torch.where(used, p_logp, torch.zeros_like(p_logp))
    fwd = forward_kl(p_in, q_in)  # (B, K+1)
    rev = reverse_kl(p_in, q_in)  # (B, K+1)
    kl_acc = rev if mode == "reverse_kl_all" else fwd
    kl_rej = fwd if mode == "forward_kl_all" else rev
    return _combine(
        (w_acc * kl_acc).sum(), w_acc.sum(), (w_rej * kl_rej).sum(), w_rej.sum(), lam_acc, lam_rej
    )


def opd_loss_reference(
    q_logp: Tensor,
    p_logp: Tensor,
    num_accepted: Tensor,
    num_draft: Tensor,
    *,
    gamma: float = 0.8,
    lam_acc: float = 1.0,
    lam_rej: float = 1.0,
    mode: Mode = "opd",
    block_weight: Tensor | None = None,
) -> OPDLoss:
    """`opd_loss` written as plain loops over blocks, rows and vocabulary ids."""
    _check(q_logp, p_logp, num_accepted, num_draft, mode)

    def kl(a_logp: Tensor, b_logp: Tensor) -> Tensor:  # KL(a‖b) of two (V,) log-prob rows
        total = a_logp.new_zeros(())
        for v in range(a_logp.shape[0]):
            if a_logp[v].exp() > 0:
                total = total + a_logp[v].exp() * (a_logp[v] - b_logp[v])
        return total

    acc_sum, rej_sum = q_logp.new_zeros(()), q_logp.new_zeros(())
    acc_w, rej_w = 0.0, 0.0
    for b in range(q_logp.shape[0]):
        n, k = int(num_accepted[b]), int(num_draft[b])
        bw = 1.0 if block_weight is None else float(block_weight[b])
        if bw == 0:
            continue
        for j in range(n + 1):  # accepted drafted tokens, then the recovered/bonus row
            d = kl(q_logp[b, j], p_logp[b, j]) if mode == "reverse_kl_all" else kl(p_logp[b, j], q_logp[b, j])
            acc_sum, acc_w = acc_sum + bw * d, acc_w + bw
        for j in range(n, k):  # first rejected drafted token and every later one
            slot = j + 1  # 1-based slot of the drafted token in the block
            w = bw * gamma ** (slot - 1)
            d = kl(p_logp[b, j], q_logp[b, j]) if mode == "forward_kl_all" else kl(q_logp[b, j], p_logp[b, j])
            rej_sum, rej_w = rej_sum + w * d, rej_w + w
    return _combine(acc_sum, torch.tensor(acc_w), rej_sum, torch.tensor(rej_w), lam_acc, lam_rej)
