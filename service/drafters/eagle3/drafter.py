"""The EAGLE-3 drafter the engine runs: per sequence, the head's one-layer KV
cache and the fused target features of verified positions not yet run, plus
a per-sequence context vocabulary (docs/architecture.md)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ...costmodel import threshold_at
from ...llama import LlamaModel
from ...penalties import apply_penalties
from ...sampling import SamplingParams, target_probs
from ..base import Drafter, DraftSteps, Proposal
from ..lockstep import drive
from .head import Eagle3Head
from .runner import HeadCall, HeadRunner

# Stop drafting once the product of the head's top-1 probabilities falls below
# this (EAGLE-2's confidence rule, on a chain). The fallback only: a served
# drafter gets per-slot thresholds from the measured verify-cost curve
# (`stop_thresholds`, service.costmodel.stop_thresholds).
DEFAULT_MIN_CONFIDENCE = 0.3


@dataclass
class _SeqState:
    k: Tensor  # (kv, capacity, hd) head keys
    v: Tensor  # (kv, capacity, hd) head values
    length: int  # cache slots holding verified anchors (0 .. length-1)
    pending: Tensor  # (P, d) fused features of anchors length .. length+P-1, not yet run
    ctx_ids: Tensor  # (capacity,) int64: target ids outside the draft vocab seen in this sequence
    ctx_rows: Tensor  # (capacity, d): their LM-head rows
    n_ctx: int = 0
    scanned: int = 0  # seq.tokens[:scanned] have been looked at
    seen: set[int] = dataclasses.field(default_factory=set)


@dataclass
class _Pick:
    token: Tensor  # () int64 target id
    logp: Tensor  # () log-probability of the token under the draft distribution
    confidence: float  # the draft distribution's top probability
    dist: Tensor | None  # (V,) the sampled-from distribution (None when greedy)


class Eagle3Drafter(Drafter):
    """Per sequence: the head's one-layer KV cache + fused features of verified
    positions not yet run. propose = one catch-up step over the newly verified
    anchors (its last output gives draft 1) + k-1 single-token steps feeding the
    head's own hidden, each a `HeadCall` that the engine batches across the
    sequences of an iteration (`draft_steps`, `service.drafters.lockstep`); commit drops the draft slots (they hold the head's own
    hidden, not target features) and queues the accepted positions' features.

    Context vocabulary: target ids that occur in the sequence (prompt and
    output) but not in the static draft vocabulary join that sequence's draft
    vocabulary (the target's LM-head rows, gathered once each, applied to the
    head's own normed hidden), so the head can copy names and rare words from
    the prompt at the cost of a few hundred extra logits; it lifts the coverage of the target's tokens (docs/results.md)."""

    kind = "eagle3"

    def __init__(
        self,
        head: Eagle3Head,
        target_model: LlamaModel,
        version: str = "0",
        manifest: dict | None = None,
        context_vocab: bool = True,
        min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    ):
        self.head = head.to(device=target_model.device, dtype=target_model.dtype).eval().requires_grad_(False)
        self.head.attach(target_model)
        self.runner = HeadRunner(self.head)  # the head's batched serving forward (one per drafter)
        self.hidden_layers = tuple(head.cfg.hidden_layers)
        self.version = version
        self.manifest = manifest or {}
        self.vocab_size = target_model.cfg.vocab_size
        self.lm_weight = target_model.lm_head.weight.detach()  # (V, d)
        self.context_vocab = context_vocab and head.cfg.draft_vocab_size < self.vocab_size
        self.static_ids = set(head.d2t.tolist())
        self.min_confidence = min_confidence
        self.stop_thresholds: tuple[float, ...] = ()  # per draft slot; set from the cost curve (registry)

    def stop_threshold(self, slot: int) -> float:
        """Chain probability below which the token at draft slot `slot` is not drafted."""
        return threshold_at(self.stop_thresholds, slot, self.min_confidence)

    def begin(
        self,
        seq,
        taps: list[Tensor],  # 3 x (P, d) target residual streams of the prompt
    ) -> None:
        cfg = self.head.cfg
        frozen = self.head.frozen
        shape = (cfg.num_kv_heads, seq.capacity, cfg.head_dim)
        dtype, device = frozen.embed.dtype, frozen.embed.device
        n_ctx = seq.capacity if self.context_vocab else 0
        seq.draft_state = _SeqState(
            k=torch.empty(shape, dtype=dtype, device=device),
            v=torch.empty(shape, dtype=dtype, device=device),
            length=0,
            pending=self.head.fuse(taps),
            ctx_ids=torch.empty(n_ctx, dtype=torch.long, device=device),
            ctx_rows=torch.empty(n_ctx, cfg.hidden_size, dtype=dtype, device=device),
        )

    def _scan_context(self, state: _SeqState, tokens: list[int]) -> None:
        """Add ids of tokens[state.scanned:] missing from the draft vocab."""
        new = []
        for token in tokens[state.scanned :]:
            if token not in self.static_ids and token not in state.seen:
                state.seen.add(token)
                new.append(token)
        state.scanned = len(tokens)
        new = new[: state.ctx_ids.shape[0] - state.n_ctx]
        if new:
            ids = torch.tensor(new, dtype=torch.long, device=state.ctx_ids.device)
            state.ctx_ids[state.n_ctx : state.n_ctx + len(new)] = ids
            state.ctx_rows[state.n_ctx : state.n_ctx + len(new)] = self.lm_weight[ids]
            state.n_ctx += len(new)

    def _pick(
        self,
        logits: Tensor,  # (1, Vd + n_ctx) over the sequence's draft vocab
        ids: Tensor,  # (Vd + n_ctx,) int64 draft index -> target id
        params: SamplingParams,
        gen: torch.Generator,
        history: list[int] | None,  # with penalties: the tokens generated before this slot
    ) -> _Pick:
        """The next draft token: argmax when greedy, else a sample from the
        request's transform of the draft distribution over the target vocab.
        Penalties and logit bias apply here as to the target's row at this slot."""
        if params.greedy and history is None:
            idx = logits[0].argmax()
            logp = logits[0, idx] - torch.logsumexp(logits[0], dim=-1)
            return _Pick(ids[idx], logp, float(logp.exp()), None)
        full = logits.new_full((1, self.vocab_size), float("-inf"))
        full[0, ids] = logits[0]
        if history is not None and params.penalties is not None:
            full = apply_penalties(full, history, [], params.penalties)  # (1, V)
        if params.greedy:
            token = full[0].argmax()
            logp = torch.log_softmax(full[0].float(), dim=-1)[token]
            return _Pick(token, logp, float(logp.exp()), None)
        q = target_probs(full, params)  # (1, V): the request's transform, over the target vocab
        confidence = float(q[0].max())  # decided before sampling: the draft length stays a function of q
        token = torch.multinomial(q[0], 1, generator=gen)[0]
        return _Pick(token, q[0, token].log(), confidence, q[0])

    def propose(
        self,
        seq,
        k: int,
        params: SamplingParams,
        gen: torch.Generator,
        after: Sequence[int] = (),
        prior: float = 1.0,
    ) -> Proposal:
        """Up to k head tokens (`draft_steps` run alone)."""
        return drive(self.draft_steps(seq, k, params, gen, after, prior))

    def draft_steps(
        self,
        seq,
        k: int,
        params: SamplingParams,
        gen: torch.Generator,
        after: Sequence[int] = (),
        prior: float = 1.0,
    ) -> DraftSteps:
        """Up to k head tokens, each head forward yielded as a `HeadCall` (batched
        with other sequences' by `lockstep.run_lockstep`). `after`: tokens another
        drafter proposed first in this block (not returned); `prior`: their
        estimated acceptance probability, where the chain starts (hybrid drafting)."""
        state: _SeqState = seq.draft_state
        # anchors with a feature and a known next token: length .. len(tokens)-2
        n_new = min(state.pending.shape[0], len(seq.tokens) - 1 - state.length)
        if k <= 0 or n_new <= 0:
            return Proposal([], None, [])
        if self.context_vocab:
            self._scan_context(state, seq.tokens)
        ids = torch.cat([self.head.d2t, state.ctx_ids[: state.n_ctx]]) if state.n_ctx else self.head.d2t
        ctx_rows = state.ctx_rows[: state.n_ctx]
        device = state.pending.device
        # catch-up: the newly verified anchors; its last row gives draft 1 (or follows `after`)
        anchors = torch.tensor(seq.tokens[state.length + 1 : state.length + 1 + n_new], dtype=torch.long, device=device)
        out = yield self._call(state, state.pending[:n_new], anchors, state.length, not after)
        state.length += n_new
        state.pending = state.pending[n_new:]
        pos = state.length  # draft slots start here; commit discards them
        for j, token in enumerate(after):  # as if the head had drafted them: its own hidden feeds on
            ids_j = torch.tensor([token], dtype=torch.long, device=device)
            out = yield self._call(state, out.hidden, ids_j, pos, j + 1 == len(after))
            pos += 1
        drafted: list[int] = []
        logps: list[Tensor] = []
        dists: list[Tensor] = []
        chain = prior  # the head's own estimate that every token drafted so far is accepted
        history = [*seq.output_ids, *after] if params.penalties is not None else None
        for i in range(k):
            logits = out.logits  # (1, Vd)
            if state.n_ctx:  # context ids: the target's LM-head rows on the head's normed hidden
                logits = torch.cat([logits, F.linear(out.normed, ctx_rows)], dim=-1)  # (1, Vd + n_ctx)
            pick = self._pick(logits, ids, params, gen, None if history is None else history + drafted)
            chain *= pick.confidence
            if (i or after) and chain < self.stop_threshold(len(after) + i):
                break  # dynamic draft length: a likely rejection is not worth a longer verify pass
            logps.append(pick.logp)
            if pick.dist is not None:
                dists.append(pick.dist)
            drafted.append(int(pick.token))
            if chain < self.stop_threshold(len(after) + i + 1):
                break  # no later token can pass either (the chain only shrinks): skip its head step
            if i + 1 < k:
                out = yield self._call(state, out.hidden, pick.token.view(1), pos)
                pos += 1
        probs = torch.stack(dists) if dists else None
        # after other drafters' tokens, the first head token may fail the stop rule: nothing drafted
        return Proposal(drafted, probs, torch.stack(logps).tolist() if logps else [])

    def _call(self, state: _SeqState, hidden: Tensor, tokens: Tensor, start: int, logits: bool = True) -> HeadCall:
        """hidden: (T, d), tokens: (T,) -> the head step at slots start..start+T-1 of the sequence's cache."""
        return HeadCall(self.runner, hidden, tokens, state.k, state.v, start, logits)

    def commit(
        self,
        seq,
        num_accepted: int,
        taps: list[Tensor],  # 3 x (1 + K, d) target residual streams of the verify pass
    ) -> None:
        state: _SeqState = seq.draft_state
        # the verify pass covered [last token] + drafts; positions 0..n hold target features now
        fresh = self.head.fuse([t[: num_accepted + 1] for t in taps])
        state.pending = torch.cat([state.pending, fresh]) if state.pending.shape[0] else fresh

    def release(self, seq) -> None:
        seq.draft_state = None

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "version": self.version,
            "hidden_layers": list(self.hidden_layers),
            "draft_vocab_size": self.head.cfg.draft_vocab_size,
            "context_vocab": self.context_vocab,
            "min_confidence": self.min_confidence,
            "stop_thresholds": list(self.stop_thresholds),
        }
