"""Presence / frequency penalties and logit bias (OpenAI's sampling knobs):
pure tensor functions applied to logits before greedy argmax, the
temperature / top-k / top-p transform and verification.

Rule (OpenAI's documented formula), per row and token j:
    logit[j] + bias[j] - c[j] * frequency - (c[j] > 0) * presence
where c[j] counts j among the tokens generated so far in that row's prefix
(the prompt is not counted). In a verify pass row i follows the last emitted
token and drafted[:i], so its counts include those drafts: the row is then
exactly the distribution target-only decoding would use had they been
emitted. Drafters apply the same rule to their proposals, so q stays close to
the penalised p (acceptance) while losslessness needs only that q is what
they sampled from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

MAX_PENALTY = 2.0
MAX_BIAS = 100.0
MAX_BIAS_ENTRIES = 300


@dataclass(frozen=True)
class Penalties:
    """A request's penalties; `SamplingParams.penalties` is None when all are off,
    so the decode loop does no extra work for requests without them."""

    presence: float = 0.0
    frequency: float = 0.0
    bias_ids: tuple[int, ...] = ()
    bias_values: tuple[float, ...] = ()

    @classmethod
    def build(
        cls, presence: float | None, frequency: float | None, logit_bias: dict[int, float] | None
    ) -> Penalties | None:
        """None when nothing would change a logit."""
        bias = {t: v for t, v in (logit_bias or {}).items() if v != 0.0}
        pen = cls(presence or 0.0, frequency or 0.0, tuple(bias), tuple(bias.values()))
        return pen if pen.presence or pen.frequency or pen.bias_ids else None

    @property
    def counts_tokens(self) -> bool:
        return bool(self.presence or self.frequency)


def prefix_counts(
    history: Sequence[int], drafted: Sequence[int], rows: int, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Token counts per verify row, sparse over the tokens that occur.
    Returns ids (U,) int64 and counts (rows, U) float32, where row i counts
    history + drafted[:i]."""
    drafted = list(drafted[: max(rows - 1, 0)])
    tokens = torch.tensor([*history, *drafted], dtype=torch.long, device=device)  # (T,)
    if tokens.numel() == 0:
        return tokens, torch.zeros(rows, 0, device=device)
    ids, inverse = torch.unique(tokens, return_inverse=True)  # (U,), (T,)
    # the first row that sees each token: 0 for history, i + 1 for drafted[i]
    first_row = torch.cat(
        [torch.zeros(len(history), device=device), torch.arange(1, len(drafted) + 1, device=device)]
    )  # (T,)
    visible = (torch.arange(rows, device=device)[:, None] >= first_row[None, :]).float()  # (rows, T)
    counts = torch.zeros(rows, ids.shape[0], device=device).index_add_(1, inverse, visible)  # (rows, U)
    return ids, counts


def apply_penalties(
    logits: Tensor,  # (N, V)
    history: Sequence[int],  # tokens generated before row 0 (not the prompt)
    drafted: Sequence[int],  # row i also counts drafted[:i] (at least N - 1 of them are used)
    penalties: Penalties,
) -> Tensor:  # (N, V) float32, a new tensor
    """The rule of the module docstring; `logits` is left untouched."""
    out = logits.float().clone()
    if penalties.bias_ids:
        ids = torch.tensor(penalties.bias_ids, dtype=torch.long, device=out.device)  # (B,)
        out[:, ids] += torch.tensor(penalties.bias_values, dtype=out.dtype, device=out.device)
    if penalties.counts_tokens:
        ids, counts = prefix_counts(history, drafted, out.shape[0], out.device)  # (U,), (N, U)
        if ids.numel():
            out[:, ids] -= penalties.frequency * counts + penalties.presence * (counts > 0).float()
    return out
