"""The block log's writer: ships block and prompt records to Redis off the
serving path, through a bounded queue drained by one daemon thread (the block
record contract, docs/architecture.md). Built from explicit arguments; the
server's start-up code maps its settings onto them."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..metrics import Metrics
from .codec import block_context_offset, encode, pack_tokens, prompt_context_bytes
from .record import BlockRecord, PromptRecord, context_key

log = logging.getLogger(__name__)

# (record, its stream fields or None for a prompt, byte offset into the context key, context bytes)
_Encoded = tuple[BlockRecord | PromptRecord, dict[str, bytes] | None, int, bytes]


@dataclass
class _Counters:
    written: int = 0
    dropped: int = 0
    prompts_dropped: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class BlockLogger:
    """Ships records to Redis off the serving path.

    `submit` only enqueues (bounded queue; when full the record is dropped and
    counted). A daemon thread drains the queue in batches, one pipelined round
    trip per batch; on any Redis error the batch is dropped and counted, the
    thread backs off and the client reconnects on its next try. Socket
    timeouts bound how long a hung Redis can hold the writer.

    `written` / `dropped` count block records; prompt records lost are in
    `prompts_dropped` (they only cost the prefixes of that request).

    Retention: the stream is capped near `maxlen` entries (XADD MAXLEN ~); a
    request's token context (prompt, then emitted ids) expires `context_ttl_s`
    after its last write. `store_contexts=False` writes block records only: no
    prompt reaches Redis, and no block's prefix can be rebuilt from the log."""

    def __init__(
        self,
        redis_url: str,
        stream: str,
        maxlen: int,
        queue_size: int,
        metrics: Metrics | None = None,
        *,
        context_ttl_s: int = 3600,
        store_contexts: bool = True,
        batch_size: int = 256,
        socket_timeout_s: float = 1.0,
        backoff_s: tuple[float, float] = (0.5, 2.0),
    ) -> None:
        # plain attribute copies, like DrafterReloader.__init__'s: deliberate boilerplate
        self.stream = stream
        self.maxlen = maxlen
        self.metrics = metrics
        self.context_ttl_s = context_ttl_s
        self.store_contexts = store_contexts
        self.batch_size = batch_size
        self.backoff_s = backoff_s
        # no client-side retries: the writer has its own backoff and never waits for Redis twice
        self._redis = redis.Redis.from_url(
            redis_url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._queue: queue.Queue[BlockRecord | PromptRecord] = queue.Queue(maxsize=queue_size)
        self._counters = _Counters()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="blocklog-writer", daemon=True)
        self._thread.start()

    @property
    def written(self) -> int:
        return self._counters.written

    @property
    def dropped(self) -> int:
        return self._counters.dropped

    @property
    def prompts_dropped(self) -> int:
        return self._counters.prompts_dropped

    def submit(self, record: BlockRecord | PromptRecord) -> None:
        """Enqueue a record; never blocks, never raises."""
        try:
            if self._closing.is_set():
                raise queue.Full
            self._queue.put_nowait(record)
        except queue.Full:
            self._count_dropped([record])
        except Exception:  # a logging path must not take a request down
            log.exception("block record submit failed")

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything submitted so far is written or dropped."""
        records = self._queue
        # `unfinished_tasks` counts records put and not yet marked done by the writer
        with records.all_tasks_done:
            return records.all_tasks_done.wait_for(lambda: records.unfinished_tasks == 0, timeout=timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Flush what is queued (within `timeout`), then stop the writer."""
        self.flush(timeout)
        self._closing.set()
        self._thread.join(timeout=max(0.1, timeout))
        self._redis.close()

    # writer thread

    def _count_dropped(self, records: Iterable[BlockRecord | PromptRecord]) -> None:
        blocks = prompts = 0
        for rec in records:
            if isinstance(rec, BlockRecord):
                blocks += 1
            else:
                prompts += 1
        with self._counters.lock:
            self._counters.dropped += blocks
            self._counters.prompts_dropped += prompts
        if self.metrics is not None and blocks:
            self.metrics.block_records_dropped.inc(blocks)

    def _take_batch(self) -> list[BlockRecord | PromptRecord]:
        try:
            first = self._queue.get(timeout=0.05)
        except queue.Empty:
            return []
        batch = [first]
        while len(batch) < self.batch_size:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _done(self, batch: list[BlockRecord | PromptRecord]) -> None:
        for _ in batch:
            self._queue.task_done()

    def _encode_batch(self, batch: list[BlockRecord | PromptRecord]) -> list[_Encoded]:
        out = []
        for rec in batch:
            try:
                if isinstance(rec, BlockRecord):
                    out.append(
                        (rec, encode(rec), block_context_offset(rec), pack_tokens(rec.emitted_tokens()))
                    )
                else:
                    out.append((rec, None, 0, prompt_context_bytes(rec)))
            except Exception:  # a malformed record is the caller's bug: lose it, keep the batch
                log.exception("dropping a malformed %s", type(rec).__name__)
                self._count_dropped([rec])
        return out

    def _write(self, encoded: list[_Encoded]) -> None:
        """One pipelined round trip (no MULTI: a partial batch is still useful).
        Without `store_contexts` only the stream entries: no prompt, no context key."""
        pipe = self._redis.pipeline(transaction=False)
        for rec, fields, offset, payload in encoded:
            if fields is not None:
                pipe.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)
            if not self.store_contexts:
                continue
            key = context_key(self.stream, rec.request_id)
            pipe.setrange(key, offset, payload)
            pipe.expire(key, self.context_ttl_s)
        pipe.execute()

    def _run(self) -> None:
        backoff = self.backoff_s[0]
        failing = False
        while not (self._closing.is_set() and self._queue.empty()):
            batch = self._take_batch()
            if not batch:
                continue
            encoded = self._encode_batch(batch)
            try:
                if encoded:
                    self._write(encoded)
            # Redis down, timed out or refusing the write; anything else must not kill the writer either
            except Exception as e:  # noqa: BLE001
                self._count_dropped(rec for rec, *_ in encoded)
                self._done(batch)
                if not failing:
                    log.warning("block log: Redis write failed (%s); dropping records until it is back", e)
                failing = True
                self._closing.wait(backoff)
                backoff = min(2 * backoff, self.backoff_s[1])
                continue
            num_blocks = sum(fields is not None for _, fields, _, _ in encoded)
            with self._counters.lock:
                self._counters.written += num_blocks
            if self.metrics is not None and num_blocks:
                self.metrics.block_records_written.inc(num_blocks)
            self._done(batch)
            if failing:
                log.info("block log: Redis writes resumed")
            failing = False
            backoff = self.backoff_s[0]
