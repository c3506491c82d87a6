"""The live regression guard: after the server swaps in a newer drafter version,
compare the acceptance it serves with the previous version's, request by
request, and say when to roll back.

The sample of a version is the served τ of each of its finished requests
(1 + accepted / verify steps that drafted, over the request's own steps), so
every request weighs the same, long or short. The previous version's sample
is its last `window` requests before the swap; the new version's, its requests
since. `tau_verdict` is the rule (a pure function); `RegressionGuard` keeps the
samples (fed from the engine thread) and the version it watches (set by the
reloader, which acts on the verdict: service/reloader.py).

The rule: with d = mean(new) - mean(old) and its standard error
se = sqrt(var(new)/n_new + var(old)/n_old) (Welch), roll back when even the
upper confidence bound d + z·se is below -margin·mean(old), i.e. the new
version is worse by more than the margin with confidence; stop watching
(keep it) once the new sample has `window` requests without that; wait while
either sample is below `min_requests` (a previous version that served fewer
than that before the swap is no baseline: the new one is kept after a window).
A verdict is taken at every reloader tick, so z is high (3 by default) to keep
repeated looks from rolling back a version that is not worse. Traffic that
changes between the two windows moves τ too: the margin absorbs small shifts."""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

VersionKey = tuple[str, str]  # (checkpoint kind, version), e.g. ("eagle3", "3")


@dataclass(frozen=True)
class Verdict:
    decision: str  # "wait" | "keep" | "rollback"
    reason: str
    old_tau: float | None = None
    new_tau: float | None = None
    upper: float | None = None  # upper confidence bound of mean(new) - mean(old)


def _mean_var(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and unbiased variance (0 for a single value)."""
    n = len(xs)
    mean = sum(xs) / n
    var = sum((x - mean) ** 2 for x in xs) / (n - 1) if n > 1 else 0.0
    return mean, var


def tau_verdict(
    old: Sequence[float], new: Sequence[float], *, margin: float, z: float, min_requests: int, window: int
) -> Verdict:
    """Roll back, keep, or wait, from per-request served τ of the previous (`old`)
    and the new version (`new`); see the module docstring for the rule."""
    if len(old) < min_requests and len(new) >= window:
        served = f"the previous version served {len(old)} requests before the swap"
        return Verdict("keep", f"no baseline: {served}")
    if len(old) < min_requests or len(new) < min_requests:
        counts = f"{len(old)} requests before the swap, {len(new)} after"
        return Verdict("wait", f"{counts}; need {min_requests} each")
    m_old, v_old = _mean_var(old)
    m_new, v_new = _mean_var(new)
    upper = (m_new - m_old) + z * math.sqrt(v_new / len(new) + v_old / len(old))
    stats = {"old_tau": m_old, "new_tau": m_new, "upper": upper}
    if upper < -margin * m_old:
        reason = (
            f"served τ {m_new:.3f} over {len(new)} requests vs {m_old:.3f} over {len(old)} before: "
            f"worse by more than {margin:.0%} (upper bound of the difference {upper:+.3f}, z={z:g})"
        )
        return Verdict("rollback", reason, **stats)
    if len(new) >= window:
        reason = f"served τ {m_new:.3f} vs {m_old:.3f} over a full window: not worse beyond the margin"
        return Verdict("keep", reason, **stats)
    return Verdict("wait", f"served τ {m_new:.3f} vs {m_old:.3f}, {len(new)}/{window} requests", **stats)


@dataclass(frozen=True)
class Watch:
    """A swap under watch: the version before and the version after."""

    old: VersionKey
    new: VersionKey
    old_path: str  # the old version's checkpoint directory, for the pointer to go back to


class RegressionGuard:
    """Per-version samples of served τ and the swap being watched. Thread-safe:
    `observe` runs on the engine thread, the rest on the reloader's."""

    def __init__(self, *, window: int, min_requests: int, margin: float, z: float) -> None:
        self.window = window
        self.min_requests = min_requests
        self.margin = margin
        self.z = z
        self._samples: dict[VersionKey, deque[float]] = {}
        self._watch: Watch | None = None
        self._lock = threading.Lock()

    def observe(self, version: VersionKey, num_drafts: int, num_accepted: int) -> None:
        """A finished request served by `version`; requests that never drafted carry no τ."""
        if num_drafts <= 0:
            return
        with self._lock:
            sample = self._samples.get(version)
            if sample is None:
                sample = self._samples[version] = deque(maxlen=self.window)
            sample.append(1.0 + num_accepted / num_drafts)

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
        return tau_verdict(
            old, new, margin=self.margin, z=self.z, min_requests=self.min_requests, window=self.window
        )
