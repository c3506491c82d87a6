"""Block records (DESIGN §6): the versioned contract between the serving engine
and the Draft-OPD workers, its compact encoding, the never-blocking writer, and
the consumer-group helpers the worker reads them with.

Redis layout (S = the stream name, default `draftloop:blocks`):

- `S` — stream, one entry per verify step, `XADD S MAXLEN ~ N`. Fields:
  `schema_version` (ASCII int), `request_id` (UTF-8) and `data` (msgpack map:
  scalars as msgpack values, id lists as little-endian uint32 bytes, the
  target's top-k log-probs as float16 bytes, the K per-token log-probs as
  float32 bytes).
- `S:ctx:<request_id>` — string, the request's token context, little-endian
  uint32 words with a TTL refreshed by every write:
  word 0 = 1 + len(prompt) (0: the prompt record never arrived);
  word 1 + i = 1 + id of the token at sequence position i (0: not logged).
  The prompt record writes words 0..len(prompt) once (`SETRANGE`); each block
  writes its emitted tokens (accepted drafts, then `next_token`) at words
  1 + position ... Writes land by offset, so their order does not matter, and a
  record lost on the way leaves zero words a consumer can see.

A consumer rebuilds the prefix of any block with one `GET` per request:
prefix = context[:position] (`block_prefixes`), refused when it has a hole.
Hence the producer's rule: log every step that emits tokens, including the
first token after prefill and steps that drafted nothing, as blocks with K = 0
(no drafted tokens, one target row: still the target's own state, usable by
the accepted stream); a token no record covers leaves every later block of
that request without a prefix.

Engine code: no web framework here (the worker imports it)."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgpack
import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .config import Settings
from .metrics import Metrics

if TYPE_CHECKING:
    from .engine import BlockObservation

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_U32 = np.dtype("<u4")
_F16 = np.dtype("<f2")
_F32 = np.dtype("<f4")


class SchemaError(ValueError):
    """A record this code cannot read (unknown schema_version, malformed fields)."""


@dataclass
class BlockRecord:
    """One verify step of one request.

    `position` = number of context tokens preceding the first drafted token
    (len(prompt) + tokens generated before this step). Target row j (0..K) is
    the target's distribution for the token at position + j, conditioned on the
    prefix plus draft_tokens[:j]; the emitted tokens draft_tokens[:num_accepted]
    + [next_token] occupy positions position .. position + num_accepted.
    Target log-probs are of its raw distribution (log-softmax of the logits,
    temperature 1, no top-k/top-p); `temperature` is what the request sampled with."""

    request_id: str
    step: int
    drafter_version: str
    target_model: str
    temperature: float
    position: int
    draft_tokens: list[int]  # K drafted ids (K may be 0)
    draft_logprobs: list[float]  # K: log q of each drafted token; 0.0 for deterministic drafters
    num_accepted: int
    next_token: int  # recovered (first rejection) or bonus (all K accepted)
    target_top_ids: list[list[int]]  # (K+1) x k
    target_top_logprobs: list[list[float]]  # (K+1) x k, log p
    target_draft_logprobs: list[float]  # K: log p of each drafted token at its position
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def from_observation(cls, obs: BlockObservation, target_model: str) -> BlockRecord:
        """The record of one verify step, as the engine hands it to its block sink."""
        return cls(
            request_id=obs.request_id,
            step=obs.step,
            drafter_version=obs.drafter_version,
            target_model=target_model,
            temperature=obs.temperature,
            position=obs.position,
            draft_tokens=obs.draft_tokens,
            draft_logprobs=obs.draft_logprobs,
            num_accepted=obs.num_accepted,
            next_token=obs.next_token,
            target_top_ids=obs.target_top_ids,
            target_top_logprobs=obs.target_top_logprobs,
            target_draft_logprobs=obs.target_draft_logprobs,
        )

    @property
    def num_draft(self) -> int:
        return len(self.draft_tokens)

    def emitted_tokens(self) -> list[int]:
        """The tokens this step appended to the sequence."""
        return list(self.draft_tokens[: self.num_accepted]) + [self.next_token]


@dataclass
class PromptRecord:
    """A request's prompt token ids, logged once before its blocks. (The target
    model is on every block, so it is not repeated here.)"""

    request_id: str
    prompt_ids: list[int]
    schema_version: int = SCHEMA_VERSION


def context_key(stream: str, request_id: str) -> str:
    return f"{stream}:ctx:{request_id}"


def _pack_tokens(ids: Sequence[int]) -> bytes:
    """Token ids as context words: id + 1, so that 0 marks a hole."""
    return (np.asarray(ids, dtype=np.int64) + 1).astype(_U32).tobytes()


def prompt_context_bytes(rec: PromptRecord) -> bytes:
    return np.asarray([len(rec.prompt_ids) + 1], dtype=_U32).tobytes() + _pack_tokens(rec.prompt_ids)


def block_context_offset(rec: BlockRecord) -> int:
    return 4 * (1 + rec.position)


# --- stream entry encoding -------------------------------------------------------------


def encode(rec: BlockRecord) -> dict[str, bytes]:
    """Stream fields of one block record (see the module docstring)."""
    K = len(rec.draft_tokens)
    top_ids = np.asarray(rec.target_top_ids, dtype=np.int64)
    top_lp = np.asarray(rec.target_top_logprobs, dtype=np.float32)
    if top_ids.ndim != 2 or top_ids.shape[0] != K + 1 or top_lp.shape != top_ids.shape:
        raise SchemaError(
            f"target top-k must be (K+1) x k with K={K}: ids {top_ids.shape}, logprobs {top_lp.shape}"
        )
    if len(rec.draft_logprobs) != K or len(rec.target_draft_logprobs) != K:
        raise SchemaError("draft_logprobs and target_draft_logprobs need one value per drafted token")
    if not 0 <= rec.num_accepted <= K:
        raise SchemaError(f"num_accepted={rec.num_accepted} outside 0..{K}")
    data = {
        "step": rec.step,
        "drafter_version": rec.drafter_version,
        "target_model": rec.target_model,
        "temperature": float(rec.temperature),
        "position": rec.position,
        "num_accepted": rec.num_accepted,
        "next_token": rec.next_token,
        "k": top_ids.shape[1],
        "draft_tokens": np.asarray(rec.draft_tokens, dtype=_U32).tobytes(),
        "draft_logprobs": np.asarray(rec.draft_logprobs, dtype=_F32).tobytes(),
        "target_top_ids": top_ids.astype(_U32).tobytes(),
        "target_top_logprobs": top_lp.astype(_F16).tobytes(),  # the bulk of a record; float16 halves it
        "target_draft_logprobs": np.asarray(rec.target_draft_logprobs, dtype=_F32).tobytes(),
    }
    return {
        "schema_version": str(rec.schema_version).encode(),
        "request_id": rec.request_id.encode(),
        "data": msgpack.packb(data, use_bin_type=True),
    }


def _field(fields: dict, name: str) -> bytes:
    v = fields.get(name.encode(), fields.get(name))
    if v is None:
        raise SchemaError(f"block record lacks field {name!r}")
    return v.encode() if isinstance(v, str) else v


def decode(fields: dict) -> BlockRecord:
    """Inverse of `encode`; accepts bytes or str keys (as redis-py returns them)."""
    try:
        version = int(_field(fields, "schema_version"))
    except ValueError as e:
        raise SchemaError(f"bad schema_version: {e}") from None
    if version != SCHEMA_VERSION:
        raise SchemaError(f"unknown block record schema_version {version} (this code reads {SCHEMA_VERSION})")
    try:
        d = msgpack.unpackb(_field(fields, "data"), raw=False)
        k = int(d["k"])
        draft = np.frombuffer(d["draft_tokens"], dtype=_U32)
        K = len(draft)
        return BlockRecord(
            schema_version=version,
            request_id=_field(fields, "request_id").decode(),
            step=int(d["step"]),
            drafter_version=d["drafter_version"],
            target_model=d["target_model"],
            temperature=float(d["temperature"]),
            position=int(d["position"]),
            draft_tokens=draft.astype(np.int64).tolist(),
            draft_logprobs=np.frombuffer(d["draft_logprobs"], dtype=_F32).tolist(),
            num_accepted=int(d["num_accepted"]),
            next_token=int(d["next_token"]),
            target_top_ids=np.frombuffer(d["target_top_ids"], dtype=_U32)
            .reshape(K + 1, k)
            .astype(np.int64)
            .tolist(),
            target_top_logprobs=np.frombuffer(d["target_top_logprobs"], dtype=_F16)
            .reshape(K + 1, k)
            .astype(np.float32)
            .tolist(),
            target_draft_logprobs=np.frombuffer(d["target_draft_logprobs"], dtype=_F32).tolist(),
        )
    except SchemaError:
        raise
    except (KeyError, ValueError, TypeError, msgpack.UnpackException) as e:
        raise SchemaError(f"malformed block record: {e!r}") from None


# --- writer ---------------------------------------------------------------------------

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
    `prompts_dropped` (they only cost the prefixes of that request)."""

    def __init__(
        self,
        redis_url: str,
        stream: str,
        maxlen: int,
        queue_size: int,
        metrics: Metrics | None = None,
        *,
        context_ttl_s: int = 3600,
        batch_size: int = 256,
        socket_timeout_s: float = 1.0,
        backoff_s: tuple[float, float] = (0.5, 2.0),
    ):
        self.stream = stream
        self.maxlen = maxlen
        self.metrics = metrics
        self.context_ttl_s = context_ttl_s
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
        self._c = _Counters()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="blocklog-writer", daemon=True)
        self._thread.start()

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics | None = None) -> BlockLogger:
        return cls(
            settings.redis_url,
            settings.block_stream,
            maxlen=settings.block_stream_maxlen,
            queue_size=settings.block_queue_size,
            metrics=metrics,
        )

    @property
    def written(self) -> int:
        return self._c.written

    @property
    def dropped(self) -> int:
        return self._c.dropped

    @property
    def prompts_dropped(self) -> int:
        return self._c.prompts_dropped

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
        q = self._queue
        # `unfinished_tasks` counts records put and not yet marked done by the writer
        with q.all_tasks_done:
            return q.all_tasks_done.wait_for(lambda: q.unfinished_tasks == 0, timeout=timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Flush what is queued (within `timeout`), then stop the writer."""
        self.flush(timeout)
        self._closing.set()
        self._thread.join(timeout=max(0.1, timeout))
        self._redis.close()

    # writer thread

    def _count_dropped(self, records: Iterable[BlockRecord | PromptRecord]) -> None:
        blocks = prompts = 0
        for r in records:
            if isinstance(r, BlockRecord):
                blocks += 1
            else:
                prompts += 1
        with self._c.lock:
            self._c.dropped += blocks
            self._c.prompts_dropped += prompts
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
                        (rec, encode(rec), block_context_offset(rec), _pack_tokens(rec.emitted_tokens()))
                    )
                else:
                    out.append((rec, None, 0, prompt_context_bytes(rec)))
            except Exception:  # a malformed record is the caller's bug: lose it, keep the batch
                log.exception("dropping a malformed %s", type(rec).__name__)
                self._count_dropped([rec])
        return out

    def _write(self, encoded: list[_Encoded]) -> None:
        """One pipelined round trip (no MULTI: a partial batch is still useful)."""
        pipe = self._redis.pipeline(transaction=False)
        for rec, fields, offset, payload in encoded:
            if fields is not None:
                pipe.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)
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
            n = sum(fields is not None for _, fields, _, _ in encoded)
            with self._c.lock:
                self._c.written += n
            if self.metrics is not None and n:
                self.metrics.block_records_written.inc(n)
            self._done(batch)
            if failing:
                log.info("block log: Redis writes resumed")
            failing = False
            backoff = self.backoff_s[0]


# --- consumer side (worker) -----------------------------------------------------------

Entry = tuple[str, BlockRecord]


def ensure_group(r: redis.Redis, stream: str, group: str, start_id: str = "0") -> None:
    """Create the consumer group (and the stream) unless it exists."""
    try:
        r.xgroup_create(stream, group, id=start_id, mkstream=True)
    except redis.ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise


def ack(r: redis.Redis, stream: str, group: str, ids: Sequence[str | bytes]) -> int:
    return int(r.xack(stream, group, *ids)) if ids else 0


def _decode_entries(
    r: redis.Redis, stream: str, group: str, raw: Iterable[tuple[bytes | str, dict | None]]
) -> list[Entry]:
    """Decode entries; ack and skip the ones that cannot be used (trimmed away
    while pending, or unreadable), so that they are not delivered forever."""
    out: list[Entry] = []
    bad: list[bytes | str] = []
    for entry_id, fields in raw:
        eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        if not fields:
            bad.append(eid)
            continue
        try:
            out.append((eid, decode(fields)))
        except SchemaError as e:
            log.warning("skipping block record %s: %s", eid, e)
            bad.append(eid)
    ack(r, stream, group, bad)
    return out


def read_blocks(
    r: redis.Redis,
    stream: str,
    group: str,
    consumer: str,
    count: int = 256,
    block_ms: int | None = None,
    claim_idle_ms: int | None = 600_000,
) -> list[Entry]:
    """Up to `count` (entry_id, record) pairs for this consumer, in this order of
    preference: its own pending entries (delivered earlier, never acked, e.g.
    before a crash), then entries other consumers left pending for more than
    `claim_idle_ms` (XAUTOCLAIM; None: never), then new entries (waiting up to
    `block_ms`; None: do not wait). Ack with `ack` once used."""
    raw = r.xreadgroup(group, consumer, {stream: "0"}, count=count)
    entries = raw[0][1] if raw else []
    if entries:
        return _decode_entries(r, stream, group, entries)
    if claim_idle_ms is not None:
        claimed = r.xautoclaim(
            stream, group, consumer, min_idle_time=claim_idle_ms, start_id="0-0", count=count
        )
        if claimed[1]:
            return _decode_entries(r, stream, group, claimed[1])
    raw = r.xreadgroup(group, consumer, {stream: ">"}, count=count, block=block_ms)
    return _decode_entries(r, stream, group, raw[0][1] if raw else [])


@dataclass
class RequestContext:
    """A request's logged token context (see the module docstring)."""

    prompt_len: int | None  # None: the prompt record was lost
    tokens: np.ndarray  # (T,) int64 token ids by sequence position; -1 where nothing was logged

    @property
    def prompt_ids(self) -> list[int] | None:
        if self.prompt_len is None:
            return None
        ids = self.tokens[: self.prompt_len]
        return None if len(ids) < self.prompt_len or (ids < 0).any() else ids.tolist()

    def prefix(self, rec: BlockRecord) -> list[int] | None:
        """Tokens before the block's first drafted token, or None if any is missing."""
        ids = self.tokens[: rec.position]
        return None if len(ids) < rec.position or (ids < 0).any() else ids.tolist()


def _parse_context(raw: bytes | None) -> RequestContext | None:
    if not raw:
        return None
    words = np.frombuffer(raw[: len(raw) // 4 * 4], dtype=_U32).astype(np.int64)
    return RequestContext(prompt_len=int(words[0]) - 1 if words[0] else None, tokens=words[1:] - 1)


def read_contexts(r: redis.Redis, stream: str, request_ids: Iterable[str]) -> dict[str, RequestContext]:
    """The logged context of each request (one pipelined GET each); requests
    whose context expired or was never written are missing from the result."""
    rids = list(dict.fromkeys(request_ids))
    pipe = r.pipeline(transaction=False)
    for rid in rids:
        pipe.get(context_key(stream, rid))
    out = {}
    for rid, raw in zip(rids, pipe.execute(), strict=True):
        ctx = _parse_context(raw)
        if ctx is not None:
            out[rid] = ctx
    return out


def read_prompt(r: redis.Redis, stream: str, request_id: str) -> list[int] | None:
    ctx = read_contexts(r, stream, [request_id]).get(request_id)
    return ctx.prompt_ids if ctx is not None else None


def block_prefixes(r: redis.Redis, stream: str, records: Sequence[BlockRecord]) -> list[list[int] | None]:
    """The prefix (prompt + tokens emitted before it) of each block; None where
    it cannot be rebuilt (context expired, or a record of that request was lost)."""
    ctxs = read_contexts(r, stream, (rec.request_id for rec in records))
    out: list[list[int] | None] = []
    for rec in records:
        ctx = ctxs.get(rec.request_id)
        out.append(ctx.prefix(rec) if ctx is not None else None)
    return out
