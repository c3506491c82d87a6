"""Evaluating a drafter head: offline on held-out Draft-OPD blocks (the publish
gate), and online through the real engine (SFT).

Offline: the expected acceptance length of held-out blocks along their served
draft paths, E[τ] = 1 + Σ_{i=1..K} Π_{j<i} β_j (docs/architecture.md),
averaged over blocks with K > 0, with β_j the probability that a draft from q
is accepted at row j under the block's own verification rule: greedy blocks
(temperature 0) accept when q's argmax is the target's argmax; sampled blocks
have β_j = Σ_x min(p_j(x), q_j(x)) at the request's temperature. Replaying
the serving head on greedy blocks gives back the served τ exactly (tested).
`tau_overlap`, β = Σ min(p, q) at temperature 1 for every block, is reported
beside it. Sums run over the logged top-k ids inside the draft vocab."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from service.drafters.eagle3 import Eagle3Head

from .config import OPDConfig
from .data import RequestBlocks, collate_requests, request_batches
from .losses import blocks_loss, replay_logq, teacher_top1


@dataclass
class EvalResult:
    tau: float | None  # mean E[τ] under each block's own sampling rule (the publish gate); None: no block
    tau_overlap: float | None  # mean E[τ] with β = Σ min(p, q) at temperature 1
    blocks: int  # held-out blocks with K > 0
    loss: float | None  # Draft-OPD loss on the held-out blocks
    beta: list[float]  # mean per-row β of `tau` (over blocks drafting that row)
    served_tau: float | None  # the served acceptance length of the same blocks (num_accepted + 1)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def expected_tau(
    beta: Tensor,  # (N, S) per-row acceptance probability
    num_draft: Tensor,  # (N,) K of each block
) -> Tensor:
    """E[τ] = 1 + Σ_{i=1..K} Π_{j<i} β_j per block -> (N,)."""
    rows = torch.arange(beta.shape[1], device=beta.device)[None, :]
    drafted = torch.where(rows < num_draft[:, None].to(beta.device), beta, torch.zeros_like(beta))
    return 1.0 + torch.cumprod(drafted, dim=1).sum(1)


def acceptance_beta(
    logq: Tensor,  # (N, S, Vd) draft log q
    p_ids: Tensor,  # (N, S, k) the target's top-k as draft ids (-1 outside the draft vocab, -2 none)
    p_logprobs: Tensor,  # (N, S, k) their raw target log p
    temperature: Tensor | None = None,  # (N,) each block's request temperature (None: 1 for all)
) -> Tensor:
    """Per-row acceptance probability of a draft from q under the verification
    rule, on the logged top-k ids inside the draft vocab -> (N, S).
    - temperature 0: 1 when q's argmax is the target's argmax (the top-1 id), else 0
    - temperature T > 0: Σ_x min(p_T(x), q_T(x)), p_T ∝ p^(1/T) and q_T ∝ q^(1/T);
      p_T is renormalised over the logged top-k when T != 1 (the request's
      top-k/top-p are not logged), and at T = 1 it is the raw p (a lower bound)"""
    dev = logq.device
    ids, lp = p_ids.to(dev), p_logprobs.float().to(dev)
    valid = ids >= 0
    temp = torch.ones(logq.shape[0], device=dev) if temperature is None else temperature.float().to(dev)
    temp_rows = temp.clamp(min=1e-3)[:, None, None]
    q_t = torch.log_softmax(logq / temp_rows, dim=-1).exp().gather(-1, ids.clamp(min=0))
    lp_valid = torch.where(ids >= -1, lp, torch.full_like(lp, float("-inf")))  # every logged id
    p_t = torch.where((temp_rows == 1.0), lp_valid.exp(), torch.softmax(lp_valid / temp_rows, dim=-1))
    overlap = torch.where(valid, torch.minimum(p_t, q_t), torch.zeros_like(q_t)).sum(-1)
    top1_draft = teacher_top1(ids, lp)  # the target's argmax among the logged ids; -1 outside the draft vocab
    greedy = ((logq.argmax(-1) == top1_draft) & (top1_draft >= 0)).float()
    return torch.where((temp == 0)[:, None], greedy, overlap)


class _Totals:
    """Running sums of `evaluate` over batches."""

    def __init__(self) -> None:
        self.taus: list[Tensor] = []
        self.overlaps: list[Tensor] = []
        self.served: list[Tensor] = []
        self.beta_sum: Tensor | None = None
        self.beta_cnt: Tensor | None = None
        self.loss_sum, self.loss_w = 0.0, 0

    def result(self) -> EvalResult:
        def mean(parts: list[Tensor]) -> float | None:
            x = torch.cat(parts) if parts else torch.zeros(0)
            return float(x.mean()) if x.numel() else None

        return EvalResult(
            tau=mean(self.taus),
            tau_overlap=mean(self.overlaps),
            blocks=int(sum(x.numel() for x in self.taus)),
            loss=self.loss_sum / self.loss_w if self.loss_w else None,
            beta=[] if self.beta_sum is None else [float(b / c) for b, c in zip(self.beta_sum, self.beta_cnt) if c > 0],
            served_tau=mean(self.served),
        )


def _pad_add(a: Tensor | None, b: Tensor) -> Tensor:  # (n,), (m,) -> (max(n, m),), zero-padded sum
    if a is None:
        return b
    n = max(a.numel(), b.numel())
    return F.pad(a, (0, n - a.numel())) + F.pad(b, (0, n - b.numel()))


@torch.no_grad()
def evaluate(head: Eagle3Head, requests: Sequence[RequestBlocks], cfg: OPDConfig | None = None) -> EvalResult:
    """Held-out evaluation of `head` along the served draft paths (float32): E[τ]
    of each block with K > 0, under its request's sampling rule (`tau`) and
    under the temperature-1 overlap (`tau_overlap`)."""
    cfg = cfg or OPDConfig()
    was_training = head.training
    head.eval()
    device = head.fc.weight.device
    totals = _Totals()
    for idx in request_batches(requests, max(cfg.batch_tokens, 1)):
        batch = collate_requests([requests[i] for i in idx], device, torch.float32)
        logq = replay_logq(head, batch)
        drafted = batch.num_draft > 0
        beta = acceptance_beta(logq, batch.p_ids, batch.p_logprobs, batch.temperature).cpu()  # (N, S)
        beta_t1 = acceptance_beta(logq, batch.p_ids, batch.p_logprobs).cpu()
        totals.taus.append(expected_tau(beta, batch.num_draft)[drafted])
        totals.overlaps.append(expected_tau(beta_t1, batch.num_draft)[drafted])
        totals.served.append((batch.num_accepted + 1)[drafted].float())
        rows = (torch.arange(beta.shape[1])[None, :] < batch.num_draft[:, None]).float()
        totals.beta_sum = _pad_add(totals.beta_sum, (beta * rows).sum(0))
        totals.beta_cnt = _pad_add(totals.beta_cnt, rows.sum(0))
        n = int(drafted.sum())
        totals.loss_sum += float(blocks_loss(logq, batch, cfg, head.frozen.lm_rows, weighted=False).loss) * n
        totals.loss_w += n
    head.train(was_training)
    return totals.result()


def evaluate_tau(target, drafter, prompts: Sequence[Sequence[int]], k: int, max_tokens: int) -> tuple[float, list[float]]:
    """Greedy acceptance length τ and per-position acceptance of `drafter` on
    `prompts` through the real engine (`target`: a service.runtime.Target)."""
    from service.engine import Engine
    from service.sampling import SamplingParams

    engine = Engine(target.model, drafter, target.eos_token_ids, k)
    for ids in prompts:
        engine.generate(list(ids), SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return engine.stats.tau, engine.stats.per_position_acceptance()[:k]
