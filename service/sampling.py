"""Sampling and lossless verification math (docs/architecture.md, "The math,
and where it lives"): pure tensor functions, randomness only through an
explicit torch.Generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .penalties import Penalties


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    max_tokens: int = 16
    seed: int | None = None
    logprobs: int | None = None  # top alternatives per token (completions 0-5, chat 0-20); None: none
    echo: bool = False
    ignore_eos: bool = False
    # presence / frequency penalties and logit bias (service/penalties.py); None: off, no extra work
    penalties: Penalties | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def target_probs(
    logits: Tensor,  # (N, V)
    params: SamplingParams,
) -> Tensor:  # (N, V) float32
    """Rule: the sampling distribution is softmax(logits / T) restricted to the
    top-k ids and then to the smallest nucleus with mass >= top_p, renormalised.
    The same transform is applied to target and draft logits before acceptance."""
    scaled = logits.float() / params.temperature  # (N, V)
    if 0 < params.top_k < scaled.shape[-1]:
        kth_largest = torch.topk(scaled, params.top_k, dim=-1).values[:, -1:]  # (N, 1)
        scaled = scaled.masked_fill(scaled < kth_largest, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)  # (N, V) each
        # drop a token when the mass strictly before it already reaches top_p
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        drop[..., 0] = False  # the most likely token always stays (a top_p that rounds to 0 in float32 dropped it)
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(
    probs: Tensor,  # (N, V)
    gen: torch.Generator | None,
) -> Tensor:  # (N,) int64
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def greedy_verify(
    draft: Tensor,  # (K,) int64
    target_logits: Tensor,  # (K+1, V)
) -> tuple[int, int]:
    """Rule: accept drafted tokens while each equals the target's argmax; the next
    token is the target's argmax at the first mismatch (or after the last draft).
    Returns (num_accepted, next_token)."""
    best = target_logits.argmax(-1)  # (K+1,)
    num_draft = draft.shape[0]
    if num_draft == 0:
        return 0, int(best[0])
    match = (best[:num_draft] == draft).int()  # (K,)
    num_accepted = int(match.cumprod(0).sum())
    return num_accepted, int(best[num_accepted])


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
    num_draft = draft.shape[0]
    if num_draft == 0:
        return 0, int(sample(p[:1], gen))
    rows = torch.arange(num_draft, device=p.device)
    p_drafted = p[rows, draft]  # (K,) p_i(x_i)
    q_drafted = q[rows, draft] if q is not None else torch.ones_like(p_drafted)  # (K,) q_i(x_i)
    uniform = torch.rand(num_draft, generator=gen, device=p.device)  # (K,)
    accepted = (uniform * q_drafted < p_drafted).int()  # u < p/q without dividing by a zero q
    num_accepted = int(accepted.cumprod(0).sum())
    if num_accepted == num_draft:
        return num_accepted, int(sample(p[num_draft : num_draft + 1], gen))
    rejected = num_accepted  # the row of the first rejected drafted token
    if q is None:
        residual = p[rejected].clone()  # (V,)
        residual[draft[rejected]] = 0.0
    else:
        residual = (p[rejected] - q[rejected]).clamp_min(0.0)  # (V,)
    if residual.sum() <= 0:  # p == q at this position: the rejection had probability 0
        residual = p[rejected]
    return num_accepted, int(sample(residual.unsqueeze(0), gen))


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen
