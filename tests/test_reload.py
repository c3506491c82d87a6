"""Hot reload of the drafter with a real Redis and real eagle3 checkpoints of
the default target: pointer contract, pub/sub and polling, refusals, Redis
outages, pin / unpin, and the admin routes on a small app of their own.

Each test uses its own Redis namespace, so tests never see each other's keys."""

from __future__ import annotations

import json
import queue
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service import checkpoints
from service.api.admin import router as admin_router
from service.api.errors import install_error_handlers
from service.config import Settings
from service.drafters import eagle3
from service.drafters.ngram import NgramDrafter
from service.engine import Engine, Sequence, StepOutput
from service.metrics import Metrics
from service.reloader import CheckpointRefused, DrafterReloader, UnknownVersion
from service.sampling import SamplingParams

from .conftest import free_port, redis_or_skip, scratch_prefix
from .throwaway_redis import AVAILABLE as HAVE_REDIS_SERVER
from .throwaway_redis import start_redis, stop_redis, wait_until

REDIS_URL = "redis://127.0.0.1:6379/0"
TOKEN = "s3cret-admin-token"


@pytest.fixture(scope="module")
def rds() -> redis.Redis:
    return redis_or_skip(REDIS_URL)


@pytest.fixture
def ns(rds: redis.Redis) -> Iterator[str]:
    yield from scratch_prefix(rds, "test-reload")


@pytest.fixture(scope="module")
def head(target) -> eagle3.Eagle3Head:
    cfg = eagle3.Eagle3Config.for_target(target.model.cfg, draft_vocab_size=2048)
    h = eagle3.Eagle3Head(cfg)
    h.reset_parameters(torch.Generator().manual_seed(0))
    return h


@pytest.fixture
def ckdir(tmp_path: Path) -> Path:
    return tmp_path / "checkpoints"


@pytest.fixture
def save(head, target, ckdir: Path) -> Callable[[], tuple[int, Path]]:
    """Writes the next version with the real eagle3 writer -> (version, dir)."""

    def _save() -> tuple[int, Path]:
        path = eagle3.save_checkpoint(head, ckdir, target.model_id)
        return int(path.name[1:]), path

    return _save


class CountingLoader:
    """The real eagle3 loader, counting calls per version (to see retries)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def __call__(self, path: Path, target) -> eagle3.Eagle3Drafter:
        self.calls[path.name] = self.calls.get(path.name, 0) + 1
        return eagle3.load_checkpoint(path, target)


def make_reloader(target, ckdir: Path, ns: str, *, poll: float = 30.0, url: str = REDIS_URL, **settings_kw):
    """A reloader on an engine serving ngram (not started), its metrics and loader."""
    settings_kw.setdefault("drafter", "eagle3")  # served as loaded (auto/hybrid wrap it: see the hybrid test)
    settings = Settings(checkpoint_dir=ckdir, redis_url=url, block_log=False, **settings_kw)
    metrics = Metrics()
    engine = Engine(target.model, NgramDrafter(), target.eos_token_ids, 4, metrics=metrics)
    loader = CountingLoader()
    reloader = DrafterReloader(
        engine,
        target,
        settings,
        metrics,
        namespace=ns,
        poll_interval_s=poll,
        max_backoff_s=0.5,
        loaders={"eagle3": loader},
    )
    return reloader, engine, metrics, loader


def next_message(sub, timeout: float = 2.0) -> dict | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = sub.get_message(timeout=0.1)  # None for the (ignored) subscribe confirmation too
        if msg is not None:
            return msg
    return None


def wait_subscribed(rds: redis.Redis, ns: str) -> None:
    channel = checkpoints.updates_channel(ns)
    assert wait_until(lambda: rds.pubsub_numsub(channel)[0][1] >= 1, 10.0), "the reloader did not subscribe"


def reloads(metrics: Metrics, outcome: str) -> float:
    return metrics.drafter_reloads.labels(outcome=outcome)._value.get()


def serving(engine: Engine) -> tuple[str, str]:
    return engine.drafter.kind, engine.drafter.version


def flip_bytes(path: Path, offset_from_end: int = 100, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) - offset_from_end, len(data) - offset_from_end + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------
# the pointer contract


def test_list_versions_sees_only_complete_dirs(save, ckdir: Path) -> None:
    v1, _ = save()
    v2, _ = save()
    (ckdir / "eagle3" / "v9").mkdir()  # no manifest: incomplete
    (ckdir / "eagle3" / ".tmp-abc").mkdir()
    assert checkpoints.list_versions(ckdir) == [v1, v2] == [1, 2]
    assert checkpoints.version_path(ckdir, 2) == ckdir / "eagle3" / "v2"
    assert checkpoints.list_versions(ckdir / "nothing-here") == []


def test_pin_holds_against_automatic_publishes(rds, ns, save, ckdir: Path) -> None:
    paths = dict(save() for _ in range(3))
    with pytest.raises(FileNotFoundError):  # only complete directories are published
        checkpoints.publish_version(rds, 9, ckdir / "eagle3" / "v9", namespace=ns)

    sub = rds.pubsub(ignore_subscribe_messages=True)
    sub.subscribe(checkpoints.updates_channel(ns))
    wait_subscribed(rds, ns)
    assert checkpoints.publish_version(rds, 2, paths[2], namespace=ns)
    ptr = checkpoints.read_pointer(rds, ns)
    assert ptr is not None and ptr["version"] == 2 and ptr["pinned"] is False and ptr["kind"] == "eagle3"
    msg = next_message(sub)
    assert msg is not None and checkpoints.decode_pointer(msg["data"])["version"] == 2

    # an automatic publish never moves the pointer back (stale / redelivered result)
    assert not checkpoints.publish_version(rds, 1, paths[1], namespace=ns)
    assert checkpoints.read_pointer(rds, ns)["version"] == 2

    # an operator pin always moves it; automatic publishes are then only recorded
    assert checkpoints.publish_version(rds, 1, paths[1], pinned=True, namespace=ns)
    assert not checkpoints.publish_version(rds, 3, paths[3], namespace=ns)
    ptr = checkpoints.read_pointer(rds, ns)
    assert (ptr["version"], ptr["pinned"]) == (1, True)
    assert checkpoints.read_latest(rds, ns)["version"] == 3
    assert sorted(checkpoints.list_versions(ckdir)) == [1, 2, 3]  # kept on disk

    # unpin follows the newest published version again
    ptr = checkpoints.unpin(rds, ckdir, namespace=ns)
    assert (ptr["version"], ptr["pinned"]) == (3, False)
    assert checkpoints.read_pointer(rds, ns)["version"] == 3
    sub.close()


def test_unpin_without_a_published_version_uses_the_newest_on_disk(rds, ns, save, ckdir: Path) -> None:
    assert checkpoints.unpin(rds, ckdir, namespace=ns) is None  # nothing anywhere
    paths = dict(save() for _ in range(2))
    checkpoints.publish_version(rds, 1, paths[1], pinned=True, namespace=ns)
    ptr = checkpoints.unpin(rds, ckdir, namespace=ns)
    assert (ptr["version"], ptr["pinned"]) == (2, False)


# ---------------------------------------------------------------------------
# the reloader thread


def test_publish_swaps_the_drafter(rds, ns, target, save, ckdir: Path) -> None:
    reloader, engine, metrics, _ = make_reloader(
        target, ckdir, ns, poll=30.0
    )  # only pub/sub can be this fast
    reloader.start()
    try:
        wait_subscribed(rds, ns)
        for _ in range(2):
            version, path = save()
            t0 = time.monotonic()
            checkpoints.publish_version(rds, version, path, namespace=ns)
            assert wait_until(lambda v=version: serving(engine) == ("eagle3", str(v)), timeout=5.0)
            assert time.monotonic() - t0 < 5.0
        assert reloads(metrics, "ok") == 2 and reloads(metrics, "refused") == 0
        info = metrics.drafter_info.labels(kind="eagle3", version="2")._value.get()
        assert info == 1 and metrics.drafter_version._value.get() == 2
    finally:
        reloader.stop()


def test_polling_picks_up_a_missed_message(rds, ns, target, save, ckdir: Path) -> None:
    version, path = save()
    reloader, engine, metrics, _ = make_reloader(target, ckdir, ns, poll=0.5)
    reloader.start()
    try:
        wait_subscribed(rds, ns)
        payload = checkpoints.pointer_payload(version, path)  # SET without PUBLISH: the message is "lost"
        rds.set(checkpoints.pointer_key(ns), json.dumps(payload))
        assert wait_until(lambda: serving(engine) == ("eagle3", "1"), timeout=5.0)
        assert reloads(metrics, "ok") == 1
    finally:
        reloader.stop()


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_bad_checkpoint_is_refused_once(rds, ns, target, save, ckdir: Path, damage: str, caplog) -> None:
    good, good_path = save()
    bad, bad_path = save()
    weights = bad_path / eagle3.WEIGHTS_FILE
    if damage == "flipped":
        flip_bytes(weights)
    else:
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    reloader, engine, metrics, loader = make_reloader(target, ckdir, ns, poll=0.2)
    reloader.start()
    try:
        checkpoints.publish_version(rds, good, good_path, namespace=ns)
        assert wait_until(lambda: serving(engine) == ("eagle3", str(good)), 10.0)
        with caplog.at_level("ERROR", logger="service.reloader"):
            checkpoints.publish_version(rds, bad, bad_path, namespace=ns)
            assert wait_until(lambda: reloads(metrics, "refused") == 1, 10.0)
            time.sleep(1.5)  # ~7 polls: a refused, unchanged checkpoint is not tried again
        assert serving(engine) == ("eagle3", str(good))
        assert reloads(metrics, "refused") == 1 and reloads(metrics, "ok") == 1
        assert loader.calls[bad_path.name] == 1
        assert any("refused" in r.getMessage() and "sha256" in r.getMessage() for r in caplog.records)
        [refusal] = reloader.status()["refused"]
        assert refusal["version"] == bad and "sha256" in refusal["reason"]

        # the admin path reports the same refusal as an error, and serving is unchanged
        with pytest.raises(CheckpointRefused, match="sha256"):
            reloader.reload_now(bad)
        with pytest.raises(UnknownVersion):
            reloader.reload_now(99)
        assert serving(engine) == ("eagle3", str(good))

        # a version whose files are replaced is tried again
        shutil.rmtree(bad_path)
        shutil.copytree(good_path, bad_path)
        manifest = bad_path / eagle3.MANIFEST_FILE
        manifest.write_text(manifest.read_text().replace(f'"version": {good},', f'"version": {bad},'))
        assert wait_until(lambda: serving(engine) == ("eagle3", str(bad)), timeout=5.0)
    finally:
        reloader.stop()


def test_mismatched_target_is_refused(rds, ns, target, save, ckdir: Path) -> None:
    version, path = save()
    manifest = path / eagle3.MANIFEST_FILE
    manifest.write_text(
        manifest.read_text().replace(f'"target_model": "{target.model_id}"', '"target_model": "other"')
    )
    reloader, engine, metrics, _ = make_reloader(target, ckdir, ns)
    checkpoints.publish_version(rds, version, path, namespace=ns)
    assert reloader.check() is False
    assert serving(engine) == ("ngram", "0") and reloads(metrics, "refused") == 1
    assert "target" in reloader.status()["refused"][0]["reason"]


@pytest.mark.skipif(not HAVE_REDIS_SERVER, reason="needs the redis-server binary")
def test_redis_outage_keeps_serving_and_recovers(target, save, ckdir: Path, tmp_path: Path) -> None:
    """A private redis-server: down at start, up, killed, up again."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    v1, p1 = save()
    v2, p2 = save()
    reloader, engine, metrics, _ = make_reloader(target, ckdir, "draftloop", poll=0.3, url=url)
    reloader.start()  # Redis is not there yet
    server = None
    try:
        time.sleep(1.0)
        assert reloader.running and not reloader._redis_ok and serving(engine) == ("ngram", "0")
        assert reloader.status()["redis"].startswith("unavailable")

        server = start_redis(port, tmp_path)
        checkpoints.publish_version(server, v1, p1)
        assert wait_until(lambda: serving(engine) == ("eagle3", "1"), timeout=10.0)

        stop_redis(server)  # Redis dies: the drafter keeps serving, the thread lives
        server = None
        time.sleep(1.5)
        assert reloader.running and not reloader._redis_ok and serving(engine) == ("eagle3", "1")

        server = start_redis(port, tmp_path)  # an empty Redis comes back
        checkpoints.publish_version(server, v2, p2)
        assert wait_until(lambda: serving(engine) == ("eagle3", "2"), timeout=10.0)
        assert reloader._redis_ok and reloads(metrics, "refused") == 0
    finally:
        reloader.stop()
        if server is not None:
            stop_redis(server)
    assert not reloader.running


def test_no_follow_for_an_explicit_other_drafter(target, ckdir: Path, ns) -> None:
    reloader, _, _, _ = make_reloader(target, ckdir, ns, drafter="ngram")
    reloader.start()
    assert not reloader.follow and not reloader.running


def collect(outputs: queue.Queue) -> list[int]:
    """The tokens of one sequence's outputs, up to its finish."""
    tokens: list[int] = []
    while True:
        out = outputs.get(timeout=60)
        assert not isinstance(out, BaseException), out
        tokens += out.token_ids
        if out.finish_reason is not None:
            return tokens


def test_in_flight_sequence_finishes_on_its_drafter(rds, ns, target, save, ckdir: Path) -> None:
    """A swap while a sequence decodes: it finishes on ngram, the next sequence
    runs on the new drafter, and both give the same (greedy, lossless) output."""
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompt = target.tokenizer.encode("The three primary colors are")
    version, path = save()
    reloader, engine, _, _ = make_reloader(target, ckdir, ns)
    engine.start_loop()
    try:
        outputs: queue.Queue[StepOutput | BaseException] = queue.Queue()
        seq = Sequence("in-flight", list(prompt), params, emit=outputs.put)
        engine.submit(seq)
        first = outputs.get(timeout=30)
        assert not isinstance(first, BaseException)
        checkpoints.publish_version(rds, version, path, namespace=ns)
        assert reloader.check()  # loads and swaps while the engine thread decodes `seq`
        tokens = first.token_ids + collect(outputs)
        assert serving(engine) == ("eagle3", "1")
        assert len(tokens) == params.max_tokens
        assert seq.drafter is not None and seq.drafter.kind == "ngram"
        seq2 = Sequence("after-swap", list(prompt), params, emit=outputs.put)
        engine.submit(seq2)
        tokens2 = collect(outputs)
        assert seq2.drafter.kind == "eagle3" and tokens2 == tokens  # both lossless: the greedy target output
    finally:
        engine.stop_loop()


# ---------------------------------------------------------------------------
# the admin routes


def admin_client(reloader: DrafterReloader) -> TestClient:
    app = FastAPI()
    install_error_handlers(app, 1_000_000)
    app.include_router(admin_router)
    app.state.reloader = reloader
    return TestClient(app)


def assert_openai_error(resp, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code
    return err


def test_admin_auth(target, ckdir: Path, ns) -> None:
    off, _, _, _ = make_reloader(target, ckdir, ns)  # no DRAFTLOOP_ADMIN_TOKEN
    with admin_client(off) as client:
        for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}):
            assert_openai_error(client.get("/admin/drafter", headers=headers), 403)
            assert_openai_error(client.post("/admin/drafter", json={"version": 1}, headers=headers), 403)
            assert_openai_error(client.delete("/admin/drafter/pin", headers=headers), 403)

    on, _, _, _ = make_reloader(target, ckdir, ns, admin_token=TOKEN)
    with admin_client(on) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
            err = assert_openai_error(client.get("/admin/drafter", headers=headers), 401)
            assert err["type"] == "authentication_error"
            assert_openai_error(client.post("/admin/drafter", json={"bogus": 1}, headers=headers), 401)
        assert client.get("/admin/drafter", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200

    app = FastAPI()  # no reloader configured
    install_error_handlers(app, 1_000_000)
    app.include_router(admin_router)
    with TestClient(app) as client:
        assert_openai_error(client.get("/admin/drafter"), 503, "admin_unavailable")


def test_admin_pin_rollback_unpin(rds, ns, target, save, ckdir: Path) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    paths = dict(save() for _ in range(3))
    flip_bytes(paths[3] / eagle3.WEIGHTS_FILE)  # v3 is corrupt
    reloader, engine, metrics, _ = make_reloader(target, ckdir, ns, admin_token=TOKEN)
    checkpoints.publish_version(rds, 2, paths[2], namespace=ns)  # the worker's newest good version
    assert reloader.check() and serving(engine) == ("eagle3", "2")

    with admin_client(reloader) as client:
        body = client.get("/admin/drafter", headers=auth).json()
        assert body["serving"]["kind"] == "eagle3" and body["serving"]["version"] == "2"
        assert body["versions"] == [1, 2, 3] and body["pointer"]["version"] == 2 and body["redis"] == "ok"

        # roll back: pin v1
        resp = client.post("/admin/drafter", json={"version": 1}, headers=auth)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert (
            body["serving"]["version"] == "1"
            and body["pointer"]["version"] == 1
            and body["pointer"]["pinned"]
        )
        assert serving(engine) == ("eagle3", "1")

        # a new automatic version does not move the pin (the reloader keeps v1)
        v4, p4 = save()
        assert not checkpoints.publish_version(rds, v4, p4, namespace=ns)
        assert reloader.check() is False and serving(engine) == ("eagle3", "1")

        # unknown version 404, corrupt one 409 with its reason, bad bodies 400; nothing changes
        assert_openai_error(
            client.post("/admin/drafter", json={"version": 99}, headers=auth), 404, "version_not_found"
        )
        err = assert_openai_error(client.post("/admin/drafter", json={"version": 3}, headers=auth), 409)
        assert err["code"] == "checkpoint_refused" and "sha256" in err["message"]
        assert_openai_error(client.post("/admin/drafter", json={}, headers=auth), 400)
        assert_openai_error(
            client.post("/admin/drafter", json={"version": 2, "unpin": True}, headers=auth), 400
        )
        assert_openai_error(client.post("/admin/drafter", json={"version": "x"}, headers=auth), 400)
        assert serving(engine) == ("eagle3", "1")
        assert checkpoints.read_pointer(rds, ns)["version"] == 1

        # unpin: back to the newest published version (v4), loaded at once
        resp = client.delete("/admin/drafter/pin", headers=auth)
        assert resp.status_code == 200, resp.text
        pointer = resp.json()["pointer"]
        assert pointer["version"] == 4 and pointer["pinned"] is False
        assert serving(engine) == ("eagle3", "4")

        # pin again and unpin through POST
        assert (
            client.post("/admin/drafter", json={"version": 2}, headers=auth).json()["serving"]["version"]
            == "2"
        )
        resp = client.post("/admin/drafter", json={"version": None, "unpin": True}, headers=auth)
        assert resp.status_code == 200 and resp.json()["serving"]["version"] == "4"
    assert reloads(metrics, "refused") == 1


def test_hybrid_follows_the_pointer(rds, ns, target, save, ckdir: Path) -> None:
    """DRAFTLOOP_DRAFTER=hybrid: each published eagle3 version is served wrapped
    with prompt lookup, and a pointer naming the served head is a no-op."""
    (_, v1), (_, v2) = save(), save()
    reloader, engine, _, _ = make_reloader(target, ckdir, ns, drafter="hybrid")
    checkpoints.publish_version(rds, 1, v1, namespace=ns)
    assert reloader.check() and serving(engine) == ("hybrid", "1")
    assert reloader.check() is False  # the pointer names the head the hybrid serves
    checkpoints.publish_version(rds, 2, v2, namespace=ns)
    assert reloader.check() and serving(engine) == ("hybrid", "2")
