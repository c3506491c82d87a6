"""A compact Llama-family decoder (Llama, SmolLM, Mistral, Qwen2, Qwen3) with a
preallocated KV cache, written for speculative decoding (one sequence per forward;
`service.ragged` runs several sequences' rows through the same layers).

Why not transformers' forward: on a 135M model the per-call Python overhead of
its cache objects and mask builders is a large share of a decode step. Here a
step is a straight run of matmuls; rolling back rejected draft tokens is moving
an integer, and the verify pass can hand back the hidden states of any layers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

SUPPORTED_ARCHS = {"llama", "mistral", "qwen2", "qwen3"}


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    qk_norm: bool = False

    @classmethod
    def from_hf(cls, cfg: dict) -> LlamaConfig:
        arch = cfg.get("model_type", "")
        if arch not in SUPPORTED_ARCHS:
            raise ValueError(
                f"model_type {arch!r} is not supported; supported: {sorted(SUPPORTED_ARCHS)}"
            )
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type", "default") not in ("default", None):
            raise ValueError(f"rope scaling {rope.get('rope_type')!r} is not supported")
        heads = cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", arch == "qwen2"),
            qk_norm=arch == "qwen3",
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin: (max_len, head_dim) in the rotate-half layout used by HF Llama."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = torch.outer(torch.arange(max_len, dtype=torch.float64), inv)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (heads, T, hd); cos/sin: (T, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def cached_attention(
    q: Tensor,  # (h, T, hd) queries of the T new positions, RoPE applied
    k: Tensor,  # (kv, T, hd) their keys, RoPE applied
    v: Tensor,  # (kv, T, hd) their values
    k_cache: Tensor,  # (kv, capacity, hd) one layer's keys
    v_cache: Tensor,  # (kv, capacity, hd)
    start: int,  # cache slot of the first new position
    mask: Tensor | None,  # (T, start+T) bool (`causal_mask`), None when T == 1
) -> Tensor:
    """Writes the new keys/values at start..start+T-1 and attends over the
    cached prefix 0..start+T-1 (grouped-query when kv < h) -> (T, h*hd).
    Shared by the target's layers and the EAGLE-3 head's cached step."""
    heads, t, head_dim = q.shape
    end = start + t
    k_cache[:, start:end] = k
    v_cache[:, start:end] = v
    out = F.scaled_dot_product_attention(
        q.unsqueeze(0),
        k_cache[:, :end].unsqueeze(0),
        v_cache[:, :end].unsqueeze(0),
        attn_mask=mask,
        enable_gqa=heads != k.shape[0],
    )
    return out[0].transpose(0, 1).reshape(t, heads * head_dim)


class KVCache:
    """Per-sequence keys/values, (layers, kv_heads, capacity, hd) each; `length`
    is how many positions are valid, so a rollback is one assignment."""

    def __init__(self, cfg: LlamaConfig, capacity: int, num_layers: int, dtype, device):
        shape = (num_layers, cfg.num_kv_heads, capacity, cfg.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0
        self.capacity = capacity

    def rollback(self, length: int) -> None:
        assert 0 <= length <= self.length
        self.length = length


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        h, kv, hd, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        self.h, self.kv, self.hd = h, kv, hd
        self.q_proj = nn.Linear(d, h * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, kv * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, kv * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(h * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.qkv_proj: nn.Module | None = None  # q, k and v in one GEMM (`service.packed.fuse_projections`)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (..., d) -> q (..., h*hd), k (..., kv*hd), v (..., kv*hd)."""
        if self.qkv_proj is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.qkv_proj(x).split((self.h * self.hd, self.kv * self.hd, self.kv * self.hd), dim=-1)

    def heads(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (T, d), cos/sin (T, hd) -> q (h, T, hd), k (kv, T, hd) with RoPE applied,
        v (kv, T, hd). Fused, q and k share one RoPE pass (the same elementwise ops)."""
        t, h, kv = x.shape[0], self.h, self.kv
        if self.qkv_proj is not None and self.q_norm is None:
            qkv = self.qkv_proj(x).view(t, h + 2 * kv, self.hd).transpose(0, 1)  # (h+2kv, T, hd)
            qk = apply_rope(qkv[: h + kv], cos, sin)
            return qk[:h], qk[h:], qkv[h + kv :]
        q, k, v = self.project(x)
        q, k = q.view(t, h, self.hd).transpose(0, 1), k.view(t, kv, self.hd).transpose(0, 1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v.view(t, kv, self.hd).transpose(0, 1)

    def forward(
        self,
        x: Tensor,  # (T, d)
        cos: Tensor,  # (T, hd)
        sin: Tensor,
        k_cache: Tensor,  # (kv, capacity, hd), this layer's slice
        v_cache: Tensor,
        start: int,
        mask: Tensor | None,  # (T, start+T) bool, None when T == 1
    ) -> Tensor:
        q, k, v = self.heads(x, cos, sin)
        return self.o_proj(cached_attention(q, k, v, k_cache, v_cache, start, mask))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        d, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, i, bias=False)
        self.up_proj = nn.Linear(d, i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)
        self.gate_up_proj: nn.Module | None = None  # gate and up in one GEMM (`service.packed.fuse_projections`)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, k_cache, v_cache, start, mask) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, start, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def causal_mask(start: int, t: int, device) -> Tensor | None:
    """(t, start+t) bool: new token i sees every cached position and new tokens <= i."""
    if t == 1:
        return None
    cols = torch.arange(start + t, device=device)
    rows = torch.arange(start, start + t, device=device)
    return cols.unsqueeze(0) <= rows.unsqueeze(1)


class LlamaModel(nn.Module):
    """Decoder stack + LM head. `forward` runs T new tokens of one sequence."""

    def __init__(self, cfg: LlamaConfig, max_len: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.max_len = max_len or cfg.max_position_embeddings
        cos, sin = rope_tables(cfg.head_dim, self.max_len, cfg.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def new_cache(self, capacity: int, num_layers: int | None = None) -> KVCache:
        if capacity > self.max_len:
            raise ValueError(f"sequence of {capacity} positions exceeds max_len {self.max_len}")
        return KVCache(self.cfg, capacity, num_layers or len(self.layers), self.dtype, self.device)

    def forward(
        self,
        tokens: Tensor,  # (T,) int64, positions cache.length .. cache.length+T-1
        cache: KVCache,
        hidden_layers: tuple[int, ...] = (),
        num_layers: int | None = None,
        logits: bool = True,
        last_only: bool = False,
    ) -> tuple[Tensor | None, Tensor, list[Tensor]]:
        """Returns (logits (T, V) or None, final normed hidden (T, d), the residual
        stream after each layer in `hidden_layers`). Appends T positions to the cache.
        `num_layers` runs only the first layers (a self-speculative draft model);
        `last_only` applies the LM head to the last position alone."""
        start, t = cache.length, tokens.shape[0]
        if start + t > cache.capacity:
            raise ValueError("KV cache capacity exceeded")
        cos, sin = self.cos[start : start + t], self.sin[start : start + t]
        mask = causal_mask(start, t, tokens.device)
        x = self.embed_tokens(tokens)
        taps: list[Tensor] = []
        n = num_layers or len(self.layers)
        for i in range(n):
            x = self.layers[i](x, cos, sin, cache.k[i], cache.v[i], start, mask)
            if i in hidden_layers:
                taps.append(x)
        cache.length = start + t
        h = self.norm(x[-1:] if last_only else x)
        return (self.lm_head(h) if logits else None), h, taps


def load_llama(path: str | Path, dtype=torch.float32, device="cpu", max_len: int | None = None) -> LlamaModel:
    """Load a Hugging Face safetensors folder (config.json + *.safetensors)."""
    path = Path(path)
    hf_cfg = json.loads((path / "config.json").read_text())
    cfg = LlamaConfig.from_hf(hf_cfg)
    with torch.device("meta"):
        model = LlamaModel(cfg, max_len=max_len)
    state: dict[str, Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    state = {k.removeprefix("model."): v for k, v in state.items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model = model.to_empty(device=device)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"weights do not match config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    cos, sin = rope_tables(cfg.head_dim, model.max_len, cfg.rope_theta)
    model.cos, model.sin = cos.to(device), sin.to(device)
    return model.to(dtype).eval().requires_grad_(False)


# ---------------------------------------------------------------------------
# padded batches (training data: SFT trajectories, Draft-OPD target features)


def new_padded_cache(model: LlamaModel, batch: int, capacity: int) -> tuple[Tensor, Tensor]:
    """Zeroed keys and values for `batched_forward`: (layers, B, kv, capacity, hd)
    each. Zeroed, since a few-query forward attends over the whole capacity with
    the unwritten columns masked, and 0 * garbage could be nan."""
    cfg = model.cfg
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, capacity, cfg.head_dim)
    return (
        torch.zeros(shape, dtype=model.dtype, device=model.device),
        torch.zeros(shape, dtype=model.dtype, device=model.device),
    )


def padded_mask(cols: Tensor, pad: Tensor, width: int | None = None) -> Tensor:
    """(B, 1, T, width) bool: query column c of row b sees key columns pad[b]..c;
    a padding column sees itself (so that no softmax row is empty). width:
    key columns (default: up to the last query's, cols[-1] + 1).
    cols: (T,) cache columns of the queries; pad: (B,) left-padding columns."""
    keys = torch.arange(int(cols[-1]) + 1 if width is None else width, device=cols.device)
    mask = (keys[None, None, :] <= cols[None, :, None]) & (keys[None, None, :] >= pad[:, None, None])
    return (mask | (keys[None, None, :] == cols[None, :, None])).unsqueeze(1)


# At most this many queries per row, `batched_forward` attends with two plain
# batched matmuls over the whole cache (`grouped_attention`): torch's CPU flash
# kernel for SDPA with a mask spent ~90 % of a 128-row bf16 decode step, tiling
# for long queries it does not have (docs/results.md).
FEW_QUERIES = 16


def grouped_attention(
    q: Tensor,  # (B, h, T, hd)
    k: Tensor,  # (B, kv, L, hd), contiguous (bmm copies a strided view)
    v: Tensor,  # (B, kv, L, hd)
    mask: Tensor,  # (B, 1, T, L) bool, True where a query sees a key
) -> Tensor:
    """Masked grouped-query attention as two batched matmuls, without repeating
    the keys and values per group; softmax in float32 -> (B, h, T, hd)."""
    batch, heads, t, hd = q.shape
    kv = k.shape[1]
    groups, length = heads // kv, k.shape[2]
    qg = q.reshape(batch * kv, groups * t, hd)  # a group's heads share their kv head
    scores = torch.bmm(qg, k.flatten(0, 1).transpose(1, 2)).float() * (1.0 / math.sqrt(hd))  # (B*kv, g*T, L)
    scores = scores.view(batch, kv, groups, t, length).masked_fill(~mask.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype).view(batch * kv, groups * t, length)
    return torch.bmm(probs, v.flatten(0, 1)).view(batch, heads, t, hd)


def batched_forward(
    model: LlamaModel,
    ids: Tensor,  # (B, T) int64, left-padded
    k_cache: Tensor,  # (layers, B, kv, capacity, hd), from `new_padded_cache`
    v_cache: Tensor,  # (layers, B, kv, capacity, hd)
    start: int,  # cache column of ids[:, 0]
    pad: Tensor,  # (B,) int64 left-padding columns of each row
    hidden_layers: tuple[int, ...],
) -> tuple[Tensor, Tensor]:
    """`LlamaModel.forward` over a left-padded batch, on the same weights: writes
    columns start..start+T-1 of the caches. -> (final normed hidden (B, T, d),
    the residual streams after `hidden_layers` concatenated (B, T, len(hidden_layers)*d))."""
    batch, t = ids.shape
    cols = torch.arange(start, start + t, device=ids.device)
    pos = (cols.unsqueeze(0) - pad.unsqueeze(1)).clamp(min=0)  # (B, T) RoPE positions
    cos, sin = model.cos[pos].unsqueeze(1), model.sin[pos].unsqueeze(1)  # (B, 1, T, hd)
    few = t <= FEW_QUERIES
    capacity = k_cache.shape[3]
    mask = padded_mask(cols, pad, capacity if few else None)
    x = model.embed_tokens(ids)
    taps = []
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q, k, v = attn.project(h)
        q = q.view(batch, t, attn.h, attn.hd).transpose(1, 2)
        k = k.view(batch, t, attn.kv, attn.hd).transpose(1, 2)
        v = v.view(batch, t, attn.kv, attn.hd).transpose(1, 2)
        if attn.q_norm is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rope(q, cos, sin).to(x.dtype), apply_rope(k, cos, sin).to(x.dtype)  # float32 tables
        k_cache[i, :, :, start : start + t] = k
        v_cache[i, :, :, start : start + t] = v
        if few:  # the whole (contiguous) capacity, masked: a column slice would be copied by every bmm
            out = grouped_attention(q, k_cache[i], v_cache[i], mask)
        else:
            keys, values = k_cache[i, :, :, : start + t], v_cache[i, :, :, : start + t]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=attn.h != attn.kv)
        x = x + attn.o_proj(out.transpose(1, 2).reshape(batch, t, attn.h * attn.hd))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        if i in hidden_layers:
            taps.append(x)
    return model.norm(x), torch.cat(taps, dim=-1)
