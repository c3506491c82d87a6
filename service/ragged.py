"""One target forward over several sequences' new rows (ragged batching).

Each part brings its own new tokens (a verify pass: the last emitted token and
its K drafts; or a chunk of a prompt) and its own `KVCache`. The rows of all
parts are concatenated to (N, d), so the embedding, the norms, every
projection, the MLP and the LM head run once for the whole batch: on a CPU
the weights are read once per forward instead of once per sequence, which is
what makes a batch cheap. RoPE uses each row's own position, and attention
runs part by part on its own cache (`cached_attention`, as in
`LlamaModel.forward`), cheap at these lengths.

Every per-row operation here is the one `LlamaModel.forward` applies, and the
prepacked float32 linears compute a row the same whatever the row count, so
a part's logits and taps equal a single-sequence forward's
(tests/test_batching.py checks it bit for bit)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .llama import DecoderLayer, KVCache, LlamaModel, cached_attention, causal_mask


@dataclass
class RaggedPart:
    tokens: Tensor  # (T,) int64, T >= 1: positions cache.length .. cache.length+T-1
    cache: KVCache
    hidden_layers: tuple[int, ...] = ()  # layers whose residual streams this part wants
    logit_rows: int = 0  # LM head on the last logit_rows rows (verify: T; a prompt's last chunk: 1)


@dataclass
class RaggedOut:
    logits: Tensor | None  # (logit_rows, V); None when logit_rows == 0
    taps: list[Tensor]  # one (T, d) per layer of part.hidden_layers, in layer order


@dataclass(frozen=True)
class _Segment:
    begin: int  # first row of the part in the (N, d) batch
    end: int
    start: int  # cache slot of the part's first new position
    mask: Tensor | None  # (T, start+T) bool, None when T == 1


def check_parts(parts: list[RaggedPart]) -> None:
    """Raise ValueError for a part that cannot run (empty, or past its cache)."""
    for part in parts:
        t = part.tokens.shape[0]
        if t < 1 or not 0 <= part.logit_rows <= t:
            raise ValueError(f"a ragged part needs >= 1 token and 0..T logit rows, got T={t}")
        if part.cache.length + t > part.cache.capacity:
            raise ValueError("KV cache capacity exceeded")


def _segments(parts: list[RaggedPart], device: torch.device) -> list[_Segment]:
    out, row = [], 0
    for part in parts:
        t, start = part.tokens.shape[0], part.cache.length
        out.append(_Segment(row, row + t, start, causal_mask(start, t, device)))
        row += t
    return out


def _layer(
    layer: DecoderLayer,
    index: int,
    x: Tensor,  # (N, d) residual stream of every row
    cos: Tensor,  # (N, hd) each row's own position
    sin: Tensor,
    parts: list[RaggedPart],
    segments: list[_Segment],
) -> Tensor:
    """`DecoderLayer.forward` over the concatenated rows; attention per part."""
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    q, k, v = attn.heads(h, cos, sin)  # (h, N, hd), (kv, N, hd) with RoPE, (kv, N, hd)
    outs = []
    for part, seg in zip(parts, segments):
        rows = slice(seg.begin, seg.end)
        cache = part.cache
        outs.append(
            cached_attention(
                q[:, rows], k[:, rows], v[:, rows], cache.k[index], cache.v[index], seg.start, seg.mask
            )
        )
    x = x + attn.o_proj(torch.cat(outs))
    return x + layer.mlp(layer.post_attention_layernorm(x))


def ragged_forward(model: LlamaModel, parts: list[RaggedPart]) -> list[RaggedOut]:
    """Run every part's new tokens through the target in one pass -> one
    `RaggedOut` per part. Appends each part's T positions to its own cache
    (only once the whole pass succeeded: a failed pass leaves every
    `cache.length` as it was, so it can be retried)."""
    check_parts(parts)
    device = model.device
    segments = _segments(parts, device)
    ids = torch.cat([p.tokens for p in parts])  # (N,)
    positions = torch.cat([torch.arange(s.start, s.start + s.end - s.begin, device=device) for s in segments])
    cos, sin = model.cos[positions], model.sin[positions]  # (N, hd)
    wanted = set().union(*(p.hidden_layers for p in parts))
    streams: dict[int, Tensor] = {}
    x = model.embed_tokens(ids)
    for i, layer in enumerate(model.layers):
        x = _layer(layer, i, x, cos, sin, parts, segments)
        if i in wanted:
            streams[i] = x
    hidden = model.norm(x)  # (N, d)
    picks = [torch.arange(s.end - p.logit_rows, s.end, device=device) for p, s in zip(parts, segments)]
    rows = torch.cat(picks)
    logits = model.lm_head(hidden[rows]) if rows.numel() else None  # (sum of logit_rows, V)
    outs, first = [], 0
    for part, seg in zip(parts, segments):
        part_logits = None
        if part.logit_rows:
            part_logits = logits[first : first + part.logit_rows]
            first += part.logit_rows
        taps = [
            streams[i][seg.begin : seg.end] for i in sorted(set(part.hidden_layers)) if i < len(model.layers)
        ]
        outs.append(RaggedOut(part_logits, taps))
    for part, seg in zip(parts, segments):
        part.cache.length = seg.end - seg.begin + seg.start
    return outs
