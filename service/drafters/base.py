"""The drafter interface the engine speaks: propose K tokens from the current
state of one sequence, then hear which of them the target accepted."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..sampling import SamplingParams

if TYPE_CHECKING:
    from ..engine import Sequence


# One letter per drafted token in block records (`draft_sources`): who drafted it.
SOURCE_CODES = {"eagle3": "e", "ngram": "n", "draft_model": "d"}


@dataclass
class Proposal:
    tokens: list[int]  # K drafted ids (K may be 0: plain decoding this step)
    probs: Tensor | None  # (K, V) draft distribution after the request's transform; None: deterministic
    logprobs: list[float] | None = None  # log q of each drafted token (block records)
    sources: str | None = None  # K letters of SOURCE_CODES; None: every token from the drafter's own kind

    def source_string(self, kind: str) -> str:
        """`sources`, or (None) the drafter kind's letter for every token ("?" if it has none)."""
        if self.sources is not None:
            return self.sources
        return SOURCE_CODES.get(kind, "?") * len(self.tokens)


# A proposal drafted as a generator: it yields the batched head steps it needs
# (`service.drafters.lockstep`), receives each step's output and returns the Proposal.
DraftSteps = Generator[Any, Any, "Proposal"]


class Drafter(ABC):
    """Per-sequence state lives in `seq.draft_state`, created by `begin`.

    `hidden_layers` names target layers whose residual streams the target's
    forward passes hand over (`taps`, one (T, d) tensor per layer, for the T
    tokens of that pass), so a head drafter needs no extra target forward."""

    kind: str = "base"
    version: str = "0"
    checkpoint_kind: str | None = None  # the checkpoint kind a pointer names for this drafter (None: kind)
    hidden_layers: tuple[int, ...] = ()

    def begin(self, seq: Sequence, taps: list[Tensor]) -> None:
        """After the prompt's prefill (taps cover every prompt position)."""
        seq.draft_state = None

    @abstractmethod
    def propose(self, seq: Sequence, k: int, params: SamplingParams, gen: torch.Generator) -> Proposal:
        """Draft up to k tokens continuing seq.tokens."""

    def draft_steps(self, seq: Sequence, k: int, params: SamplingParams, gen: torch.Generator) -> DraftSteps | None:
        """`propose` as a generator of head steps that `service.drafters.lockstep`
        batches with other sequences' steps; None: this drafter only has `propose`."""
        return None

    def commit(self, seq: Sequence, num_accepted: int, taps: list[Tensor]) -> None:
        """After verification: seq.tokens already holds the accepted drafts and the
        next token; taps cover the verify pass ([last token] + drafts)."""

    def release(self, seq: Sequence) -> None:
        seq.draft_state = None

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": self.version}
