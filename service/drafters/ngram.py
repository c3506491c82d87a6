"""Prompt-lookup drafter: continue the most recent earlier occurrence of the
sequence's last n tokens. Needs no training; the baseline."""

from __future__ import annotations

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from ..sampling import SamplingParams
from .base import Drafter, Proposal


def lookup(tokens: np.ndarray, k: int, n_max: int, n_min: int) -> list[int]:
    """Tokens following the latest earlier match of the longest suffix n-gram
    (n from n_max down to n_min); [] when nothing matches. tokens: (L,) int64."""
    return lookup_match(tokens, k, n_max, n_min)[0]


def lookup_match(tokens: np.ndarray, k: int, n_max: int, n_min: int) -> tuple[list[int], int]:
    """`lookup`'s tokens and the length n of the suffix that matched (0: none).
    tokens: (L,) int64."""
    length = tokens.shape[0]
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        suffix = tokens[length - n :]
        windows = sliding_window_view(tokens[: length - 1], n)  # starts 0 .. L-1-n
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start : start + k].tolist(), n
    return [], 0


class NgramDrafter(Drafter):
    kind = "ngram"

    def __init__(self, n_max: int = 3, n_min: int = 1):
        self.n_max, self.n_min = n_max, n_min

    def propose(self, seq, k: int, params: SamplingParams, gen: torch.Generator) -> Proposal:
        drafted = lookup(np.asarray(seq.tokens, dtype=np.int64), k, self.n_max, self.n_min) if k else []
        return Proposal(drafted, None, [0.0] * len(drafted), "n" * len(drafted))
