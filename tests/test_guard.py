"""The live regression guard (service/guard.py, wired in service/reloader.py):
the rule on hand-made samples, the rollback and cool-down Lua scripts on a
real Redis, and the reloader with real eagle3 checkpoints of the default
target -- real traffic through the engine where two versions serve the same
τ (kept), and a version whose served τ is set low (rolled back: pointer,
cool-down, metric, log, the server back on the old version) -- and end to end:
a real server under real traffic rolls back a randomised head published
through the checkpoint store and the pointer."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import torch

from service import checkpoints
from service.config import Settings
from service.drafters import eagle3
from service.drafters.ngram import NgramDrafter
from service.engine import Engine
from service.guard import RegressionGuard, RequestSample, guard_verdict, tau_verdict
from service.metrics import Metrics
from service.reloader import DrafterReloader
from service.sampling import SamplingParams
from worker.prompts import chat_ids, sharegpt_prompts

from .conftest import redis_or_skip, scratch_prefix

RULE = {"margin": 0.05, "z": 3.0, "min_requests": 10, "window": 40}


# --- the rule ----------------------------------------------------------------------


def test_a_clear_drop_is_rolled_back() -> None:
    old = [2.0, 2.2, 1.8, 2.1, 1.9] * 4  # τ ≈ 2
    new = [1.1, 1.0, 1.2, 1.05, 1.15] * 4  # τ ≈ 1.1
    v = tau_verdict(old, new, **RULE)
    assert v.decision == "rollback" and v.upper is not None and v.upper < -0.05 * v.old_tau
    assert "1.100" in v.reason and "2.000" in v.reason


def test_too_few_requests_wait() -> None:
    assert tau_verdict([2.0] * 40, [1.0] * 9, **RULE).decision == "wait"
    assert tau_verdict([2.0] * 9, [1.0] * 39, **RULE).decision == "wait"
    # a previous version that served too little before the swap is no baseline: kept after a window
    no_baseline = tau_verdict([2.0] * 9, [1.0] * 40, **RULE)
    assert no_baseline.decision == "keep" and "no baseline" in no_baseline.reason


def test_equal_or_slightly_worse_is_kept_after_a_full_window() -> None:
    old = [1.5, 1.7, 1.6, 1.4, 1.8] * 8
    assert tau_verdict(old, list(old), **RULE).decision == "keep"
    slightly = [x - 0.03 for x in old]  # 2 % worse: inside the 5 % margin
    assert tau_verdict(old, slightly, **RULE).decision == "keep"
    assert tau_verdict(old, slightly[:20], **RULE).decision == "wait"  # window not full yet


def test_noise_is_not_a_regression() -> None:
    """A drop as large as the clear one, but with per-request spread so wide that
    the bound cannot exclude 'not worse': no rollback on 10 requests."""
    old = [1.0, 3.0] * 5
    new = [1.0, 2.6] * 5
    assert tau_verdict(old, new, **RULE).decision == "wait"


def test_guard_samples_per_version() -> None:
    guard = RegressionGuard(window=4, min_requests=2, margin=0.05, z=3.0)
    for _ in range(6):
        guard.observe(("eagle3", "1"), num_drafts=10, num_accepted=10)  # τ 2
    guard.observe(("eagle3", "1"), num_drafts=0, num_accepted=0)  # drafted nothing: no τ
    assert guard.verdict() is None
    guard.watch(("eagle3", "1"), ("eagle3", "2"), "/ck/eagle3/v1")
    assert guard.verdict().decision == "wait"
    for _ in range(4):
        guard.observe(("eagle3", "2"), num_drafts=10, num_accepted=0)  # τ 1
    v = guard.verdict()
    assert v.decision == "rollback" and v.old_tau == 2.0 and v.new_tau == 1.0


def test_same_tau_but_slower_decoding_is_rolled_back_for_speed() -> None:
    """A head that guesses as well but drafts twice as slowly: τ cannot see it, speed does."""
    old = [RequestSample(2.0 + 0.1 * (i % 3), 60.0 + i % 5) for i in range(40)]
    new = [RequestSample(2.0 + 0.1 * (i % 3), 30.0 + i % 5) for i in range(20)]
    v = guard_verdict(old, new, margin=0.05, speed_margin=0.15, z=3.0, min_requests=10, window=40)
    assert v.decision == "rollback" and v.measure == "speed" and v.label == "speed_regression"
    assert "tok/s" in v.reason and v.new_tau is not None and v.new_tau < 35


def test_speed_within_its_margin_and_equal_tau_is_kept() -> None:
    old = [RequestSample(1.8 + 0.1 * (i % 3), 60.0 + i % 5) for i in range(40)]
    new = [RequestSample(1.8 + 0.1 * (i % 3), 55.0 + i % 5) for i in range(40)]  # 8 % slower: inside 15 %
    v = guard_verdict(old, new, margin=0.05, speed_margin=0.15, z=3.0, min_requests=10, window=40)
    assert v.decision == "keep" and v.measure == "tau"
    worse_tau = [RequestSample(1.0, 90.0) for _ in range(20)]  # faster but τ collapsed: τ decides
    v = guard_verdict(old, worse_tau, margin=0.05, speed_margin=0.15, z=3.0, min_requests=10, window=40)
    assert v.decision == "rollback" and v.label == "tau_regression"


def test_guard_measures_decode_speed_per_request() -> None:
    guard = RegressionGuard(window=4, min_requests=2, margin=0.05, z=3.0, speed_margin=0.15)
    for _ in range(4):
        guard.observe(("eagle3", "1"), num_drafts=10, num_accepted=10, decode_tokens=20, decode_s=0.5)  # 40 tok/s
    guard.watch(("eagle3", "1"), ("eagle3", "2"), "/ck/eagle3/v1")
    for _ in range(4):
        guard.observe(("eagle3", "2"), num_drafts=10, num_accepted=10, decode_tokens=20, decode_s=1.0)  # 20 tok/s
    v = guard.verdict()
    assert v.decision == "rollback" and v.measure == "speed" and (v.old_tau, v.new_tau) == (40.0, 20.0)


# --- the pointer: rollback and cool-down ----------------------------------------------


@pytest.fixture(scope="module")
def rds() -> redis.Redis:
    return redis_or_skip("redis://127.0.0.1:6379/0")


@pytest.fixture
def ns(rds: redis.Redis) -> Iterator[str]:
    yield from scratch_prefix(rds, "test-guard")


@pytest.fixture(scope="module")
def head(target) -> eagle3.Eagle3Head:
    h = eagle3.Eagle3Head(eagle3.Eagle3Config.for_target(target.model.cfg, draft_vocab_size=2048))
    h.reset_parameters(torch.Generator().manual_seed(0), std=0.05)
    return h.init_output_from(target.model)


@pytest.fixture
def versions(head, target, tmp_path: Path) -> list[Path]:
    """v1, v2, v3: the same weights (so the same τ on the same requests)."""
    ckdir = tmp_path / "checkpoints"
    return [eagle3.save_checkpoint(head, ckdir, target.model_id) for _ in range(3)]


def test_rollback_moves_the_pointer_back_and_cools_the_version_down(rds, ns: str, versions) -> None:
    v1, v2, v3 = versions
    checkpoints.publish_version(rds, 1, v1, namespace=ns)
    checkpoints.publish_version(rds, 2, v2, namespace=ns)
    assert not checkpoints.rollback_version(rds, 1, 1, v1, 60, namespace=ns)  # pointer names v2, not v1
    assert checkpoints.rollback_version(rds, 2, 1, v1, 60, namespace=ns)
    assert checkpoints.read_pointer(rds, ns)["version"] == 1
    assert checkpoints.read_latest(rds, ns)["version"] == 1  # an unpin does not bring v2 back
    assert 0 < rds.ttl(checkpoints.cooldown_key(2, namespace=ns)) <= 60
    assert not checkpoints.rollback_version(rds, 2, 1, v1, 60, namespace=ns)  # done already: no-op
    # the worker publishing v2 again (a redelivered task) moves nothing while it cools down...
    assert not checkpoints.publish_version(rds, 2, v2, namespace=ns)
    assert checkpoints.read_pointer(rds, ns)["version"] == 1
    # ...a newer version does, and an operator may pin v2 on purpose
    assert checkpoints.publish_version(rds, 3, v3, namespace=ns)
    assert checkpoints.publish_version(rds, 2, v2, pinned=True, namespace=ns)
    assert not checkpoints.rollback_version(rds, 2, 1, v1, 60, namespace=ns)  # never against a pin


# --- the reloader ---------------------------------------------------------------------


def make_reloader(target, ckdir: Path, ns: str, rds: redis.Redis, **guard) -> tuple[DrafterReloader, Metrics]:
    settings = Settings(
        checkpoint_dir=ckdir, drafter="eagle3", block_log=False, guard_cooldown_s=120,
        **{f"guard_{k}": v for k, v in guard.items()},
    )  # fmt: skip
    metrics = Metrics()
    engine = Engine(target.model, NgramDrafter(), target.eos_token_ids, 4, metrics=metrics)
    return DrafterReloader(engine, target, settings, metrics, namespace=ns, redis=rds), metrics


def serve(reloader: DrafterReloader, target, n: int) -> None:
    prompts = sorted((chat_ids(target.tokenizer, p) for p in sharegpt_prompts("train", limit=20)), key=len)
    for i in range(n):
        params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        reloader.engine.generate(prompts[i % len(prompts)], params, request_id=f"r{i}")


def test_same_tau_is_kept_on_real_traffic(rds, ns: str, versions, target) -> None:
    reloader, metrics = make_reloader(target, versions[0].parent.parent, ns, rds, window=6, min_requests=3)
    checkpoints.publish_version(rds, 1, versions[0], namespace=ns)
    assert reloader.check() and reloader.guard.watching is None  # ngram -> eagle3: another kind, not watched
    serve(reloader, target, 6)
    checkpoints.publish_version(rds, 2, versions[1], namespace=ns)
    assert reloader.check() and reloader.guard.watching is not None
    serve(reloader, target, 3)
    reloader.guard_tick()
    assert reloader.guard.verdict().decision == "wait"  # 3 of a 6-request window
    serve(reloader, target, 3)  # the same requests as v1 served, with the same weights: the same τ
    reloader.guard_tick()
    assert reloader.guard.watching is None and reloader.engine.drafter.version == "2"
    assert checkpoints.read_pointer(rds, ns)["version"] == 2
    assert metrics.drafter_rollbacks.labels(reason="tau_regression")._value.get() == 0


def test_a_worse_version_is_rolled_back(rds, ns: str, versions, target, caplog) -> None:
    reloader, metrics = make_reloader(target, versions[0].parent.parent, ns, rds, window=20, min_requests=5)
    checkpoints.publish_version(rds, 1, versions[0], namespace=ns)
    reloader.check()
    guard = reloader.guard
    for _ in range(20):  # v1 served τ ≈ 2 ...
        guard.observe(("eagle3", "1"), num_drafts=10, num_accepted=10)
    checkpoints.publish_version(rds, 2, versions[1], namespace=ns)
    reloader.check()
    for i in range(5):  # ... and v2 τ ≈ 1.1: a collapse like 2.71 -> 1.00
        guard.observe(("eagle3", "2"), num_drafts=10, num_accepted=1 + i % 2)
    with caplog.at_level(logging.WARNING):
        reloader.guard_tick()
    assert reloader.engine.drafter.version == "1"  # swapped back at once
    assert checkpoints.read_pointer(rds, ns)["version"] == 1
    assert rds.exists(checkpoints.cooldown_key(2, namespace=ns))
    assert metrics.drafter_rollbacks.labels(reason="tau_regression")._value.get() == 1
    assert "rolling back eagle3 v2 to v1" in caplog.text and "worse by more than 5%" in caplog.text
    assert reloader.guard.watching is None  # the swap back is a downgrade: not watched
    assert not checkpoints.publish_version(rds, 2, versions[1], namespace=ns)  # cooling down
    # a newer version is published and watched again
    checkpoints.publish_version(rds, 3, versions[2], namespace=ns)
    assert reloader.check() and reloader.guard.watching.new == ("eagle3", "3")
    reloader.pin(1)
    assert reloader.guard.watching is None  # an operator pin ends the watch


# --- end to end: a real server, a bad head published through the pointer ------------------


def guard_lines(log: str) -> str:
    """The server log's drafter and guard lines (a failure's evidence, without the access log)."""
    return "\n".join(line for line in log.splitlines() if "drafter" in line or "regression guard" in line)


@pytest.mark.slow
def test_a_bad_head_published_to_a_live_server_is_rolled_back(redis_db: str, settings, target, tmp_path: Path) -> None:
    """v1 is an SFT head fit to the traffic's prompts (served τ well above 1); v2
    has randomised weights. Both go through the checkpoint store and the
    pointer; a real server serving real requests (official client, API key)
    must roll v2 back by itself: pointer and server back on v1, the cool-down
    set, the rollback counted on /metrics."""
    import openai

    from benchmarks.soak_heads import bad_head, good_head

    from .conftest import metric, server_env, start_server, stop_process

    rds = redis.Redis.from_url(redis_db)
    ckdir = tmp_path / "checkpoints"
    prompts = [p for p in sharegpt_prompts("train", limit=60) if len(p) < 120][:8]
    v1 = good_head(target, prompts, ckdir, tmp_path / "sft-cache")
    checkpoints.publish_version(rds, 1, v1)
    env = server_env(
        settings.cache_dir, tmp_path, DRAFTLOOP_DRAFTER="auto", DRAFTLOOP_REDIS_URL=redis_db,
        DRAFTLOOP_API_KEYS="sk-guard-test", DRAFTLOOP_GUARD_WINDOW="12", DRAFTLOOP_GUARD_MIN_REQUESTS="6",
        OMP_NUM_THREADS="1",
        # the guard samples only requests that drafted; the adaptive policy may hold a short
        # request at K = 0 on a machine whose verify rows are dear, leaving v1 without a baseline
        # (a CI run kept v2 that way: "no baseline"), so every step drafts here
        DRAFTLOOP_SPECULATION="fixed",
    )  # fmt: skip
    server = start_server(env, tmp_path)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-guard-test", max_retries=0, timeout=120)
    ids = [chat_ids(target.tokenizer, p) for p in prompts]
    served: list[str] = []

    def send(n: int) -> None:
        for i in range(n):
            r = client.completions.create(model="smollm2-135m-instruct", prompt=ids[i % len(ids)], max_tokens=16, temperature=0)
            served.append(r.system_fingerprint)

    try:
        with httpx.Client(base_url=server.url) as http:
            send(8)  # v1's baseline
            assert served == ["draftloop-hybrid-1"] * 8
            v2 = bad_head(target, v1, ckdir)
            assert checkpoints.publish_version(rds, 2, v2)
            deadline = time.monotonic() + 240
            while metric(http, "draftloop_drafter_rollbacks_total", reason="tau_regression") < 1:
                assert time.monotonic() < deadline, guard_lines(server.log_tail(200_000))
                send(2)
            assert "draftloop-hybrid-2" in served  # v2 did serve before it was rolled back
            assert checkpoints.read_pointer(rds)["version"] == 1
            assert rds.exists(checkpoints.cooldown_key(2))
            assert not checkpoints.publish_version(rds, 2, v2)  # cooling down: a republish moves nothing
            deadline = time.monotonic() + 30
            while metric(http, "draftloop_drafter_version") != 1.0:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            send(1)
            assert served[-1] == "draftloop-hybrid-1"
        assert "rolling back eagle3 v2 to v1" in server.log_tail(20000)
    finally:
        stop_process(server.process)
