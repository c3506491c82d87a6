"""The publish gate: a candidate drafter against the incumbent serving drafter,
by real greedy speculative decoding on the same held-out requests.

Both drafters run through `service.engine.Engine.generate` at the served K,
with full-length drafts (no confidence stop: a truncated draft path cannot
show that a new head drafts longer). Per request, τ = (accepted + 1) per
verify step, averaged over every verify step of the request (a step whose
drafter proposed nothing counts as τ = 1: it is a target forward that emitted
one token). The decision is a paired bootstrap over requests of the mean
per-request τ difference candidate - incumbent: publish only when the lower
bound of its interval is above 0, so a tie is never published.

The statistics (`bootstrap_ci`, `decide`) are pure functions; `run_gate`
decodes; `gate_prompts` picks the requests; `candidate_drafter` wraps a new
head the way the serving drafter wraps its own."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from service.drafters.base import Drafter
from service.drafters.eagle3 import Eagle3Drafter, Eagle3Head
from service.drafters.hybrid import HybridDrafter
from service.llama import LlamaModel

log = logging.getLogger(__name__)

MIN_REQUESTS = 2  # a single request cannot say anything about the spread
CANDIDATE_VERSION = "candidate"

# serving kind -> how a candidate eagle3 drafter (full-length, of the new head) is
# wrapped to serve like that kind; kinds not listed serve the head itself
CandidateWrapper = Callable[[Drafter, Eagle3Drafter], Drafter]  # (incumbent, head drafter) -> candidate
CANDIDATE_WRAPPERS: dict[str, CandidateWrapper] = {}  # filled below the wrappers' definitions


@dataclass
class GateResult:
    """One gate decision, as it goes into the run's report."""

    publish: bool
    reason: str
    incumbent: str  # "<kind> <version>" of the serving drafter
    candidate: str
    k: int  # drafted tokens per step (the served K)
    requests: int  # paired requests compared
    incumbent_tau: float | None  # mean per-request τ
    candidate_tau: float | None
    diff: float | None  # candidate - incumbent, mean over requests
    low: float | None  # the bootstrap interval of `diff`
    high: float | None
    level: float
    resamples: int
    max_tokens: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------
# the statistics


def bootstrap_ci(
    diffs: Sequence[float], level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `diffs` (paired per-request
    differences): resample them with replacement `resamples` times with a
    numpy Generator seeded by `seed` -> (low, high) at `level`."""
    x = np.asarray(diffs, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError("bootstrap_ci needs a non-empty 1-d sequence of differences")
    if not 0.0 < level < 1.0 or resamples < 1:
        raise ValueError(f"bad level {level} or resamples {resamples}")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def decide(
    incumbent_taus: Sequence[float],
    candidate_taus: Sequence[float],
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[bool, str, float | None, float | None]:
    """Paired per-request τ of the two drafters on the same requests ->
    (publish, reason, low, high): publish only when the interval's lower
    bound of the mean difference candidate - incumbent is above 0."""
    if len(incumbent_taus) != len(candidate_taus):
        raise ValueError("the two drafters must be measured on the same requests")
    if len(incumbent_taus) < MIN_REQUESTS:
        return False, f"too few gate requests ({len(incumbent_taus)} < {MIN_REQUESTS})", None, None
    diffs = np.asarray(candidate_taus, dtype=np.float64) - np.asarray(incumbent_taus, dtype=np.float64)
    low, high = bootstrap_ci(diffs, level, resamples, seed)
    ci = f"{level:.0%} interval of the τ gain [{low:+.4f}, {high:+.4f}]"
    if low > 0.0:
        return True, f"candidate drafts longer: {ci} is above 0", low, high
    if not diffs.any():
        return False, f"a tie: every request has the same τ ({ci})", low, high
    return False, f"no clear gain: {ci} does not lie above 0", low, high


# ---------------------------------------------------------------------------
# decoding


def request_taus(
    target: Any, drafter: Drafter, prompts: Sequence[Sequence[int]], k: int, max_tokens: int
) -> list[float | None]:
    """Greedy τ of each request through the real engine (`target`: a
    service.runtime.Target): (accepted + 1) averaged over the request's
    verify steps; None for a request that ended before its first step."""
    from service.engine import Engine
    from service.sampling import SamplingParams

    engine = Engine(target.model, drafter, target.eos_token_ids, k)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    out: list[float | None] = []
    for i, ids in enumerate(prompts):
        steps0, accepted0 = engine.timing.steps, engine.stats.num_accepted_tokens
        engine.generate(list(ids), params, request_id=f"gate-{i}")
        steps = engine.timing.steps - steps0
        out.append(1.0 + (engine.stats.num_accepted_tokens - accepted0) / steps if steps else None)
    return out


def full_length(drafter: Drafter) -> Drafter:
    """The drafter without its confidence stop (drafts all K tokens), in place:
    an eagle3 head's constant and measured per-slot thresholds both go to 0,
    and so do those of the head inside a hybrid (which cut its lookup tokens too)."""
    for part in (drafter, getattr(drafter, "head", None)):
        if isinstance(part, Eagle3Drafter):
            part.min_confidence = 0.0
            part.stop_thresholds = ()
    return drafter


def _as_hybrid(incumbent: Drafter, head: Eagle3Drafter) -> Drafter:
    """The candidate head with the serving hybrid's prompt lookup and rule."""
    return HybridDrafter(head, incumbent.lookup, incumbent.min_match)  # type: ignore[attr-defined]


CANDIDATE_WRAPPERS["hybrid"] = _as_hybrid


def serving_copy(head: Eagle3Head, model: LlamaModel) -> Eagle3Head:
    """A fresh head with `head`'s weights, attached to `model` as a loaded
    checkpoint is (the drafter converts it to the target's dtype in place,
    so the trained head itself is left as it is)."""
    new = Eagle3Head(head.cfg)
    new.load_state_dict({k: v.detach().clone() for k, v in head.state_dict().items()})
    return new.attach(model)


def candidate_drafter(incumbent: Drafter, head: Eagle3Head, model: LlamaModel) -> Drafter:
    """The new head wrapped as the incumbent's kind serves a head (eagle3 for
    eagle3, ngram and none; a registered wrapper for other kinds), full-length."""
    drafter = Eagle3Drafter(serving_copy(head, model), model, version=CANDIDATE_VERSION, min_confidence=0.0)
    wrap = CANDIDATE_WRAPPERS.get(incumbent.kind)
    return full_length(wrap(incumbent, drafter)) if wrap is not None else drafter


def gate_prompts(
    tokenizer: Any, served: Sequence[Sequence[int]], want: int, max_prompt_len: int
) -> list[list[int]]:
    """The gate's requests: the served held-out prompts (distinct, at most
    `max_prompt_len` tokens), topped up to `want` with held-out ShareGPT
    prompts through the chat template, taken from the end of that split:
    every benchmark evaluates on its first prompts (`worker.prompts.eval_prompts`),
    and a gate choosing versions on those would inflate their held-out gains."""
    from worker.prompts import chat_ids, gate_topup_prompts

    out: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()

    def add(ids: Sequence[int]) -> None:
        key = tuple(int(t) for t in ids)
        if key and len(key) <= max_prompt_len and key not in seen:
            seen.add(key)
            out.append(list(key))

    for ids in served:
        add(ids)
    if len(out) < want:
        for text in gate_topup_prompts(4 * want):
            add(chat_ids(tokenizer, text))
            if len(out) >= want:
                break
    return out


def run_gate(
    target: Any,
    incumbent: Drafter,
    candidate: Drafter,
    prompts: Sequence[Sequence[int]],
    k: int,
    cfg: Any,
) -> GateResult:
    """Both drafters on `prompts` at K = `k` (full-length drafts), then
    `decide`. `target`: a service.runtime.Target; `cfg`: an OPDConfig (its
    gate_max_tokens, gate_level, gate_resamples and seed)."""
    full_length(incumbent)
    inc = request_taus(target, incumbent, prompts, k, cfg.gate_max_tokens)
    cand = request_taus(target, candidate, prompts, k, cfg.gate_max_tokens)
    pairs = [(a, b) for a, b in zip(inc, cand, strict=True) if a is not None and b is not None]
    inc_t, cand_t = [a for a, _ in pairs], [b for _, b in pairs]
    publish, reason, low, high = decide(inc_t, cand_t, cfg.gate_level, cfg.gate_resamples, cfg.seed)
    mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
    result = GateResult(
        publish=publish,
        reason=reason,
        incumbent=f"{incumbent.kind} {incumbent.version}",
        candidate=f"{candidate.kind} {candidate.version}",
        k=k,
        requests=len(pairs),
        incumbent_tau=mean(inc_t),
        candidate_tau=mean(cand_t),
        diff=float(np.mean(np.subtract(cand_t, inc_t))) if pairs else None,
        low=low,
        high=high,
        level=cfg.gate_level,
        resamples=cfg.gate_resamples,
        max_tokens=cfg.gate_max_tokens,
    )
    log.info(
        "gate: %s τ %s vs %s τ %s over %d requests at K=%d: %s",
        result.candidate, result.candidate_tau, result.incumbent, result.incumbent_tau, result.requests, k,
        reason,
    )  # fmt: skip
    return result
