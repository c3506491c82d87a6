"""Issue #5, the paper's central claim at small scale: SFT plateaus, Draft-OPD
keeps improving (docs/architecture.md, arXiv 2605.29343).

    python -m benchmarks.opd_vs_sft --out results/opd_vs_sft.json [--quick] [--prompts FILE.jsonl]

1. SFT (worker/train/sft.py: cached target trajectories, draft vocab, the TTT loss)
   from a fresh EAGLE-3 head, epoch by epoch, measuring held-out greedy τ after
   each epoch (`sft_curve`), until τ stops improving (no gain of `min_delta`
   over the best for `patience` epochs) or `sft_max_epochs`, the length of its
   LR schedule. The head at that point is the SFT checkpoint.
2. Rollouts: the SFT checkpoint serves training-split prompts it never trained
   on through the real engine (speculative decoding, temperature 1, seeded), with
   `worker.train.rollouts.BlockCollector` as the block sink, exactly what the block log
   records in serving. Every OPD arm trains on these same blocks.
3. Arms, each from the SFT checkpoint with the same extra budget:
   `sft_continued` (the same run, its optimizer and LR schedule, more steps),
   `opd` (the full Draft-OPD objective), and the ablations `forward_kl_all`,
   `reverse_kl_all`, `no_decay` (γ = 1), `random_anchors` (teacher-forced random
   anchors instead of the served block starts), all through
   `worker.train` (build_requests, compute_features, train_opd) and OPDConfig.
4. Measurement: every arm, the SFT checkpoint and target-only decoding serve the
   held-out prompts through the engine at temperature 0 and at temperature 1
   (seed `seed + prompt index`, the same for every method): τ, per-position
   acceptance, tokens/s (benchmarks.speedup.measure: methods interleaved) and
   the speedup over target-only.

Budget: the unit is a *head token-position*, one non-padding context position
run through the drafter head's decoder layer for one unrolled draft step. An
SFT step on trajectories unrolling `ttt_steps` steps costs (positions in the
batch) x ttt_steps; an OPD step replaying blocks costs (context positions of
its requests) x (K + 1). The extra budget is `budget_epochs` SFT epochs'
worth (every trajectory position x ttt_steps, per epoch); each arm trains until
it has processed at least that many and stops at that step, so it overshoots by
less than one step (`trained_tokens`, `max_step_tokens` in the JSON).

Goal (reported, not tuned for): at temperature 0, Draft-OPD τ >= 1.10 x
continued-SFT τ, and the full objective above every ablation.

The JSON records each phase's time (timings: docs/results.md). `--quick` runs
every phase on a tiny scale (tests/test_opd_vs_sft.py). The plan and the budget
bookkeeping are benchmarks/opd_budget.py; phase 1, benchmarks/sft_plateau.py."""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.opd_budget import (
    QUICK,
    BudgetHook,
    Clock,
    Plan,
    greedy_evaluator,
    intermediate_marks,
    serving_drafter,
)
from benchmarks.sft_plateau import continue_sft, load_trajectories, sft_to_plateau
from benchmarks.speedup import EngineMethod, device_name, measure, strip_eos
from service.config import Settings
from service.drafters.eagle3 import Eagle3Head
from service.drafters.none import NoDrafter
from service.engine import StepTiming
from service.metrics import SpecDecodeStats
from service.runtime import Target, load_target
from service.sampling import SamplingParams
from worker.prompts import chat_ids, eval_prompts, sharegpt_prompts
from worker.train.blocks import build_requests
from worker.train.config import OPDConfig
from worker.train.data import RequestBlocks
from worker.train.features import compute_features
from worker.train.loop import bf16_is_fast, trainable_copy
from worker.train.opd import train_opd
from worker.train.rollouts import BlockCollector, serve_for_blocks

log = logging.getLogger("benchmarks.opd_vs_sft")

GOAL_RATIO = 1.10
OPD_ARMS: dict[str, dict[str, Any]] = {  # OPDConfig overrides of each Draft-OPD arm
    "opd": {},
    "forward_kl_all": {"mode": "forward_kl_all"},
    "reverse_kl_all": {"mode": "reverse_kl_all"},
    "no_decay": {"gamma": 1.0},
    "random_anchors": {"anchors": "random"},
}
ABLATIONS = [a for a in OPD_ARMS if a != "opd"]
BUDGET_DEFINITION = (
    "head token-positions: non-padding context positions run through the drafter head's decoder layer, "
    "times the draft steps unrolled (SFT: ttt_steps; Draft-OPD: K+1); budget_tokens = budget_epochs x "
    "(SFT trajectory positions x ttt_steps); each arm stops at the first optimizer step reaching it"
)


# ---------------------------------------------------------------------------
# phases 2-3: rollouts and Draft-OPD arms


def collect_rollouts(
    target: Target, head: Eagle3Head, prompts: list[list[int]], plan: Plan
) -> tuple[BlockCollector, dict]:
    """On-policy blocks: the SFT drafter (version "1") serves the prompts through
    the real engine at temperature 1, every verify step logged."""
    drafter = serving_drafter(head, target, "1", plan.rollout_min_confidence)
    params = SamplingParams(temperature=1.0, max_tokens=plan.rollout_max_tokens)
    # as served (the plan's confidence stop, temperature 1): its arms evaluate greedy and sampled
    collector, stats = serve_for_blocks(target, drafter, plan.k, prompts, params, plan.seed, "rollout", greedy_eval=False)
    del stats["seconds"]  # the phase clock records it
    return collector, stats


def opd_requests(
    target: Target, head: Eagle3Head, rollouts: BlockCollector, cfg: OPDConfig
) -> list[RequestBlocks]:
    model = target.model
    requests, stats = build_requests(
        rollouts.records, rollouts.contexts, head.d2t, model.cfg.vocab_size, 1, target.model_id, cfg
    )
    if not requests:
        raise RuntimeError(f"no trainable blocks in the rollouts ({stats.as_dict()})")
    compute_features(model, requests, head.cfg.hidden_layers, fast_bf16=bf16_is_fast(model.device))
    return requests


def train_opd_arm(
    sft_head: Eagle3Head,
    target: Target,
    requests: list[RequestBlocks],
    cfg: OPDConfig,
    make_hook: Callable[[Eagle3Head], BudgetHook],
) -> tuple[Eagle3Head, dict[str, Any]]:
    student = trainable_copy(sft_head, target.model)
    hook = make_hook(student)
    cfg = replace(cfg, epochs=10**6)  # the budget hook ends training
    result = train_opd(student, requests, cfg, on_step=hook)
    return student, {
        **hook.summary(result.seconds),
        "epochs": len(result.epoch_loss),
        "final_loss": result.history[-1]["loss"],
    }


# ---------------------------------------------------------------------------
# phase 4: measurement


class SampledMethod(EngineMethod):
    """An engine configuration at a given temperature; each timed pass starts
    fresh statistics, so τ is that of exactly one pass over the prompts."""

    def __init__(self, name: str, target: Target, drafter, k: int, temperature: float, seed: int):
        super().__init__(name, target, drafter, k)
        self.k, self.temperature, self.seed = k, temperature, seed

    def run(self, prompts: list[list[int]], max_new: int) -> list[list[int]]:
        self.engine.stats, self.engine.timing = SpecDecodeStats(), StepTiming()
        return [
            strip_eos(
                self.engine.generate(
                    ids, SamplingParams(temperature=self.temperature, seed=self.seed + i, max_tokens=max_new)
                ),
                self.eos,
            )
            for i, ids in enumerate(prompts)
        ]

    def extra(self) -> dict:
        s = self.engine.stats
        return {
            "tau": round(s.tau, 4),
            "per_position_acceptance": [round(a, 4) for a in s.per_position_acceptance()[: self.k]],
            "step_ms": {k: round(v, 2) for k, v in self.engine.timing.per_step_ms().items()},
        }


def measure_all(
    target: Target, heads: dict[str, Eagle3Head], prompts: list[list[int]], plan: Plan, clock: Clock
) -> dict[float, dict[str, dict]]:
    """temperature -> method name -> measured row (target_only and each head)."""
    out: dict[float, dict[str, dict]] = {}
    for temp in (0.0, 1.0):
        methods = [SampledMethod("target_only", target, NoDrafter(), 0, temp, plan.seed)]
        methods += [
            SampledMethod(n, target, serving_drafter(h, target, n), plan.k, temp, plan.seed)
            for n, h in heads.items()
        ]
        rows = measure(
            methods, prompts, plan.eval_max_tokens, plan.repeats, lambda m, t=temp: clock.say("T=%g %s", t, m)
        )
        out[temp] = {r["method"]: r for r in rows}
    return out


# ---------------------------------------------------------------------------
# report


def goal_check(arms: list[dict], temperature: float) -> dict[str, Any]:
    tau = {a["name"]: a["tau"] for a in arms if a["temperature"] == temperature}
    ratio = tau["opd"] / tau["sft_continued"]
    ordering = {abl: tau["opd"] > tau[abl] for abl in ABLATIONS}
    return {
        "opd_tau": tau["opd"],
        "sft_continued_tau": tau["sft_continued"],
        "opd_over_sft_continued": round(ratio, 4),
        "ratio_met": ratio >= GOAL_RATIO,
        "opd_above_ablation": ordering,
        "ordering_met": all(ordering.values()),
        "met": ratio >= GOAL_RATIO and all(ordering.values()),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    curve = result["sft_curve"]
    ax.plot(
        [p["budget_tokens"] / 1e6 for p in curve], [p["tau"] for p in curve], "k-o", label="sft (to plateau)"
    )
    start = (curve[-1]["budget_tokens"] / 1e6, curve[-1]["tau"])
    for name, info in result["training"].items():
        pts = [start, *((p["budget_tokens"] / 1e6, p["tau"]) for p in info["curve"])]
        final = next(a for a in result["arms"] if a["name"] == name and a["temperature"] == 0.0)
        pts.append(((start[0] * 1e6 + info["trained_tokens"]) / 1e6, final["tau"]))
        width = 2.5 if name in ("opd", "sft_continued") else 1.2
        ax.plot(*zip(*pts, strict=True), "-o", label=name, lw=width)
    goal = result["goal"]
    ax.axhline(
        GOAL_RATIO * goal["sft_continued_tau"],
        ls="--",
        c="grey",
        lw=1,
        label=f"goal: {GOAL_RATIO:.2f} x sft_continued",
    )
    ax.set_xlabel("training budget (millions of head token-positions)")
    ax.set_ylabel("held-out τ (temperature 0)")
    ax.set_title(f"{result['model']}: τ vs training budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    names = ["sft_checkpoint", "sft_continued", *OPD_ARMS]
    rows = {(r["name"], r["temperature"]): r["tau"] for r in [*result["arms"], *result["baselines"]]}
    x = list(range(len(names)))
    for off, temp in ((-0.2, 0.0), (0.2, 1.0)):
        bx.bar([i + off for i in x], [rows[(n, temp)] for n in names], width=0.4, label=f"T={temp:g}")
    bx.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
    bx.set_ylim(1.0, None)
    bx.set_ylabel("held-out τ")
    bx.set_title("after the same extra budget")
    bx.legend(fontsize=8)
    fig.suptitle(
        f"SFT vs Draft-OPD, {result['budget_tokens']:,} head token-positions per arm; {result['device']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def arm_rows(
    measured: dict[float, dict[str, dict]], names: Sequence[str], training: dict[str, dict]
) -> list[dict]:
    rows = []
    for name in names:
        for temp, by_name in measured.items():
            r = by_name[name]
            row = {
                "name": name,
                "temperature": temp,
                "tau": r["tau"],
                "speedup_vs_target_only": r["speedup_vs_target_only"],
                "per_position_acceptance": r.get("per_position_acceptance", []),
                "tokens_per_s": r["tokens_per_s"],
            }
            if name in training:
                row["trained_tokens"] = training[name]["trained_tokens"]
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------
# CLI


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Plan]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--out",
        type=Path,
        default=Path("results/opd_vs_sft.json"),
        help="JSON; the plot goes next to it (.png)",
    )
    ap.add_argument(
        "--quick", action="store_true", help="every phase at a tiny scale (for the test)"
    )
    ap.add_argument(
        "--prompts",
        type=Path,
        help='JSONL of {"prompt": ...} held-out prompts (default: ShareGPT held-out split)',
    )
    ap.add_argument(
        "--dtype",
        default="bfloat16",
        help="target dtype (bfloat16 is faster on CPUs with AVX512-BF16 or AMX; auto: Settings)",
    )
    ap.add_argument("--cache-dir", type=Path, help="default: DRAFTLOOP_CACHE_DIR")
    for f in fields(Plan):
        ap.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(f.default),
            help=f"default {f.default} ({QUICK.__dict__[f.name]} with --quick)",
        )
    args = ap.parse_args(argv)
    base = QUICK if args.quick else Plan()
    plan = replace(
        base, **{f.name: getattr(args, f.name) for f in fields(Plan) if getattr(args, f.name) is not None}
    )
    return args, plan


def main(argv: Sequence[str] | None = None) -> dict:
    args, plan = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(plan.threads)
    torch.manual_seed(plan.seed)
    clock = Clock()
    settings = Settings(dtype=args.dtype, **({"cache_dir": args.cache_dir} if args.cache_dir else {}))
    clock.say("plan: %s", asdict(plan))
    with clock.phase("load"):
        target = load_target(settings)
        heldout = [chat_ids(target.tokenizer, t) for t in eval_prompts(args.prompts, plan.eval_prompts)]
        train_texts = list(sharegpt_prompts("train", limit=plan.sft_prompts + plan.rollout_prompts))
        rollout_ids = [chat_ids(target.tokenizer, t) for t in train_texts[plan.sft_prompts :]]
    evaluate = greedy_evaluator(target, heldout, plan)
    with clock.phase("trajectories"):
        data = load_trajectories(target, train_texts[: plan.sft_prompts], plan, settings.cache_dir)
    with clock.phase("sft_to_plateau"):
        run = sft_to_plateau(target, data, plan, evaluate, clock)
    checkpoint = trainable_copy(run.head, target.model)  # frozen copy of the SFT checkpoint
    budget = math.ceil(plan.budget_epochs * run.epoch_tokens)
    clock.say(
        "sft checkpoint after %d epochs (plateau: %s); extra budget per arm %d head token-positions",
        len(run.curve),
        run.plateaued,
        budget,
    )
    with clock.phase("rollouts"):
        rollouts, rollout_stats = collect_rollouts(target, checkpoint, rollout_ids, plan)
        clock.say("rollouts: %s", rollout_stats)

    def hook_for(name: str) -> Callable[[Eagle3Head], BudgetHook]:
        return lambda head: BudgetHook(
            budget, run.tokens, evaluate, head, clock, name, intermediate_marks(budget, plan.curve_points)
        )

    heads: dict[str, Eagle3Head] = {"sft_checkpoint": checkpoint}
    training: dict[str, dict] = {}
    opd_base = OPDConfig(batch_tokens=plan.batch_tokens, seed=plan.seed, heldout_fraction=0.0)
    requests: dict[str, list[RequestBlocks]] = {}
    for name, overrides in OPD_ARMS.items():
        with clock.phase(f"train_{name}"):
            cfg = replace(opd_base, **overrides)
            if cfg.anchors not in requests:
                requests[cfg.anchors] = opd_requests(target, checkpoint, rollouts, cfg)
            heads[name], training[name] = train_opd_arm(
                checkpoint, target, requests[cfg.anchors], cfg, hook_for(name)
            )
    with clock.phase("train_sft_continued"):
        training["sft_continued"] = continue_sft(run, hook_for("sft_continued")(run.head))
        heads["sft_continued"] = run.head
    with clock.phase("measure"):
        measured = measure_all(target, heads, heldout, plan, clock)

    arm_names = ["sft_continued", *OPD_ARMS]
    arms = arm_rows(measured, arm_names, training)
    result = {
        "issue": 5,
        "claim": "SFT plateaus; Draft-OPD from the SFT checkpoint, given the same extra budget, improves",
        "model": target.name,
        "device": device_name(target.model.device),
        "dtype": str(target.model.dtype).removeprefix("torch."),
        "budget_tokens": budget,
        "budget_definition": BUDGET_DEFINITION,
        "goal": {
            "statement": f"at temperature 0: Draft-OPD τ >= {GOAL_RATIO:.2f} x continued-SFT τ, "
            "and opd above every ablation (reported, not tuned for)",
            **goal_check(arms, 0.0),
            "temperature_1": goal_check(arms, 1.0),
        },
        "sft_curve": run.curve,
        "sft_plateaued": run.plateaued,
        "arms": arms,
        "baselines": arm_rows(measured, ["target_only", "sft_checkpoint"], {}),
        "training": training,
        "rollouts": rollout_stats,
        "config": {
            "plan": asdict(plan),
            "quick": args.quick,
            "sft": asdict(run.cfg),
            "opd": asdict(opd_base),
            "opd_arms": OPD_ARMS,
            "prompts": str(args.prompts) if args.prompts else f"sharegpt heldout[:{len(heldout)}]",
            "sft_prompts": f"sharegpt train[:{plan.sft_prompts}]",
            "rollout_prompts": f"sharegpt train[{plan.sft_prompts}:][:{plan.rollout_prompts}]",
            "threads": torch.get_num_threads(),
        },
        "timings_s": {**clock.phases, "total": round(clock.elapsed(), 1)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    g = result["goal"]
    for a in arms:
        clock.say(
            "%-15s T=%g τ %.3f speedup %.2fx",
            a["name"],
            a["temperature"],
            a["tau"],
            a["speedup_vs_target_only"],
        )
    clock.say(
        "goal %s: opd/sft_continued %.3f (need %.2f), ordering %s; wrote %s and %s",
        "met" if g["met"] else "not met",
        g["opd_over_sft_continued"],
        GOAL_RATIO,
        g["opd_above_ablation"],
        args.out,
        args.out.with_suffix(".png"),
    )
    return result


if __name__ == "__main__":
    main()
