"""The block record contract (docs/architecture.md): what one verify step of
the serving engine hands to the block log, and the versioned, tensor-free
records the Draft-OPD worker reads back.

This module imports neither torch nor the settings: the engine, the writer and
the worker's consumer all depend on it, never the other way round."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# 2: drafter_kind and draft_sources. Version-1 records still decode (codec.py).
SCHEMA_VERSION = 2


class SchemaError(ValueError):
    """A record this code cannot read (unknown schema_version, malformed fields)."""


@dataclass
class BlockObservation:
    """Everything the block log needs from one verify step, as the engine hands
    it to its block sink (plain lists, no tensors)."""

    request_id: str
    step: int
    drafter_version: str
    temperature: float
    position: int  # tokens of context before the first drafted token
    draft_tokens: list[int]
    draft_logprobs: list[float]
    num_accepted: int
    next_token: int
    target_top_ids: list[list[int]]  # (K+1) x topk, raw target distribution (temperature 1)
    target_top_logprobs: list[list[float]]
    target_draft_logprobs: list[float]  # log p of each drafted token
    prompt_ids: list[int] | None = None  # set on a request's first step only
    drafter_kind: str = "none"  # the serving drafter's kind: eagle3, hybrid, ngram, draft_model, none
    draft_sources: str = ""  # K letters: who drafted each token (e: eagle3 head, n: lookup, d: draft model)


@dataclass
class BlockRecord:
    """One verify step of one request.

    `position` = number of context tokens preceding the first drafted token
    (len(prompt) + tokens generated before this step). Target row j (0..K) is
    the target's distribution for the token at position + j, conditioned on the
    prefix plus draft_tokens[:j]; the emitted tokens draft_tokens[:num_accepted]
    + [next_token] occupy positions position .. position + num_accepted.
    Target log-probs are of its raw distribution (log-softmax of the logits,
    temperature 1, no top-k/top-p); `temperature` is what the request sampled with."""

    request_id: str
    step: int
    drafter_version: str
    target_model: str
    temperature: float
    position: int
    draft_tokens: list[int]  # K drafted ids (K may be 0)
    draft_logprobs: list[float]  # K: log q of each drafted token; 0.0 for deterministic drafters
    num_accepted: int
    next_token: int  # recovered (first rejection) or bonus (all K accepted)
    target_top_ids: list[list[int]]  # (K+1) x k
    target_top_logprobs: list[list[float]]  # (K+1) x k, log p
    target_draft_logprobs: list[float]  # K: log p of each drafted token at its position
    # who drafted: the drafter's kind, and per drafted token a letter ("?": unknown). The
    # on-policy Draft-OPD update keeps blocks the eagle3 head did not draft out of its loss.
    drafter_kind: str = "unknown"
    draft_sources: str = ""  # K letters; "" on construction means "?" for each
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if not self.draft_sources:
            self.draft_sources = "?" * len(self.draft_tokens)

    @classmethod
    def from_observation(cls, obs: BlockObservation, target_model: str) -> BlockRecord:
        """The record of one verify step, as the engine hands it to its block sink:
        every field of the observation that the record has, plus the target model."""
        shared = {f.name for f in dataclasses.fields(cls)} - {"schema_version", "target_model"}
        return cls(target_model=target_model, **{name: getattr(obs, name) for name in shared})

    @property
    def num_draft(self) -> int:
        return len(self.draft_tokens)

    def emitted_tokens(self) -> list[int]:
        """The tokens this step appended to the sequence."""
        return list(self.draft_tokens[: self.num_accepted]) + [self.next_token]


@dataclass
class PromptRecord:
    """A request's prompt token ids, logged once before its blocks. (The target
    model is on every block, so it is not repeated here.)"""

    request_id: str
    prompt_ids: list[int]
    schema_version: int = SCHEMA_VERSION


def context_key(stream: str, request_id: str) -> str:
    """The Redis key of a request's token context, next to the block stream."""
    return f"{stream}:ctx:{request_id}"
