"""The trainers' objectives as tensor functions: the Draft-OPD loss (a fast
vectorised `opd_loss` and the plain loop-based `opd_loss_reference` beside it,
tested equal), its target distributions on the draft vocabulary, the accept
mask of the head being trained, the loss of a replayed batch of blocks, and
the SFT training-time-test (TTT) loss.

Draft-OPD. One block = one logged verify step: K drafted tokens, n of them
accepted, and the target's distribution p at positions j = 0..K (row j
predicts the token after the prefix plus the first j drafted tokens). The
drafter is replayed at the same block start and gives q at the same K+1 rows.
n is the accepted prefix of the head being trained (`replay_accepted`: the
leading rows where argmax q is the teacher's choice, as the paper's and the
official code's `build_accept_mask` under greedy verification), not the
`num_accepted` logged at serving time, which is the served head's and stale
after the first update (`OPDConfig.accept="served"` keeps it, an ablation).
Rule (j is 0-based; the drafted token at row j sits in slot j + 1 of the block):
- accepted stream: forward KL(p‖q) at rows 0..n — the n accepted drafted
  tokens and row n, where the recovered/bonus token was taken (the target's own
  state). Weight 1 each.
- rejected stream: reverse KL(q‖p) at rows n..K−1 when n < K — the first
  rejected drafted token and every later one — weighted γ^(slot−1) = γ^j. Row
  n thus lands in both streams when a rejection happened.
- pooling (`pool`): "token" (default) is one token-weighted mean over every
  row of both streams in the batch, a rejected row weighing λ_rej·γ^j and an
  accepted one λ_acc: L = (λ_acc·Σ w·KL_acc + λ_rej·Σ w·KL_rej) /
  (λ_acc·Σ w_acc + λ_rej·Σ w_rej), so each stream counts by its tokens;
  "stream" averages the two streams' own means, (λ_acc·L_acc + λ_rej·L_rej) /
  (λ_acc + λ_rej), whatever their sizes. An empty stream contributes 0.
  `loss_acc` / `loss_rej` are each stream's own weighted mean, for logging.
Each stream reads its own target (`p_acc`, `p_rej`): the tail of the logged
top-k is handled per KL direction (see `worker.train.opd`), and rows on the
emitted context use the target's exact distribution (`exact_teacher_logp`).

Ablations: `mode="forward_kl_all"` uses forward KL in both streams,
`mode="reverse_kl_all"` reverse KL in both (rows and weights unchanged, so only
the direction differs); `gamma=1` removes the decay.

q and p must index the same vocabulary (the full target vocabulary, or a
reduced draft vocabulary with the target ids mapped onto it). The logged
target is sparse top-k; `densify_topk` puts it back on the vocabulary."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from service.drafters.eagle3 import Eagle3Head, shifted_tokens

from .config import MODES, POOLS, Mode, OPDConfig, Pool
from .data import Batch, ReplayBatch

# Floor for the target's mass outside its logged top-k, so reverse KL stays finite
# when the logged top-k (float16 log-probs) sums to ~1.
MIN_TAIL_MASS = 1e-6
# Log-prob of draft ids a block could not draft (context ids not seen yet): finite, so
# that 0·log 0 terms of either KL direction stay 0 instead of 0·inf = nan; exp() is 0.
MASKED_LOGP = -1e4
STEP_WEIGHT_DECAY = 0.8  # SFT loss weight of draft step j: 0.8^j
ACC_ROWS = 512  # rows per SFT step on which the progress bar's top-1 agreement is measured


class OPDLoss(NamedTuple):
    loss: Tensor  # () the combined objective
    loss_acc: Tensor  # () accepted stream, for logging
    loss_rej: Tensor  # () rejected stream, for logging


def densify_topk(
    top_ids: Tensor,  # (..., k) int, ids < 0 are ignored (e.g. target ids outside a reduced draft vocab)
    top_logprobs: Tensor,  # (..., k) log p of those ids
    vocab_size: int,
    tail: Literal["spread", "renorm"] = "spread",
) -> Tensor:
    """Target log-probs on the whole vocabulary from a logged top-k -> (..., vocab_size).

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
    tail_mass = torch.where(n_in < vocab_size, (1.0 - mass_in).clamp(min=MIN_TAIL_MASS), torch.zeros_like(mass_in))
    # normalise top-k + tail to 1 even when float16 rounding makes the top-k overshoot
    log_total = torch.log(mass_in + tail_mass)
    tail_lp = torch.log(tail_mass / (vocab_size - n_in).clamp(min=1)) - log_total
    out = tail_lp.expand(*ids.shape[:-1], vocab_size + 1).clone()
    return out.scatter(-1, ids, lp - log_total)[..., :vocab_size]


def forward_kl(p_logp: Tensor, q_logp: Tensor) -> Tensor:  # (..., V) each
    """KL(p‖q) = Σ_v p (log p − log q) over the last dim; terms with p = 0 are 0.
    p_logp, q_logp: (..., V) -> (...)."""
    p = p_logp.exp()
    safe_p_logp = torch.where(p > 0, p_logp, torch.zeros_like(p_logp))  # avoids 0·(−inf) = nan
    return (p * (safe_p_logp - q_logp)).sum(-1)


def reverse_kl(p_logp: Tensor, q_logp: Tensor) -> Tensor:  # (..., V) each
    """KL(q‖p) = Σ_v q (log q − log p) over the last dim; terms with q = 0 are 0."""
    return forward_kl(q_logp, p_logp)


def _check(
    q_logp: Tensor,  # (B, K+1, V)
    p_acc: Tensor,  # (B, K+1, V)
    p_rej: Tensor,  # (B, K+1, V)
    num_accepted: Tensor,  # (B,)
    num_draft: Tensor,  # (B,)
    mode: str,
    pool: str = "token",
) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    for p_logp in (p_acc, p_rej):
        if q_logp.shape != p_logp.shape or q_logp.dim() != 3:
            raise ValueError(f"q_logp and p_logp must both be (B, K+1, V): {tuple(q_logp.shape)} vs {tuple(p_logp.shape)}")
    max_draft = q_logp.shape[1] - 1
    if (num_draft < 0).any() or (num_draft > max_draft).any():
        raise ValueError(f"num_draft must lie in 0..{max_draft}")
    if (num_accepted < 0).any() or (num_accepted > num_draft).any():
        raise ValueError("num_accepted must lie in 0..num_draft")


def _combine(
    acc_sum: Tensor, acc_w: Tensor, rej_sum: Tensor, rej_w: Tensor, lam_acc: float, lam_rej: float, pool: str
) -> OPDLoss:  # () each
    loss_acc = acc_sum / acc_w if acc_w > 0 else acc_sum * 0.0
    loss_rej = rej_sum / rej_w if rej_w > 0 else rej_sum * 0.0
    if pool == "stream":
        loss = (lam_acc * loss_acc + lam_rej * loss_rej) / (lam_acc + lam_rej)
    else:  # "token": every row of the batch in one weighted mean
        total_w = lam_acc * acc_w + lam_rej * rej_w
        total = lam_acc * acc_sum + lam_rej * rej_sum
        loss = total / total_w if total_w > 0 else total * 0.0
    return OPDLoss(loss, loss_acc, loss_rej)


# `opd_loss` and `opd_loss_reference` are a deliberate pair (the same rule, vectorised
# and as plain loops, tested equal in tests/test_opd_loss.py): keep their signatures alike.
def opd_loss(
    q_logp: Tensor,  # (B, K+1, V) drafter log-probs (grad flows here); rows past num_draft are padding
    p_acc: Tensor,  # (B, K+1, V) target log-probs read by the accepted stream (e.g. from `densify_topk`)
    p_rej: Tensor,  # (B, K+1, V) target log-probs read by the rejected stream (may be p_acc itself)
    num_accepted: Tensor,  # (B,) int, accepted drafted tokens of each block
    num_draft: Tensor,  # (B,) int, drafted tokens of each block (≤ K)
    *,
    gamma: float = 0.8,
    lam_acc: float = 1.0,
    lam_rej: float = 1.0,
    mode: Mode = "opd",
    block_weight: Tensor | None = None,  # (B,) optional per-block weight, e.g. for blocks of an older drafter
    pool: Pool = "token",
) -> OPDLoss:
    """Draft-OPD loss of a batch of blocks (rule in the module docstring)."""
    _check(q_logp, p_acc, p_rej, num_accepted, num_draft, mode, pool)
    batch, rows = q_logp.shape[:2]
    j = torch.arange(rows, device=q_logp.device)[None, :]  # (1, K+1)
    accepted = num_accepted.to(q_logp.device)[:, None]  # (B, 1)
    drafted = num_draft.to(q_logp.device)[:, None]  # (B, 1)
    weight = torch.ones(batch, 1, device=q_logp.device) if block_weight is None else block_weight.to(q_logp)[:, None]

    w_acc = (j <= accepted).to(q_logp.dtype) * weight  # (B, K+1): rows 0..n
    w_rej = ((j >= accepted) & (j < drafted)).to(q_logp.dtype) * (gamma ** j.to(q_logp.dtype)) * weight  # rows n..K−1
    # Unused rows (padding) may hold −inf/nan: blank them before the KL, since even a
    # masked-out inf would turn into nan gradients (0·inf) on the way back.
    used = ((w_acc > 0) | (w_rej > 0))[..., None]  # (B, K+1, 1)
    q_in = torch.where(used, q_logp, torch.zeros_like(q_logp))
    acc_in = torch.where(used, p_acc, torch.zeros_like(p_acc))
    rej_in = acc_in if p_rej is p_acc else torch.where(used, p_rej, torch.zeros_like(p_rej))
    kl_acc = reverse_kl(acc_in, q_in) if mode == "reverse_kl_all" else forward_kl(acc_in, q_in)  # (B, K+1)
    kl_rej = forward_kl(rej_in, q_in) if mode == "forward_kl_all" else reverse_kl(rej_in, q_in)  # (B, K+1)
    return _combine((w_acc * kl_acc).sum(), w_acc.sum(), (w_rej * kl_rej).sum(), w_rej.sum(), lam_acc, lam_rej, pool)


def _kl_rows(a_logp: Tensor, b_logp: Tensor) -> Tensor:  # (V,) each -> ()
    """KL(a‖b) of two (V,) log-prob rows, as a loop over the vocabulary."""
    total = a_logp.new_zeros(())
    for v in range(a_logp.shape[0]):
        if a_logp[v].exp() > 0:
            total = total + a_logp[v].exp() * (a_logp[v] - b_logp[v])
    return total


def opd_loss_reference(
    q_logp: Tensor,  # (B, K+1, V)
    p_acc: Tensor,  # (B, K+1, V)
    p_rej: Tensor,  # (B, K+1, V)
    num_accepted: Tensor,  # (B,)
    num_draft: Tensor,  # (B,)
    *,
    gamma: float = 0.8,
    lam_acc: float = 1.0,
    lam_rej: float = 1.0,
    mode: Mode = "opd",
    block_weight: Tensor | None = None,  # (B,)
    pool: Pool = "token",
) -> OPDLoss:
    """`opd_loss` written as plain loops over blocks, rows and vocabulary ids.

    A deliberate duplicate: its signature repeats `opd_loss`'s (and `_check`'s)
    and its body restates the rule, so that it reads on its own as the
    specification the fast version is tested against (tests/test_opd_loss.py)."""
    _check(q_logp, p_acc, p_rej, num_accepted, num_draft, mode, pool)
    acc_sum, rej_sum = q_logp.new_zeros(()), q_logp.new_zeros(())
    acc_w, rej_w = 0.0, 0.0
    for b in range(q_logp.shape[0]):
        accepted, drafted = int(num_accepted[b]), int(num_draft[b])
        weight = 1.0 if block_weight is None else float(block_weight[b])
        if weight == 0:
            continue
        for j in range(accepted + 1):  # accepted drafted tokens, then the recovered/bonus row
            q, p = q_logp[b, j], p_acc[b, j]
            kl = _kl_rows(q, p) if mode == "reverse_kl_all" else _kl_rows(p, q)
            acc_sum, acc_w = acc_sum + weight * kl, acc_w + weight
        for j in range(accepted, drafted):  # first rejected drafted token and every later one
            slot = j + 1  # 1-based slot of the drafted token in the block
            w = weight * gamma ** (slot - 1)
            q, p = q_logp[b, j], p_rej[b, j]
            kl = _kl_rows(p, q) if mode == "forward_kl_all" else _kl_rows(q, p)
            rej_sum, rej_w = rej_sum + w * kl, rej_w + w
    acc_w_t, rej_w_t = torch.tensor(acc_w), torch.tensor(rej_w)
    if pool == "stream":  # the mean of each stream, then their λ-weighted average
        return _combine(acc_sum, acc_w_t, rej_sum, rej_w_t, lam_acc, lam_rej, pool)
    # "token": restated as one mean over every row, an accepted row weighing λ_acc·w, a rejected one λ_rej·w·γ^j
    out = _combine(acc_sum, acc_w_t, rej_sum, rej_w_t, lam_acc, lam_rej, "stream")
    num, den = lam_acc * acc_sum + lam_rej * rej_sum, lam_acc * acc_w + lam_rej * rej_w
    return OPDLoss(num / den if den > 0 else num * 0.0, out.loss_acc, out.loss_rej)


# ---------------------------------------------------------------------------
# Draft-OPD on replayed blocks


def target_logp(
    p_ids: Tensor,  # (N, S, k) draft ids, -1 for logged target ids outside the draft vocab, -2 padding
    p_logprobs: Tensor,  # (N, S, k) raw target log p
    draft_vocab: int,
    tail: str = "spread",
    valid: Tensor | None = None,  # (N, draft_vocab) bool, the ids each block could draft (None: all)
) -> Tensor:
    """The target's row distributions on the draft vocab -> (N, S, draft_vocab)
    log-probs: p restricted to the draft vocab, renormalised; "spread": the mass
    outside the logged top-k spread over the other (valid) ids; "renorm": none
    there. Ids outside `valid` get `MASKED_LOGP`."""
    p = p_logprobs.float().exp()
    known = torch.where(p_ids >= -1, p, torch.zeros_like(p)).sum(-1, keepdim=True)  # all logged ids
    outside = (1.0 - known).clamp(min=MIN_TAIL_MASS)
    inside = torch.where(p_ids >= 0, p, torch.zeros_like(p)).sum(-1, keepdim=True)
    log_z = torch.log(inside + outside)
    out = densify_topk(p_ids, p_logprobs.float() - log_z, draft_vocab, tail=tail)  # type: ignore[arg-type]
    if valid is None:
        return out
    mask = valid[:, None, :].to(out.device)
    out = out.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(out, dim=-1, keepdim=True)
    out = out - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # renormalise over the valid ids
    return out.masked_fill(~mask, MASKED_LOGP)


def replay_logq(head: Eagle3Head, batch: ReplayBatch) -> Tensor:
    """The head's log q at every block row over the block's draft vocab: static
    ids, then the context ids (masked where the block had not seen them yet)
    -> (N, S, Vd + C) float32."""
    hidden = head.unroll_hidden(batch.features, batch.step_tokens, batch.key_valid)  # (S, B, T, d)
    h = hidden[:, batch.rows, batch.anchors].transpose(0, 1)  # (N, S, d)
    logits = head.logits(h)  # (N, S, Vd)
    if batch.ctx_rows.shape[1]:
        normed = head.norm(h)
        ctx = torch.einsum("nsd,ncd->nsc", normed, batch.ctx_rows[batch.rows].to(normed.dtype))  # (N, S, C)
        ctx = ctx.masked_fill(~batch.ctx_valid[:, None, :], MASKED_LOGP)
        logits = torch.cat([logits, ctx.to(logits.dtype)], dim=-1)
    return torch.log_softmax(logits.float(), dim=-1)


def _valid_ids(batch: ReplayBatch, static: int) -> Tensor | None:
    """(N, Vd + C) bool: static ids, then the context ids each block had seen."""
    if not batch.ctx_valid.shape[1]:
        return None
    n = batch.ctx_valid.shape[0]
    return torch.cat([torch.ones(n, static, dtype=torch.bool, device=batch.ctx_valid.device), batch.ctx_valid], dim=1)


def teacher_top1(
    p_ids: Tensor,  # (N, S, k) draft ids, -1 outside the draft vocab, -2 padding
    p_logprobs: Tensor,  # (N, S, k) raw target log p
) -> Tensor:
    """The teacher's choice at each row as a draft id -> (N, S): the logged top-1
    (the verifier's argmax when serving), -1 when it lies outside the draft
    vocab or the row logged nothing."""
    lp = torch.where(p_ids >= -1, p_logprobs.float(), torch.full_like(p_logprobs.float(), float("-inf")))
    top = p_ids.gather(-1, lp.argmax(-1, keepdim=True)).squeeze(-1)
    return torch.where(top >= 0, top, torch.full_like(top, -1))


@torch.no_grad()
def replay_accepted(
    logq: Tensor,  # (N, S, V) replayed log q of the head being trained
    top1: Tensor,  # (N, S) the teacher's choice (`teacher_top1`), -1: no draft id can match
    num_draft: Tensor,  # (N,) K of each block
) -> Tensor:
    """Accepted drafted tokens of each replayed block under greedy verification
    of the head that gave `logq` -> (N,) int64: the leading rows j < K where its
    argmax is the teacher's choice (the official `build_accept_mask`: match,
    then cumprod). Past the served accepted prefix the rows are conditioned on
    the served drafts, as the official replay of rejected blocks is on the
    drafted prefix."""
    rows = torch.arange(logq.shape[1], device=logq.device)[None, :]
    top1 = top1.to(logq.device)
    match = (logq.argmax(-1) == top1) & (top1 >= 0) & (rows < num_draft.to(logq.device)[:, None])
    return match.long().cumprod(1).sum(1).cpu()


@torch.no_grad()
def exact_teacher_logp(
    batch: ReplayBatch,
    lm_rows: Tensor,  # (Vd, d) the target's LM-head rows of the static draft vocab
    valid: Tensor | None,  # (N, Vd + C) bool, the ids each block could draft (None: all)
) -> tuple[Tensor, Tensor, Tensor]:
    """The target's exact distribution on each block's draft vocab at its rows on
    the emitted context (`batch.exact_index`): final hidden times the LM-head rows
    of the static ids and of the request's context ids, softmax over the ids the
    block could draft, as the SFT loss's `_target_rows` -> (block idx (R,), row
    idx (R,), log p (R, Vd + C) float32; `MASKED_LOGP` outside `valid`)."""
    n_idx, s_idx = (batch.exact_index >= 0).nonzero(as_tuple=True)
    dev = lm_rows.device
    with torch.autocast(dev.type, enabled=False):  # the teacher in float32, also under bf16 training
        final = batch.exact_final.to(dev).float()[batch.exact_index[n_idx, s_idx].to(dev)]  # (R, d)
        logits = final @ lm_rows.float().T  # (R, Vd)
        if batch.ctx_rows.shape[1]:
            per_req = torch.einsum("rd,bcd->rbc", final, batch.ctx_rows.float())  # (R, B, C): small (B, C)
            ctx = per_req[torch.arange(final.shape[0], device=dev), batch.rows.to(dev)[n_idx]]
            logits = torch.cat([logits, ctx], dim=-1)
        if valid is not None:
            logits = logits.masked_fill(~valid.to(dev)[n_idx], float("-inf"))
        logp = torch.log_softmax(logits, dim=-1)
    logp = logp.masked_fill(~torch.isfinite(logp), MASKED_LOGP)
    return n_idx, s_idx, logp


def _stream_targets(logq: Tensor, batch: ReplayBatch, cfg: OPDConfig, lm_rows: Tensor | None) -> tuple[Tensor, Tensor]:
    """(p_acc, p_rej), each (N, S, Vd + C): the logged top-k with the tail each KL
    direction needs, and with `cfg.teacher == "exact"` the exact rows on the
    emitted context in place of the logged ones (full support: both directions)."""
    vocab = logq.shape[-1]
    valid = _valid_ids(batch, vocab - batch.ctx_valid.shape[1])
    spread = target_logp(batch.p_ids, batch.p_logprobs, vocab, "spread", valid).to(logq.device)
    fwd_p = spread if cfg.tail == "spread" else target_logp(batch.p_ids, batch.p_logprobs, vocab, "renorm", valid).to(logq.device)
    p_acc = spread if cfg.mode == "reverse_kl_all" else fwd_p
    p_rej = fwd_p if cfg.mode == "forward_kl_all" else spread
    if cfg.teacher == "exact" and lm_rows is not None and bool((batch.exact_index >= 0).any()):
        n_idx, s_idx, exact = exact_teacher_logp(batch, lm_rows, valid)
        same = p_rej is p_acc
        p_acc = p_acc.clone()
        p_acc[n_idx.to(logq.device), s_idx.to(logq.device)] = exact.to(logq.device)
        if same:
            p_rej = p_acc
        else:
            p_rej = p_rej.clone()
            p_rej[n_idx.to(logq.device), s_idx.to(logq.device)] = exact.to(logq.device)
    return p_acc, p_rej


def block_accepted(logq: Tensor, batch: ReplayBatch, cfg: OPDConfig) -> Tensor:
    """(N,) the accepted prefix each block's loss uses: the replayed head's own
    (`replay_accepted`), or the logged one with `cfg.accept == "served"`."""
    if cfg.accept == "served":
        return batch.num_accepted
    return replay_accepted(logq.detach(), teacher_top1(batch.p_ids, batch.p_logprobs), batch.num_draft)


def blocks_loss(
    logq: Tensor,  # (N, S, Vd + C) replayed log q, from `replay_logq`
    batch: ReplayBatch,
    cfg: OPDConfig,
    lm_rows: Tensor | None = None,  # (Vd, d) the target's LM-head rows of the draft vocab (None: logged rows only)
    weighted: bool = True,
) -> OPDLoss:
    """Draft-OPD loss of replayed blocks, on the accepted prefix of `block_accepted`.
    Each stream reads the target with the tail its KL direction needs
    (`worker.train.opd`), exact on the emitted context given `lm_rows`."""
    p_acc, p_rej = _stream_targets(logq, batch, cfg, lm_rows)
    return opd_loss(
        logq, p_acc, p_rej, block_accepted(logq, batch, cfg), batch.num_draft,
        gamma=cfg.gamma, lam_acc=cfg.lam_acc, lam_rej=cfg.lam_rej, mode=cfg.mode, pool=cfg.pool,
        block_weight=batch.weight.to(logq.device) if weighted else None,
    )  # fmt: skip


# ---------------------------------------------------------------------------
# SFT: the EAGLE-3 training-time test


def step_masks(batch: Batch, steps: int, on_prompt: bool = False, in_vocab: Tensor | None = None) -> list[Tensor]:
    """(B, T) bool per draft step j: anchors t whose step-j input token x_{t+j+1}
    and target position t+j+1 exist (t+j+1 <= len-1); without on_prompt only
    anchors in the generated part (t >= P-1, where serving drafts from). With
    `in_vocab` ((V,) bool over target ids), also only anchors whose target
    argmax at t+j+1 (`batch.next_ids`) is known and lies in the draft vocab: the
    head cannot draft any other token, so such rows only teach it to spread mass."""
    dev = batch.tokens.device
    t = torch.arange(batch.tokens.shape[1], device=dev).unsqueeze(0)
    first = (batch.prompt_lens - 1).unsqueeze(1) if not on_prompt else torch.zeros(1, 1, dtype=torch.long, device=dev)
    masks = [(t >= first) & (t + j + 1 <= batch.lengths.unsqueeze(1) - 1) for j in range(steps)]
    if in_vocab is None:
        return masks
    ok = (batch.next_ids >= 0) & in_vocab.to(batch.next_ids.device)[batch.next_ids.clamp(min=0)]  # (B, T) by target position
    out = []
    for j, mask in enumerate(masks):
        shifted = torch.zeros_like(ok)  # anchor t reads target position t+j+1
        shifted[:, : max(ok.shape[1] - j - 1, 0)] = ok[:, j + 1 :]
        out.append(mask & shifted)
    return out


def _target_rows(
    final: Tensor,  # (B, T, d) the target's final normed hidden
    lm_rows: Tensor,  # (Vd, d) the target's LM-head rows of the draft vocab
    masks: list[Tensor],  # S x (B, T) bool anchor masks
) -> tuple[Tensor, Tensor]:
    """The target's draft-vocab distribution at every position some step reads
    (position t+j+1 for anchor t at step j), each computed once -> (p (M, Vd)
    float32, row (B, T) int64: position -> row of p, -1 where unused)."""
    need = torch.zeros_like(masks[0])
    for j, mask in enumerate(masks):
        need[:, j + 1 :] |= mask[:, : need.shape[1] - j - 1]
    b_idx, s_idx = need.nonzero(as_tuple=True)
    row = torch.full(need.shape, -1, dtype=torch.long, device=need.device)
    row[b_idx, s_idx] = torch.arange(b_idx.numel(), device=need.device)
    with torch.no_grad():
        p = torch.softmax(F.linear(final[b_idx, s_idx], lm_rows).float(), dim=-1)
    return p, row


def ttt_loss(
    head: Eagle3Head, batch: Batch, steps: int, on_prompt: bool = False, acc_rows: int | None = ACC_ROWS
) -> tuple[Tensor, list[float], list[float]]:
    """EAGLE-3 training-time-test loss -> (weighted loss, per-step loss, per-step
    top-1 agreement with the target's argmax over the draft vocab). Loss at step
    j: cross-entropy from the target's distribution restricted to the draft
    vocab to the head's, weighted STEP_WEIGHT_DECAY^j, over the anchors of
    `step_masks` (target argmax in the draft vocab)."""
    hidden = head.unroll_hidden(batch.features, shifted_tokens(batch.tokens, steps), batch.valid)  # (S, B, T, d)
    in_vocab = torch.zeros(head.cfg.target_vocab_size, dtype=torch.bool, device=head.d2t.device)
    in_vocab[head.d2t] = True
    masks = step_masks(batch, steps, on_prompt, in_vocab)
    p_all, p_row = _target_rows(batch.final, head.frozen.lm_rows, masks)
    losses, accs, total, wsum = [], [], hidden.sum() * 0.0, 0.0  # zero, still on the graph, when no row counts
    for j, mask in enumerate(masks):
        if not bool(mask.any()):
            continue
        b_idx, t_idx = mask.nonzero(as_tuple=True)
        logits = head.logits(hidden[j, b_idx, t_idx]).float()  # (M, Vd)
        p = p_all[p_row[b_idx, t_idx + j + 1]]  # (M, Vd)
        loss = F.cross_entropy(logits, p)  # soft targets: -Σ p log q = forward KL(p‖q) + H(p)
        w = STEP_WEIGHT_DECAY**j
        total, wsum = total + w * loss, wsum + w
        losses.append(float(loss.detach()))
        rows = slice(0, acc_rows)  # top-1 agreement on a sample of rows: argmax over Vd is not free on a CPU
        accs.append(float((logits[rows].detach().max(-1).indices == p[rows].max(-1).indices).float().mean()))
    return total / max(wsum, 1e-9), losses, accs
