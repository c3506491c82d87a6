"""The EAGLE-3 head (Li et al., EAGLE-3, 2025): a one-layer decoder on fused
target hidden states, with the target's token embedding shared and frozen and
its own final norm and draft-vocab LM head (initialised from the target's).
`step` is the cached forward of one sequence (the serving runner, `runner.py`,
computes it for the rows of many sequences at once), `unroll` the batched
"training-time test" forward; the design is in docs/architecture.md.

- `fc` fuses the target's residual streams after a low, a middle and a high
  layer, (3d) -> (d). That is the head's hidden input at verified positions.
  Each stream is RMS-normalised (own learnable weight) before the concat: the
  raw streams differ in scale between layers and carry massive activations on
  a few channels, which made the raw-concat fc of EAGLE-3 slow and unstable to
  train in a short budget. (EAGLE-3.1's `fc_norm`; a head imported from a plain
  EAGLE-3 checkpoint has `cfg.fc_norm` False and fuses the raw streams.)
- one decoder layer whose attention reads the concatenation
  [input_norm(embedding of the next token), hidden_norm(hidden)] (2d wide:
  q/k/v take 2d inputs, as in EAGLE-3), with the *hidden* as the residual;
  then a standard post-attention norm + SwiGLU MLP.
- logits through the head's own final norm and LM head over a reduced draft
  vocabulary (`d2t`: draft id -> target id), both trained and initialised from
  the target's final norm and its LM-head rows of the draft vocab (as EAGLE-3
  and SpecForge; checkpoint format 2). The target's token embedding is shared
  and frozen; none of the frozen target tensors are in the checkpoint.
- From the second draft step the head feeds its own output hidden state (not a
  target feature) back in: "training-time test". `Eagle3Head.unroll` is that
  unrolled training forward; `Eagle3Drafter` runs the same math step by step
  with a one-layer KV cache.

Alignment: anchor t pairs the target feature at position t with the token at
t+1 and predicts the token at t+2; unroll step j at anchor t feeds the token at
t+j+1, sits at RoPE position t+j, and attends to the verified anchors 0..t plus
its own earlier steps 1..j at anchor t -- what serving sees after drafting j
tokens from anchor t."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...llama import MLP, LlamaModel, RMSNorm, apply_rope, cached_attention, causal_mask
from .config import Eagle3Config


@dataclass
class FrozenTarget:
    """The target tensors the head shares and never trains: token embedding,
    RoPE tables, and the target's final norm and LM-head rows of the draft
    vocabulary (the SFT labels; the head's own copies are `norm`/`lm_head`)."""

    embed: Tensor  # (V, d)
    norm_weight: Tensor  # (d,)
    norm_eps: float
    lm_rows: Tensor  # (Vd, d) = lm_head.weight[d2t], gathered once
    cos: Tensor  # (max_len, hd)
    sin: Tensor  # (max_len, hd)

    @classmethod
    def from_model(
        cls,
        model: LlamaModel,
        d2t: Tensor,  # (Vd,) int64 draft id -> target id
    ) -> FrozenTarget:
        lm_weight = model.lm_head.weight.detach()
        return cls(
            embed=model.embed_tokens.weight.detach(),
            norm_weight=model.norm.weight.detach(),
            norm_eps=model.norm.eps,
            lm_rows=lm_weight[d2t.to(lm_weight.device)].contiguous(),
            cos=model.cos,
            sin=model.sin,
        )


class Eagle3Head(nn.Module):
    """Trainable weights: the three feature norms, fc, the two input norms, the 2d-input attention, the
    post-attention norm, the MLP, the final norm and the draft-vocab LM head.
    Buffer: d2t (Vd,) int64. The frozen target parts are attached with `attach(target_model)` (or by assigning `frozen`)
    and are not module state."""

    def __init__(self, cfg: Eagle3Config):
        super().__init__()
        self.cfg = cfg
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.feature_norms = nn.ModuleList(RMSNorm(d, cfg.rms_norm_eps) for _ in range(3 if cfg.fc_norm else 0))
        self.fc = nn.Linear(3 * d, d, bias=False)
        self.input_norm = RMSNorm(d, cfg.rms_norm_eps)  # on the token embedding
        self.hidden_norm = RMSNorm(d, cfg.rms_norm_eps)  # on the fused / own hidden
        self.qkv_proj = nn.Linear(2 * d, (h + 2 * kv) * hd, bias=False)
        self.o_proj = nn.Linear(h * hd, d, bias=False)
        self.post_attention_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.layer_config())
        self.norm = RMSNorm(d, cfg.rms_norm_eps)  # final norm (from the target's, `init_output_from`)
        self.lm_head = nn.Linear(d, cfg.draft_vocab_size, bias=False)  # rows of the draft vocab
        self.register_buffer("d2t", torch.arange(cfg.draft_vocab_size, dtype=torch.long))
        self._frozen_target: FrozenTarget | None = None

    def reset_parameters(self, generator: torch.Generator | None = None, std: float = 0.02, fc_identity: bool = True) -> None:
        """Normal(0, std) weights, the layer's output projections at std/sqrt(2).
        With fc_identity, fc starts as the identity on the (normalised) high
        layer's stream and zero elsewhere, so the head's first output already
        lives in the target's late-layer geometry: in short CPU runs this
        learned clearly faster than a random fc (docs/results.md)."""
        with torch.no_grad():
            for lin in (self.fc, self.qkv_proj, self.mlp.gate_proj, self.mlp.up_proj):
                lin.weight.normal_(0.0, std, generator=generator)
            for lin in (self.o_proj, self.mlp.down_proj):
                lin.weight.normal_(0.0, std / math.sqrt(2.0), generator=generator)
            for norm in (self.input_norm, self.hidden_norm, self.post_attention_norm, self.norm, *self.feature_norms):
                norm.weight.fill_(1.0)
            if fc_identity:
                d = self.cfg.hidden_size
                self.fc.weight.zero_()
                self.fc.weight[:, 2 * d :] = torch.eye(d)

    @torch.no_grad()
    def init_layer_from(self, model: LlamaModel, index: int = -1) -> Eagle3Head:
        """The decoder layer := target layer `index`'s weights where the shapes
        agree: the hidden half of q/k/v (the embedding half keeps its random
        init), o_proj, the MLP, and the input / post-attention norms (an
        SFT ablation, `SFTConfig.init_layer`)."""
        layer, d = model.layers[index], self.cfg.hidden_size
        attn = layer.self_attn
        self.qkv_proj.weight[:, d:] = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach()
        self.o_proj.weight.copy_(attn.o_proj.weight.detach())
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(self.mlp, name).weight.copy_(getattr(layer.mlp, name).weight.detach())
        self.hidden_norm.weight.copy_(layer.input_layernorm.weight.detach())
        self.post_attention_norm.weight.copy_(layer.post_attention_layernorm.weight.detach())
        return self

    @torch.no_grad()
    def init_output_from(self, model: LlamaModel) -> Eagle3Head:
        """Final norm and LM head := the target's norm weight and its LM-head rows
        of `d2t` (a new head, or a format-1 checkpoint that had no copies)."""
        self.norm.weight.copy_(model.norm.weight.detach())
        self.norm.eps = model.norm.eps
        lm_weight = model.lm_head.weight.detach()
        self.lm_head.weight.copy_(lm_weight[self.d2t.to(lm_weight.device)])
        return self

    def attach(self, model: LlamaModel) -> Eagle3Head:
        """Share the target's frozen tensors (gathers the draft vocab's LM-head rows)."""
        self._frozen_target = FrozenTarget.from_model(model, self.d2t)
        return self

    @property
    def frozen(self) -> FrozenTarget:
        """The attached frozen target tensors; RuntimeError when not attached."""
        if self._frozen_target is None:
            raise RuntimeError("Eagle3Head.attach(target_model) must be called first")
        return self._frozen_target

    @frozen.setter
    def frozen(self, value: FrozenTarget) -> None:
        """Attach prepared frozen tensors (e.g. float32 copies for training)."""
        self._frozen_target = value

    # -- pieces shared by serving and training --------------------------------
    def fuse(self, taps: list[Tensor]) -> Tensor:
        """taps: 3 x (..., d) target residual streams -> (..., d) fused feature."""
        if self.cfg.fc_norm:
            taps = [norm(t) for norm, t in zip(self.feature_norms, taps)]
        return self.fc(torch.cat(taps, dim=-1))

    def logits(
        self,
        hidden: Tensor,  # (..., d) head output
    ) -> Tensor:
        """-> (..., Vd) draft-vocab logits (the head's own norm and LM head)."""
        return self.lm_head(self.norm(hidden))

    def _attn_input(
        self,
        hidden: Tensor,  # (..., d)
        tokens: Tensor,  # (...) int64
    ) -> Tensor:
        """-> (..., 2d) = [norm(emb), norm(hidden)]."""
        emb = F.embedding(tokens, self.frozen.embed)
        return torch.cat([self.input_norm(emb), self.hidden_norm(hidden)], dim=-1)

    def _split_qkv(
        self,
        x: Tensor,  # (..., T, 2d)
    ) -> tuple[Tensor, Tensor, Tensor]:
        """-> q (..., h, T, hd), k/v (..., kv, T, hd)."""
        cfg = self.cfg
        qkv = self.qkv_proj(x)
        lead, t = qkv.shape[:-2], qkv.shape[-2]
        q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        q, k, v = qkv.split([q_width, kv_width, kv_width], -1)
        q = q.view(*lead, t, cfg.num_heads, cfg.head_dim).transpose(-2, -3)
        k = k.view(*lead, t, cfg.num_kv_heads, cfg.head_dim).transpose(-2, -3)
        v = v.view(*lead, t, cfg.num_kv_heads, cfg.head_dim).transpose(-2, -3)
        return q, k, v

    def _finish(
        self,
        hidden: Tensor,  # (..., T, d) the layer's hidden input (the residual)
        attn_out: Tensor,  # (..., T, h*hd)
    ) -> Tensor:
        """Residual on the hidden input, then the MLP block -> (..., T, d)."""
        x = hidden + self.o_proj(attn_out)
        return x + self.mlp(self.post_attention_norm(x))

    # -- serving: one sequence, cached -----------------------------------------
    def step(
        self,
        hidden: Tensor,  # (T, d) fused features (verified anchors) or the head's own output
        tokens: Tensor,  # (T,) int64, the token after each anchor
        k_cache: Tensor,  # (kv, capacity, hd)
        v_cache: Tensor,  # (kv, capacity, hd)
        start: int,  # RoPE position / cache slot of the first row
    ) -> Tensor:
        """Runs T new positions through the layer, writing their keys/values at
        start..start+T-1 and attending to everything cached before. -> (T, d)."""
        frozen = self.frozen
        t = hidden.shape[0]
        q, k, v = self._split_qkv(self._attn_input(hidden, tokens))
        cos, sin = frozen.cos[start : start + t], frozen.sin[start : start + t]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = cached_attention(q, k, v, k_cache, v_cache, start, causal_mask(start, t, hidden.device))
        return self._finish(hidden, out)

    # -- training: batched, unrolled ("training-time test") ----------------------
    def unroll_hidden(
        self,
        features: Tensor,  # (B, T, 3d) target taps at positions 0..T-1
        step_tokens: Tensor,  # (S, B, T) int64: token fed at step j, anchor t (default: tokens[t+j+1])
        key_valid: Tensor | None = None,  # (B, T) bool: real (not padding) positions
    ) -> Tensor:
        """-> (S, B, T, d): the head's output hidden at step j, anchor t (predicts
        the token after step_tokens[j, :, t]). Step 0 reads the fused target
        feature; step j >= 1 reads step j-1's output at the same anchor. The query
        (j, t) attends to step-0 keys at anchors <= t and its own steps 1..j."""
        cfg, frozen = self.cfg, self.frozen
        num_steps, batch, t = step_tokens.shape
        groups, kv, hd = cfg.num_heads // cfg.num_kv_heads, cfg.num_kv_heads, cfg.head_dim
        pos = torch.arange(t, device=features.device)
        allowed = pos.unsqueeze(0) <= pos.unsqueeze(1)  # (T query, T key) causal
        if key_valid is not None:
            allowed = allowed & key_valid[:, None, None, None, :]  # (B, 1, 1, T, T)
        hidden = self.fuse(list(features.split(cfg.hidden_size, dim=-1)))  # (B, T, d)
        keys: list[Tensor] = []  # per step (B, kv, 1, T, hd)
        values: list[Tensor] = []
        outs = []
        for j in range(num_steps):
            q, k, v = self._split_qkv(self._attn_input(hidden, step_tokens[j]))
            rope_pos = torch.clamp(pos + j, max=frozen.cos.shape[0] - 1)
            cos, sin = frozen.cos[rope_pos], frozen.sin[rope_pos]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            keys.append(k.unsqueeze(2))
            values.append(v.unsqueeze(2))
            out = _unrolled_attention(q.view(batch, kv, groups, t, hd), keys, values, allowed)
            out = out.reshape(batch, kv * groups, t, hd).transpose(1, 2).reshape(batch, t, kv * groups * hd)
            hidden = self._finish(hidden, out)
            outs.append(hidden)
        return torch.stack(outs)

    def unroll(
        self,
        features: Tensor,  # (B, T, 3d)
        tokens: Tensor,  # (B, T) int64 ids at positions 0..T-1
        steps: int,
        key_valid: Tensor | None = None,  # (B, T) bool
        step_tokens: Tensor | None = None,  # (S, B, T) overrides the fed tokens (e.g. drafted ones)
    ) -> list[Tensor]:
        """Training forward: draft-vocab logits per step, each (B, T, Vd); step j at
        anchor t predicts the token at t+j+2 (with the default step_tokens)."""
        if step_tokens is None:
            step_tokens = shifted_tokens(tokens, steps)
        hidden = self.unroll_hidden(features, step_tokens, key_valid)
        return [self.logits(h) for h in hidden]


def _unrolled_attention(
    q: Tensor,  # (B, kv, g, T, hd) step j's queries, RoPE applied
    keys: list[Tensor],  # j+1 x (B, kv, 1, T, hd): step 0's keys, then steps 1..j at the same anchor
    values: list[Tensor],  # j+1 x (B, kv, 1, T, hd)
    allowed: Tensor,  # (T, T) or (B, 1, 1, T, T) bool: causal over step 0, padding masked
) -> Tensor:
    """Step j's attention: causal over the step-0 keys, plus each query's own
    earlier steps at its anchor (a diagonal per step) -> (B, kv, g, T, hd)."""
    t = q.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, keys[0].transpose(-1, -2)) * scale  # (B, kv, g, T, T)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if len(keys) > 1:
        diag = torch.stack([(q * key).sum(-1) for key in keys[1:]], dim=-1) * scale  # (B, kv, g, T, j)
        scores = torch.cat([scores, diag], dim=-1)
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs[..., :t], values[0])  # (B, kv, g, T, hd)
    for i, value in enumerate(values[1:], start=1):
        out = out + probs[..., t + i - 1 : t + i] * value
    return out


def shifted_tokens(
    tokens: Tensor,  # (B, T) int64
    steps: int,
) -> Tensor:
    """-> (S, B, T) with [j, b, t] = tokens[b, t+j+1] (0 past the end): the
    ground-truth token the head is fed at step j from anchor t."""
    batch, t = tokens.shape
    out = tokens.new_zeros(steps, batch, t)
    for j in range(steps):
        n = max(t - j - 1, 0)
        out[j, :, :n] = tokens[:, j + 1 : j + 1 + n]
    return out
