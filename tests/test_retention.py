"""Data retention of the block log (docs/deployment.md, "What Redis keeps"):
token contexts expire after DRAFTLOOP_BLOCK_CONTEXT_TTL_S and the worker skips
the blocks whose context is gone; with DRAFTLOOP_BLOCK_CONTEXTS=false no prompt
reaches Redis and an update run ends cleanly with nothing to train on.

Real parts: the default model served in-process by the engine with an eagle3
head (v1, published), the server's own block sink (`build_block_sink`) writing
to the real Redis, and the worker's `run_update` reading it back."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import redis
import torch

from service import checkpoints
from service.blocklog import BlockConsumer, context_key
from service.config import Settings
from service.drafters import eagle3
from service.engine import Engine
from service.metrics import Metrics
from service.runtime import build_block_sink
from service.sampling import SamplingParams
from worker.train.blocks import build_requests
from worker.prompts import chat_ids, sharegpt_prompts


STREAM = "draftloop:blocks"  # in a Redis database of the test's own (`redis_db`)


@pytest.fixture
def r(redis_db: str) -> redis.Redis:
    return redis.Redis.from_url(redis_db)


@pytest.fixture(scope="module")
def head(target) -> eagle3.Eagle3Head:
    """An untrained head (what it drafts does not matter here, only that it drafts)."""
    h = eagle3.Eagle3Head(eagle3.Eagle3Config.for_target(target.model.cfg, draft_vocab_size=8192))
    h.reset_parameters(torch.Generator().manual_seed(0), std=0.05)
    return h.init_output_from(target.model).attach(target.model)


def serve(target, head, settings: Settings, request_ids: list[str]) -> None:
    """Serve one short greedy request per id through the server's block sink, and flush it."""
    on_close: list = []
    sink = build_block_sink(settings, Metrics(), target.model_id, on_close)
    drafter = eagle3.Eagle3Drafter(head, target.model, version="1")
    engine = Engine(target.model, drafter, target.eos_token_ids, 4, block_sink=sink)
    prompts = sorted((chat_ids(target.tokenizer, p) for p in sharegpt_prompts("train", limit=8)), key=len)
    try:
        for rid, ids in zip(request_ids, prompts, strict=False):
            engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), request_id=rid)
    finally:
        for close in on_close:
            close()


def log_settings(settings: Settings, redis_url: str, **kw) -> Settings:
    return Settings(redis_url=redis_url, block_stream=STREAM, block_log=True, cache_dir=settings.cache_dir, **kw)


def test_expired_contexts_are_skipped_by_the_replay(target, head, settings: Settings, redis_db: str, r: redis.Redis) -> None:
    """One request's context expires (a real TTL), the other's is kept: building
    the replay examples skips exactly the first request's drafted blocks."""
    gone, kept = f"gone-{uuid.uuid4().hex[:6]}", f"kept-{uuid.uuid4().hex[:6]}"
    serve(target, head, log_settings(settings, redis_db, block_context_ttl_s=1), [gone])
    assert r.pttl(context_key(STREAM, gone)) <= 1000  # -1 would be no expiry; -2 already gone
    time.sleep(1.5)
    assert not r.exists(context_key(STREAM, gone))
    serve(target, head, log_settings(settings, redis_db), [kept])
    assert 3000 < r.ttl(context_key(STREAM, kept)) <= 3600  # DRAFTLOOP_BLOCK_CONTEXT_TTL_S's default

    consumer = BlockConsumer(r, STREAM, "test", "reader")
    consumer.ensure_group()
    entries, bad = consumer.read(1000)
    records = [rec for _, rec in entries]
    assert not bad and {rec.request_id for rec in records} == {gone, kept}
    contexts = consumer.read_contexts(rec.request_id for rec in records)
    assert set(contexts) == {kept}
    reqs, stats = build_requests(
        records, {rid: c.tokens for rid, c in contexts.items()}, head.d2t, target.model.cfg.vocab_size, 1,
        target.model_id,
    )  # fmt: skip
    drafted = {rid: sum(rec.num_draft > 0 and rec.request_id == rid for rec in records) for rid in (gone, kept)}
    assert drafted[gone] > 0 and drafted[kept] > 0
    assert stats.no_context == drafted[gone]
    assert stats.used == drafted[kept] and [req.request_id for req in reqs] == [kept]


def test_without_contexts_no_prompt_is_kept_and_updates_end_cleanly(
    target, head, settings: Settings, redis_db: str, r: redis.Redis, tmp_path: Path
) -> None:
    from worker import update

    s = log_settings(
        settings, redis_db, block_contexts=False, checkpoint_dir=tmp_path / "checkpoints", opd_min_blocks=1,
    )  # fmt: skip
    checkpoints.publish_version(r, 1, eagle3.save_checkpoint(head, s.checkpoint_dir, target.model_id))
    rids = [f"private-{i}-{uuid.uuid4().hex[:6]}" for i in range(2)]
    serve(target, head, s, rids)
    n = r.xlen(STREAM)
    assert n > 0 and not list(r.scan_iter(f"{STREAM}:ctx:*"))  # blocks, and no context (no prompt) at all

    out = update.run_update(r, s, target)
    assert out["status"] == "no_usable_blocks" and not out["published"], out
    blocks = out["blocks"]
    assert blocks["records"] == n and blocks["used"] == 0 and blocks["train_blocks"] == 0
    assert blocks["no_context"] > 0 and blocks["no_context"] + blocks["empty"] + blocks["too_short"] == n
    assert BlockConsumer(r, STREAM, update.GROUP, update.CONSUMER).waiting() == (0, 0)  # all acked
    assert checkpoints.list_versions(s.checkpoint_dir) == [1]
