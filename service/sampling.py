"""Sampling and lossless verification math (docs/architecture.md, "The math,
and where it lives"): pure tensor functions, randomness only through an
explicit torch.Generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    max_tokens: int = 16
    seed: int | None = None
    logprobs: int | None = None  # how many top alternatives to return per token (0-5); None: none
    echo: bool = False
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def target_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """Rule: the sampling distribution is softmax(logits / T) restricted to the
    top-k ids and then to the smallest nucleus with mass >= top_p, renormalised.
    The same transform is applied to target and draft logits before acceptance.
    logits: (N, V) -> probs (N, V) float32."""
    x = logits.float() / params.temperature
    if 0 < params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if params.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
        # drop a token when the mass strictly before it already reaches top_p
        drop = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: Tensor, gen: torch.Generator | None) -> Tensor:
    """probs: (N, V) -> (N,) int64."""
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def greedy_verify(draft: Tensor, target_logits: Tensor) -> tuple[int, int]:
    """Rule: accept drafted tokens while each equals the target's argmax; the next
    token is the target's argmax at the first mismatch (or after the last draft).
    draft: (K,) int64; target_logits: (K+1, V). Returns (num_accepted, next_token)."""
    best = target_logits.argmax(-1)  # (K+1,)
    k = draft.shape[0]
    if k == 0:
        return 0, int(best[0])
    match = (best[:k] == draft).int()
    n = int(match.cumprod(0).sum())
    return n, int(best[n])


def rejection_verify(
    draft: Tensor,  # (K,) int64
    q: Tensor | None,  # (K, V) draft probs after the same transform; None: deterministic drafter (one-hot)
    p: Tensor,  # (K+1, V) target probs after the transform
    gen: torch.Generator | None,
) -> tuple[int, int]:
    """Rule (Leviathan et al. 2023): accept drafted x_i with probability
    min(1, p_i(x_i) / q_i(x_i)); at the first rejection emit a token from
    norm(max(0, p_i - q_i)); if all K are accepted emit a bonus token from p_K.
    The emitted sequence is distributed exactly as sampling from p."""
    k = draft.shape[0]
    if k == 0:
        return 0, int(sample(p[:1], gen))
    rows = torch.arange(k, device=p.device)
    p_x = p[rows, draft]
    q_x = q[rows, draft] if q is not None else torch.ones_like(p_x)
    u = torch.rand(k, generator=gen, device=p.device)
    accepted = (u * q_x < p_x).int()  # u < p/q without dividing by a zero q
    n = int(accepted.cumprod(0).sum())
    if n == k:
        return n, int(sample(p[k : k + 1], gen))
    if q is None:
        residual = p[n].clone()
        residual[draft[n]] = 0.0
    else:
        residual = (p[n] - q[n]).clamp_min(0.0)
    total = residual.sum()
    if total <= 0:  # p == q at this position: the rejection had probability 0
        residual = p[n]
    return n, int(sample(residual.unsqueeze(0), gen))


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen
