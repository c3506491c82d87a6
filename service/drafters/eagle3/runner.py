"""The EAGLE-3 head's serving forward over the rows of several sequences.

A `HeadCall` is one sequence's head step (the catch-up over its newly verified
anchors, or one drafted token) on its own head KV cache. `HeadRunner.forward`
runs the calls of one round together, as `service.ragged` runs the target:
embedding, norms, the q/k/v and o projections, the MLP and the draft-vocab LM
head once over the stacked rows; RoPE at each row's own position; attention
per call against its own cache (`cached_attention`, as `Eagle3Head.step`).

Why the runner has linears of its own: MKL's float32 sgemm rounds a row
differently depending on how many rows the call has, so a sequence's draft
would change with the batch beside it. The runner reads the head's weights
through prepacked oneDNN linears (`service.packed`), which compute a row the
same at any row count, so a batched call returns bit for bit what the same
call returns alone (and a one-sequence draft is the same either way). The
head's own modules are left as they are (training uses them); a packed weight
follows in-place updates of the head's. Other dtypes and devices fall back to
`F.linear`: the head's rows may then differ in the last bits between batch
sizes, which changes drafts, never the target's verified output."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ...llama import apply_rope, cached_attention, causal_mask
from ...packed import PackedLinear
from .head import Eagle3Head


@dataclass
class HeadCall:
    runner: HeadRunner
    hidden: Tensor  # (T, d) fused target features of verified anchors, or the head's own output
    tokens: Tensor  # (T,) int64, the token after each row
    k_cache: Tensor  # (kv, capacity, hd) the sequence's head keys
    v_cache: Tensor  # (kv, capacity, hd)
    start: int  # RoPE position / cache slot of the first row
    logits: bool = True  # also the draft-vocab logits of the last row

    @property
    def rows(self) -> int:
        return self.hidden.shape[0]


@dataclass
class HeadOut:
    hidden: Tensor  # (1, d) the head's output at the call's last row
    normed: Tensor | None  # (1, d) its final norm (the context-vocab logits read it); None without logits
    logits: Tensor | None  # (1, Vd) draft-vocab logits; None without logits


class HeadRunner:
    """Batched serving forward of one head (calls sharing a runner batch together)."""

    def __init__(self, head: Eagle3Head) -> None:
        self.head = head
        mlp = head.mlp
        self.qkv, self.o_proj, self.lm_head = (
            PackedLinear(m.weight) for m in (head.qkv_proj, head.o_proj, head.lm_head)
        )
        self.gate, self.up, self.down = (
            PackedLinear(m.weight) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        )

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (N, 2d) -> q (h, N, hd), k/v (kv, N, hd), as `Eagle3Head._split_qkv`."""
        cfg, n = self.head.cfg, x.shape[0]
        q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        q, k, v = self.qkv(x).split([q_width, kv_width, kv_width], -1)
        q = q.view(n, cfg.num_heads, cfg.head_dim).transpose(0, 1)
        k = k.view(n, cfg.num_kv_heads, cfg.head_dim).transpose(0, 1)
        v = v.view(n, cfg.num_kv_heads, cfg.head_dim).transpose(0, 1)
        return q, k, v

    def forward(self, calls: list[HeadCall]) -> list[HeadOut]:
        """`Eagle3Head.step` of every call in one pass (+ the LM head on the last
        row of the calls that want logits) -> one `HeadOut` per call."""
        head, frozen = self.head, self.head.frozen
        hidden = torch.cat([c.hidden for c in calls]) if len(calls) > 1 else calls[0].hidden  # (N, d)
        tokens = torch.cat([c.tokens for c in calls]) if len(calls) > 1 else calls[0].tokens  # (N,)
        device = hidden.device
        positions = torch.cat([torch.arange(c.start, c.start + c.rows, device=device) for c in calls])  # (N,)
        x = torch.cat([head.input_norm(F.embedding(tokens, frozen.embed)), head.hidden_norm(hidden)], dim=-1)
        q, k, v = self._qkv(x)
        cos, sin = frozen.cos[positions], frozen.sin[positions]  # (N, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        outs, row = [], 0
        for c in calls:
            rows = slice(row, row + c.rows)
            mask = causal_mask(c.start, c.rows, device)
            outs.append(
                cached_attention(q[:, rows], k[:, rows], v[:, rows], c.k_cache, c.v_cache, c.start, mask)
            )
            row += c.rows
        x = hidden + self.o_proj(torch.cat(outs) if len(outs) > 1 else outs[0])
        h = head.post_attention_norm(x)
        x = x + self.down(F.silu(self.gate(h)) * self.up(h))  # (N, d)
        ends = torch.tensor([c.rows for c in calls], device=device).cumsum(0) - 1
        last = x[ends]  # (calls, d)
        want = [i for i, c in enumerate(calls) if c.logits]
        normed = head.norm(last[want]) if want else None  # (wanted, d)
        logits = self.lm_head(normed) if normed is not None else None  # (wanted, Vd)
        results, j = [], 0
        for i, c in enumerate(calls):
            if c.logits:
                results.append(HeadOut(last[i : i + 1], normed[j : j + 1], logits[j : j + 1]))
                j += 1
            else:
                results.append(HeadOut(last[i : i + 1], None, None))
        return results
