"""Draft-model drafter: a smaller causal LM with the target's tokenizer and its
own KV cache; or, with `num_layers`, the target's own first layers plus its
final norm and LM head (self-speculative early exit, no extra weights)."""

from __future__ import annotations

import torch

from ..llama import LlamaModel
from ..penalties import apply_penalties
from ..sampling import SamplingParams, target_probs
from .base import Drafter, Proposal


class DraftModelDrafter(Drafter):
    kind = "draft_model"

    def __init__(self, model: LlamaModel, num_layers: int | None = None, name: str = "draft_model"):
        self.model = model
        self.num_layers = num_layers
        self.version = name

    def begin(self, seq, taps) -> None:
        # the draft cache lags: it is caught up on the next propose, in one pass
        seq.draft_state = self.model.new_cache(seq.capacity, self.num_layers)

    def propose(self, seq, k: int, params: SamplingParams, gen: torch.Generator) -> Proposal:
        cache = seq.draft_state
        if k == 0:
            return Proposal([], None, [])
        feed = torch.tensor(seq.tokens[cache.length :], dtype=torch.long, device=self.model.device)
        drafted: list[int] = []
        dists, logps = [], []
        history = seq.output_ids if params.penalties is not None else []
        for i in range(k):
            logits, _, _ = self.model(feed, cache, num_layers=self.num_layers, last_only=True)
            scores = logits[-1:]  # (1, V)
            if params.penalties is not None:  # as the target's row at this slot will be penalised
                scores = apply_penalties(scores, [*history, *drafted], [], params.penalties)
            if params.greedy:
                tok = scores[0].argmax()
            else:
                q = target_probs(scores, params)  # (1, V)
                tok = torch.multinomial(q[0], 1, generator=gen)[0]
                dists.append(q[0])
                logps.append(q[0, tok])
            drafted.append(int(tok))
            if i + 1 < k:
                feed = tok.view(1)
        probs = torch.stack(dists) if dists else None
        lp = torch.stack(logps).log().tolist() if logps else [0.0] * k
        return Proposal(drafted, probs, lp)

    def commit(self, seq, num_accepted: int, taps) -> None:
        cache = seq.draft_state
        # valid: the context before this step's drafts plus the accepted drafts it fed
        before = len(seq.tokens) - num_accepted - 1
        cache.rollback(min(cache.length, before + num_accepted))
