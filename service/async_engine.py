"""asyncio front of the engine: the HTTP server's only way into it.

The engine steps its sequences on its own thread; this class hands it one
sequence per call and turns the thread's `emit` callbacks into an async
iterator through an asyncio.Queue fed with `loop.call_soon_threadsafe`, so
the event loop never waits on model work. Whenever the consumer stops early
(client disconnect, stop string, error, cancellation) the sequence is marked
cancelled and the engine frees its slot and KV cache at its next turn.

Admission control: when the engine's waiting queue is full, new sequences
are refused with `EngineOverloaded` (the API answers 503 with Retry-After:
the seconds until enough sequences have left for this one to fit, at the rate
sequences have been leaving over the last minute)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator

from .engine import Engine, Sequence, StepOutput
from .sampling import SamplingParams

log = logging.getLogger(__name__)


RETRY_AFTER_S = 1  # the least a refused client is told to wait (and all, before any sequence has left)
MAX_RETRY_AFTER_S = 60
RATE_WINDOW_S = 60.0  # departures counted over this window for the drain rate


def retry_after_s(excess: int, departures_per_s: float | None) -> int:
    """Seconds until `excess` more sequences have left the engine at the
    measured rate (each departure admits one waiting sequence), in whole
    seconds within [RETRY_AFTER_S, MAX_RETRY_AFTER_S]; no rate yet: the least."""
    if not departures_per_s or departures_per_s <= 0:
        return RETRY_AFTER_S
    return max(RETRY_AFTER_S, min(MAX_RETRY_AFTER_S, math.ceil(excess / departures_per_s)))


class DepartureRate:
    """Sequences leaving the engine per second over the last `window_s`."""

    def __init__(self, window_s: float = RATE_WINDOW_S, clock=time.monotonic):
        self.window_s, self.clock = window_s, clock
        self.times: deque[float] = deque()
        self.started = clock()

    def record(self) -> None:
        self.times.append(self.clock())
        self._expire()

    def per_s(self) -> float | None:
        self._expire()
        if not self.times:
            return None
        span = min(self.window_s, self.clock() - self.started)
        return len(self.times) / max(span, 1e-3)

    def _expire(self) -> None:
        cutoff = self.clock() - self.window_s
        while self.times and self.times[0] < cutoff:
            self.times.popleft()


class EngineOverloaded(RuntimeError):
    """The engine's waiting queue is full; retry after `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: int = RETRY_AFTER_S):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class AsyncEngine:
    def __init__(self, engine: Engine, max_queue: int):
        self.engine = engine
        self.max_queue = max_queue
        self.departures = DepartureRate()

    def check_capacity(self, num_seqs: int = 1) -> None:
        """Raise EngineOverloaded unless `num_seqs` more sequences fit in the queue."""
        waiting = self.engine.num_waiting
        if waiting + num_seqs > self.max_queue:
            wait_s = retry_after_s(waiting + num_seqs - self.max_queue, self.departures.per_s())
            raise EngineOverloaded(
                f"the server is overloaded: {waiting} sequences are waiting (limit {self.max_queue}); "
                f"retry after {wait_s} s",
                wait_s,
            )

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[StepOutput]:
        """Yield the engine's outputs for one sequence; the last one has a
        finish_reason. An engine error for this sequence is raised here."""
        self.check_capacity()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[StepOutput | BaseException] = asyncio.Queue()
        seq = Sequence(request_id, list(prompt_ids), params, emit=lambda _: None)

        def emit(item: StepOutput | BaseException) -> None:  # runs on the engine thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                seq.cancelled = True

        seq.emit = emit
        self.engine.submit(seq)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            # no-op after a normal finish; otherwise the engine drops the sequence at its next turn
            seq.cancelled = True
            self.departures.record()  # its slot frees a place for a waiting sequence

    def stop(self) -> None:
        self.engine.stop_loop()
