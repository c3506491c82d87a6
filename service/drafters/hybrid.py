"""Hybrid drafting: prompt lookup and the EAGLE-3 head in one block.

Per step, `lookup_first` decides from the context which source drafts first:

- lookup first: the lookup tokens of the longest suffix match, cut by the
  stop rule with the lookup's running acceptance in this sequence as the
  chain estimate; then, with slots left, the head continues after them (it
  reads the lookup tokens as its own drafts, its chain starting from the
  lookup's estimate);
- head first: the head alone. It stops when its chain falls below the stop
  threshold, and any lookup token after that would carry a lower chain still.

The head's steps are yielded from `draft_steps` (`service.drafters.lockstep`
batches them across sequences); lookup and the rules run per sequence.
The head's per-sequence state stays in sync whoever drafted: `commit` always
hands it the verify pass's taps of the accepted positions. Sampling stays
lossless: lookup tokens are deterministic, so their rows of q are one-hot
(as the ngram drafter's q = None), head rows are the head's q, and every
choice above depends only on the context, never on this step's draws."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..sampling import SamplingParams
from .base import SOURCE_CODES, Drafter, DraftSteps, Proposal
from .eagle3.drafter import Eagle3Drafter
from .lockstep import drive
from .ngram import NgramDrafter, lookup_match

LOOKUP, HEAD = SOURCE_CODES["ngram"], SOURCE_CODES["eagle3"]
DEFAULT_MIN_MATCH = 2  # suffix tokens a match needs before lookup drafts first


def running_rate(accepted: int, reached: int) -> float:
    """Acceptance of one source's tokens in this sequence: accepted / reached
    (a token is reached when every draft before it was accepted), with one
    prior success and one prior failure so a fresh sequence starts at 1/2."""
    return (accepted + 1) / (reached + 2)


def lookup_first(match_len: int, lookup_rate: float, head_rate: float, min_match: int) -> bool:
    """Rule: lookup drafts first when the context's suffix matches an earlier
    n-gram of at least `min_match` tokens and lookup tokens have been accepted
    in this sequence at least as often as head tokens."""
    return match_len >= min_match and lookup_rate >= head_rate


def lookup_prefix(tokens: list[int], rate: float, thresholds: list[float]) -> list[int]:
    """The lookup tokens the stop rule keeps: token j is drafted while rate^(j+1)
    (the chance all lookup tokens up to it are accepted) reaches the threshold of
    slot j; the first is always drafted. thresholds: one per slot."""
    kept: list[int] = []
    chain = 1.0
    for j, token in enumerate(tokens):
        chain *= rate
        if j and chain < thresholds[j]:
            break
        kept.append(token)
    return kept


@dataclass
class _HybridState:
    head: Any  # the eagle3 drafter's own per-sequence state
    sources: str = ""  # of the last proposal, one letter per drafted token
    reached: dict[str, int] | None = None
    accepted: dict[str, int] | None = None

    def rate(self, source: str) -> float:
        return running_rate((self.accepted or {}).get(source, 0), (self.reached or {}).get(source, 0))

    def observe(self, num_accepted: int) -> None:
        """Count reached / accepted tokens of each source in the last block."""
        self.reached = self.reached or {LOOKUP: 0, HEAD: 0}
        self.accepted = self.accepted or {LOOKUP: 0, HEAD: 0}
        for j, source in enumerate(self.sources[: num_accepted + 1]):
            self.reached[source] += 1
            self.accepted[source] += int(j < num_accepted)


class HybridDrafter(Drafter):
    """Prompt lookup + an EAGLE-3 head; served for DRAFTLOOP_DRAFTER=hybrid and
    (once an eagle3 checkpoint exists) auto. Version and checkpoint are the head's."""

    kind = "hybrid"
    checkpoint_kind = "eagle3"

    def __init__(self, head: Eagle3Drafter, lookup: NgramDrafter, min_match: int = DEFAULT_MIN_MATCH):
        self.head, self.lookup, self.min_match = head, lookup, min_match
        self.hidden_layers = head.hidden_layers
        self.version = head.version

    @contextmanager
    def _head_view(self, seq, state: _HybridState) -> Iterator[None]:
        """The head sees its own state in seq.draft_state while it runs."""
        seq.draft_state = state.head
        try:
            yield
        finally:
            state.head, seq.draft_state = seq.draft_state, state

    def begin(
        self,
        seq,
        taps: list[Tensor],  # 3 x (P, d) target residual streams of the prompt
    ) -> None:
        self.head.begin(seq, taps)
        seq.draft_state = _HybridState(seq.draft_state)

    def _lookup_tokens(self, seq, state: _HybridState, k: int) -> list[int]:
        """The lookup tokens drafted first this step ([] when the head goes first)."""
        tokens = np.asarray(seq.tokens, dtype=np.int64)
        found, n = lookup_match(tokens, k, self.lookup.n_max, self.lookup.n_min)
        if not found or not lookup_first(n, state.rate(LOOKUP), state.rate(HEAD), self.min_match):
            return []
        thresholds = [self.head.stop_threshold(j) for j in range(len(found))]
        return lookup_prefix(found, state.rate(LOOKUP), thresholds)

    def propose(self, seq, k: int, params: SamplingParams, gen: torch.Generator) -> Proposal:
        return drive(self.draft_steps(seq, k, params, gen))

    def draft_steps(self, seq, k: int, params: SamplingParams, gen: torch.Generator) -> DraftSteps:
        """The block; the head's steps are yielded (batched across sequences by
        `lockstep.run_lockstep`) while the head sees its own state."""
        state: _HybridState = seq.draft_state
        if k <= 0:
            state.sources = ""
            return Proposal([], None, [], "")
        first = self._lookup_tokens(seq, state, k)
        prior = state.rate(LOOKUP) ** len(first)
        if len(first) == k or (first and prior < self.head.stop_threshold(len(first))):
            head = Proposal([], None, [])  # no slot left, or no head token could pass the stop rule
        else:
            with self._head_view(seq, state):
                head = yield from self.head.draft_steps(seq, k - len(first), params, gen, after=first, prior=prior)
        state.sources = LOOKUP * len(first) + HEAD * len(head.tokens)
        probs: Tensor | None = None
        if head.probs is not None and first:  # sampled head tokens after lookup ones: one-hot rows
            one_hot = F.one_hot(torch.tensor(first, dtype=torch.long), head.probs.shape[-1])  # (m, V)
            probs = torch.cat([one_hot.to(head.probs), head.probs])  # (m + h, V)
        elif head.probs is not None:
            probs = head.probs
        logprobs = [0.0] * len(first) + list(head.logprobs or [])  # lookup: log of a one-hot q
        return Proposal([*first, *head.tokens], probs, logprobs, state.sources)

    def commit(self, seq, num_accepted: int, taps: list[Tensor]) -> None:
        """Count acceptance per source, then the head commits whoever drafted.
        taps: 3 x (1 + K, d) target residual streams of the verify pass."""
        state: _HybridState = seq.draft_state
        state.observe(num_accepted)
        with self._head_view(seq, state):
            self.head.commit(seq, num_accepted, taps)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "min_match": self.min_match,
            "lookup": {"n_max": self.lookup.n_max, "n_min": self.lookup.n_min},
            "head": self.head.describe(),
        }
