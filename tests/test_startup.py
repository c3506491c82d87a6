"""Start-up follows the drafter pointer: a server whose Redis pointer names a
version (pinned or not) loads exactly that version first, never the newest
one on disk; without a pointer (or with Redis down) it serves the newest
version that loads. Real eagle3 checkpoints of the default target, the real
Redis with a namespace per test (fixtures shared with test_reload)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service import checkpoints
from service.api.app import create_app
from service.config import Settings
from service.drafters import registry
from service.drafters.ngram import NgramDrafter
from service.runtime import build_drafter, load_state

from .conftest import free_port
from .test_reload import (  # noqa: F401 (fixtures shared with test_reload)
    REDIS_URL,
    CountingLoader,
    ckdir,
    head,
    ns,
    rds,
    reloads,
    save,
)


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> CountingLoader:
    """Every eagle3 load through the registry (start-up and reloader) is counted."""
    counter = CountingLoader()
    monkeypatch.setitem(registry.LOADERS, "eagle3", counter)
    return counter


def make_settings(ckdir: Path, drafter: str = "eagle3", url: str = REDIS_URL) -> Settings:
    """eagle3 by default: served as loaded (auto and hybrid wrap it, see test_auto_serves_hybrid)."""
    return Settings(checkpoint_dir=ckdir, redis_url=url, drafter=drafter, block_log=False, dtype="float32")


@pytest.mark.parametrize("pinned", [True, False])
def test_pointer_to_an_older_version_is_served_from_the_start(
    rds, ns, target, save, ckdir: Path, loads: CountingLoader, pinned: bool
) -> None:
    (_, v1), (_, v2) = save(), save()
    assert checkpoints.list_versions(ckdir) == [1, 2]
    checkpoints.publish_version(rds, 1, v1, pinned=pinned, namespace=ns)

    state = load_state(make_settings(ckdir), target, namespace=ns)
    try:
        assert (state.engine.drafter.kind, state.engine.drafter.version) == ("eagle3", "1")
        assert loads.calls == {"v1": 1}  # v2 (newest on disk) was never loaded

        app = create_app(state.settings, runtime=state)
        with TestClient(app) as client:
            reloader = app.state.reloader
            assert reloader.namespace == ns and reloader.running
            assert client.get("/health").json()["drafter"] == {"kind": "eagle3", "version": "1"}
            assert not reloader.check()  # the pointer names what is served: nothing to do
            time.sleep(0.3)
            assert client.get("/health").json()["drafter"]["version"] == "1"
        assert loads.calls == {"v1": 1}
        assert reloads(state.metrics, "ok") == reloads(state.metrics, "refused") == 0
        assert v2.is_dir()  # still on disk, just not served
    finally:
        state.close()


def test_no_pointer_serves_the_newest_valid_version(rds, ns, target, save, ckdir: Path, loads, caplog) -> None:
    save(), save()
    _, v3 = save()
    manifest = v3 / checkpoints.MANIFEST_FILE
    manifest.write_text(manifest.read_text().replace('"weights_sha256": "', '"weights_sha256": "00'))
    assert checkpoints.read_pointer(rds, ns) is None

    with caplog.at_level("WARNING"):
        drafter = build_drafter(make_settings(ckdir), target, rds, ns)
    assert (drafter.kind, drafter.version) == ("eagle3", "2")  # v3 refused, v2 is the newest that loads
    assert loads.calls == {"v3": 1, "v2": 1}
    assert "skipping eagle3 checkpoint v3" in caplog.text


def test_redis_down_falls_back_to_the_newest_version(target, save, ckdir: Path, loads, caplog) -> None:
    save(), save()
    with caplog.at_level("WARNING", logger="service.checkpoints.resolve"):
        drafter = build_drafter(make_settings(ckdir, url=f"redis://127.0.0.1:{free_port()}/0"), target)
    assert drafter.version == "2" and loads.calls == {"v2": 1}
    assert "drafter pointer unreadable" in caplog.text


def test_no_checkpoint_at_all(rds, ns, target, ckdir: Path) -> None:
    assert isinstance(build_drafter(make_settings(ckdir, drafter="auto"), target, rds, ns), NgramDrafter)
    with pytest.raises(FileNotFoundError, match="DRAFTLOOP_DRAFTER=hybrid"):
        build_drafter(make_settings(ckdir, drafter="hybrid"), target, rds, ns)
    with pytest.raises(FileNotFoundError, match="DRAFTLOOP_DRAFTER=eagle3"):
        build_drafter(make_settings(ckdir, drafter="eagle3"), target, rds, ns)


@pytest.mark.parametrize("drafter", ["auto", "hybrid"])
def test_auto_serves_hybrid(rds, ns, target, save, ckdir: Path, loads: CountingLoader, drafter: str) -> None:
    """auto and hybrid serve the published eagle3 head wrapped with prompt lookup."""
    save()
    served = build_drafter(make_settings(ckdir, drafter=drafter), target, rds, ns)
    assert (served.kind, served.version, served.checkpoint_kind) == ("hybrid", "1", "eagle3")
    assert served.describe()["head"]["kind"] == "eagle3"
