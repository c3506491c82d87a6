"""The speculative decoding engine: draft -> verify -> accept, on a dedicated
thread.

Each sequence owns a target KV cache sized for its prompt + max_tokens and
keeps the drafter it started with (a hot-reloaded drafter serves new
sequences; in-flight ones finish on the old one). The serving loop batches:
each iteration admits waiting sequences (FIFO, up to max_num_seqs running),
prefills prompts in chunks, and steps every decoding sequence in one ragged
target forward (`service.batching`, `service.ragged`). `generate` runs one
sequence on the calling thread through `start` / `step`; both paths share
`first_token` and `accept`, so they emit the same tokens. The engine imports
no web framework."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import batching, drafting
from .blocklog.record import BlockObservation
from .drafters.base import Drafter, Proposal
from .llama import KVCache, LlamaModel
from .metrics import Metrics, SpecDecodeStats
from .penalties import apply_penalties
from .sampling import SamplingParams, greedy_verify, make_generator, rejection_verify, target_probs
from .speculation import AcceptanceTracker, DraftLengthPolicy

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    token_ids: list[int]  # newly emitted tokens (may be empty on the final output)
    logprobs: list[float] | None = None  # target log-prob of each emitted token
    top_logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None  # "stop" (EOS) | "length" | None
    prompt_logprobs: list[float | None] | None = None  # with echo + logprobs, on the first output
    prompt_top_logprobs: list[dict[int, float] | None] | None = None


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[StepOutput | BaseException], None]
    tokens: list[int] = field(default_factory=list)
    drafter: Drafter | None = None
    cache: KVCache | None = None
    draft_state: Any = None
    gen: torch.Generator | None = None
    capacity: int = 0
    num_generated: int = 0
    steps: int = 0
    num_drafts: int = 0  # verify steps that checked >= 1 drafted token (this request's τ)
    num_accepted: int = 0
    decode_tokens: int = 0  # tokens its decode steps produced (accepted drafts + 1 each)
    decode_s: float = 0.0  # seconds of those steps' drafting and verifying (the guard's speed)
    arrival: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    acceptance: AcceptanceTracker = field(default_factory=AcceptanceTracker)  # for adaptive K
    prefilled: int = 0  # prompt tokens in the target cache (the batched loop prefills in chunks)
    prefill_taps: list[list[Tensor]] = field(default_factory=list)  # per chunk: the drafter's taps
    prefill_logits: list[Tensor] = field(default_factory=list)  # per chunk: the logit rows kept

    @property
    def decoding(self) -> bool:
        """Prefilled and its first token emitted: ready for draft -> verify steps."""
        return self.cache is not None and len(self.tokens) > len(self.prompt_ids)

    @property
    def remaining(self) -> int:
        return self.params.max_tokens - self.num_generated

    @property
    def output_ids(self) -> list[int]:
        """The tokens emitted so far (what presence / frequency penalties count)."""
        return self.tokens[len(self.prompt_ids) :]


@dataclass
class StepTiming:
    """Where decode steps spend their time (seconds, summed): drafting, the
    target's verify forward, and the rest (acceptance, bookkeeping, logging)."""

    steps: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0
    other_s: float = 0.0

    def add(self, draft: float, verify: float, other: float) -> None:
        self.steps += 1
        self.draft_s += draft
        self.verify_s += verify
        self.other_s += other

    def per_step_ms(self) -> dict[str, float]:
        steps = max(self.steps, 1)
        parts = (("draft", self.draft_s), ("verify", self.verify_s), ("other", self.other_s))
        return {name: 1000 * seconds / steps for name, seconds in parts}


class Engine:
    def __init__(
        self,
        target: LlamaModel,
        drafter: Drafter,
        eos_token_ids: set[int],
        num_speculative_tokens: int = 4,
        metrics: Metrics | None = None,
        block_sink: Callable[[BlockObservation], None] | None = None,
        block_topk: int = 20,
        max_num_seqs: int = 8,
        prefill_chunk: int = 256,
        speculation: DraftLengthPolicy | None = None,
    ):
        self.target = target
        self.drafter = drafter
        self.eos = set(eos_token_ids)
        self.k = num_speculative_tokens
        self.metrics = metrics
        self.stats = SpecDecodeStats(metrics)
        self.timing = StepTiming()
        self.block_sink = block_sink
        self.block_topk = block_topk
        self.max_num_seqs = max_num_seqs
        self.prefill_chunk = prefill_chunk  # prompt tokens prefilled per loop iteration (all sequences)
        self.policy = speculation or DraftLengthPolicy()  # how far each sequence drafts (service.speculation)
        self._incoming: queue.Queue[Sequence] = queue.Queue()
        self._active: deque[Sequence] = deque()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ids = itertools.count()
        # called with each finished sequence (the regression guard's sample); set by the reloader
        self.on_finish: Callable[[Sequence], None] | None = None
        if metrics is not None:
            metrics.set_drafter(drafter.kind, drafter.version)

    # ---- drafter hot swap -------------------------------------------------
    def set_drafter(self, drafter: Drafter) -> None:
        """New sequences use `drafter`; running ones finish on theirs."""
        self.drafter = drafter
        if self.metrics is not None:
            self.metrics.set_drafter(drafter.kind, drafter.version)

    # ---- one sequence ------------------------------------------------------
    def prepare(self, seq: Sequence) -> None:
        """Bind the serving drafter and allocate the sequence's cache and generator."""
        seq.drafter = self.drafter
        seq.capacity = len(seq.prompt_ids) + seq.params.max_tokens + self.k + 1
        seq.cache = self.target.new_cache(seq.capacity)
        seq.gen = make_generator(seq.params.seed, self.target.device)
        seq.tokens = list(seq.prompt_ids)

    def start(self, seq: Sequence) -> StepOutput:
        """Prefill the prompt and emit the first token. The prompt goes in chunks
        of `prefill_chunk` tokens, the boundaries the batched loop uses, so both
        compute the same cache bit for bit (attention sums by its query length)."""
        self.prepare(seq)
        hidden, taps = [], []
        for begin in range(0, len(seq.prompt_ids), self.prefill_chunk):
            chunk = seq.prompt_ids[begin : begin + self.prefill_chunk]
            ids = torch.tensor(chunk, dtype=torch.long, device=self.target.device)  # (C,)
            # h: (C, d) final normed hidden; t: (C, d) residual streams of the drafter's layers
            _, h, t = self.target(ids, seq.cache, hidden_layers=seq.drafter.hidden_layers, logits=False)
            hidden.append(h)
            taps.append(t)
        seq.prefilled = len(seq.prompt_ids)
        rows = torch.cat(hidden) if self.wants_prompt_logprobs(seq) else hidden[-1][-1:]  # (P or 1, d)
        return self.first_token(seq, self.target.lm_head(rows), [torch.cat(layer) for layer in zip(*taps)])

    @staticmethod
    def wants_prompt_logprobs(seq: Sequence) -> bool:
        return seq.params.echo and seq.params.logprobs is not None

    def first_token(
        self,
        seq: Sequence,
        logits: Tensor,  # (P, V) with echo + logprobs, else (1, V): the prompt's last row
        taps: list[Tensor],  # (P, d) each: the prompt's residual streams of the drafter's layers
    ) -> StepOutput:
        """After the prefill: pick and emit the first token, start the drafter."""
        params = seq.params
        first = self._pick(logits[-1:], params, seq.gen)
        seq.tokens.append(first)  # the next token: emitted, not yet in the target cache
        seq.drafter.begin(seq, taps)
        if self.block_sink is not None:  # the first token is a block with K = 0
            self._log_block(seq, Proposal([], None, []), logits[-1:], 0, first, len(seq.prompt_ids))
        out = self._emit(seq, [first], logits[-1:])
        if self.wants_prompt_logprobs(seq):
            chosen, top = _logprobs(logits[:-1], seq.prompt_ids[1:], params.logprobs or 0)
            out.prompt_logprobs = [None, *chosen]
            out.prompt_top_logprobs = [None, *top]
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(seq.prompt_ids))
            self.metrics.ttft.observe(time.perf_counter() - seq.arrival)
        return out

    def draft_lengths(self, seqs: list[Sequence]) -> list[int]:
        """Each decoding sequence's draft length this step: at most K (fewer near
        max_tokens or the cache's end), as the speculation policy chooses."""
        caps = [self._draft_cap(s) for s in seqs]
        # a seeded sampled request drafts its cap: its random draws then do not depend on the batch
        pinned = [s.params.seed is not None and not s.params.greedy for s in seqs]
        ks = self.policy.lengths([s.acceptance for s in seqs], caps, pinned)
        if self.metrics is not None:
            for k in ks:
                self.metrics.draft_length.observe(k)
        return ks

    def _draft_cap(self, seq: Sequence) -> int:
        if seq.drafter is None or seq.drafter.kind == "none":  # target-only: nothing to choose
            return 0
        return max(0, min(self.k, seq.remaining - 1, seq.cache.capacity - len(seq.tokens) - 1))

    def draft(self, seq: Sequence, k: int) -> Proposal:
        """The sequence's drafter proposes up to k tokens (`draft_lengths`); the
        batched loop drafts all its sequences at once (`service.drafting`)."""
        proposal = drafting.draft(self, [seq], [k])[0].proposal
        if isinstance(proposal, BaseException):
            raise proposal
        return proposal

    def verify_ids(self, seq: Sequence, proposal: Proposal) -> Tensor:
        """(K+1,): the last emitted token (not in the cache yet), then the K drafts."""
        return torch.tensor([seq.tokens[-1], *proposal.tokens], dtype=torch.long, device=self.target.device)

    def step(self, seq: Sequence) -> StepOutput:
        """One draft -> verify -> accept step."""
        t_start = time.perf_counter()
        proposal = self.draft(seq, self.draft_lengths([seq])[0])
        t_drafted = time.perf_counter()
        ids = self.verify_ids(seq, proposal)
        cached_len = seq.cache.length
        logits, _, taps = self.target(
            ids, seq.cache, hidden_layers=seq.drafter.hidden_layers
        )  # logits: (K+1, V)
        t_verified = time.perf_counter()
        out = self.accept(seq, proposal, logits, taps, cached_len)
        self.timing.add(t_drafted - t_start, t_verified - t_drafted, time.perf_counter() - t_verified)
        seq.decode_s += t_verified - t_start
        return out

    def accept(
        self,
        seq: Sequence,
        proposal: Proposal,
        logits: Tensor,  # (K+1, V): the verify pass's rows
        taps: list[Tensor],  # (K+1, d) each: the verify pass's residual streams
        cached_len: int,  # cache length before the verify pass
    ) -> StepOutput:
        """Accept a prefix of the drafts, roll the cache back past the first
        rejection, commit, log and emit (the single and the batched path alike)."""
        params = seq.params
        drafted = proposal.tokens
        context = len(seq.tokens)
        draft_ids = torch.tensor(drafted, dtype=torch.long, device=logits.device)  # (K,)
        scores = logits  # (K+1, V); logprobs and the block log keep the model's own
        if params.penalties is not None:  # row i counts the emitted tokens and drafted[:i]
            scores = apply_penalties(logits, seq.output_ids, drafted, params.penalties)
        if params.greedy:
            num_accepted, next_token = greedy_verify(draft_ids, scores)
        else:
            num_accepted, next_token = rejection_verify(
                draft_ids, proposal.probs, target_probs(scores, params), seq.gen
            )
        seq.cache.rollback(cached_len + 1 + num_accepted)
        self.stats.observe_draft(len(drafted), num_accepted)
        if drafted:
            seq.num_drafts += 1
            seq.num_accepted += num_accepted
        seq.tokens.extend(drafted[:num_accepted])
        seq.tokens.append(next_token)
        seq.drafter.commit(seq, num_accepted, taps)
        if self.block_sink is not None:
            self._log_block(seq, proposal, logits, num_accepted, next_token, context)
        seq.decode_tokens += num_accepted + 1
        seq.acceptance.observe(len(drafted), num_accepted)
        return self._emit(seq, [*drafted[:num_accepted], next_token], logits[: num_accepted + 1])

    def _pick(
        self,
        logits: Tensor,  # (1, V)
        params: SamplingParams,
        gen: torch.Generator,
    ) -> int:
        """The first token (nothing generated yet: only a logit bias applies)."""
        if params.penalties is not None:
            logits = apply_penalties(logits, [], [], params.penalties)
        if params.greedy:
            return int(logits[0].argmax())
        return int(torch.multinomial(target_probs(logits, params)[0], 1, generator=gen))

    def _emit(
        self,
        seq: Sequence,
        new: list[int],
        logits: Tensor,  # (len(new), V) before the cut: row i is the target's logits that predicted new[i]
    ) -> StepOutput:
        """Cut the new tokens at EOS / max_tokens and account for them."""
        params = seq.params
        finish = None
        if not params.ignore_eos:
            for i, token in enumerate(new):
                if token in self.eos:
                    new, finish = new[:i], "stop"
                    break
        if len(new) >= seq.remaining:
            new = new[: seq.remaining]
            finish = finish or "length"
        seq.num_generated += len(new)
        if seq.num_generated >= params.max_tokens and finish is None:
            finish = "length"
        out = StepOutput(new, finish_reason=finish)
        if params.logprobs is not None and new:
            out.logprobs, out.top_logprobs = _logprobs(logits[: len(new)], new, params.logprobs)
        if self.metrics is not None:
            self.metrics.generation_tokens.inc(len(new))
        return out

    def _log_block(self, seq, proposal: Proposal, logits: Tensor, n: int, nxt: int, context: int) -> None:
        """Every step is logged, K = 0 ones too, so a consumer can rebuild any
        block's prefix from the prompt and the emitted tokens of earlier blocks."""
        lsm = torch.log_softmax(logits.float(), dim=-1)
        k = len(proposal.tokens)
        top = torch.topk(lsm, min(self.block_topk, lsm.shape[-1]), dim=-1)
        draft_lp = lsm[
            torch.arange(k, device=lsm.device),
            torch.tensor(proposal.tokens, dtype=torch.long, device=lsm.device),
        ]
        obs = BlockObservation(
            request_id=seq.request_id,
            step=seq.steps,
            drafter_version=seq.drafter.version,
            temperature=seq.params.temperature,
            position=context,
            draft_tokens=list(proposal.tokens),
            draft_logprobs=list(proposal.logprobs or [0.0] * k),
            num_accepted=n,
            next_token=nxt,
            target_top_ids=top.indices.tolist(),
            target_top_logprobs=top.values.tolist(),
            target_draft_logprobs=draft_lp.tolist(),
            prompt_ids=list(seq.prompt_ids) if seq.steps == 0 else None,
            drafter_kind=seq.drafter.kind,
            draft_sources=proposal.source_string(seq.drafter.kind),
        )
        seq.steps += 1
        try:
            self.block_sink(obs)
        except Exception:  # the log must never take a request down
            log.exception("block sink failed")

    def finish(self, seq: Sequence) -> None:
        if seq.drafter is not None:
            seq.drafter.release(seq)
            if self.on_finish is not None:
                try:
                    self.on_finish(seq)
                except Exception:  # an observer must never take a request down
                    log.exception("on_finish observer failed")
        seq.cache = None

    # ---- synchronous use (tests, benchmarks, training rollouts) -------------
    def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> list[int]:
        """Run one sequence to completion on the calling thread."""
        seq = Sequence(request_id or f"sync-{next(self._ids)}", list(prompt_ids), params, lambda _: None)
        out_tokens: list[int] = []
        with torch.inference_mode():
            out = self.start(seq)
            out_tokens += out.token_ids
            while out.finish_reason is None:
                out = self.step(seq)
                out_tokens += out.token_ids
        self.finish(seq)
        return out_tokens

    # ---- the serving loop --------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        self._incoming.put(seq)
        if self.metrics is not None:
            self.metrics.waiting.set(self._incoming.qsize())

    @property
    def num_waiting(self) -> int:
        return self._incoming.qsize()

    def start_loop(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="draftloop-engine", daemon=True)
            self._thread.start()

    def stop_loop(self) -> None:
        self._stop.set()
        self._incoming.put(None)  # type: ignore[arg-type]  # wake the loop
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                self._admit()
                if self._active:
                    self._iterate()

    def run_until_idle(self) -> None:
        """The serving loop on the calling thread, until every submitted sequence has left."""
        with torch.inference_mode():
            while self._active or self.num_waiting:
                self._admit()
                if self._active:
                    self._iterate()

    def _iterate(self) -> None:
        """One batched iteration (`service.batching`): cancelled sequences leave
        first; each output is emitted, and finished or failed sequences leave."""
        running: list[Sequence] = []
        for seq in self._active:
            if seq.cancelled:
                self._drop(seq, None)
            else:
                running.append(seq)
        try:
            results = batching.iteration(self, running)
        except Exception as exc:  # a bug outside any one sequence: fail the batch, keep the engine
            log.exception("engine iteration failed")
            results = [(seq, exc) for seq in running]
        gone: set[int] = set()
        for seq, out in results:
            if isinstance(out, BaseException):
                self._drop(seq, out)
                gone.add(id(seq))
                continue
            seq.emit(out)
            if out.finish_reason is not None:
                self._drop(seq, None, out.finish_reason)
                gone.add(id(seq))
        self._active = deque(seq for seq in running if id(seq) not in gone)

    def _admit(self) -> None:
        block = not self._active
        if block:
            self._set_gauges()  # idle: report 0 running before waiting for work
        while len(self._active) < self.max_num_seqs:
            try:
                seq = self._incoming.get(block=block, timeout=None)
            except queue.Empty:
                break
            block = False
            if seq is None:
                break
            self._active.append(seq)
        self._set_gauges()

    def _set_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.running.set(len(self._active))
            self.metrics.waiting.set(self._incoming.qsize())

    def _drop(self, seq: Sequence, exc: BaseException | None, finish_reason: str | None = None) -> None:
        self.finish(seq)
        if exc is not None:
            seq.emit(exc)
        if self.metrics is not None:
            reason = finish_reason or ("error" if exc is not None else "abort")
            self.metrics.requests.labels(finish_reason=reason).inc()
            self.metrics.request_latency.observe(time.perf_counter() - seq.arrival)


def _logprobs(
    logits: Tensor,  # (T, V)
    tokens: list[int],  # T ids, one per row
    top_n: int,
) -> tuple[list[float], list[dict[int, float]]]:
    """Target log-probs of `tokens` (one per row) and the top_n alternatives."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (T, V)
    token_ids = torch.tensor(tokens, dtype=torch.long, device=logp.device)  # (T,), long even when empty
    chosen = logp[torch.arange(len(tokens), device=logp.device), token_ids].tolist()
    tops: list[dict[int, float]] = []
    if top_n > 0:
        top_values, top_ids = torch.topk(logp, top_n, dim=-1)  # (T, top_n) each
        tops = [dict(zip(ids, values)) for ids, values in zip(top_ids.tolist(), top_values.tolist())]
    else:
        tops = [{} for _ in tokens]
    for alternatives, token, token_logp in zip(tops, tokens, chosen):
        alternatives.setdefault(token, token_logp)  # OpenAI includes the chosen token among the alternatives
    return chosen, tops
