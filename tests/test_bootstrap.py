"""The SFT bootstrap across beat ticks (worker/bootstrap.py), in-process on the
real default model and a real Redis: served requests' tokens join the pool
and their blocks are acked, training resumes from tick to tick under one
budget, every tick's head goes through the gate, and once the budget is spent
the ticks stop being bootstrap ticks."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import redis
import torch

from service.blocklog import BlockConsumer
from service.config import Settings
from service.drafters import eagle3
from service.drafters.ngram import NgramDrafter
from service.engine import Engine
from service.metrics import Metrics
from service.sampling import SamplingParams
from worker import bootstrap
from worker.prompts import chat_ids, sharegpt_prompts
from worker.update import CONSUMER, GROUP, run_update

TICKED_SFT = {
    "num_prompts": 4, "max_new_tokens": 16, "gen_batch_size": 4, "train_steps": 4, "tick_steps": 2,
    "batch_tokens": 512, "warmup_steps": 1, "eval_prompts": 0, "save_every_s": 3600,
}  # fmt: skip
TINY_GATE = {"gate_requests": 4, "gate_max_tokens": 12, "gate_resamples": 300}


def serve_with_ngram(target, settings: Settings, n: int) -> None:
    """n greedy requests through the engine with the server's real block sink."""
    from service.runtime import build_block_sink

    on_close: list = []
    sink = build_block_sink(settings, Metrics(), target.model_id, on_close)
    engine = Engine(target.model, NgramDrafter(), target.eos_token_ids, 4, block_sink=sink)
    prompts = [chat_ids(target.tokenizer, p) for p in sharegpt_prompts("train", limit=200)[100 : 100 + n]]
    try:
        for i, ids in enumerate(prompts):
            engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=20), request_id=f"boot-{i}-{uuid.uuid4().hex[:6]}")
    finally:
        for fn in on_close:
            fn()


def test_bootstrap_ticks_resume_pool_served_tokens_and_end(redis_db: str, settings: Settings, target, tmp_path: Path):
    stream = f"test-boot:{uuid.uuid4().hex[:8]}:blocks"
    s = settings.model_copy(update={
        "redis_url": redis_db, "block_stream": stream, "block_log": True, "drafter": "auto",
        "checkpoint_dir": tmp_path / "ck", "cache_dir": tmp_path / "cache",
        "sft_bootstrap": TICKED_SFT, "opd_train": TINY_GATE, "opd_min_blocks": 10_000,
    })  # fmt: skip
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "models").symlink_to(Path(settings.cache_dir) / "models")
    r = redis.Redis.from_url(redis_db)
    serve_with_ngram(target, s, 3)
    written = r.xlen(stream)
    assert written > 0

    # tick 1: the served requests join the pool, half the budget trains, the gate decides
    first = run_update(r, s, target)
    assert first["kind"] == "sft_bootstrap" and first["bootstrap"]["finished"] is False, first
    assert first["bootstrap"]["served_requests"] == 3 and first["bootstrap"]["entries"] == written
    assert first["gate"]["incumbent"].startswith("ngram") and first["gate"]["requests"] == 4
    assert r.xpending(stream, GROUP)["pending"] == 0  # acked once the report was written
    served = list((tmp_path / "cache" / "sft").glob("features-*/served-*"))
    assert served, "the served requests' features were not cached"
    state = json.loads((bootstrap.state_dir(s) / "state.json").read_text())
    assert state["spent"]["step"] == 2

    # tick 2 resumes (same draft vocabulary, steps 2..3) and spends the budget; nothing new was served
    second = run_update(r, s, target)
    assert second["kind"] == "sft_bootstrap" and second["bootstrap"]["finished"] is True, second
    assert second["bootstrap"]["served_requests"] == 0
    state = json.loads((bootstrap.state_dir(s) / "state.json").read_text())
    assert [h["step"] for h in state["history"]] == [0, 1, 2, 3]
    heads = [eagle3.load_head(x["checkpoint"], target.model, target.model_id)[0] for x in (first, second)]
    assert torch.equal(heads[0].d2t, heads[1].d2t)

    # the budget is spent: no third bootstrap tick; with no version ever published
    # there is no head to run Draft-OPD from, and the run says so
    third = run_update(r, s, target)
    if first["published"] or second["published"]:
        assert third.get("kind") != "sft_bootstrap", third
    else:
        assert third == {"status": "no_drafter", "bootstrap_spent": True}
    assert BlockConsumer(r, stream, GROUP, CONSUMER).pending().count == 0
