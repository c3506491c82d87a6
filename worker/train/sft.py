"""The supervised bootstrap of the EAGLE-3 head (the Draft-OPD paper's SFT
baseline, our cold start); `draftloop train-sft` runs it (worker.train.cli).

1. Trajectories: the target continues training prompts greedily, in batches
   (`worker.train.features.generate_batch`, a left-padded batched forward over
   the target's own weights; in bfloat16 where that is fast). The taps the head
   reads and the final normed hidden of every fed position are kept on the way
   in the memory-mapped feature cache of `worker.train.featstore` (content
   addressed, resumable), so no target pass is ever repeated. Prompts: the
   built-in ShareGPT train split or a JSONL file; never the held-out split.
2. Draft vocabulary: the most frequent target ids among the generated tokens
   (the remainder filled from prompt counts, then by id), as the d2t map.
3. Training, the EAGLE-3 objective ("training-time test", `losses.ttt_loss`):
   `Eagle3Head.unroll` over `ttt_steps` draft steps, feeding the head's own
   hidden from step 2 on. Loss at step j: cross-entropy from the target's
   distribution restricted to the draft vocab (softmax of its final hidden
   through the target's LM-head rows) to the head's (its own trained norm and
   LM head) -- forward KL(p‖q) up to p's entropy -- weighted 0.8^j (as
   SpecForge), on reply anchors whose target argmax lies in the draft vocab.
   Cosine LR over the budget (steps, minutes or token-positions, the first
   spent). The optimizer state and budget spent are saved every minute;
   rerunning the command resumes.
4. The head is written as the next `eagle3/v{N}` checkpoint (parent None),
   after a τ evaluation on a few held-out prompts."""

from __future__ import annotations

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
from .featstore import FeatureStore, GenerationSettings, add_served, build_store, cache_layers, digest, served_store
from .loop import autocast, cosine_lr, load_state, make_optimizer, optimizer_step, save_state, trainable_params, use_bf16
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


# Its leading parameters repeat generate_batch's on purpose (a deliberate duplicate pair):
# it is the cached, batched driver of that one function.
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
    max_seconds: float | None = None,
) -> FeatureStore:
    """Generate (or reuse cached) trajectories for `prompt_ids`, batch by batch,
    into the feature cache under cache_dir (`worker.train.featstore`: taps of
    `hidden_layers` and of the layers before them) -> a store reading
    `hidden_layers`. With fast_bf16 a bfloat16 copy of the target generates (its
    greedy path can part from the float32 one at near-ties; harmless for
    training data, and faster on CPUs with bf16 instructions). `max_seconds`
    bounds this call's generation (None: every prompt)."""
    settings = GenerationSettings(model_id, cache_layers(hidden_layers), max_new_tokens, tuple(sorted(eos_ids)), fast_bf16)
    return build_store(model, prompt_ids, settings, cache_dir, hidden_layers, batch_size, max_seconds)


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
    finished: bool = True  # the training budget is spent (a ticking bootstrap: False until its last call)


@dataclass
class Spent:
    """The training budget spent so far (saved with the optimizer state)."""

    step: int = 0
    seconds: float = 0.0
    tokens: int = 0

    def fraction(self, cfg: SFTConfig) -> float:
        """The spent fraction of the budget: the largest over the limits that are set."""
        parts = [0.0]
        if cfg.train_steps is not None:
            parts.append(self.step / max(1, cfg.train_steps))
        if cfg.train_minutes is not None:
            parts.append(self.seconds / max(1e-9, 60.0 * cfg.train_minutes))
        if cfg.train_tokens is not None:
            parts.append(self.tokens / max(1, cfg.train_tokens))
        return max(parts)


def _show_progress(bar: tqdm, history: list[dict], ttt_steps: int, spent: float) -> None:
    """Budget spent, mean loss and per-step top-1 agreement of the last 20 steps on the progress bar."""
    recent = history[-20:]
    acc_avg = [
        sum(h["acc"][j] for h in recent if len(h["acc"]) > j) / max(1, sum(len(h["acc"]) > j for h in recent))
        for j in range(ttt_steps)
    ]
    bar.set_postfix(
        budget=f"{100 * min(spent, 1.0):.1f}%",
        loss=f"{sum(h['loss'] for h in recent) / len(recent):.3f}",
        acc="/".join(f"{a:.2f}" for a in acc_avg),
    )


def _sft_step(head: Eagle3Head, opt: torch.optim.Optimizer, data, batches: list[list[int]], step: int, lr: float, cfg: SFTConfig, bf16: bool) -> dict:
    """Optimizer step `step` (epoch-wise shuffled batches of `data`) at `lr` -> its history record."""
    epoch, k = divmod(step, len(batches))
    perm = torch.randperm(len(batches), generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
    batch = collate(data, batches[int(perm[k])]).to(head.fc.weight.device)
    with autocast(head.fc.weight.device, bf16):
        loss, losses, accs = ttt_loss(head, batch, cfg.ttt_steps, cfg.loss_on_prompt)
    optimizer_step(opt, trainable_params(head), loss, lr, cfg.grad_clip)
    tokens = int(batch.valid.sum()) * cfg.ttt_steps
    return {"step": step, "loss": float(loss.detach()), "losses": losses, "acc": accs, "tokens": tokens, "lr": lr}


def train_head(
    head: Eagle3Head,
    data: Trajectories | FeatureStore,
    cfg: SFTConfig,
    state_dir: Path | None = None,
    *,
    opt: torch.optim.Optimizer | None = None,
    start_step: int = 0,
    until_step: int | None = None,
    on_step: StepHook | None = None,
) -> list[dict]:
    """Train `head` (attached to the target) in place on `data` with the TTT loss
    (bf16 autocast where bf16 matmuls are fast; float32 master weights) until
    cfg's budget is spent. With state_dir, resumes from and periodically saves
    the optimizer state, the budget spent and the history.

    To continue a run (benchmarks): pass its `opt` (from `make_optimizer`) and
    `start_step`; `until_step` ends this call instead of the budget (later steps
    run at the schedule's final LR); `on_step(record)` is called after every
    optimizer step and stops training by returning True. Each history record
    counts `tokens`: non-padding positions x unrolled draft steps, the head
    token-positions the step processed."""
    bf16 = use_bf16(head.fc.weight.device, cfg.fast_bf16)
    frozen = head.frozen
    lm_rows = frozen.lm_rows
    if bf16:  # cast the frozen LM-head rows once, not in every autocast matmul
        frozen.lm_rows = lm_rows.to(torch.bfloat16)
    batches = trajectory_batches(data, cfg.batch_tokens)
    opt = opt or make_optimizer(head, cfg, cfg.output_lr_scale)
    spent, history = Spent(step=start_step), []
    if state_dir is not None and (meta := load_state(state_dir, head, opt)) is not None:
        spent, history = Spent(**meta["spent"]), meta["history"]
        log.info("resuming SFT from step %d (%s)", spent.step, state_dir)
    head.train()
    try:
        last_save, t0 = time.monotonic(), time.monotonic() - spent.seconds
        bar = tqdm(desc="sft", unit="step", initial=spent.step, total=until_step or cfg.train_steps)
        while (spent.step < until_step) if until_step is not None else spent.fraction(cfg) < 1.0:
            lr = cosine_lr(spent.step, spent.fraction(cfg), cfg.lr, cfg.warmup_steps)
            history.append(_sft_step(head, opt, data, batches, spent.step, lr, cfg, bf16))
            spent = Spent(spent.step + 1, time.monotonic() - t0, spent.tokens + history[-1]["tokens"])
            bar.update(1)
            _show_progress(bar, history, cfg.ttt_steps, spent.fraction(cfg))
            if state_dir is not None and time.monotonic() - last_save > cfg.save_every_s:
                save_state(state_dir, head, opt, {"spent": asdict(spent), "history": history})
                last_save = time.monotonic()
            if on_step is not None and on_step(history[-1]):
                break
        bar.close()
        if state_dir is not None:  # a stop by on_step (a bootstrap tick's slice) resumes from here
            save_state(state_dir, head, opt, {"spent": asdict(spent), "history": history})
    finally:
        frozen.lm_rows = lm_rows
        head.eval()
    return history


# ---------------------------------------------------------------------------
# the whole bootstrap


def _training_data(target, prompts: Sequence[str], sft_dir: Path, layers: tuple[int, ...], cfg: SFTConfig, exchanges) -> tuple[FeatureStore, Tensor]:
    """Trajectories (+ teacher-forced `exchanges`) -> (data, generated tokens (N,))."""
    from worker.prompts import chat_ids, sharegpt_exchanges

    model = target.model
    fast = use_bf16(model.device, cfg.fast_bf16)
    budget = None if cfg.gen_minutes is None else 60.0 * cfg.gen_minutes

    def collect(ids: list[list[int]], max_new_tokens: int) -> FeatureStore:
        return collect_trajectories(
            model, ids, max_new_tokens, target.eos_token_ids, layers, sft_dir, cfg.gen_batch_size, target.model_id, fast, budget
        )

    data = collect([chat_ids(target.tokenizer, p) for p in prompts], cfg.max_new_tokens)
    resp = data.response_tokens()
    if exchanges is None:
        exchanges = sharegpt_exchanges("train", cfg.num_exchanges) if cfg.num_exchanges else ()
    if exchanges:  # one prefill per sequence: max_new_tokens=1 decodes nothing
        data = FeatureStore.merged([data, collect(exchange_ids(target.tokenizer, exchanges, cfg.exchange_max_tokens), 1)])
    return data, resp


def _new_head(model: LlamaModel, d2t: Tensor, layers: tuple[int, ...], seed: int, init_layer: int | None = None) -> Eagle3Head:
    """A freshly initialised head over draft vocab `d2t` (Vd,), attached to `model`
    (its decoder layer from target layer `init_layer`, None: random)."""
    head = Eagle3Head(Eagle3Config.for_target(model.cfg, d2t.numel(), layers))
    head.reset_parameters(torch.Generator().manual_seed(seed))
    if init_layer is not None:
        head.init_layer_from(model, init_layer)
    head.d2t.copy_(d2t)
    # on the target's device; on a GPU float32 master weights under bf16 autocast (the target
    # is bf16 there), on a CPU the target's dtype as before (a bf16 target may train without autocast)
    master = torch.float32 if model.device.type == "cuda" else model.dtype
    head.init_output_from(model).to(device=model.device, dtype=master).attach(model)
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
    data: FeatureStore,
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
        "optimizer_steps": len(history),
        "head_token_positions": sum(h["tokens"] for h in history),
    }
    return save_checkpoint(
        head, checkpoint_dir, target.model_id, parent_version=None, trained_on=trained_on,
        eval_tau={"tau_before": None, "tau_after": info["tau"]}, extra={"trainer": "sft", "sft": sft_info},
    )  # fmt: skip


def head_layers(model: LlamaModel, cfg: SFTConfig) -> tuple[int, ...]:
    """The target layers the head reads: cfg.hidden_layers or the default taps."""
    return tuple(cfg.hidden_layers) if cfg.hidden_layers else Eagle3Config.for_target(model.cfg, 1).hidden_layers


def prepare_data(
    target, prompts: Sequence[str], cache_dir: str | Path, cfg: SFTConfig, exchanges: Sequence[tuple[str, str]] | None = None
) -> tuple[FeatureStore, Tensor]:
    """Trajectories of `prompts` (+ teacher-forced exchanges) in the feature cache
    under cache_dir/sft -> (data, generated tokens (N,)); `train-sft --generate-only`."""
    return _training_data(target, prompts, Path(cache_dir) / "sft", head_layers(target.model, cfg), cfg, exchanges)


def _saved_d2t(state_dir: Path) -> Tensor | None:
    """The draft vocabulary of a saved training state (None: nothing saved yet)."""
    from safetensors import safe_open

    path = state_dir / "state.safetensors"
    if not path.exists():
        return None
    with safe_open(str(path), "pt") as saved:
        return saved.get_tensor("head.d2t") if "head.d2t" in saved.keys() else None


def _with_served(target, data: FeatureStore, cache_dir: str | Path, cfg: SFTConfig, served: Sequence[tuple[list[int], list[int]]]) -> FeatureStore:
    """`data` plus every served (prompt, completion) pair cached so far, `served` added first."""
    layers = head_layers(target.model, cfg)
    fast = use_bf16(target.model.device, cfg.fast_bf16)
    settings = GenerationSettings(target.model_id, cache_layers(layers), cfg.max_new_tokens, tuple(sorted(target.eos_token_ids)), fast)
    folder = Path(cache_dir) / "sft"
    if served:
        n = add_served(target.model, served, settings, folder, max(1, cfg.gen_batch_size // 4))
        log.info("served requests: %d sequences, %d new positions in the training pool", len(served), n)
    pool = served_store(settings, folder, layers)
    return data if pool is None else FeatureStore.merged([data, pool])


def _slice_hook(cfg: SFTConfig) -> StepHook:
    """Stops a call after cfg.tick_steps steps or cfg.tick_minutes (None: no limit)."""
    t0, steps = time.monotonic(), [0]

    def hook(_record: dict) -> bool:
        steps[0] += 1
        if cfg.tick_steps is not None and steps[0] >= cfg.tick_steps:
            return True
        return cfg.tick_minutes is not None and time.monotonic() - t0 >= 60.0 * cfg.tick_minutes

    return hook


def train_sft(
    target,
    prompts: Sequence[str],
    checkpoint_dir: str | Path,
    cache_dir: str | Path,
    cfg: SFTConfig | None = None,
    exchanges: Sequence[tuple[str, str]] | None = None,
    *,
    state_dir: Path | None = None,
    served: Sequence[tuple[list[int], list[int]]] = (),
) -> SFTResult:
    """The whole bootstrap on a loaded service.runtime.Target: trajectories (+
    teacher-forced `exchanges`, by default cfg.num_exchanges from the ShareGPT
    train split) -> draft vocab -> TTT training -> eval -> checkpoint
    `eagle3/v{N}`. Resumable.

    With `state_dir` (the worker's bootstrap, one call per beat tick): training
    state lives there across calls, the draft vocabulary is the first call's,
    `served` (prompt, completion) pairs join the pool with every earlier call's,
    and one call trains at most cfg.tick_steps / cfg.tick_minutes; each call
    writes its head as a checkpoint, and `SFTResult.finished` says whether the
    whole budget is spent."""
    cfg = cfg or SFTConfig()
    torch.manual_seed(cfg.seed)
    model = target.model
    layers = head_layers(model, cfg)
    t0 = time.perf_counter()
    data, resp = prepare_data(target, prompts, cache_dir, cfg, exchanges)
    if state_dir is not None:
        data = _with_served(target, data, cache_dir, cfg, served)
    t_gen = time.perf_counter() - t0
    d2t = _saved_d2t(state_dir) if state_dir is not None else None
    if d2t is None:
        d2t = build_draft_vocab(resp, data.tokens, model.cfg.vocab_size, cfg.draft_vocab_size)
    coverage = float(torch.isin(resp, d2t).float().mean()) if resp.numel() else 0.0
    log.info("draft vocab: %d ids, covering %.2f%% of the training trajectories' generated tokens", d2t.numel(), 100 * coverage)
    head = _new_head(model, d2t, layers, cfg.seed, cfg.init_layer)
    ticking = state_dir is not None
    if state_dir is None:
        unkeyed = {k: None for k in ("eval_prompts", "save_every_s", "gen_minutes", "train_steps", "train_minutes", "train_tokens")}
        keyed = {k: v for k, v in asdict(cfg).items() if k not in ("tick_minutes", "tick_steps")} | unkeyed
        run_key = digest([str(data.tokens.sum().item()), data.tokens.numel(), keyed])  # a larger budget resumes
        state_dir = Path(cache_dir) / "sft" / f"run-{run_key}"
    t1 = time.perf_counter()
    history = train_head(head, data, cfg, state_dir, on_step=_slice_hook(cfg) if ticking else None)
    finished = Spent(**json.loads((state_dir / "state.json").read_text())["spent"]).fraction(cfg) >= 1.0
    seconds = {"trajectories": round(t_gen, 1), "training": round(time.perf_counter() - t1, 1)}
    tau, per_pos = _heldout_tau(target, head, cfg)
    info = {"coverage": coverage, "tau": tau, "per_pos": per_pos, "seconds": seconds}
    path = _save(target, head, checkpoint_dir, data, resp, history, cfg, info)
    if not ticking:
        shutil.rmtree(state_dir, ignore_errors=True)  # finished: a rerun trains afresh (trajectories stay cached)
    return SFTResult(path, history, int(resp.numel()), tau, finished)
