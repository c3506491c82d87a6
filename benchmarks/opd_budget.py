"""The OPD-vs-SFT benchmark's sizes and bookkeeping (benchmarks/opd_vs_sft.py):
its `Plan`, a phase clock for progress lines, held-out greedy τ of a head
under training, and `BudgetHook`, which counts each arm's head
token-positions, evaluates at marks along the budget and stops the arm when
the budget is spent (the equal-compute rule of that benchmark)."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from service.drafters.eagle3 import DEFAULT_MIN_CONFIDENCE, Eagle3Drafter, Eagle3Head
from service.runtime import Target
from worker.train.evaluate import evaluate_tau

log = logging.getLogger("benchmarks.opd_vs_sft")


@dataclass
class Plan:
    """The run's sizes (CLI flags of the same names override them)."""

    sft_prompts: int = (
        512  # training-split prompts of the SFT trajectories (train-sft's default: cache shared)
    )
    sft_max_new_tokens: int = 128
    gen_batch_size: int = 128
    draft_vocab_size: int = 8192
    sft_max_epochs: int = 6  # the SFT LR schedule's length
    patience: int = 1  # epochs without a gain of min_delta in τ before SFT counts as plateaued
    min_delta: float = 0.01
    batch_tokens: int = 2048  # padded tokens per optimizer step, SFT and OPD alike
    rollout_prompts: int = 48  # training-split prompts after the SFT ones
    rollout_max_tokens: int = 128
    # the rollout drafter's early stop (the serving default; 0: always K drafts, more rejected-stream rows)
    rollout_min_confidence: float = DEFAULT_MIN_CONFIDENCE
    budget_epochs: float = 0.5  # extra training budget per arm, in SFT epochs' head token-positions
    eval_prompts: int = 12  # held-out prompts (τ curve and measurement)
    eval_max_tokens: int = 64
    curve_points: int = 2  # τ points along each arm's extra budget (the last one is the measurement)
    k: int = 4  # speculative tokens per step
    repeats: int = 1  # timed passes per method and temperature (median tokens/s)
    seed: int = 0
    threads: int = 1


# `--quick`: every phase on a tiny scale (tests/test_opd_vs_sft.py), by phase
QUICK = Plan(
    sft_prompts=24, sft_max_new_tokens=32, gen_batch_size=24, draft_vocab_size=2048,  # trajectories
    sft_max_epochs=3, batch_tokens=1024,  # training
    rollout_prompts=6, rollout_max_tokens=32,  # rollouts
    eval_prompts=3, eval_max_tokens=24, curve_points=1,  # measurement
)


# ---------------------------------------------------------------------------
# progress


class Clock:
    """Elapsed time in every log line, and the duration of each phase."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.phases: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def say(self, msg: str, *args: Any) -> None:
        log.info("[%6.0fs] " + msg, self.elapsed(), *args)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        self.say("phase %s ...", name)
        yield
        self.phases[name] = round(time.perf_counter() - start, 1)
        self.say("phase %s done in %.0f s", name, self.phases[name])


# ---------------------------------------------------------------------------
# heads, drafters, τ


def serving_drafter(
    head: Eagle3Head, target: Target, version: str, min_confidence: float = DEFAULT_MIN_CONFIDENCE
) -> Eagle3Drafter:
    """A drafter on a copy of `head`: serving casts and re-attaches the head it
    gets, which must not touch one still being trained."""
    copy = Eagle3Head(head.cfg)
    copy.load_state_dict(head.state_dict())
    return Eagle3Drafter(copy, target.model, version=version, min_confidence=min_confidence)


Evaluate = Callable[[Eagle3Head], tuple[float, list[float]]]


def greedy_evaluator(target: Target, prompts: list[list[int]], plan: Plan) -> Evaluate:
    """Held-out greedy τ and per-position acceptance of a head, by real decoding
    (the same prompts and length as the temperature-0 measurement, so the
    curves end where the measured τ is)."""

    def evaluate(head: Eagle3Head) -> tuple[float, list[float]]:
        tau, per_pos = evaluate_tau(
            target, serving_drafter(head, target, "eval"), prompts, plan.k, plan.eval_max_tokens
        )
        return round(tau, 4), [round(a, 4) for a in per_pos]

    return evaluate


@dataclass
class BudgetHook:
    """`on_step` hook of one arm: counts head token-positions, records held-out
    τ at intermediate marks of the budget, stops once the budget is reached."""

    budget: int
    start_tokens: int  # x of the arm's first point (budget spent before it)
    evaluate: Evaluate
    head: Eagle3Head
    clock: Clock
    name: str
    marks: list[int] = field(default_factory=list)  # intermediate budgets to evaluate at
    tokens: int = 0
    steps: int = 0
    max_step_tokens: int = 0
    curve: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, record: dict) -> bool:
        self.tokens += record["tokens"]
        self.steps += 1
        self.max_step_tokens = max(self.max_step_tokens, record["tokens"])
        while self.marks and self.tokens >= self.marks[0]:
            self.marks.pop(0)
            tau, per_pos = self.evaluate(self.head)
            self.curve.append(
                {
                    "budget_tokens": self.start_tokens + self.tokens,
                    "tau": tau,
                    "per_position_acceptance": per_pos,
                }
            )
            self.clock.say(
                "%s: %d/%d head token-positions, held-out greedy τ %.3f",
                self.name,
                self.tokens,
                self.budget,
                tau,
            )
        return self.tokens >= self.budget

    def summary(self, seconds: float) -> dict[str, Any]:
        return {
            "trained_tokens": self.tokens,
            "steps": self.steps,
            "max_step_tokens": self.max_step_tokens,
            "train_seconds": round(seconds, 1),
            "curve": self.curve,
        }


def intermediate_marks(budget: int, points: int) -> list[int]:
    return [math.ceil(budget * i / points) for i in range(1, points)]
