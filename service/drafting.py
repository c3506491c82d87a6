"""Drafting for one engine step over several sequences: the head drafters'
steps batched across sequences, every other drafter alone.

Sequences whose drafter has `draft_steps` (eagle3, hybrid) draft in lock-step
(`service.drafters.lockstep`): per draft step ONE head forward over all of
them (per head, when a hot swap left two in the batch). Drafters without it
(ngram, draft_model, none) `propose` one sequence at a time. Each sequence
gets its own proposal or its own exception, and the seconds it cost (its own
work plus its share, by rows, of each batched head forward), which feed the
speculation policy's draft cost per token and the engine's step timing."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .drafters.base import DraftSteps, Proposal
from .drafters.lockstep import run_lockstep

if TYPE_CHECKING:
    from .engine import Engine, Sequence


@dataclass
class Drafted:
    proposal: Proposal | BaseException  # the exception fails that sequence alone
    seconds: float = 0.0


def draft(engine: Engine, seqs: list[Sequence], ks: list[int]) -> list[Drafted]:
    """Each sequence's drafter proposes up to its k tokens (k = 0: nothing drafted)."""
    out = [Drafted(Proposal([], None, [])) for _ in seqs]
    steps: list[DraftSteps] = []
    stepping: list[int] = []  # the sequences behind `steps`
    for i, (seq, k) in enumerate(zip(seqs, ks, strict=True)):
        if not k:
            continue
        t0 = time.perf_counter()
        try:
            gen = seq.drafter.draft_steps(seq, k, seq.params, seq.gen)
            if gen is None:
                out[i].proposal = seq.drafter.propose(seq, k, seq.params, seq.gen)
            else:
                steps.append(gen)
                stepping.append(i)
        except Exception as exc:  # noqa: BLE001 -- handed back: the caller fails that sequence
            out[i].proposal = exc
        out[i].seconds = time.perf_counter() - t0
    for i, (result, seconds) in zip(stepping, run_lockstep(steps), strict=True):
        out[i] = Drafted(result, out[i].seconds + seconds)
    for d, k in zip(out, ks, strict=True):
        if k and isinstance(d.proposal, Proposal):
            engine.policy.observe_draft(d.seconds, len(d.proposal.tokens))
    return out
