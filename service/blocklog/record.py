"""The block record contract (docs/architecture.md): what one verify step of
the serving engine hands to the block log, and the versioned, tensor-free
records the Draft-OPD worker reads back.

This module imports neither torch nor the settings: the engine, the writer and
the worker's consumer all depend on it, never the other way round."""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA_VERSION = 1


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
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def from_observation(cls, obs: BlockObservation, target_model: str) -> BlockRecord:
        """The record of one verify step, as the engine hands it to its block sink."""
        return cls(
            request_id=obs.request_id,
            step=obs.step,
            drafter_version=obs.drafter_version,
            target_model=target_model,
            temperature=obs.temperature,
            position=obs.position,
            draft_tokens=obs.draft_tokens,
            draft_logprobs=obs.draft_logprobs,
            num_accepted=obs.num_accepted,
            next_token=obs.next_token,
            target_top_ids=obs.target_top_ids,
            target_top_logprobs=obs.target_top_logprobs,
            target_draft_logprobs=obs.target_draft_logprobs,
        )

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
