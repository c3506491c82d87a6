"""EAGLE-3 drafter (DESIGN §4.1): a one-layer head on fused target hidden
states, its checkpoint format, and the drafter that runs it in the engine.

The head (Li et al., EAGLE-3, 2025):
- `fc` fuses the target's residual streams after a low, a middle and a high
  layer, (3d) -> (d). That is the head's hidden input at verified positions.
  Each stream is RMS-normalised (own learnable weight) before the concat: the
  raw streams differ ~10x in scale between layers and carry massive
  activations (~2.5e4 on a few channels at the first position), which made the
  raw-concat fc of EAGLE-3 slow and unstable to train in our short budget.
- one decoder layer whose attention reads the concatenation
  [input_norm(embedding of the next token), hidden_norm(hidden)] (2d wide:
  q/k/v take 2d inputs, as in EAGLE-3), with the *hidden* as the residual;
  then a standard post-attention norm + SwiGLU MLP.
- logits through the target's frozen final norm and the frozen rows of its LM
  head for a reduced draft vocabulary (`d2t`: draft id -> target id); the
  target's token embedding is shared and frozen too. None of the frozen
  target tensors are in the checkpoint, only `d2t`.
- From the second draft step the head feeds its own output hidden state (not a
  target feature) back in: "training-time test". `Eagle3Head.unroll` is that
  unrolled training forward; `Eagle3Drafter` runs the same math step by step
  with a one-layer KV cache.

Alignment: anchor t pairs the target feature at position t with the token at
t+1 and predicts the token at t+2; unroll step j at anchor t feeds the token at
t+j+1, sits at RoPE position t+j, and attends to the verified anchors 0..t plus
its own earlier steps 1..j at anchor t -- what serving sees after drafting j
tokens from anchor t.

Checkpoints (DESIGN §8): `<checkpoint_dir>/eagle3/v{N}/` holding
`model.safetensors` (head weights + `d2t`) and `manifest.json`; written to a
temporary directory, fsynced, then renamed into place."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..llama import MLP, LlamaConfig, LlamaModel, RMSNorm, apply_rope, causal_mask
from ..sampling import SamplingParams, target_probs
from .base import Drafter, Proposal

log = logging.getLogger(__name__)

FORMAT = "draftloop-eagle3"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
KIND_DIR = "eagle3"
_VERSION_DIR = re.compile(r"^v(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that must not be served (wrong target, shapes, hash, format)."""


# ---------------------------------------------------------------------------
# configuration


def default_hidden_layers(num_layers: int) -> tuple[int, int, int]:
    """Low, middle and high target layers (residual stream after each), as in
    EAGLE-3: e.g. (2, 15, 27) for 30 layers."""
    if num_layers < 3:
        raise ValueError(f"an EAGLE-3 head needs a target with >= 3 layers, got {num_layers}")
    mid = num_layers // 2
    return (min(2, num_layers // 4), mid, max(num_layers - 3, mid + 1))


@dataclass(frozen=True)
class Eagle3Config:
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    hidden_layers: tuple[int, int, int]
    draft_vocab_size: int
    target_vocab_size: int
    target_num_layers: int

    @classmethod
    def for_target(
        cls, cfg: LlamaConfig, draft_vocab_size: int, hidden_layers: tuple[int, ...] | None = None
    ) -> Eagle3Config:
        layers = tuple(hidden_layers) if hidden_layers else default_hidden_layers(cfg.num_layers)
        if len(layers) != 3 or sorted(set(layers)) != list(layers) or not 0 <= layers[0] <= layers[-1] < cfg.num_layers:
            raise ValueError(f"hidden_layers must be 3 increasing layer indices below {cfg.num_layers}, got {layers}")
        return cls(
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            rms_norm_eps=cfg.rms_norm_eps,
            rope_theta=cfg.rope_theta,
            hidden_layers=layers,  # type: ignore[arg-type]
            draft_vocab_size=min(draft_vocab_size, cfg.vocab_size),
            target_vocab_size=cfg.vocab_size,
            target_num_layers=cfg.num_layers,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Eagle3Config:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - d.keys()
        if missing:
            raise CheckpointError(f"architecture config lacks {sorted(missing)}")
        return cls(**{k: (tuple(d[k]) if k == "hidden_layers" else d[k]) for k in names})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden_layers"] = list(self.hidden_layers)
        return d

    def layer_config(self) -> LlamaConfig:
        """The head's decoder layer dimensions, as a LlamaConfig (for MLP)."""
        return LlamaConfig(
            vocab_size=self.target_vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_layers=1,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            max_position_embeddings=0,
            tie_word_embeddings=False,
        )


# ---------------------------------------------------------------------------
# the head


@dataclass
class FrozenTarget:
    """The target tensors the head shares and never trains: token embedding,
    final norm, the LM head rows of the draft vocabulary, RoPE tables."""

    embed: Tensor  # (V, d)
    norm_weight: Tensor  # (d,)
    norm_eps: float
    lm_rows: Tensor  # (Vd, d) = lm_head.weight[d2t], gathered once
    cos: Tensor  # (max_len, hd)
    sin: Tensor

    @classmethod
    def from_model(cls, model: LlamaModel, d2t: Tensor) -> FrozenTarget:
        w = model.lm_head.weight.detach()
        return cls(
            embed=model.embed_tokens.weight.detach(),
            norm_weight=model.norm.weight.detach(),
            norm_eps=model.norm.eps,
            lm_rows=w[d2t.to(w.device)].contiguous(),
            cos=model.cos,
            sin=model.sin,
        )


class Eagle3Head(nn.Module):
    """Trainable weights: the three feature norms, fc, the two input norms, the 2d-input attention, the
    post-attention norm and the MLP. Buffer: d2t (Vd,) int64. The frozen target
    parts are attached with `attach(target_model)` and are not module state."""

    def __init__(self, cfg: Eagle3Config):
        super().__init__()
        self.cfg = cfg
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.feature_norms = nn.ModuleList(RMSNorm(d, cfg.rms_norm_eps) for _ in range(3))
        self.fc = nn.Linear(3 * d, d, bias=False)
        self.input_norm = RMSNorm(d, cfg.rms_norm_eps)  # on the token embedding
        self.hidden_norm = RMSNorm(d, cfg.rms_norm_eps)  # on the fused / own hidden
        self.qkv_proj = nn.Linear(2 * d, (h + 2 * kv) * hd, bias=False)
        self.o_proj = nn.Linear(h * hd, d, bias=False)
        self.post_attention_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.layer_config())
        self.register_buffer("d2t", torch.arange(cfg.draft_vocab_size, dtype=torch.long))
        self.frozen: FrozenTarget | None = None

    def reset_parameters(self, generator: torch.Generator | None = None, std: float = 0.02, fc_identity: bool = True) -> None:
        """Normal(0, std) weights, the layer's output projections at std/sqrt(2).
        With fc_identity, fc starts as the identity on the (normalised) high
        layer's stream and zero elsewhere, so the head's first output already
        lives in the target's late-layer geometry: in our short CPU runs this
        learned clearly faster than a random fc (held-out top-1 0.16 vs 0.12
        after 80 steps)."""
        with torch.no_grad():
            for lin in (self.fc, self.qkv_proj, self.mlp.gate_proj, self.mlp.up_proj):
                lin.weight.normal_(0.0, std, generator=generator)
            for lin in (self.o_proj, self.mlp.down_proj):
                lin.weight.normal_(0.0, std / math.sqrt(2.0), generator=generator)
            for norm in (self.input_norm, self.hidden_norm, self.post_attention_norm, *self.feature_norms):
                norm.weight.fill_(1.0)
            if fc_identity:
                d = self.cfg.hidden_size
                self.fc.weight.zero_()
                self.fc.weight[:, 2 * d :] = torch.eye(d)

    def attach(self, model: LlamaModel) -> Eagle3Head:
        self.frozen = FrozenTarget.from_model(model, self.d2t)
        return self

    def _frozen(self) -> FrozenTarget:
        if self.frozen is None:
            raise RuntimeError("Eagle3Head.attach(target_model) must be called first")
        return self.frozen

    # -- pieces shared by serving and training --------------------------------
    def fuse(self, taps: list[Tensor]) -> Tensor:
        """taps: 3 x (..., d) target residual streams -> (..., d) fused feature."""
        return self.fc(torch.cat([norm(t) for norm, t in zip(self.feature_norms, taps)], dim=-1))

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden: (..., d) head output -> (..., Vd) draft-vocab logits."""
        fz = self._frozen()
        h = F.rms_norm(hidden, (hidden.shape[-1],), fz.norm_weight, fz.norm_eps)
        return F.linear(h, fz.lm_rows)

    def _attn_input(self, hidden: Tensor, tokens: Tensor) -> Tensor:
        """hidden: (..., d), tokens: (...) -> (..., 2d) = [norm(emb), norm(hidden)]."""
        emb = F.embedding(tokens, self._frozen().embed)
        return torch.cat([self.input_norm(emb), self.hidden_norm(hidden)], dim=-1)

    def _split_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (..., T, 2d) -> q (..., h, T, hd), k/v (..., kv, T, hd)."""
        c = self.cfg
        qkv = self.qkv_proj(x)
        lead, t = qkv.shape[:-2], qkv.shape[-2]
        q, k, v = qkv.split([c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim], -1)
        q = q.view(*lead, t, c.num_heads, c.head_dim).transpose(-2, -3)
        k = k.view(*lead, t, c.num_kv_heads, c.head_dim).transpose(-2, -3)
        v = v.view(*lead, t, c.num_kv_heads, c.head_dim).transpose(-2, -3)
        return q, k, v

    def _finish(self, hidden: Tensor, attn_out: Tensor) -> Tensor:
        """Residual on the hidden input, then the MLP block. attn_out: (..., T, h*hd)."""
        x = hidden + self.o_proj(attn_out)
        return x + self.mlp(self.post_attention_norm(x))

    # -- serving: one sequence, cached -----------------------------------------
    def step(
        self,
        hidden: Tensor,  # (T, d) fused features (verified anchors) or the head's own output
        tokens: Tensor,  # (T,) int64, the token after each anchor
        k_cache: Tensor,  # (kv, capacity, hd)
        v_cache: Tensor,
        start: int,  # RoPE position / cache slot of the first row
    ) -> Tensor:
        """Runs T new positions through the layer, writing their keys/values at
        start..start+T-1 and attending to everything cached before. -> (T, d)."""
        c, fz = self.cfg, self._frozen()
        t = hidden.shape[0]
        end = start + t
        q, k, v = self._split_qkv(self._attn_input(hidden, tokens))
        cos, sin = fz.cos[start:end], fz.sin[start:end]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_cache[:, start:end] = k
        v_cache[:, start:end] = v
        out = F.scaled_dot_product_attention(
            q.unsqueeze(0),
            k_cache[:, :end].unsqueeze(0),
            v_cache[:, :end].unsqueeze(0),
            attn_mask=causal_mask(start, t, hidden.device),
            enable_gqa=c.num_heads != c.num_kv_heads,
        )
        return self._finish(hidden, out[0].transpose(0, 1).reshape(t, c.num_heads * c.head_dim))

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
        c, fz = self.cfg, self._frozen()
        s_steps, b, t = step_tokens.shape
        g, kv, hd = c.num_heads // c.num_kv_heads, c.num_kv_heads, c.head_dim
        scale = 1.0 / math.sqrt(hd)
        pos = torch.arange(t, device=features.device)
        allowed = pos.unsqueeze(0) <= pos.unsqueeze(1)  # (T query, T key) causal
        if key_valid is not None:
            allowed = allowed & key_valid[:, None, None, None, :]  # (B, 1, 1, T, T)
        hidden = self.fuse(list(features.split(c.hidden_size, dim=-1)))  # (B, T, d)
        keys: list[Tensor] = []  # per step (B, kv, 1, T, hd)
        values: list[Tensor] = []
        outs = []
        for j in range(s_steps):
            q, k, v = self._split_qkv(self._attn_input(hidden, step_tokens[j]))
            p = torch.clamp(pos + j, max=fz.cos.shape[0] - 1)
            cos, sin = fz.cos[p], fz.sin[p]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            q = q.view(b, kv, g, t, hd)
            keys.append(k.unsqueeze(2))
            values.append(v.unsqueeze(2))
            scores = torch.matmul(q, keys[0].transpose(-1, -2)) * scale  # (B, kv, g, T, T)
            scores = scores.masked_fill(~allowed, float("-inf"))
            if j:
                diag = torch.stack([(q * ki).sum(-1) for ki in keys[1:]], dim=-1) * scale  # (B, kv, g, T, j)
                scores = torch.cat([scores, diag], dim=-1)
            probs = torch.softmax(scores, dim=-1)
            out = torch.matmul(probs[..., :t], values[0])  # (B, kv, g, T, hd)
            for i, vi in enumerate(values[1:], start=1):
                out = out + probs[..., t + i - 1 : t + i] * vi
            out = out.reshape(b, kv * g, t, hd).transpose(1, 2).reshape(b, t, kv * g * hd)
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


def shifted_tokens(tokens: Tensor, steps: int) -> Tensor:
    """tokens: (B, T) -> (S, B, T) with [j, b, t] = tokens[b, t+j+1] (0 past the end):
    the ground-truth token the head is fed at step j from anchor t."""
    b, t = tokens.shape
    out = tokens.new_zeros(steps, b, t)
    for j in range(steps):
        n = max(t - j - 1, 0)
        out[j, :, :n] = tokens[:, j + 1 : j + 1 + n]
    return out


# ---------------------------------------------------------------------------
# the drafter


@dataclass
class _SeqState:
    k: Tensor  # (kv, capacity, hd) head keys
    v: Tensor
    length: int  # cache slots holding verified anchors (0 .. length-1)
    pending: Tensor  # (P, d) fused features of anchors length .. length+P-1, not yet run
    ctx_ids: Tensor  # (capacity,) int64: target ids outside the draft vocab seen in this sequence
    ctx_rows: Tensor  # (capacity, d): their LM-head rows
    n_ctx: int = 0
    scanned: int = 0  # seq.tokens[:scanned] have been looked at
    seen: set[int] = dataclasses.field(default_factory=set)


# Stop drafting once the product of the head's top-1 probabilities falls below
# this (EAGLE-2's confidence rule, on a chain): the head is well calibrated
# (held-out: top-1 prob 0.2-0.4 -> 29% accepted, 0.8-1 -> 89%), and on a CPU a
# verify pass of 4+ tokens costs ~1.5x one of 1-3 tokens.
DEFAULT_MIN_CONFIDENCE = 0.3


class Eagle3Drafter(Drafter):
    """Per sequence: the head's one-layer KV cache + fused features of verified
    positions not yet run. propose = one catch-up call over the newly verified
    anchors (its last output gives draft 1) + k-1 single-token calls feeding the
    head's own hidden; commit drops the draft slots (they hold the head's own
    hidden, not target features) and queues the accepted positions' features.

    Context vocabulary: target ids that occur in the sequence (prompt and
    output) but not in the static draft vocabulary join that sequence's draft
    vocabulary (their frozen LM-head rows, gathered once each), so the head can
    copy names and rare words from the prompt at the cost of a few hundred extra
    logits. On held-out ShareGPT this lifts coverage of the target's tokens
    from 86% to 94% (4k static ids) and 91% to 96% (8k)."""

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
        self.hidden_layers = tuple(head.cfg.hidden_layers)
        self.version = version
        self.manifest = manifest or {}
        self.vocab_size = target_model.cfg.vocab_size
        self.lm_weight = target_model.lm_head.weight.detach()  # (V, d)
        self.context_vocab = context_vocab and head.cfg.draft_vocab_size < self.vocab_size
        self.static_ids = set(head.d2t.tolist())
        self.min_confidence = min_confidence

    def begin(self, seq, taps: list[Tensor]) -> None:
        c = self.head.cfg
        fz = self.head._frozen()
        shape = (c.num_kv_heads, seq.capacity, c.head_dim)
        dt, dev = fz.embed.dtype, fz.embed.device
        n_ctx = seq.capacity if self.context_vocab else 0
        seq.draft_state = _SeqState(
            k=torch.empty(shape, dtype=dt, device=dev),
            v=torch.empty(shape, dtype=dt, device=dev),
            length=0,
            pending=self.head.fuse(taps),
            ctx_ids=torch.empty(n_ctx, dtype=torch.long, device=dev),
            ctx_rows=torch.empty(n_ctx, c.hidden_size, dtype=dt, device=dev),
        )

    def _scan_context(self, st: _SeqState, tokens: list[int]) -> None:
        """Add ids of tokens[st.scanned:] missing from the draft vocab."""
        new = []
        for t in tokens[st.scanned :]:
            if t not in self.static_ids and t not in st.seen:
                st.seen.add(t)
                new.append(t)
        st.scanned = len(tokens)
        new = new[: st.ctx_ids.shape[0] - st.n_ctx]
        if new:
            ids = torch.tensor(new, dtype=torch.long, device=st.ctx_ids.device)
            st.ctx_ids[st.n_ctx : st.n_ctx + len(new)] = ids
            st.ctx_rows[st.n_ctx : st.n_ctx + len(new)] = self.lm_weight[ids]
            st.n_ctx += len(new)

    def propose(self, seq, k: int, params: SamplingParams, gen: torch.Generator) -> Proposal:
        st: _SeqState = seq.draft_state
        # anchors with a feature and a known next token: length .. len(tokens)-2
        n_new = min(st.pending.shape[0], len(seq.tokens) - 1 - st.length)
        if k <= 0 or n_new <= 0:
            return Proposal([], None, [])
        head = self.head
        fz = head._frozen()
        device = st.pending.device
        if self.context_vocab:
            self._scan_context(st, seq.tokens)
        ids = torch.cat([head.d2t, st.ctx_ids[: st.n_ctx]]) if st.n_ctx else head.d2t  # draft index -> target id
        ctx_rows = st.ctx_rows[: st.n_ctx]
        toks = torch.tensor(seq.tokens[st.length + 1 : st.length + 1 + n_new], dtype=torch.long, device=device)
        h = head.step(st.pending[:n_new], toks, st.k, st.v, st.length)[-1:]  # (1, d)
        st.length += n_new
        st.pending = st.pending[n_new:]
        pos = st.length  # draft slots start here; commit discards them
        drafted: list[int] = []
        logps: list[Tensor] = []
        dists: list[Tensor] = []
        chain = 1.0  # the head's own estimate that every token drafted so far is accepted
        for i in range(k):
            hn = F.rms_norm(h, (h.shape[-1],), fz.norm_weight, fz.norm_eps)
            logits = F.linear(hn, fz.lm_rows)  # (1, Vd)
            if st.n_ctx:
                logits = torch.cat([logits, F.linear(hn, ctx_rows)], dim=-1)  # (1, Vd + n_ctx)
            if params.greedy:
                idx = logits[0].argmax()
                tok = ids[idx]
                logp = logits[0, idx] - torch.logsumexp(logits[0], dim=-1)
                confidence = float(logp.exp())
            else:
                full = logits.new_full((1, self.vocab_size), float("-inf"))
                full[0, ids] = logits[0]
                q = target_probs(full, params)  # (1, V): the request's transform, over the target vocab
                confidence = float(q[0].max())  # decided before sampling: the draft length stays a function of q
                tok = torch.multinomial(q[0], 1, generator=gen)[0]
                logp = q[0, tok].log()
            chain *= confidence
            if i and chain < self.min_confidence:
                break  # dynamic draft length: a likely rejection is not worth a longer verify pass
            logps.append(logp)
            if not params.greedy:
                dists.append(q[0])
            drafted.append(int(tok))
            if chain < self.min_confidence:
                break  # no later token can pass either (the chain only shrinks): skip its head step
            if i + 1 < k:
                h = head.step(h, tok.view(1), st.k, st.v, pos)
                pos += 1
        probs = torch.stack(dists) if dists else None
        return Proposal(drafted, probs, torch.stack(logps).tolist())

    def commit(self, seq, num_accepted: int, taps: list[Tensor]) -> None:
        st: _SeqState = seq.draft_state
        # the verify pass covered [last token] + drafts; positions 0..n hold target features now
        fresh = self.head.fuse([t[: num_accepted + 1] for t in taps])
        st.pending = torch.cat([st.pending, fresh]) if st.pending.shape[0] else fresh

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
        }


# ---------------------------------------------------------------------------
# checkpoints


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (after a rename, so the new entry is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_versions(checkpoint_dir: str | Path) -> list[tuple[int, Path]]:
    """(version, directory) of every `eagle3/v{N}` under checkpoint_dir, oldest first."""
    root = Path(checkpoint_dir) / KIND_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _VERSION_DIR.match(p.name))]
    return sorted(found)


def save_checkpoint(
    head: Eagle3Head,
    checkpoint_dir: str | Path,
    target_model_id: str,
    parent_version: int | None = None,
    trained_on: dict[str, int] | None = None,
    eval_tau: dict[str, float | None] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write head weights + manifest as the next version `eagle3/v{N}` under
    checkpoint_dir, atomically (temp dir, fsync, rename). Returns the directory."""
    root = Path(checkpoint_dir) / KIND_DIR
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in head.state_dict().items()}
        weights = tmp / WEIGHTS_FILE
        save_file(state, str(weights), metadata={"format": FORMAT})
        fsync_path(weights)
        c = head.cfg
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": "eagle3",
            "version": None,  # set below, once the number is taken
            "parent_version": parent_version,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "target_model": target_model_id,
            "target_hidden_size": c.hidden_size,
            "target_vocab_size": c.target_vocab_size,
            "target_num_layers": c.target_num_layers,
            "hidden_layers": list(c.hidden_layers),
            "draft_vocab_size": c.draft_vocab_size,
            "architecture": c.to_dict(),
            "weights_file": WEIGHTS_FILE,
            "weights_sha256": _sha256(weights),
            "dtype": str(state["fc.weight"].dtype).removeprefix("torch."),
            "trained_on": trained_on or {},
            "eval": {"tau_before": None, "tau_after": None, **(eval_tau or {})},
            **(extra or {}),
        }
        for _ in range(100):  # another writer may take the same number: retry with the next one
            versions = list_versions(checkpoint_dir)
            n = versions[-1][0] + 1 if versions else 1
            manifest["version"] = n
            mpath = tmp / MANIFEST_FILE
            mpath.write_text(json.dumps(manifest, indent=2) + "\n")
            fsync_path(mpath)
            fsync_path(tmp)
            dest = root / f"v{n}"
            try:
                os.rename(tmp, dest)  # atomic; fails if dest exists and is non-empty
            except OSError:
                if dest.exists():
                    continue
                raise
            fsync_path(root)
            log.info("saved eagle3 checkpoint v%d to %s", n, dest)
            return dest
        raise RuntimeError(f"could not claim a version number under {root}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_manifest(path: str | Path) -> dict[str, Any]:
    mpath = Path(path) / MANIFEST_FILE
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {MANIFEST_FILE}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{mpath}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{mpath}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
    return manifest


def load_head(path: str | Path, target_model: LlamaModel, target_model_id: str) -> tuple[Eagle3Head, dict[str, Any]]:
    """Validate and load a checkpoint directory -> (head attached to the target,
    manifest). Raises CheckpointError naming what is wrong."""
    path = Path(path)
    m = read_manifest(path)
    tcfg = target_model.cfg
    if m.get("target_model") != target_model_id:
        raise CheckpointError(
            f"{path}: trained for target {m.get('target_model')!r}, but the target is {target_model_id!r}"
        )
    for key, want in (
        ("target_hidden_size", tcfg.hidden_size),
        ("target_vocab_size", tcfg.vocab_size),
        ("target_num_layers", tcfg.num_layers),
    ):
        if m.get(key) != want:
            raise CheckpointError(f"{path}: {key} is {m.get(key)!r}, the target has {want}")
    cfg = Eagle3Config.from_dict(m.get("architecture") or {})
    if list(cfg.hidden_layers) != list(m.get("hidden_layers", [])) or not all(
        0 <= i < tcfg.num_layers for i in cfg.hidden_layers
    ):
        raise CheckpointError(f"{path}: hidden_layers {m.get('hidden_layers')} do not fit a {tcfg.num_layers}-layer target")
    try:
        expect = Eagle3Config.for_target(tcfg, cfg.draft_vocab_size, cfg.hidden_layers)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    if cfg != dataclasses.replace(expect, rms_norm_eps=cfg.rms_norm_eps):
        raise CheckpointError(f"{path}: head architecture {cfg.to_dict()} does not match the target's {expect.to_dict()}")
    weights = path / (m.get("weights_file") or WEIGHTS_FILE)
    if not weights.is_file():
        raise CheckpointError(f"{path}: weights file {weights.name} is missing")
    digest = _sha256(weights)
    if digest != m.get("weights_sha256"):
        raise CheckpointError(
            f"{weights}: sha256 {digest[:16]}... does not match the manifest's {str(m.get('weights_sha256'))[:16]}... "
            "(corrupt or partially written checkpoint)"
        )
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: unreadable safetensors ({exc})") from None
    head = Eagle3Head(cfg)
    want = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if want != got:
        bad = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
        detail = ", ".join(f"{k}: expected {want.get(k)}, found {got.get(k)}" for k in bad[:4])
        raise CheckpointError(f"{weights}: wrong tensor shapes ({detail})")
    d2t = state["d2t"]
    if d2t.dtype != torch.long or int(d2t.min()) < 0 or int(d2t.max()) >= tcfg.vocab_size:
        raise CheckpointError(f"{weights}: d2t must hold int64 ids in [0, {tcfg.vocab_size})")
    if torch.unique(d2t).numel() != d2t.numel():
        raise CheckpointError(f"{weights}: d2t has duplicate target ids")
    head.load_state_dict(state)
    return head.attach(target_model), m


def load_checkpoint(path: str | Path, target) -> Eagle3Drafter:
    """A ready drafter from `eagle3/v{N}`; `target` is a service.runtime.Target."""
    head, m = load_head(path, target.model, target.model_id)
    drafter = Eagle3Drafter(head, target.model, version=str(m["version"]), manifest=m)
    log.info("eagle3 drafter v%s loaded from %s (draft vocab %d)", m["version"], path, head.cfg.draft_vocab_size)
    return drafter


def load_latest(checkpoint_dir: str | Path, target) -> Eagle3Drafter | None:
    """The newest version under checkpoint_dir that loads; refused ones are skipped
    with a warning. None when there is none."""
    for _, path in reversed(list_versions(checkpoint_dir)):
        try:
            return load_checkpoint(path, target)
        except CheckpointError as exc:
            log.warning("skipping eagle3 checkpoint: %s", exc)
    return None
