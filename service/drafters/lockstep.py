"""Drafting several sequences in lock-step, so their head steps run batched.

A drafter that drafts with a head writes its proposal as a generator
(`Drafter.draft_steps`): it yields a step request (rows for its head, its own
cache) each time it needs a head forward, receives that step's output, and
returns the `Proposal`. `run_lockstep` advances many such generators in
rounds: each round, the requests of every waiting generator are grouped by
the runner that serves them (one per head: after a hot swap a batch may hold
two) and each group runs as ONE forward over all its rows. Everything a
generator does between its steps (picking, sampling, stop rules) is per
sequence, in its own order, so a sequence drafts the same proposal and draws
from its generator the same way alone or in a batch, provided the runner
computes a row the same whatever the rows beside it (eagle3's `HeadRunner`
does in float32). `drive` is the single-sequence case: `propose` is
`drive(draft_steps(...))`, one code path for both.

Failures stay with their sequence: an exception inside a generator ends that
generator alone; when a batched forward raises, its requests run again one by
one (a request changes nothing its rerun does not overwrite: the cache slots
it writes), and a request that fails alone fails its generator alone."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

from .base import DraftSteps, Proposal

log = logging.getLogger(__name__)


class StepRunner(Protocol):
    def forward(self, requests: Sequence[Any]) -> list[Any]:
        """One batched forward over the requests' rows -> one output per request."""
        ...


class StepRequest(Protocol):
    runner: StepRunner  # who runs it; requests with the same runner batch together

    @property
    def rows(self) -> int: ...


class _Lockstep:
    def __init__(self, gens: list[DraftSteps]) -> None:
        self.gens = gens
        self.results: list[Proposal | BaseException | None] = [None] * len(gens)
        self.seconds = [0.0] * len(gens)  # own time + a share of each batched forward by rows
        self.waiting: dict[int, StepRequest] = {}

    def advance(self, i: int, value: Any) -> None:
        """Send the step's output (None to start) to generator i: its next request or its end."""
        t0 = time.perf_counter()
        try:
            self.waiting[i] = self.gens[i].send(value)
        except StopIteration as stop:
            self.results[i] = stop.value
        except Exception as exc:  # noqa: BLE001 -- that sequence's failure, handed back
            self.results[i] = exc
        self.seconds[i] += time.perf_counter() - t0

    def fail(self, i: int, exc: BaseException) -> None:
        self.results[i] = exc
        self.gens[i].close()  # runs its finally blocks (e.g. the hybrid's state view)

    def run_group(self, members: list[int]) -> None:
        """One forward for the members' requests (one runner); one by one if it raises."""
        requests = [self.waiting.pop(i) for i in members]
        runner = requests[0].runner
        t0 = time.perf_counter()
        outs: list[Any]
        try:
            outs = runner.forward(requests)
        except Exception as exc:
            if len(requests) == 1:
                outs = [exc]
            else:
                log.warning(
                    "batched head step of %d sequences failed; running them one by one",
                    len(requests),
                    exc_info=True,
                )
                outs = [_alone(runner, request) for request in requests]
        elapsed = time.perf_counter() - t0
        rows = sum(r.rows for r in requests)
        for i, request, out in zip(members, requests, outs, strict=True):
            self.seconds[i] += elapsed * request.rows / rows
            if isinstance(out, BaseException):
                self.fail(i, out)
            else:
                self.advance(i, out)

    def run(self) -> list[tuple[Proposal | BaseException, float]]:
        for i in range(len(self.gens)):
            self.advance(i, None)
        while self.waiting:
            groups: dict[int, list[int]] = {}
            for i, request in self.waiting.items():
                groups.setdefault(id(request.runner), []).append(i)
            for members in groups.values():
                self.run_group(members)
        return [(result, seconds) for result, seconds in zip(self.results, self.seconds)]  # type: ignore[misc]


def _alone(runner: StepRunner, request: StepRequest) -> Any:
    try:
        return runner.forward([request])[0]
    except Exception as exc:  # noqa: BLE001 -- fails that request's generator alone
        return exc


def run_lockstep(gens: list[DraftSteps]) -> list[tuple[Proposal | BaseException, float]]:
    """Run the generators to their proposals, each round's steps batched per
    runner -> per generator (its Proposal or its exception, seconds it cost)."""
    return _Lockstep(gens).run()


def drive(gen: DraftSteps) -> Proposal:
    """One generator alone (what `propose` runs); raises its exception."""
    result, _ = run_lockstep([gen])[0]
    if isinstance(result, BaseException):
        raise result
    return result
