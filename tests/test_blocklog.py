"""Block records: encoding round trip, and the writer and the worker's consumer
against a real Redis (the one at settings.redis_url, plus throwaway
redis-server processes for outages)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import msgpack
import pytest
import redis

from service.blocklog import (
    SCHEMA_VERSION,
    BlockConsumer,
    BlockLogger,
    BlockRecord,
    PendingSummary,
    PromptRecord,
    SchemaError,
    decode,
    encode,
    entry_id_key,
)
from service.blocklog.record import BlockObservation
from service.config import get_settings
from service.metrics import Metrics

from .conftest import free_port, redis_or_skip, scratch_prefix
from .throwaway_redis import AVAILABLE as HAVE_REDIS_SERVER
from .throwaway_redis import start_redis, stop_redis, wait_until

URL = get_settings().redis_url


def _block(
    rid: str = "req-1",
    step: int = 0,
    position: int = 5,
    draft: list[int] | None = None,
    n_acc: int = 1,
    next_token: int = 77,
    k: int = 3,
) -> BlockRecord:
    draft = [11, 12, 13] if draft is None else draft
    K = len(draft)
    return BlockRecord(
        request_id=rid,
        step=step,
        drafter_version="3",
        target_model="smollm2-135m-instruct",
        temperature=0.7,
        position=position,
        draft_tokens=draft,
        draft_logprobs=[-0.25 * (i + 1) for i in range(K)],
        num_accepted=n_acc,
        next_token=next_token,
        target_top_ids=[[100_000 + 10 * j + i for i in range(k)] for j in range(K + 1)],
        target_top_logprobs=[[-0.5 * i - 0.125 * j for i in range(k)] for j in range(K + 1)],
        target_draft_logprobs=[-1.5 * (i + 1) for i in range(K)],
    )


@pytest.fixture
def r() -> redis.Redis:
    return redis_or_skip(URL)


@pytest.fixture
def stream(r: redis.Redis) -> Iterator[str]:
    yield from scratch_prefix(r, "test:blocks")


# --- encoding ---------------------------------------------------------------------------


def test_encode_decode_round_trip() -> None:
    rec = _block()
    fields = encode(rec)
    assert set(fields) == {"schema_version", "request_id", "data"}
    assert all(isinstance(v, bytes) for v in fields.values())
    assert sum(len(v) for v in fields.values()) < 400  # K=3, k=3: packed arrays, not JSON of floats
    out = decode({k.encode(): v for k, v in fields.items()})  # redis-py hands back bytes keys
    assert out == rec  # every value here is exact in float16/float32

    # float16 top-k log-probs: close, not exact; ids above 2^16 survive
    rec.target_top_logprobs[0][1] = -3.14159
    out = decode(encode(rec))
    assert out.target_top_logprobs[0][1] == pytest.approx(-3.14159, abs=2e-3)
    assert out.target_top_ids == rec.target_top_ids

    empty = _block(draft=[], n_acc=0, k=2)  # K = 0: the first token after prefill, or a step with no draft
    assert decode(encode(empty)) == empty
    assert empty.emitted_tokens() == [77]


def test_provenance_round_trip_and_version_1_records_still_decode() -> None:
    rec = _block()
    rec.drafter_kind, rec.draft_sources = "hybrid", "nne"
    assert decode(encode(rec)) == rec
    with pytest.raises(SchemaError, match="one letter per draft"):
        encode(BlockRecord(**{**vars(rec), "draft_sources": "ne"}))
    # a version-1 entry: no drafter_kind / draft_sources in its data
    fields = encode(rec)
    data = msgpack.unpackb(fields["data"])
    del data["drafter_kind"], data["draft_sources"]
    v1 = {**fields, "schema_version": b"1", "data": msgpack.packb(data)}
    old = decode(v1)
    assert (old.drafter_kind, old.draft_sources, old.schema_version) == ("eagle3", "eee", 1)  # numbered
    assert old.draft_tokens == rec.draft_tokens and old.num_accepted == rec.num_accepted
    data["drafter_version"] = "0"  # ngram / none before version 2: who drafted is unknown
    old = decode({**v1, "data": msgpack.packb(data)})
    assert (old.drafter_kind, old.draft_sources) == ("unknown", "???")


def test_from_observation_carries_every_shared_field() -> None:
    obs = BlockObservation(
        request_id="r", step=1, drafter_version="2", temperature=0.0, position=4, draft_tokens=[5, 6],
        draft_logprobs=[0.0, -1.0], num_accepted=1, next_token=7, target_top_ids=[[1], [2], [3]],
        target_top_logprobs=[[-0.1], [-0.2], [-0.3]], target_draft_logprobs=[-0.5, -0.6],
        prompt_ids=[1, 2], drafter_kind="hybrid", draft_sources="ne",
    )
    rec = BlockRecord.from_observation(obs, "m")
    assert (rec.target_model, rec.drafter_kind, rec.draft_sources, rec.next_token) == ("m", "hybrid", "ne", 7)
    assert rec.schema_version == SCHEMA_VERSION == 2


def test_decode_rejects_unknown_schema_and_bad_records() -> None:
    fields = encode(_block())
    with pytest.raises(SchemaError, match="schema_version 3"):
        decode({**fields, "schema_version": b"3"})
    with pytest.raises(SchemaError, match="lacks field 'data'"):
        decode({"schema_version": b"1", "request_id": b"x"})
    data = msgpack.unpackb(fields["data"])
    del data["position"]
    with pytest.raises(SchemaError, match="malformed"):
        decode({**fields, "data": msgpack.packb(data)})
    bad = _block()
    bad.target_top_ids = bad.target_top_ids[:-1]  # K rows instead of K+1
    with pytest.raises(SchemaError):
        encode(bad)
    bad = _block(n_acc=4)
    with pytest.raises(SchemaError, match="num_accepted"):
        encode(bad)


# --- writer -----------------------------------------------------------------------------


def _prompt(r: redis.Redis, stream: str, rid: str) -> list[int] | None:
    ctx = BlockConsumer(r, stream, "opd", "trainer").read_contexts([rid]).get(rid)
    return ctx.prompt_ids if ctx is not None else None


def _prefixes(r: redis.Redis, stream: str, records: list[BlockRecord]) -> list[list[int] | None]:
    """Each block's prefix as the worker rebuilds it; None where it cannot."""
    ctxs = BlockConsumer(r, stream, "opd", "trainer").read_contexts(rec.request_id for rec in records)
    return [ctxs[rec.request_id].prefix(rec) if rec.request_id in ctxs else None for rec in records]


def _request_blocks(rid: str, prompt: list[int]) -> list[BlockRecord]:
    """Three consecutive steps of one request: K = 0 after prefill, then two drafted steps."""
    b0 = _block(rid, step=0, position=len(prompt), draft=[], n_acc=0, next_token=40)
    b1 = _block(rid, step=1, position=b0.position + 1, draft=[41, 42, 99], n_acc=2, next_token=43)
    b2 = _block(rid, step=2, position=b1.position + 3, draft=[44, 45, 46], n_acc=3, next_token=47)
    return [b0, b1, b2]


def test_logger_writes_records_and_context(r: redis.Redis, stream: str) -> None:
    metrics = Metrics()
    logger = BlockLogger(URL, stream, maxlen=1000, queue_size=100, metrics=metrics)
    prompt = [7, 0, 8, 9]  # id 0 must survive (context words store id + 1)
    blocks = _request_blocks("req-a", prompt)
    logger.submit(PromptRecord("req-a", prompt))
    for b in blocks:
        logger.submit(b)
    assert logger.flush(5.0)
    logger.close()
    assert (logger.written, logger.dropped) == (3, 0)
    assert metrics.block_records_written._value.get() == 3
    entries = r.xrange(stream)
    assert [decode(f) for _, f in entries] == blocks

    assert _prompt(r, stream, "req-a") == prompt
    assert _prefixes(r, stream, blocks) == [prompt, prompt + [40], prompt + [40, 41, 42, 43]]
    assert 0 < r.ttl(f"{stream}:ctx:req-a") <= 3600
    assert _prompt(r, stream, "never-seen") is None
    logger.submit(_block())  # after close: dropped, not raised
    assert logger.dropped == 1


def test_server_block_sink_logs_with_the_settings(r: redis.Redis, stream: str) -> None:
    from service.runtime import build_block_sink
    from service.engine import BlockObservation

    settings = get_settings().model_copy(update={"block_log": True, "block_stream": stream})
    on_close: list = []
    sink = build_block_sink(settings, Metrics(), "smollm2-135m-instruct", on_close)
    rec = _block("req-s", position=2, draft=[], n_acc=0, next_token=40)
    fields = {k: v for k, v in vars(rec).items() if k not in ("target_model", "schema_version")}
    sink(BlockObservation(**fields, prompt_ids=[5, 6]))
    for close in on_close:
        close()
    assert [decode(f) for _, f in r.xrange(stream)] == [rec]
    assert _prefixes(r, stream, [rec]) == [[5, 6]]


def test_lost_record_leaves_a_visible_hole(r: redis.Redis, stream: str) -> None:
    logger = BlockLogger(URL, stream, maxlen=1000, queue_size=100)
    prompt = [1, 2, 3]
    b0, _lost, b2 = _request_blocks("req-b", prompt)
    for rec in (b2, PromptRecord("req-b", prompt), b0):  # b1 lost; order does not matter
        logger.submit(rec)
    logger.close()
    assert _prefixes(r, stream, [b0, b2]) == [prompt, None]
    # and without the prompt record nothing can be rebuilt
    logger = BlockLogger(URL, stream, maxlen=1000, queue_size=100)
    c0, c1, _ = _request_blocks("req-c", prompt)
    logger.submit(c0)
    logger.submit(c1)
    logger.close()
    assert _prompt(r, stream, "req-c") is None
    assert _prefixes(r, stream, [c0, c1]) == [None, None]


def test_maxlen_trims_the_stream(r: redis.Redis, stream: str) -> None:
    logger = BlockLogger(URL, stream, maxlen=100, queue_size=2000)
    for i in range(1000):
        logger.submit(_block(step=i))
    logger.close()
    assert logger.written == 1000
    assert 100 <= r.xlen(stream) < 1000  # MAXLEN ~: approximate, trimmed by whole nodes


def test_consumer_group_ack_and_pending_reread(r: redis.Redis, stream: str) -> None:
    logger = BlockLogger(URL, stream, maxlen=1000, queue_size=100)
    for i in range(5):
        logger.submit(_block(step=i))
    logger.close()
    w1 = BlockConsumer(r, stream, "opd", "w1")
    w1.ensure_group()
    w1.ensure_group()  # idempotent
    assert w1.waiting() == (5, 0)

    first, bad = w1.read(3)
    assert [rec.step for _, rec in first] == [0, 1, 2] and bad == []
    assert w1.waiting() == (2, 3)
    assert w1.pending() == PendingSummary(3, first[0][0], first[-1][0])
    # w1 "crashes" before acking: its next read hands back the same entries first, then new ones
    again, _ = w1.read(10)
    assert [eid for eid, _ in again[:3]] == [eid for eid, _ in first]
    assert [rec.step for _, rec in again] == [0, 1, 2, 3, 4]
    ids = [eid for eid, _ in again]
    assert sorted(reversed(ids), key=entry_id_key) == ids
    assert w1.pending_ids(10) == ids
    # another consumer of the group gets neither w1's pending entries nor delivered ones
    assert BlockConsumer(r, stream, "opd", "w2").read(10) == ([], [])
    assert w1.ack(ids) == 5
    assert w1.read(10) == ([], [])
    assert w1.waiting() == (0, 0)
    assert w1.pending().count == 0


def test_unreadable_entries_are_reported(r: redis.Redis, stream: str) -> None:
    consumer = BlockConsumer(r, stream, "opd", "w1")
    consumer.ensure_group()
    bad_id = r.xadd(stream, {**encode(_block(step=0)), "schema_version": b"9"}).decode()
    r.xadd(stream, encode(_block(step=1)))
    got, bad = consumer.read(10)
    assert [rec.step for _, rec in got] == [1] and bad == [bad_id]
    assert consumer.pending().count == 2  # nothing acked until the caller says so
    assert consumer.ack(bad + [eid for eid, _ in got]) == 2
    assert consumer.pending().count == 0
    # an entry trimmed away while pending comes back as unusable, not as a record
    trimmed = r.xadd(stream, encode(_block(step=2))).decode()
    assert [eid for eid, _ in consumer.read(10)[0]] == [trimmed]
    r.xdel(stream, trimmed)
    assert consumer.read(10) == ([], [trimmed])


def test_unreachable_redis_never_blocks_submit() -> None:
    metrics = Metrics()
    logger = BlockLogger(
        "redis://127.0.0.1:1/0",
        "test:blocks:unreachable",
        maxlen=100,
        queue_size=2000,
        metrics=metrics,
        backoff_s=(0.01, 0.05),
    )
    rec = _block()
    t0 = time.perf_counter()
    for _ in range(1000):
        logger.submit(rec)
    assert time.perf_counter() - t0 < 0.5
    assert logger.flush(5.0)
    assert (logger.written, logger.dropped) == (0, 1000)
    assert metrics.block_records_dropped._value.get() == 1000
    logger.close()


def test_full_queue_drops_and_hung_redis_times_out() -> None:
    # A server that accepts connections and never answers: the writer hangs in a
    # read until its socket timeout, the queue fills, submit still returns at once.
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(64)
        port = hung.getsockname()[1]
        logger = BlockLogger(
            f"redis://127.0.0.1:{port}/0",
            "test:blocks:hung",
            maxlen=100,
            queue_size=4,
            batch_size=1,
            socket_timeout_s=0.2,
            backoff_s=(0.01, 0.02),
        )
        rec = _block()
        logger.submit(rec)
        time.sleep(0.05)  # the writer takes it and waits on the hung server
        t0 = time.perf_counter()
        for _ in range(100):
            logger.submit(rec)
        assert time.perf_counter() - t0 < 0.1
        assert logger.dropped >= 100 - 4  # at most queue_size of them fit
        assert logger.flush(5.0)  # each try ends at the socket timeout
        assert (logger.written, logger.dropped) == (0, 101)
        logger.close()


@pytest.mark.skipif(not HAVE_REDIS_SERVER, reason="needs the redis-server binary")
def test_writer_recovers_when_redis_comes_back(tmp_path) -> None:
    port = free_port()
    server = start_redis(port, tmp_path)
    stream = "test:blocks:recover"
    logger = BlockLogger(
        f"redis://127.0.0.1:{port}/0",
        stream,
        maxlen=1000,
        queue_size=1000,
        socket_timeout_s=0.5,
        backoff_s=(0.05, 0.2),
    )
    try:
        logger.submit(_block(step=0))
        assert logger.flush(5.0) and logger.written == 1

        stop_redis(server)
        for i in range(10):
            logger.submit(_block(step=1 + i))
        assert logger.flush(5.0)
        assert logger.written == 1 and logger.dropped == 10

        server = start_redis(port, tmp_path)  # a fresh, empty server on the same port
        step = 100

        def delivered() -> bool:
            nonlocal step
            logger.submit(_block(step=step))
            step += 1
            return server.xlen(stream) > 0

        assert wait_until(delivered, 5.0), "writer did not reconnect by itself"
        assert logger.flush(5.0)
        assert logger.written >= 2
        assert logger.written + logger.dropped == step - 100 + 11
    finally:
        logger.close(1.0)
        stop_redis(server)
