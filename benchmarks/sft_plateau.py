"""Phase 1 of the OPD-vs-SFT benchmark (benchmarks/opd_vs_sft.py): SFT of a
fresh EAGLE-3 head on train-sft's cached trajectories, epoch by epoch, until
held-out τ plateaus, and more of the same run (its optimizer and LR schedule)
as the `sft_continued` arm."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.opd_budget import BudgetHook, Clock, Evaluate, Plan
from service.drafters.eagle3 import Eagle3Config, Eagle3Head
from service.runtime import Target
from worker.prompts import chat_ids
from worker.train.config import SFTConfig
from worker.train.data import Trajectories, trajectory_batches
from worker.train.loop import bf16_is_fast, make_optimizer, trainable_copy
from worker.train.sft import build_draft_vocab, collect_trajectories, train_head


@dataclass
class SFTRun:
    head: Eagle3Head  # float32, attached to float32 copies of the frozen target tensors
    opt: torch.optim.Optimizer
    cfg: SFTConfig
    data: Trajectories
    next_step: int
    tokens: int  # head token-positions so far
    epoch_tokens: int
    curve: list[dict[str, Any]]
    plateaued: bool


PLAN_TO_SFT = {  # SFTConfig field <- Plan field
    "num_prompts": "sft_prompts",
    "max_new_tokens": "sft_max_new_tokens",
    **{name: name for name in ("gen_batch_size", "draft_vocab_size", "batch_tokens", "seed")},
}


def sft_config(plan: Plan, n_batches: int) -> SFTConfig:
    """train-sft's config with this plan's sizes, its LR schedule `sft_max_epochs` long."""
    steps = plan.sft_max_epochs * n_batches
    return SFTConfig(
        **{field_name: getattr(plan, plan_name) for field_name, plan_name in PLAN_TO_SFT.items()},
        train_steps=steps,
        train_minutes=None,
        warmup_steps=max(1, min(SFTConfig.warmup_steps, steps // 20)),
        eval_prompts=0,
    )


def load_trajectories(
    target: Target, prompts: Sequence[str], plan: Plan, cache_dir: Path
) -> Trajectories:
    """train-sft's trajectories (same cache folder and key for the same sizes)."""
    model = target.model
    layers = Eagle3Config.for_target(model.cfg, 1).hidden_layers
    ids = [chat_ids(target.tokenizer, p) for p in prompts]
    fast = bf16_is_fast(model.device)
    return collect_trajectories(
        model,
        ids,
        plan.sft_max_new_tokens,
        target.eos_token_ids,
        layers,
        cache_dir / "sft",
        plan.gen_batch_size,
        target.model_id,
        fast,
    )


def plateaued(curve: list[dict[str, Any]], patience: int, min_delta: float) -> bool:
    """The last `patience` epochs gained less than min_delta over the best before them."""
    if len(curve) <= patience:
        return False
    best_before = max(p["tau"] for p in curve[:-patience])
    return all(p["tau"] < best_before + min_delta for p in curve[-patience:])


def sft_to_plateau(
    target: Target, data: Trajectories, plan: Plan, evaluate: Evaluate, clock: Clock
) -> SFTRun:
    model = target.model
    n_batches = len(trajectory_batches(data, plan.batch_tokens))
    cfg = sft_config(plan, n_batches)
    d2t = build_draft_vocab(
        data.response_tokens(), data.tokens, model.cfg.vocab_size, cfg.draft_vocab_size
    )
    fresh = Eagle3Head(Eagle3Config.for_target(model.cfg, d2t.numel()))
    fresh.reset_parameters(torch.Generator().manual_seed(cfg.seed))
    fresh.d2t.copy_(d2t)
    fresh.init_output_from(model)
    head = trainable_copy(fresh, model)  # float32 master weights whatever the serving dtype
    opt = make_optimizer(head, cfg)
    epoch_tokens = int(data.tokens.numel()) * cfg.ttt_steps
    curve: list[dict[str, Any]] = []
    run = SFTRun(head, opt, cfg, data, 0, 0, epoch_tokens, curve, False)
    losses: list[float] = []

    def on_step(record: dict) -> bool:
        run.tokens += record["tokens"]
        run.next_step = record["step"] + 1
        losses.append(record["loss"])
        if run.next_step % n_batches:
            return False
        tau, per_pos = evaluate(head)
        curve.append(
            {
                "epoch": run.next_step // n_batches,
                "step": run.next_step,
                "budget_tokens": run.tokens,
                "tau": tau,
                "per_position_acceptance": per_pos,
                "train_loss": round(sum(losses[-n_batches:]) / n_batches, 4),
                "elapsed_s": round(clock.elapsed(), 1),
            }
        )
        clock.say(
            "sft epoch %d/%d: held-out greedy τ %.3f (loss %.3f)",
            curve[-1]["epoch"],
            plan.sft_max_epochs,
            tau,
            curve[-1]["train_loss"],
        )
        run.plateaued = plateaued(curve, plan.patience, plan.min_delta)
        return run.plateaued

    clock.say(
        "sft: %d trajectories, %d positions, %d batches/epoch, up to %d epochs",
        len(data),
        data.tokens.numel(),
        n_batches,
        plan.sft_max_epochs,
    )
    train_head(head, data, cfg, opt=opt, on_step=on_step)
    return run


def continue_sft(run: SFTRun, hook: BudgetHook) -> dict[str, Any]:
    """More of the same SFT run: its optimizer, its LR schedule (its final LR past the end)."""
    t0 = time.perf_counter()
    lengths = run.data.offsets.diff()
    cheapest = min(int(lengths[b].sum()) for b in trajectory_batches(run.data, run.cfg.batch_tokens))
    most_steps = math.ceil(hook.budget / (cheapest * run.cfg.ttt_steps))  # the hook stops it before
    train_head(
        run.head,
        run.data,
        run.cfg,
        opt=run.opt,
        start_step=run.next_step,
        until_step=run.next_step + most_steps,
        on_step=hook,
    )
    return hook.summary(time.perf_counter() - t0)
