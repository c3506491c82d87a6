"""One iteration of the serving loop over every running sequence (continuous
batching): chunked prefill, drafting (the EAGLE-3 head's steps batched across
sequences, `service.drafting`), ONE ragged target forward, then acceptance per
sequence.

Admission policy (the engine's loop): sequences are admitted in arrival
order while fewer than `max_num_seqs` run; more wait in the FIFO queue. A
prompt is prefilled in chunks of `prefill_chunk` tokens (fixed boundaries:
0, C, 2C, ...; `Engine.start` uses the same ones, so the cache is the same
bit for bit). Each iteration takes the next chunk of the oldest prefilling
sequences while their chunks fit in a budget of `prefill_chunk` tokens (the
oldest always goes; several short prompts share one budget), and every
decoding sequence takes one draft -> verify -> accept step in the same
forward. A long prompt thus delays the running decodes by at most one chunk
of rows per iteration.

Failures stay with their sequence: an exception while preparing, drafting or
accepting fails that sequence alone (a failed batched head step is rerun one
sequence at a time, `service.drafters.lockstep`); when the batched forward itself raises,
each part is run again on its own (every cache length was left as it was),
so only the parts that fail alone fail their sequence."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import drafting
from .drafters.base import Proposal
from .drafting import Drafted
from .ragged import RaggedOut, RaggedPart, ragged_forward

if TYPE_CHECKING:
    from .engine import Engine, Sequence, StepOutput

log = logging.getLogger(__name__)

Result = tuple["Sequence", "StepOutput | BaseException"]


@dataclass
class _Work:
    seq: Sequence
    part: RaggedPart
    proposal: Proposal | None  # None: a prompt chunk
    cached_len: int  # cache length before the forward
    draft_s: float = 0.0


def chunk_size(seq: Sequence, prefill_chunk: int) -> int:
    """Tokens in the sequence's next prompt chunk."""
    return min(prefill_chunk, len(seq.prompt_ids) - seq.prefilled)


def _prefill_work(engine: Engine, seq: Sequence) -> _Work:
    """The next chunk of a prompt; prepares the sequence first."""
    if seq.cache is None:
        engine.prepare(seq)
    begin = seq.prefilled
    end = begin + chunk_size(seq, engine.prefill_chunk)
    ids = torch.tensor(seq.prompt_ids[begin:end], dtype=torch.long, device=engine.target.device)  # (chunk,)
    last = end == len(seq.prompt_ids)
    rows = ids.shape[0] if engine.wants_prompt_logprobs(seq) else int(last)
    part = RaggedPart(ids, seq.cache, seq.drafter.hidden_layers, rows)
    return _Work(seq, part, None, seq.cache.length)


def _decode_work(engine: Engine, seq: Sequence, drafted: Drafted) -> _Work:
    if isinstance(drafted.proposal, BaseException):
        raise drafted.proposal
    t0 = time.perf_counter()
    ids = engine.verify_ids(seq, drafted.proposal)  # (K+1,)
    part = RaggedPart(ids, seq.cache, seq.drafter.hidden_layers, ids.shape[0])
    return _Work(seq, part, drafted.proposal, seq.cache.length, drafted.seconds + time.perf_counter() - t0)


def plan(engine: Engine, running: list[Sequence]) -> tuple[list[_Work], list[Result]]:
    """This iteration's parts: prompt chunks within the budget, then one verify
    pass per decoding sequence, all drafted together (the head steps batched
    across sequences). -> (work, sequences that failed to plan)."""
    work: list[_Work] = []
    failed: list[Result] = []
    budget = engine.prefill_chunk
    decoding = [seq for seq in running if seq.decoding]
    lengths = engine.draft_lengths(decoding)  # adaptive K, per batch
    drafts = dict(zip(map(id, decoding), drafting.draft(engine, decoding, lengths), strict=True))
    for seq in running:
        try:
            if seq.decoding:
                work.append(_decode_work(engine, seq, drafts[id(seq)]))
                continue
            size = chunk_size(seq, engine.prefill_chunk)
            if size == 0:
                raise ValueError("a sequence needs a prompt of at least one token")
            if size > budget:
                budget = 0  # FIFO: no younger prompt overtakes one that did not fit
                continue
            work.append(_prefill_work(engine, seq))
            budget -= size
        except Exception as exc:
            log.exception("sequence %s failed", seq.request_id)
            failed.append((seq, exc))
    return work, failed


def forward(engine: Engine, work: list[_Work]) -> list[RaggedOut | BaseException]:
    """One ragged forward; if it raises, each part alone (one result per part)."""
    parts = [w.part for w in work]
    try:
        return list(ragged_forward(engine.target, parts))
    except Exception as exc:
        if len(parts) == 1:
            return [exc]
        log.warning(
            "batched forward of %d sequences failed; running them one by one", len(parts), exc_info=True
        )
    results: list[RaggedOut | BaseException] = []
    for w in work:
        w.part.cache.rollback(w.cached_len)
        try:
            results.append(ragged_forward(engine.target, [w.part])[0])
        except Exception as exc:  # noqa: BLE001 -- handed back: `iteration` logs it and fails that sequence
            results.append(exc)
    return results


def _finish_prefill(engine: Engine, w: _Work, out: RaggedOut) -> StepOutput | None:
    """Keep the chunk's taps (and logits); the last chunk emits the first token."""
    seq = w.seq
    seq.prefilled += w.part.tokens.shape[0]
    seq.prefill_taps.append(out.taps)
    if out.logits is not None:
        seq.prefill_logits.append(out.logits)
    if seq.prefilled < len(seq.prompt_ids):
        return None
    taps = [torch.cat(layer) for layer in zip(*seq.prefill_taps)]  # (P, d) each
    logits = torch.cat(seq.prefill_logits)  # (P or 1, V)
    seq.prefill_taps, seq.prefill_logits = [], []
    return engine.first_token(seq, logits, taps)


def iteration(engine: Engine, running: list[Sequence]) -> list[Result]:
    """One engine iteration over `running` (none cancelled) -> each sequence's
    output this iteration, or its exception (a prompt chunk that is not the
    last yields nothing)."""
    work, results = plan(engine, running)
    if not work:
        return results
    t_drafted = time.perf_counter()
    outs = forward(engine, work)
    verify_s = time.perf_counter() - t_drafted
    if engine.metrics is not None:
        engine.metrics.batch_size.observe(len(work))
    rows = sum(w.part.tokens.shape[0] for w in work)
    for w, out in zip(work, outs):
        t0 = time.perf_counter()
        try:
            if isinstance(out, BaseException):
                raise out
            if w.proposal is None:
                step = _finish_prefill(engine, w, out)
            else:
                step = engine.accept(w.seq, w.proposal, out.logits, out.taps, w.cached_len)
        except Exception as exc:
            log.exception("sequence %s failed", w.seq.request_id)
            results.append((w.seq, exc))
            continue
        if w.proposal is not None:  # a decode step's share of the forward: its rows
            share = verify_s * w.part.tokens.shape[0] / rows
            engine.timing.add(w.draft_s, share, time.perf_counter() - t0)
            w.seq.decode_s += w.draft_s + share
        if step is not None:
            results.append((w.seq, step))
    return results
