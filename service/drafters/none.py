"""The `none` drafter: target-only decoding (the baseline the benchmarks and
the greedy reference compare against)."""

from __future__ import annotations

import torch

from ..sampling import SamplingParams
from .base import Drafter, Proposal


class NoDrafter(Drafter):
    """Target-only decoding: never drafts."""

    kind = "none"

    def propose(self, seq, k: int, params: SamplingParams, gen: torch.Generator) -> Proposal:
        return Proposal([], None, [])
