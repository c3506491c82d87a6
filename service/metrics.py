"""Prometheus metrics and the one stats object that feeds them.

Names follow docs/architecture.md ("Where to add … a metric"): prefix
`draftloop_`, counters end in `_total`, base units; rates (acceptance rate,
tokens/s) are left to PromQL."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

MAX_POSITIONS = 16


class Metrics:
    """All series of one server, on their own registry (tests build several)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        p = "draftloop_"
        self.drafts = Counter(p + "spec_decode_drafts", "Verify steps that checked >= 1 drafted token", registry=r)
        self.draft_tokens = Counter(p + "spec_decode_draft_tokens", "Drafted tokens sent to verification", registry=r)
        self.accepted_tokens = Counter(p + "spec_decode_accepted_tokens", "Drafted tokens accepted", registry=r)
        self.accepted_per_position = Counter(
            p + "spec_decode_accepted_tokens_per_position",
            "Drafted tokens accepted at each draft position (0-based)",
            ["position"],
            registry=r,
        )
        self.acceptance_length = Histogram(
            p + "spec_decode_acceptance_length",
            "Tokens emitted per verify step (accepted + 1)",
            buckets=tuple(range(1, MAX_POSITIONS + 2)),
            registry=r,
        )
        self._add_load_series(r, p)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter(p + "requests", "Finished requests", ["finish_reason"], registry=r)
        self.running = Gauge(p + "num_requests_running", "Sequences being decoded", registry=r)
        self.waiting = Gauge(p + "num_requests_waiting", "Sequences waiting for a slot", registry=r)
        self.block_records_written = Counter(
            p + "block_records_written", "Block records written to Redis", registry=r
        )
        self.block_records_dropped = Counter(
            p + "block_records_dropped", "Block records dropped (queue full or Redis unavailable)", registry=r
        )
        self.block_backlog = Gauge(
            p + "block_backlog",
            "Block records the training consumer group has not finished, read at scrape time: "
            "undelivered (no worker read them yet) and pending (read, not acked: an update under way, or a worker that died)",
            ["state"],
            registry=r,
        )
        self.drafter_version = Gauge(p + "drafter_version", "Version number of the serving drafter", registry=r)
        self.drafter_info = Gauge(
            p + "drafter_info", "The serving drafter (value 1)", ["kind", "version"], registry=r
        )
        self.drafter_reloads = Counter(
            p + "drafter_reloads", "Drafter reload attempts", ["outcome"], registry=r
        )
        self.drafter_rollbacks = Counter(
            p + "drafter_rollbacks",
            "Drafter versions rolled back by the regression guard",
            ["reason"],
            registry=r,
        )
        for pos in range(MAX_POSITIONS):
            self.accepted_per_position.labels(position=str(pos))
        for outcome in ("ok", "refused"):
            self.drafter_reloads.labels(outcome=outcome)
        for reason in ("tau_regression", "speed_regression"):
            self.drafter_rollbacks.labels(reason=reason)

    def _add_load_series(self, r: CollectorRegistry, p: str) -> None:
        """Latency and batching: how loaded the engine is."""
        self.request_latency = Histogram(
            p + "request_latency_seconds",
            "End-to-end request latency",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.ttft = Histogram(
            p + "time_to_first_token_seconds",
            "Time from request arrival to its first generated token",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16),
            registry=r,
        )
        self.draft_length = Histogram(
            p + "draft_length",
            "Draft length K chosen per sequence and step (adaptive speculation: service/speculation.py)",
            buckets=tuple(range(MAX_POSITIONS + 1)),
            registry=r,
        )
        self.batch_size = Histogram(
            p + "batch_size",
            "Sequences in one target forward of the serving loop (decode steps and prompt chunks)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )

    def set_drafter(self, kind: str, version: str) -> None:
        self.drafter_info.clear()
        self.drafter_info.labels(kind=kind, version=version).set(1)
        try:
            self.drafter_version.set(float(version))
        except ValueError:
            self.drafter_version.set(0)


@dataclass
class SpecDecodeStats:
    """Acceptance statistics of the engine (vLLM's observe_draft shape); also
    forwards each observation to Prometheus when `metrics` is set."""

    metrics: Metrics | None = None
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=lambda: [0] * MAX_POSITIONS)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def observe_draft(self, num_draft: int, num_accepted: int) -> None:
        if num_draft <= 0:
            return
        with self._lock:
            self.num_drafts += 1
            self.num_draft_tokens += num_draft
            self.num_accepted_tokens += num_accepted
            for i in range(min(num_accepted, MAX_POSITIONS)):
                self.accepted_per_position[i] += 1
        m = self.metrics
        if m is not None:
            m.drafts.inc()
            m.draft_tokens.inc(num_draft)
            m.accepted_tokens.inc(num_accepted)
            for i in range(min(num_accepted, MAX_POSITIONS)):
                m.accepted_per_position.labels(position=str(i)).inc()
            m.acceptance_length.observe(num_accepted + 1)

    @property
    def tau(self) -> float:
        """Mean acceptance length over steps that drafted: 1 + accepted / drafts."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0

    def per_position_acceptance(self) -> list[float]:
        n = max(self.num_drafts, 1)
        return [c / n for c in self.accepted_per_position]
