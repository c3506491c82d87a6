"""The live regression guard: after the server swaps in a newer drafter version,
compare what it serves with the previous version's, request by request, on
two measures, and say when to roll back.

The two measures of a finished request:
- served τ: 1 + accepted / verify steps that drafted, over the request's own
  steps (what the drafter guesses right);
- decode speed: tokens its decode steps produced per second of those steps'
  draft + verify time (what the server gains: a head that guesses as well but
  drafts slower, or drafts longer for nothing, shows up here and not in τ).
Every request weighs the same, long or short. The previous version's sample is
its last `window` requests before the swap; the new version's, its requests
since. `metric_verdict` is the rule on one measure and `guard_verdict` combines
the two (pure functions); `RegressionGuard` keeps the samples (fed from the
engine thread) and the version it watches (set by the reloader, which acts on
the verdict: service/reloader.py).

The rule on one measure: with d = mean(new) - mean(old) and its standard error
se = sqrt(var(new)/n_new + var(old)/n_old) (Welch), roll back when even the
upper confidence bound d + z·se is below -margin·mean(old), i.e. the new
version is worse by more than the margin with confidence; stop watching
(keep it) once the new sample has `window` requests without that; wait while
either sample is below `min_requests` (a previous version that served fewer
than that before the swap is no baseline: the new one is kept after a window).
A verdict is taken at every reloader tick, so z is high (3 by default) to keep
repeated looks from rolling back a version that is not worse. Traffic that
changes between the two windows moves τ too: the margin absorbs small shifts.
The two measures combined: roll back when either says so (the reason names
which: `tau_regression` or `speed_regression`); otherwise τ's verdict stands
(the two samples fill together, one value of each per request).
Speed also moves with load (more sequences per step), so it gets its own,
wider margin (DRAFTLOOP_GUARD_SPEED_MARGIN)."""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

VersionKey = tuple[str, str]  # (checkpoint kind, version), e.g. ("eagle3", "3")


@dataclass(frozen=True)
class Verdict:
    decision: str  # "wait" | "keep" | "rollback"
    reason: str
    old_tau: float | None = None  # mean of the measure the verdict rests on (τ, or tokens/s for speed)
    new_tau: float | None = None
    upper: float | None = None  # upper confidence bound of mean(new) - mean(old)
    measure: str = "tau"  # "tau" | "speed": which measure decided (the rollback reason's label)

    @property
    def label(self) -> str:
        return f"{self.measure}_regression"


@dataclass(frozen=True)
class RequestSample:
    """One finished request, as the guard sees it."""

    tau: float
    tokens_per_s: float | None  # None when its decode steps took no measurable time


def _mean_var(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and unbiased variance (0 for a single value)."""
    n = len(xs)
    mean = sum(xs) / n
    var = sum((x - mean) ** 2 for x in xs) / (n - 1) if n > 1 else 0.0
    return mean, var


def metric_verdict(
    old: Sequence[float],
    new: Sequence[float],
    *,
    margin: float,
    z: float,
    min_requests: int,
    window: int,
    measure: str = "tau",
) -> Verdict:
    """Roll back, keep, or wait, from one per-request measure (served τ, or decode
    tokens/s) of the previous (`old`) and the new version (`new`); see the module
    docstring for the rule."""
    name, fmt = ("served τ", "{:.3f}") if measure == "tau" else ("decode speed", "{:.1f} tok/s")
    if len(old) < min_requests and len(new) >= window:
        served = f"the previous version served {len(old)} requests before the swap"
        return Verdict("keep", f"no baseline: {served}", measure=measure)
    if len(old) < min_requests or len(new) < min_requests:
        counts = f"{len(old)} requests before the swap, {len(new)} after"
        return Verdict("wait", f"{counts}; need {min_requests} each", measure=measure)
    m_old, v_old = _mean_var(old)
    m_new, v_new = _mean_var(new)
    upper = (m_new - m_old) + z * math.sqrt(v_new / len(new) + v_old / len(old))
    stats = {"old_tau": m_old, "new_tau": m_new, "upper": upper, "measure": measure}
    a, b = fmt.format(m_new), fmt.format(m_old)
    if upper < -margin * m_old:
        reason = (
            f"{name} {a} over {len(new)} requests vs {b} over {len(old)} before: "
            f"worse by more than {margin:.0%} (upper bound of the difference {upper:+.3f}, z={z:g})"
        )
        return Verdict("rollback", reason, **stats)
    if len(new) >= window:
        reason = f"{name} {a} vs {b} over a full window: not worse beyond the margin"
        return Verdict("keep", reason, **stats)
    return Verdict("wait", f"{name} {a} vs {b}, {len(new)}/{window} requests", **stats)


def tau_verdict(old: Sequence[float], new: Sequence[float], **rule: Any) -> Verdict:
    """`metric_verdict` on served τ."""
    return metric_verdict(old, new, measure="tau", **rule)


def guard_verdict(
    old: Sequence[RequestSample],
    new: Sequence[RequestSample],
    *,
    margin: float,
    speed_margin: float,
    z: float,
    min_requests: int,
    window: int,
) -> Verdict:
    """Both measures: roll back when either says so (τ first), else τ's verdict."""
    rule = {"z": z, "min_requests": min_requests, "window": window}
    tau = metric_verdict([s.tau for s in old], [s.tau for s in new], margin=margin, measure="tau", **rule)
    speed = metric_verdict(
        [s.tokens_per_s for s in old if s.tokens_per_s is not None],
        [s.tokens_per_s for s in new if s.tokens_per_s is not None],
        margin=speed_margin, measure="speed", **rule,
    )  # fmt: skip
    return speed if speed.decision == "rollback" and tau.decision != "rollback" else tau


@dataclass(frozen=True)
class Watch:
    """A swap under watch: the version before and the version after."""

    old: VersionKey
    new: VersionKey
    old_path: str  # the old version's checkpoint directory, for the pointer to go back to


class RegressionGuard:
    """Per-version samples of served τ and the swap being watched. Thread-safe:
    `observe` runs on the engine thread, the rest on the reloader's."""

    def __init__(
        self, *, window: int, min_requests: int, margin: float, z: float, speed_margin: float = 0.15
    ) -> None:
        self.window = window
        self.min_requests = min_requests
        self.margin = margin
        self.speed_margin = speed_margin
        self.z = z
        self._samples: dict[VersionKey, deque[RequestSample]] = {}
        self._watch: Watch | None = None
        self._lock = threading.Lock()

    def observe(
        self,
        version: VersionKey,
        num_drafts: int,
        num_accepted: int,
        decode_tokens: int = 0,
        decode_s: float = 0.0,
    ) -> None:
        """A finished request served by `version`: its drafted steps, accepted
        drafts, and the tokens and seconds of its decode steps. Requests that
        never drafted carry no τ and are not sampled."""
        if num_drafts <= 0:
            return
        speed = decode_tokens / decode_s if decode_s > 0 and decode_tokens > 0 else None
        with self._lock:
            sample = self._samples.get(version)
            if sample is None:
                sample = self._samples[version] = deque(maxlen=self.window)
            sample.append(RequestSample(1.0 + num_accepted / num_drafts, speed))

    def watch(self, old: VersionKey, new: VersionKey, old_path: str) -> None:
        """Start comparing `new` (just swapped in) with `old` (its last `window` requests)."""
        with self._lock:
            # keep the old version's recent requests; the rest (the new one, if seen before) starts afresh
            self._samples = {old: self._samples[old]} if old in self._samples else {}
            self._watch = Watch(old, new, old_path)
        log.info("regression guard: watching %s v%s against %s v%s", *new, *old)

    @property
    def watching(self) -> Watch | None:
        return self._watch

    def stop_watching(self) -> None:
        with self._lock:
            self._watch = None

    def verdict(self) -> Verdict | None:
        """The verdict on the watched swap; None when nothing is watched."""
        with self._lock:
            w = self._watch
            if w is None:
                return None
            old = list(self._samples.get(w.old, ()))
            new = list(self._samples.get(w.new, ()))
        return guard_verdict(
            old, new, margin=self.margin, speed_margin=self.speed_margin, z=self.z,
            min_requests=self.min_requests, window=self.window,
        )  # fmt: skip
