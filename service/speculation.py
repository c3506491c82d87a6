"""Adaptive speculation: how many tokens each running sequence drafts this step.

Speculation and batching trade against each other. A verify forward over N
rows costs t(N) (the measured cost-vs-rows curve of this machine and dtype,
`service.costmodel`); a one-row forward is weight-bandwidth bound, so on a
small batch extra rows are almost free, and on a large one they cost nearly
their full share. Each sequence i keeps a running estimate α_i of the chance
that one drafted token is accepted (`AcceptanceTracker`), so drafting K_i
tokens yields E_i(K_i) = 1 + α_i + … + α_i^K_i tokens (a chain: token j counts
only when tokens 1..j-1 did). The step's goodput is

    G(K) = Σ_i E_i(K_i) / (t(Σ_i (K_i + 1)) + draft_cost · Σ_i K_i)

and `choose_lengths` picks the K (each within its cap) that maximises it. Adding
one token to sequence i raises the numerator by α_i^(K_i+1) and the denominator
by the same amount whichever i it is, so the best next token is always the one
with the largest α_i^(K_i+1); the rule walks that greedy path to the caps and
keeps the best point on it (the curve need not be smooth). K = 0 for everyone
is on the path: speculation runs only where it pays.

Exploration. A sequence held at K = 0 measures nothing: its estimate, the
block log that trains the drafter, and the regression guard's per-request τ
would all go without data, and a weak or new drafter would never be drafted
again (a soak saw 11 drafted tokens in 33k steps). So once the policy has held
`explore_every` sequence-steps at K = 0, the sequence idle longest drafts its
cap once, whatever the rule says: ≤ 1/explore_every of an idle drafter's
steps, short requests included; its rows still count in the others' choice.

Pure functions and a small mutable estimate; the engine calls them each step
(service/engine.py)."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise

PRIOR_ACCEPTED = 1.0  # pseudo-counts: a new sequence starts at α = 0.5 ...
PRIOR_REJECTED = 1.0  # ... and its own blocks take over after a few steps
DECAY = 0.9  # per step: acceptance drifts along a request (code, then prose)


@dataclass
class AcceptanceTracker:
    """Running per-token acceptance of one sequence's drafts.

    Under the chain model a block of K drafts with n accepted shows n accepts
    and, when n < K, one rejection; the estimate is the decayed
    accepts / (accepts + rejections), which is the maximum-likelihood α of a
    truncated geometric over the recent blocks."""

    accepted: float = PRIOR_ACCEPTED
    rejected: float = PRIOR_REJECTED
    held: int = 0  # steps in a row held at K = 0 by the policy (who explores first)

    def observe(self, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        self.accepted = DECAY * self.accepted + accepted
        self.rejected = DECAY * self.rejected + (1.0 if accepted < drafted else 0.0)

    def idle(self) -> None:
        """A step the policy held this sequence at K = 0: drift towards the prior."""
        self.accepted = DECAY * self.accepted + (1 - DECAY) * PRIOR_ACCEPTED
        self.rejected = DECAY * self.rejected + (1 - DECAY) * PRIOR_REJECTED

    @property
    def alpha(self) -> float:
        return self.accepted / (self.accepted + self.rejected)


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens one verify step yields with k drafts: 1 + α + … + α^k."""
    return float(sum(alpha**j for j in range(k + 1)))


def curve_cost(points: Sequence[tuple[int, float]]) -> Callable[[int], float]:
    """Seconds of a forward of n rows, from measured (rows, seconds) points:
    piecewise linear between them, the first point's below, and the slope of
    the last two beyond (more rows never cost less)."""
    pts = sorted(points)
    if not pts:
        raise ValueError("no cost points")

    def cost(n: int) -> float:
        if n <= pts[0][0] or len(pts) == 1:
            return pts[0][1] if n <= pts[0][0] else pts[0][1] * n / pts[0][0]
        for (r0, s0), (r1, s1) in pairwise(pts):
            if n <= r1:
                return s0 + (s1 - s0) * (n - r0) / (r1 - r0)
        (r0, s0), (r1, s1) = pts[-2], pts[-1]
        return s1 + max(s1 - s0, 0.0) / (r1 - r0) * (n - r1)

    return cost


def choose_lengths(
    alphas: Sequence[float],
    caps: Sequence[int],
    cost: Callable[[int], float],
    draft_cost: float = 0.0,
    floors: Sequence[int] | None = None,
) -> list[int]:
    """Draft lengths K_i ∈ [floors[i], caps[i]] maximising the step's goodput
    (module docstring). draft_cost: seconds of one drafted token's own draft
    step. floors (default 0): lengths fixed beforehand, whose rows still count."""
    n = len(alphas)
    ks = list(floors) if floors is not None else [0] * n
    if n == 0:
        return ks
    start = list(ks)
    tokens = sum(expected_tokens(a, k) for a, k in zip(alphas, ks, strict=True))
    drafted = sum(ks)
    rows = n + drafted
    best_rate, best_drafted = tokens / (cost(rows) + draft_cost * drafted), 0
    # max-heap of each open sequence's next gain α^(K+1); the path is replayed to its best point
    heap = [(-(alphas[i] ** (ks[i] + 1)), i) for i in range(n) if ks[i] < caps[i]]
    heapq.heapify(heap)
    path: list[int] = []
    while heap:
        gain, i = heapq.heappop(heap)
        tokens -= gain
        ks[i] += 1
        path.append(i)
        rows, drafted = rows + 1, drafted + 1
        rate = tokens / (cost(rows) + draft_cost * drafted)
        if rate > best_rate:
            best_rate, best_drafted = rate, len(path)
        if ks[i] < caps[i]:
            heapq.heappush(heap, (gain * alphas[i], i))
    for i in path[:best_drafted]:
        start[i] += 1
    return start


class DraftLengthPolicy:
    """The engine's draft-length decision each step: `fixed` drafts up to each
    sequence's cap; `adaptive` runs `choose_lengths` over the step's decoding
    sequences with this machine's cost curve and the drafter's own cost per
    drafted token (a running mean of what drafting took). A sequence held at
    K = 0 learns nothing about its acceptance, so its estimate drifts back to
    the prior (`AcceptanceTracker.idle`), and after `explore_every` such steps
    it drafts its cap once (module docstring; 0: never)."""

    def __init__(
        self, mode: str = "fixed", cost_points: Sequence[tuple[int, float]] = (), explore_every: int = 0
    ) -> None:
        if mode not in ("fixed", "adaptive"):
            raise ValueError(f"speculation must be fixed or adaptive, not {mode!r}")
        if explore_every < 0:
            raise ValueError(f"explore_every must be >= 0, not {explore_every}")
        self.explore_every = explore_every
        self.held = 0  # sequence-steps held at K = 0 since the last exploration
        self.adaptive = mode == "adaptive" and len(cost_points) > 0
        self.cost = curve_cost(cost_points) if self.adaptive else None
        self.draft_cost = 0.0  # seconds per drafted token, running mean

    def observe_draft(self, seconds: float, drafted: int) -> None:
        if drafted > 0:
            self.draft_cost = 0.9 * self.draft_cost + 0.1 * seconds / drafted

    def lengths(
        self, trackers: Sequence[AcceptanceTracker], caps: Sequence[int], pinned: Sequence[bool] | None = None
    ) -> list[int]:
        """Each sequence's draft length; a `pinned` one drafts its cap whatever
        the rule would pick (its rows still count in the others' choice)."""
        if self.cost is None:
            return list(caps)
        floors = [c if p else 0 for c, p in zip(caps, pinned or [False] * len(caps), strict=True)]
        idle = [i for i, c in enumerate(caps) if c > 0 and not floors[i]]
        if self.explore_every and self.held >= self.explore_every and idle:
            first = max(idle, key=lambda i: trackers[i].held)  # the longest idle (the earliest on a tie)
            floors[first] = caps[first]
            self.held = 0
        ks = choose_lengths([t.alpha for t in trackers], caps, self.cost, self.draft_cost, floors)
        for t, k, cap in zip(trackers, ks, caps, strict=True):
            if k == 0 and cap > 0:
                t.idle()
                t.held += 1
                self.held += 1
            else:
                t.held = 0
        return ks
