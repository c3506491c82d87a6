"""The supervised bootstrap of the EAGLE-3 head (the Draft-OPD paper's SFT
baseline, our cold start); `draftloop train-sft` runs it (worker.train.cli).

1. Trajectories: the target continues training prompts greedily, in batches
   (`worker.train.features.generate_batch`, a left-padded batched forward over
   the target's own weights; in bfloat16 where that is fast). The hidden states
   at the head's layers and the final normed hidden of every fed position are
   kept on the way, so no second target pass is needed. Cached in chunks under
   `<cache_dir>/sft/`, so a killed run regenerates nothing already written.
   Prompts: the built-in ShareGPT train split or a JSONL file; never the
   held-out split.
2. Draft vocabulary: the most frequent target ids among the generated tokens
   (the remainder filled from prompt counts, then by id), as the d2t map.
3. Training, the EAGLE-3 objective ("training-time test", `losses.ttt_loss`):
   `Eagle3Head.unroll` over `ttt_steps` draft steps, feeding the head's own
   hidden from step 2 on. Loss at step j: cross-entropy from the target's
   distribution restricted to the draft vocab (softmax of its final hidden
   through the same frozen LM-head rows) to the head's -- forward KL(p‖q) up to
   p's entropy; soft labels carry more per position than the greedy token --
   weighted 0.8^j (as SpecForge), on every anchor (prompt anchors too: p is the
   target's there as well). The optimizer state is saved every minute;
   rerunning the command resumes.
4. The head is written as the next `eagle3/v{N}` checkpoint (parent None),
   after a τ evaluation on a few held-out prompts."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from service.drafters.eagle3 import Eagle3Config, Eagle3Drafter, Eagle3Head, save_checkpoint
from service.llama import LlamaModel

from .config import SFTConfig
from .data import Trajectories, collate, trajectory_batches
from .evaluate import evaluate_tau
from .features import bf16_copy, generate_batch
from .loop import autocast, load_state, make_optimizer, optimizer_step, save_state, trainable_params, use_bf16, warmup_cosine_lr
from .losses import ttt_loss

log = logging.getLogger(__name__)

StepHook = Callable[[dict], bool]  # called after each optimizer step with its history record; True stops


def exchange_ids(tokenizer, exchanges: Sequence[tuple[str, str]], max_tokens: int) -> list[list[int]]:
    """Prompt (through the chat template) + reply tokens, cut at max_tokens;
    exchanges whose prompt leaves fewer than 8 reply tokens are skipped."""
    from worker.prompts import chat_ids

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
    both harmless for training data, and faster on CPUs with bf16 instructions)."""
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


def build_draft_vocab(
    response_tokens: Tensor,  # (N,) int64, generated tokens
    prompt_tokens: Tensor,  # (M,) int64
    vocab_size: int,
    size: int,
) -> Tensor:
    """The `size` target ids ranked by (count among generated tokens, count
    among prompt tokens, lower id first) -> d2t (size,) int64, ascending ids."""
    size = min(size, vocab_size)
    response_counts = torch.bincount(response_tokens, minlength=vocab_size).double()
    prompt_counts = torch.bincount(prompt_tokens, minlength=vocab_size).double()
    ids = torch.arange(vocab_size, dtype=torch.double)
    score = response_counts * 1e12 + prompt_counts * 1e5 - ids / vocab_size  # lexicographic (exact while counts < 1e5 / 1e7)
    return torch.sort(torch.topk(score, size).indices).values


# ---------------------------------------------------------------------------
# training


@dataclass
class SFTResult:
    checkpoint: Path
    history: list[dict] = field(default_factory=list)  # per logged step: loss, acc per draft step
    trained_tokens: int = 0
    tau: float | None = None


def _show_progress(bar: tqdm, history: list[dict], ttt_steps: int) -> None:
    """Mean loss and per-step top-1 agreement of the last 20 steps on the progress bar."""
    recent = history[-20:]
    acc_avg = [
        sum(h["acc"][j] for h in recent if len(h["acc"]) > j) / max(1, sum(len(h["acc"]) > j for h in recent))
        for j in range(ttt_steps)
    ]
    bar.set_postfix(loss=f"{sum(h['loss'] for h in recent) / len(recent):.3f}", acc="/".join(f"{a:.2f}" for a in acc_avg))


def _sft_step(head: Eagle3Head, opt: torch.optim.Optimizer, data: Trajectories, batches: list[list[int]], step: int, cfg: SFTConfig, bf16: bool) -> dict:
    """Optimizer step `step` (epoch-wise shuffled batches) -> its history record."""
    epoch, k = divmod(step, len(batches))
    perm = torch.randperm(len(batches), generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
    batch = collate(data, batches[int(perm[k])])
    with autocast(head.fc.weight.device, bf16):
        loss, losses, accs = ttt_loss(head, batch, cfg.ttt_steps, cfg.loss_on_prompt)
    lr = warmup_cosine_lr(step, cfg.lr, cfg.warmup_steps, cfg.train_steps)
    optimizer_step(opt, trainable_params(head), loss, lr, cfg.grad_clip)
    tokens = int(batch.valid.sum()) * cfg.ttt_steps
    return {"step": step, "loss": float(loss.detach()), "losses": losses, "acc": accs, "tokens": tokens}


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
    bf16 = use_bf16(head.fc.weight.device, cfg.fast_bf16)
    frozen = head.frozen
    lm_rows = frozen.lm_rows
    if bf16:  # cast the frozen LM-head rows once, not in every autocast matmul
        frozen.lm_rows = lm_rows.to(torch.bfloat16)
    batches = trajectory_batches(data, cfg.batch_tokens)
    opt = opt or make_optimizer(head, cfg)
    start, history = start_step, []
    if state_dir is not None and (meta := load_state(state_dir, head, opt)) is not None:
        start, history = meta["step"], meta["history"]
        log.info("resuming SFT from step %d (%s)", start, state_dir)
    head.train()
    try:
        last_save = time.monotonic()
        until = cfg.train_steps if until_step is None else until_step
        bar = tqdm(range(start, until), desc="sft", unit="step", initial=start, total=until)
        for step in bar:
            history.append(_sft_step(head, opt, data, batches, step, cfg, bf16))
            _show_progress(bar, history, cfg.ttt_steps)
            if state_dir is not None and time.monotonic() - last_save > cfg.save_every_s:
                save_state(state_dir, head, opt, {"step": step + 1, "history": history})
                last_save = time.monotonic()
            if on_step is not None and on_step(history[-1]):
                break
    finally:
        frozen.lm_rows = lm_rows
        head.eval()
    return history


# ---------------------------------------------------------------------------
# the whole bootstrap


def _training_data(target, prompts: Sequence[str], sft_dir: Path, layers: tuple[int, ...], cfg: SFTConfig, exchanges) -> tuple[Trajectories, Tensor]:
    """Trajectories (+ teacher-forced `exchanges`) -> (data, generated tokens (N,))."""
    from worker.prompts import chat_ids, sharegpt_exchanges

    model = target.model
    fast = use_bf16(model.device, cfg.fast_bf16)
    prompt_ids = [chat_ids(target.tokenizer, p) for p in prompts]
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
    return data, resp


def _new_head(model: LlamaModel, d2t: Tensor, layers: tuple[int, ...], seed: int) -> Eagle3Head:  # d2t: (Vd,)
    """A freshly initialised head over draft vocab `d2t` (Vd,), attached to `model`."""
    head = Eagle3Head(Eagle3Config.for_target(model.cfg, d2t.numel(), layers))
    head.reset_parameters(torch.Generator().manual_seed(seed))
    head.d2t.copy_(d2t)
    head.to(dtype=model.dtype).attach(model)
    return head


def _heldout_tau(target, head: Eagle3Head, cfg: SFTConfig) -> tuple[float | None, list[float] | None]:
    """Greedy τ on cfg.eval_prompts held-out prompts (None, None: skipped)."""
    from worker.prompts import chat_ids, sharegpt_prompts

    if not cfg.eval_prompts:
        return None, None
    drafter = Eagle3Drafter(head, target.model, version="eval")
    heldout = [chat_ids(target.tokenizer, p) for p in sharegpt_prompts("heldout", limit=cfg.eval_prompts)]
    tau, per_pos = evaluate_tau(target, drafter, heldout, cfg.eval_k, cfg.eval_max_tokens)
    log.info("held-out greedy τ %.3f at K=%d, per-position acceptance %s", tau, cfg.eval_k, [round(a, 3) for a in per_pos])
    return tau, per_pos


def _save(
    target,
    head: Eagle3Head,
    checkpoint_dir,
    data: Trajectories,
    resp: Tensor,  # (N,) generated tokens
    history: list[dict],
    cfg: SFTConfig,
    info: dict,
) -> Path:
    """Write the head as the next `eagle3/v{N}` (parent None) with the SFT manifest."""
    tail = history[-20:]
    sft_info = {
        "config": asdict(cfg),
        "draft_vocab_coverage": info["coverage"],
        "final_loss": sum(h["loss"] for h in tail) / max(1, len(tail)),
        "final_acc": [sum(h["acc"][j] for h in tail if len(h["acc"]) > j) / max(1, len(tail)) for j in range(cfg.ttt_steps)],
        "eval_per_position_acceptance": info["per_pos"],
        "eval_k": cfg.eval_k,
        "seconds": info["seconds"],
    }
    trained_on = {
        "sequences": len(data),
        "positions": int(data.tokens.numel()),
        "generated_tokens": int(resp.numel()),
        "blocks": 0,
        "optimizer_steps": cfg.train_steps,
    }
    return save_checkpoint(
        head, checkpoint_dir, target.model_id, parent_version=None, trained_on=trained_on,
        eval_tau={"tau_before": None, "tau_after": info["tau"]}, extra={"trainer": "sft", "sft": sft_info},
    )  # fmt: skip


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
    cfg = cfg or SFTConfig()
    torch.manual_seed(cfg.seed)
    model = target.model
    sft_dir = Path(cache_dir) / "sft"
    layers = tuple(cfg.hidden_layers) if cfg.hidden_layers else Eagle3Config.for_target(model.cfg, 1).hidden_layers
    t0 = time.perf_counter()
    data, resp = _training_data(target, prompts, sft_dir, layers, cfg, exchanges)
    t_gen = time.perf_counter() - t0
    d2t = build_draft_vocab(resp, data.tokens, model.cfg.vocab_size, cfg.draft_vocab_size)
    coverage = float(torch.isin(resp, d2t).float().mean()) if resp.numel() else 0.0
    log.info("draft vocab: %d ids, covering %.2f%% of the training trajectories' generated tokens", d2t.numel(), 100 * coverage)
    head = _new_head(model, d2t, layers, cfg.seed)
    run_key = _digest([str(data.tokens.sum().item()), data.tokens.numel(), asdict(cfg) | {"eval_prompts": 0, "save_every_s": 0}])
    state_dir = sft_dir / f"run-{run_key}"
    t1 = time.perf_counter()
    history = train_head(head, data, cfg, state_dir)
    seconds = {"trajectories": round(t_gen, 1), "training": round(time.perf_counter() - t1, 1)}
    tau, per_pos = _heldout_tau(target, head, cfg)
    info = {"coverage": coverage, "tau": tau, "per_pos": per_pos, "seconds": seconds}
    path = _save(target, head, checkpoint_dir, data, resp, history, cfg, info)
    shutil.rmtree(state_dir, ignore_errors=True)  # finished: a rerun trains afresh (trajectories stay cached)
    return SFTResult(path, history, int(resp.numel()), tau)
