"""`draftloop train-sft`: the supervised bootstrap of the EAGLE-3 head (the
Draft-OPD paper's SFT baseline, our cold start).

1. Trajectories: the target continues training prompts greedily, in batches
   (a batched, left-padded pure-torch decode over the target's own weights; in
   bfloat16 where that is fast). The hidden states at the head's layers and the
   final normed hidden of every fed position are kept on the way, so no second
   target pass is needed. Cached in chunks under `<cache_dir>/sft/`, so a
   killed run regenerates nothing already written. Prompts: the built-in
   ShareGPT train split or a JSONL file; never the held-out split.
2. Draft vocabulary: the most frequent target ids among the generated tokens
   (the remainder filled from prompt counts, then by id), as the d2t map.
3. Training, the EAGLE-3 objective ("training-time test"): `Eagle3Head.unroll`
   over `ttt_steps` draft steps, feeding the head's own hidden from step 2 on.
   Loss at step j: cross-entropy from the target's distribution restricted to
   the draft vocab (softmax of its final hidden through the same frozen LM-head
   rows) to the head's -- forward KL(p‖q) up to p's entropy; soft labels carry
   more per position than the greedy token -- weighted 0.8^j (as SpecForge),
   on every anchor (prompt anchors too: p is the target's there as well).
   The optimizer state is saved every minute; rerunning the command resumes.
4. The head is written as the next `eagle3/v{N}` checkpoint (parent None),
   after a τ evaluation on a few held-out prompts.

Defaults, measured on the shared 2-core dev CPU (one thread, bf16 on AVX512-BF16): 512
prompts x 128 new tokens -> 90k positions in 4.3 min, 240 steps of 2048
tokens in 10 min, 14.9 min in all."""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from service.drafters.eagle3 import Eagle3Config, Eagle3Drafter, Eagle3Head, save_checkpoint, shifted_tokens
from service.llama import LlamaModel

log = logging.getLogger(__name__)

StepHook = Callable[[dict], bool]  # called after each optimizer step with its history record; True stops

STEP_WEIGHT_DECAY = 0.8  # loss weight of draft step j: 0.8^j
ACC_ROWS = 512  # rows per step on which the progress bar's top-1 agreement is measured


@dataclass
class SFTConfig:
    num_prompts: int = 512
    max_new_tokens: int = 128
    gen_batch_size: int = 128
    draft_vocab_size: int = 8192
    ttt_steps: int = 3
    train_steps: int = 240
    batch_tokens: int = 2048  # padded B x T per optimizer step
    lr: float = 3e-3
    warmup_steps: int = 12
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    save_every_s: float = 60.0
    eval_prompts: int = 8
    eval_max_tokens: int = 64
    eval_k: int = 2
    loss_on_prompt: bool = True  # also distil at prompt anchors (the target's p is defined there too)
    fast_bf16: bool | None = None  # bf16 generation + autocast training; None: where bf16 matmuls are fast
    hidden_layers: tuple[int, ...] | None = None
    # Teacher-forced data (off by default): ShareGPT exchanges (prompt + its own
    # reply, cut at exchange_max_tokens) through one batched prefill each, with
    # the target's distributions as labels (EAGLE-1's data). Measured with the
    # default budget: +768 exchanges closed the train/held-out gap (top-1 on
    # generated anchors 0.56/0.36 -> 0.49/0.36) but not the held-out figure
    # itself (0.363 -> 0.357; greedy tau 1.327 -> 1.317), and the prefill costs
    # ~5 min on 2 CPU cores: this head is compute-, not data-limited here.
    num_exchanges: int = 0
    exchange_max_tokens: int = 256


# ---------------------------------------------------------------------------
# trajectories


@dataclass
class Trajectories:
    """Every fed position of every trajectory, concatenated (N positions)."""

    tokens: Tensor  # (N,) int64
    features: Tensor  # (N, 3d) float16, target taps at the head's layers
    final: Tensor  # (N, d) float16, the target's final normed hidden (its logits = final @ lm_head.T)
    offsets: Tensor  # (n+1,) int64, trajectory i is offsets[i]:offsets[i+1]
    prompt_lens: Tensor  # (n,) int64

    def __len__(self) -> int:
        return self.prompt_lens.numel()

    def length(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def response_tokens(self) -> Tensor:
        parts = [self.tokens[int(self.offsets[i]) + int(self.prompt_lens[i]) : int(self.offsets[i + 1])] for i in range(len(self))]
        return torch.cat(parts) if parts else self.tokens[:0]

    @classmethod
    def cat(cls, parts: Sequence[Trajectories]) -> Trajectories:
        lens = torch.cat([p.offsets.diff() for p in parts])
        return cls(
            tokens=torch.cat([p.tokens for p in parts]),
            features=torch.cat([p.features for p in parts]),
            final=torch.cat([p.final for p in parts]),
            offsets=torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]),
            prompt_lens=torch.cat([p.prompt_lens for p in parts]),
        )

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: getattr(self, k).contiguous() for k in ("tokens", "features", "final", "offsets", "prompt_lens")}, str(tmp))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Trajectories:
        return cls(**load_file(str(path)))


def _batched_forward(
    model: LlamaModel,
    ids: Tensor,  # (B, T) int64
    k_cache: Tensor,  # (layers, B, kv, capacity, hd)
    v_cache: Tensor,
    start: int,  # cache column of ids[:, 0]
    pad: Tensor,  # (B,) left-padding columns of each row
    hidden_layers: tuple[int, ...],
) -> tuple[Tensor, Tensor]:
    """A batched, left-padded version of LlamaModel.forward on the same weights.
    -> (final normed hidden (B, T, d), taps concatenated (B, T, len(layers)*d))."""
    cfg = model.cfg
    b, t = ids.shape
    end = start + t
    cols = torch.arange(start, end)
    pos = (cols.unsqueeze(0) - pad.unsqueeze(1)).clamp(min=0)  # (B, T) RoPE positions
    cos, sin = model.cos[pos].unsqueeze(1), model.sin[pos].unsqueeze(1)  # (B, 1, T, hd)
    keys = torch.arange(end)
    mask = (keys[None, None, :] <= cols[None, :, None]) & (keys[None, None, :] >= pad[:, None, None])
    mask = (mask | (keys[None, None, :] == cols[None, :, None])).unsqueeze(1)  # (B, 1, T, end); pads see themselves
    x = model.embed_tokens(ids)
    taps = []
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(b, t, attn.h, attn.hd).transpose(1, 2)
        k = attn.k_proj(h).view(b, t, attn.kv, attn.hd).transpose(1, 2)
        v = attn.v_proj(h).view(b, t, attn.kv, attn.hd).transpose(1, 2)
        if attn.q_norm is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        cs = (cos, sin)
        q = q * cs[0] + torch.cat([-q[..., attn.hd // 2 :], q[..., : attn.hd // 2]], -1) * cs[1]
        k = k * cs[0] + torch.cat([-k[..., attn.hd // 2 :], k[..., : attn.hd // 2]], -1) * cs[1]
        q, k = q.to(x.dtype), k.to(x.dtype)  # float32 RoPE tables on a bfloat16 model
        k_cache[i, :, :, start:end] = k
        v_cache[i, :, :, start:end] = v
        out = F.scaled_dot_product_attention(
            q, k_cache[i, :, :, :end], v_cache[i, :, :, :end], attn_mask=mask, enable_gqa=attn.h != attn.kv
        )
        x = x + attn.o_proj(out.transpose(1, 2).reshape(b, t, attn.h * attn.hd))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        if i in hidden_layers:
            taps.append(x)
    del cfg
    return model.norm(x), torch.cat(taps, dim=-1)


@torch.inference_mode()
def generate_batch(
    model: LlamaModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_ids: set[int],
    hidden_layers: tuple[int, ...],
) -> Trajectories:
    """Greedy continuations of `prompts` in one left-padded batch. A trajectory
    holds the prompt and the generated tokens that were fed back, up to (not
    including) its first EOS; every such position carries its features and
    final hidden, so the last one's final hidden still predicts the EOS."""
    cfg = model.cfg
    b = len(prompts)
    lens = torch.tensor([len(p) for p in prompts])
    width = int(lens.max())
    pad = width - lens
    ids = torch.zeros(b, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, int(pad[i]) :] = torch.tensor(list(p), dtype=torch.long)
    cap = width + max_new_tokens
    shape = (cfg.num_layers, b, cfg.num_kv_heads, cap, cfg.head_dim)
    k_cache = torch.empty(shape, dtype=model.dtype)
    v_cache = torch.empty(shape, dtype=model.dtype)
    final, feats = _batched_forward(model, ids, k_cache, v_cache, 0, pad, hidden_layers)
    finals, featss, fed = [final.half()], [feats.half()], [ids]
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long)
    nxt = model.lm_head(final[:, -1]).max(-1).indices  # (B,) first maximum, as argmax (faster in bf16)
    done = torch.isin(nxt, eos)
    n_fed = torch.zeros(b, dtype=torch.long)  # generated tokens fed before the first EOS
    for s in range(max_new_tokens - 1):
        if bool(done.all()):
            break
        n_fed += (~done).long()
        final, feats = _batched_forward(model, nxt.unsqueeze(1), k_cache, v_cache, width + s, pad, hidden_layers)
        finals.append(final.half())
        featss.append(feats.half())
        fed.append(nxt.unsqueeze(1))
        nxt = model.lm_head(final[:, -1]).max(-1).indices
        done |= torch.isin(nxt, eos)
    all_ids, all_final, all_feats = torch.cat(fed, 1), torch.cat(finals, 1), torch.cat(featss, 1)
    parts = []
    for i in range(b):
        sl = slice(int(pad[i]), width + int(n_fed[i]))
        parts.append((all_ids[i, sl], all_feats[i, sl], all_final[i, sl]))
    lengths = torch.tensor([p[0].numel() for p in parts])
    return Trajectories(
        tokens=torch.cat([p[0] for p in parts]),
        features=torch.cat([p[1] for p in parts]),
        final=torch.cat([p[2] for p in parts]),
        offsets=torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
        prompt_lens=lens,
    )


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 matmuls beat float32 here: CUDA, or a CPU with AMX / AVX512-BF16
    (about 8x on the 2-core AMD EPYC dev box, AVX512-BF16, for training-sized GEMMs)."""
    if device.type == "cuda":
        return True
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, n, None) for n in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(bool(c()) for c in checks if c is not None)


def bf16_copy(model: LlamaModel) -> LlamaModel:
    """A bfloat16 copy of the target for generating training trajectories (RoPE
    tables stay float32)."""
    fast = copy.deepcopy(model).to(torch.bfloat16)
    fast.cos, fast.sin = model.cos, model.sin
    return fast


def exchange_ids(tokenizer, exchanges: Sequence[tuple[str, str]], max_tokens: int) -> list[list[int]]:
    """Prompt (through the chat template) + reply tokens, cut at max_tokens;
    exchanges whose prompt leaves fewer than 8 reply tokens are skipped."""
    from service.prompts import chat_ids

    out = []
    for prompt, reply in exchanges:
        ids = chat_ids(tokenizer, prompt)
        if len(ids) + 8 > max_tokens:
            continue
        out.append(ids + tokenizer(reply, add_special_tokens=False)["input_ids"][: max_tokens - len(ids)])
    return out


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def collect_trajectories(
    model: LlamaModel,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_ids: set[int],
    hidden_layers: tuple[int, ...],
    cache_dir: Path,
    batch_size: int = 32,
    model_id: str = "",
    fast_bf16: bool = False,
) -> Trajectories:
    """Generate (or reuse cached) trajectories for every prompt, batch by batch.
    Prompts are grouped by length to limit padding; each batch is one chunk file
    under cache_dir/trajectories-<key>/, so an interrupted run resumes. With
    fast_bf16 a bfloat16 copy of the target generates (its greedy path can part
    from the float32 one at near-ties; the features differ by bf16 rounding --
    both harmless for training data, and several times faster on CPUs with bf16 instructions)."""
    key = _digest([model_id, list(hidden_layers), max_new_tokens, batch_size, sorted(eos_ids), fast_bf16, [list(p) for p in prompt_ids]])
    folder = Path(cache_dir) / f"trajectories-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    parts = []
    gen_model = None
    bar = tqdm(batches, desc="trajectories", unit="batch")
    t0, n_tok = time.perf_counter(), 0
    for i, batch in enumerate(bar):
        path = folder / f"chunk-{i:05d}.safetensors"
        if path.exists():
            part = Trajectories.load(path)
        else:
            if gen_model is None:
                gen_model = bf16_copy(model) if fast_bf16 and model.dtype != torch.bfloat16 else model
            part = generate_batch(gen_model, [prompt_ids[j] for j in batch], max_new_tokens, eos_ids, hidden_layers)
            part.save(path)
            n_tok += part.tokens.numel()
            bar.set_postfix(tok_per_s=f"{n_tok / (time.perf_counter() - t0):.0f}")
        parts.append(part)
    log.info("trajectories: %d sequences, %d positions in %s", sum(map(len, parts)), sum(p.tokens.numel() for p in parts), folder)
    return Trajectories.cat(parts)


# ---------------------------------------------------------------------------
# draft vocabulary


def build_draft_vocab(response_tokens: Tensor, prompt_tokens: Tensor, vocab_size: int, size: int) -> Tensor:
    """The `size` target ids ranked by (count among generated tokens, count
    among prompt tokens, lower id first) -> d2t (size,) int64, ascending ids.
    response_tokens / prompt_tokens: (N,) int64."""
    size = min(size, vocab_size)
    resp = torch.bincount(response_tokens, minlength=vocab_size).double()
    prm = torch.bincount(prompt_tokens, minlength=vocab_size).double()
    ids = torch.arange(vocab_size, dtype=torch.double)
    score = resp * 1e12 + prm * 1e5 - ids / vocab_size  # lexicographic (exact while counts < 1e5 / 1e7)
    return torch.sort(torch.topk(score, size).indices).values


# ---------------------------------------------------------------------------
# training


@dataclass
class Batch:
    features: Tensor  # (B, T, 3d) float32
    tokens: Tensor  # (B, T) int64
    final: Tensor  # (B, T, d) float32
    valid: Tensor  # (B, T) bool
    prompt_lens: Tensor  # (B,)
    lengths: Tensor  # (B,)


def length_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped by length so that B x max_len <= batch_tokens (a longer
    item is a batch of its own): little padding, bounded batch memory."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in order:
        n = lengths[i]
        if cur and max(longest, n) * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        batches.append(cur)
    return batches


def make_batches(data: Trajectories, batch_tokens: int) -> list[list[int]]:
    """Trajectory indices grouped by length so B x max_len <= batch_tokens."""
    return length_batches([data.length(i) for i in range(len(data))], batch_tokens)


def collate(data: Trajectories, idx: Sequence[int], dtype=torch.float32) -> Batch:
    lens = torch.tensor([data.length(i) for i in idx])
    t, b = int(lens.max()), len(idx)
    d3, d = data.features.shape[1], data.final.shape[1]
    feats = torch.zeros(b, t, d3, dtype=dtype)
    final = torch.zeros(b, t, d, dtype=dtype)
    toks = torch.zeros(b, t, dtype=torch.long)
    for r, i in enumerate(idx):
        s, e = int(data.offsets[i]), int(data.offsets[i + 1])
        feats[r, : e - s] = data.features[s:e]
        final[r, : e - s] = data.final[s:e]
        toks[r, : e - s] = data.tokens[s:e]
    valid = torch.arange(t).unsqueeze(0) < lens.unsqueeze(1)
    return Batch(feats, toks, final, valid, data.prompt_lens[list(idx)], lens)


def step_masks(batch: Batch, steps: int, on_prompt: bool = True) -> list[Tensor]:
    """(B, T) bool per draft step j: anchors t whose step-j input token x_{t+j+1}
    and target position t+j+1 exist (t+j+1 <= len-1); without on_prompt only
    anchors in the generated part (t >= P-1, where serving drafts from)."""
    t = torch.arange(batch.tokens.shape[1]).unsqueeze(0)
    first = (batch.prompt_lens - 1).unsqueeze(1) if not on_prompt else torch.zeros(1, 1, dtype=torch.long)
    return [(t >= first) & (t + j + 1 <= batch.lengths.unsqueeze(1) - 1) for j in range(steps)]


def ttt_loss(
    head: Eagle3Head,
    batch: Batch,
    steps: int,
    on_prompt: bool = True,
    acc_rows: int | None = ACC_ROWS,
) -> tuple[Tensor, list[float], list[float]]:
    """EAGLE-3 training-time-test loss -> (weighted loss, per-step loss, per-step
    top-1 agreement with the target's argmax over the draft vocab)."""
    hidden = head.unroll_hidden(batch.features, shifted_tokens(batch.tokens, steps), batch.valid)  # (S, B, T, d)
    lm_rows = head.frozen.lm_rows
    losses, accs, total, wsum = [], [], hidden.new_zeros(()), 0.0
    for j, mask in enumerate(step_masks(batch, steps, on_prompt)):
        if not bool(mask.any()):
            continue
        b_idx, t_idx = mask.nonzero(as_tuple=True)
        logits = head.logits(hidden[j, b_idx, t_idx]).float()  # (M, Vd)
        with torch.no_grad():
            p = torch.softmax(F.linear(batch.final[b_idx, t_idx + j + 1], lm_rows).float(), dim=-1)  # (M, Vd)
        loss = F.cross_entropy(logits, p)  # soft targets: -Σ p log q = forward KL(p‖q) + H(p)
        w = STEP_WEIGHT_DECAY**j
        total, wsum = total + w * loss, wsum + w
        losses.append(float(loss.detach()))
        rows = slice(0, acc_rows)  # top-1 agreement on a sample of rows: argmax over Vd is not free on a CPU
        accs.append(float((logits[rows].detach().max(-1).indices == p[rows].max(-1).indices).float().mean()))
    return total / max(wsum, 1e-9), losses, accs


def _lr_at(step: int, cfg: SFTConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.train_steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def _save_state(path: Path, head: Eagle3Head, opt: torch.optim.Optimizer, meta: dict) -> None:
    """Head weights + AdamW moments in safetensors, counters in JSON; atomic."""
    tensors = {f"head.{k}": v.detach().contiguous() for k, v in head.state_dict().items()}
    names = dict(head.named_parameters())
    index = {id(p): n for n, p in names.items()}
    for p, st in opt.state.items():
        for k, v in st.items():
            tensors[f"opt.{index[id(p)]}.{k}"] = v.detach().reshape(-1) if v.dim() == 0 else v.detach().contiguous()
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "state.safetensors.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, path / "state.safetensors")
    (path / "state.json.tmp").write_text(json.dumps(meta))
    os.replace(path / "state.json.tmp", path / "state.json")


def _load_state(path: Path, head: Eagle3Head, opt: torch.optim.Optimizer) -> dict | None:
    if not (path / "state.json").exists() or not (path / "state.safetensors").exists():
        return None
    meta = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "state.safetensors"))
    head.load_state_dict({k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")})
    for n, p in head.named_parameters():
        st = {k.removeprefix(f"opt.{n}."): v for k, v in tensors.items() if k.startswith(f"opt.{n}.")}
        if st:
            st["step"] = st["step"].reshape(())
            opt.state[p] = st
    return meta


@dataclass
class SFTResult:
    checkpoint: Path
    history: list[dict] = field(default_factory=list)  # per logged step: loss, acc per draft step
    trained_tokens: int = 0
    tau: float | None = None


def make_optimizer(head: Eagle3Head, cfg: SFTConfig) -> torch.optim.AdamW:
    trainable = [p for p in head.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)


def train_head(
    head: Eagle3Head,
    data: Trajectories,
    cfg: SFTConfig,
    state_dir: Path | None = None,
    *,
    opt: torch.optim.Optimizer | None = None,
    start_step: int = 0,
    until_step: int | None = None,
    on_step: StepHook | None = None,
) -> list[dict]:
    """Train `head` (attached to the target) in place on `data` with the TTT loss
    (bf16 autocast where bf16 matmuls are fast; float32 master weights).
    With state_dir, resumes from and periodically saves the optimizer state.

    To continue a run (benchmarks): pass its `opt` (from `make_optimizer`) and
    `start_step`; `until_step` ends this call (default cfg.train_steps, the LR
    schedule's length; later steps run at its final LR); `on_step(record)` is
    called after every optimizer step and stops training by returning True.
    Each history record counts `tokens`: non-padding positions x unrolled draft
    steps, the head token-positions the step processed."""
    device = head.fc.weight.device
    fast = bf16_is_fast(device) if cfg.fast_bf16 is None else cfg.fast_bf16
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if fast else contextlib.nullcontext()
    frozen = head.frozen
    lm_rows = frozen.lm_rows
    if fast:  # cast the frozen LM-head rows once, not in every autocast matmul
        frozen.lm_rows = lm_rows.to(torch.bfloat16)
    batches = make_batches(data, cfg.batch_tokens)
    trainable = [p for p in head.parameters() if p.requires_grad]
    opt = opt or make_optimizer(head, cfg)
    start, history = start_step, []
    if state_dir is not None:
        meta = _load_state(state_dir, head, opt)
        if meta is not None:
            start, history = meta["step"], meta["history"]
            log.info("resuming SFT from step %d (%s)", start, state_dir)
    head.train()
    try:
        last_save = time.monotonic()
        until = cfg.train_steps if until_step is None else until_step
        bar = tqdm(range(start, until), desc="sft", unit="step", initial=start, total=until)
        for step in bar:
            epoch, k = divmod(step, len(batches))
            perm = torch.randperm(len(batches), generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
            batch = collate(data, batches[int(perm[k])])
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, cfg)
            with autocast:
                loss, losses, accs = ttt_loss(head, batch, cfg.ttt_steps, cfg.loss_on_prompt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            opt.step()
            tokens = int(batch.valid.sum()) * cfg.ttt_steps
            history.append({"step": step, "loss": float(loss.detach()), "losses": losses, "acc": accs, "tokens": tokens})
            recent = history[-20:]
            acc_avg = [sum(h["acc"][j] for h in recent if len(h["acc"]) > j) / max(1, sum(len(h["acc"]) > j for h in recent)) for j in range(cfg.ttt_steps)]
            bar.set_postfix(loss=f"{sum(h['loss'] for h in recent) / len(recent):.3f}", acc="/".join(f"{a:.2f}" for a in acc_avg))
            if state_dir is not None and time.monotonic() - last_save > cfg.save_every_s:
                _save_state(state_dir, head, opt, {"step": step + 1, "history": history})
                last_save = time.monotonic()
            if on_step is not None and on_step(history[-1]):
                break
    finally:
        frozen.lm_rows = lm_rows
        head.eval()
    return history


def evaluate_tau(target, drafter, prompts: Sequence[Sequence[int]], k: int, max_tokens: int) -> tuple[float, list[float]]:
    """Greedy acceptance length τ and per-position acceptance on `prompts`."""
    from service.engine import Engine
    from service.sampling import SamplingParams

    engine = Engine(target.model, drafter, target.eos_token_ids, k)
    for ids in prompts:
        engine.generate(list(ids), SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return engine.stats.tau, engine.stats.per_position_acceptance()[:k]


def train_sft(
    target,
    prompts: Sequence[str],
    checkpoint_dir: str | Path,
    cache_dir: str | Path,
    cfg: SFTConfig | None = None,
    exchanges: Sequence[tuple[str, str]] | None = None,
) -> SFTResult:
    """The whole bootstrap on a loaded service.runtime.Target: trajectories (+
    teacher-forced `exchanges`, by default cfg.num_exchanges from the ShareGPT
    train split) -> draft vocab -> TTT training -> eval -> checkpoint
    `eagle3/v{N}`. Resumable."""
    from service.prompts import chat_ids, sharegpt_exchanges, sharegpt_prompts

    cfg = cfg or SFTConfig()
    torch.manual_seed(cfg.seed)
    model = target.model
    sft_dir = Path(cache_dir) / "sft"
    layers = tuple(cfg.hidden_layers) if cfg.hidden_layers else Eagle3Config.for_target(model.cfg, 1).hidden_layers
    prompt_ids = [chat_ids(target.tokenizer, p) for p in prompts]
    t0 = time.perf_counter()
    fast = bf16_is_fast(model.device) if cfg.fast_bf16 is None else cfg.fast_bf16
    data = collect_trajectories(
        model, prompt_ids, cfg.max_new_tokens, target.eos_token_ids, layers, sft_dir, cfg.gen_batch_size, target.model_id, fast
    )
    resp = data.response_tokens()
    if exchanges is None:
        exchanges = sharegpt_exchanges("train", cfg.num_exchanges) if cfg.num_exchanges else ()
    if exchanges:  # one prefill per sequence: max_new_tokens=1 decodes nothing
        forced = exchange_ids(target.tokenizer, exchanges, cfg.exchange_max_tokens)
        texts = collect_trajectories(
            model, forced, 1, target.eos_token_ids, layers, sft_dir, cfg.gen_batch_size, target.model_id, fast
        )
        data = Trajectories.cat([data, texts])
    t_gen = time.perf_counter() - t0
    d2t = build_draft_vocab(resp, data.tokens, model.cfg.vocab_size, cfg.draft_vocab_size)
    coverage = float(torch.isin(resp, d2t).float().mean()) if resp.numel() else 0.0
    log.info("draft vocab: %d ids, covering %.2f%% of the training trajectories' generated tokens", d2t.numel(), 100 * coverage)
    head = Eagle3Head(Eagle3Config.for_target(model.cfg, d2t.numel(), layers))
    head.reset_parameters(torch.Generator().manual_seed(cfg.seed))
    head.d2t.copy_(d2t)
    head.to(dtype=model.dtype).attach(model)
    run_key = _digest([str(data.tokens.sum().item()), data.tokens.numel(), asdict(cfg) | {"eval_prompts": 0, "save_every_s": 0}])
    state_dir = sft_dir / f"run-{run_key}"
    t1 = time.perf_counter()
    history = train_head(head, data, cfg, state_dir)
    t_train = time.perf_counter() - t1
    tau, per_pos = None, None
    if cfg.eval_prompts:
        drafter = Eagle3Drafter(head, model, version="eval")
        heldout = [chat_ids(target.tokenizer, p) for p in sharegpt_prompts("heldout", limit=cfg.eval_prompts)]
        tau, per_pos = evaluate_tau(target, drafter, heldout, cfg.eval_k, cfg.eval_max_tokens)
        log.info("held-out greedy τ %.3f at K=%d, per-position acceptance %s", tau, cfg.eval_k, [round(a, 3) for a in per_pos])
    tail = history[-20:]
    path = save_checkpoint(
        head,
        checkpoint_dir,
        target.model_id,
        parent_version=None,
        trained_on={
            "sequences": len(data),
            "positions": int(data.tokens.numel()),
            "generated_tokens": int(resp.numel()),
            "blocks": 0,
            "optimizer_steps": cfg.train_steps,
        },
        eval_tau={"tau_before": None, "tau_after": tau},
        extra={
            "trainer": "sft",
            "sft": {
                "config": asdict(cfg),
                "draft_vocab_coverage": coverage,
                "final_loss": sum(h["loss"] for h in tail) / max(1, len(tail)),
                "final_acc": [sum(h["acc"][j] for h in tail if len(h["acc"]) > j) / max(1, len(tail)) for j in range(cfg.ttt_steps)],
                "eval_per_position_acceptance": per_pos,
                "eval_k": cfg.eval_k,
                "seconds": {"trajectories": round(t_gen, 1), "training": round(t_train, 1)},
            },
        },
    )
    shutil.rmtree(state_dir, ignore_errors=True)  # finished: a rerun trains afresh (trajectories stay cached)
    return SFTResult(path, history, int(resp.numel()), tau)


# ---------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    d = SFTConfig()
    p = argparse.ArgumentParser(prog="draftloop train-sft", description="Bootstrap the EAGLE-3 drafter head by SFT on target trajectories.")
    p.add_argument("--prompts", type=Path, help="JSONL file of {\"prompt\": ...} (default: built-in ShareGPT train split)")
    p.add_argument("--num-prompts", type=int, default=d.num_prompts)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--gen-batch-size", type=int, default=d.gen_batch_size)
    p.add_argument(
        "--num-exchanges",
        type=int,
        default=d.num_exchanges,
        help="ShareGPT exchanges (prompt + reply) used teacher-forced, besides the trajectories; ignored with --prompts",
    )
    p.add_argument("--exchange-max-tokens", type=int, default=d.exchange_max_tokens)
    p.add_argument("--draft-vocab-size", type=int, default=d.draft_vocab_size)
    p.add_argument("--ttt-steps", type=int, default=d.ttt_steps, help="draft steps unrolled in training")
    p.add_argument("--steps", type=int, default=d.train_steps, help="optimizer steps")
    p.add_argument("--batch-tokens", type=int, default=d.batch_tokens)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval-prompts", type=int, default=d.eval_prompts, help="held-out prompts for the τ evaluation (0: skip)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads on CPU (default 1: on the shared 2-core dev box two threads ran 3.4x slower "
        "than one under load, and only 6%% faster when idle, since the bf16 matmuls saturate one core)",
    )
    p.add_argument("--checkpoint-dir", type=Path, help="default: DRAFTLOOP_CHECKPOINT_DIR")
    p.add_argument("--cache-dir", type=Path, help="default: DRAFTLOOP_CACHE_DIR")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from service.config import Settings
    from service.prompts import load_prompts, sharegpt_prompts
    from service.runtime import load_target

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in (("checkpoint_dir", args.checkpoint_dir), ("cache_dir", args.cache_dir)) if v is not None}
    settings = Settings(**overrides)
    cfg = SFTConfig(
        num_prompts=args.num_prompts,
        max_new_tokens=args.max_new_tokens,
        gen_batch_size=args.gen_batch_size,
        num_exchanges=args.num_exchanges,
        exchange_max_tokens=args.exchange_max_tokens,
        draft_vocab_size=args.draft_vocab_size,
        ttt_steps=args.ttt_steps,
        train_steps=args.steps,
        batch_tokens=args.batch_tokens,
        lr=args.lr,
        seed=args.seed,
        eval_prompts=args.eval_prompts,
    )
    t0 = time.perf_counter()
    target = load_target(settings)
    if args.prompts:
        prompts = load_prompts(args.prompts)[: cfg.num_prompts]
    else:
        prompts = list(sharegpt_prompts("train", limit=cfg.num_prompts))
    exchanges = () if args.prompts else None  # a user's prompt file comes without replies
    result = train_sft(target, prompts, settings.checkpoint_dir, settings.cache_dir, cfg, exchanges)
    log.info(
        "wrote %s (τ %s) in %.0f s; serve it with DRAFTLOOP_DRAFTER=auto DRAFTLOOP_CHECKPOINT_DIR=%s",
        result.checkpoint,
        f"{result.tau:.3f}" if result.tau is not None else "not evaluated",
        time.perf_counter() - t0,
        settings.checkpoint_dir,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
