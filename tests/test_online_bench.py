"""benchmarks/online.py end to end on the real default model, at `--quick`
scale: a tiny SFT checkpoint trained here, two rounds of served traffic and
Draft-OPD updates (ungated, so both publish and the evaluation of published
versions runs), the JSON and the plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service import checkpoints
from service.config import Settings
from service.drafters import eagle3
from worker.prompts import sharegpt_prompts
from worker.train.config import SFTConfig
from worker.train.sft import train_sft

from .conftest import ROOT

pytestmark = pytest.mark.slow

TINY_SFT = SFTConfig(
    num_prompts=4, max_new_tokens=16, gen_batch_size=4, train_steps=2, batch_tokens=512, warmup_steps=1, eval_prompts=0,
    num_exchanges=4, exchange_max_tokens=96,
)


@pytest.fixture(scope="module")
def sft_checkpoints(target, settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ckdir = tmp_path_factory.mktemp("online") / "checkpoints"
    train_sft(target, sharegpt_prompts("train", limit=TINY_SFT.num_prompts), ckdir, settings.cache_dir, TINY_SFT)
    return ckdir


def run_bench(settings: Settings, *args: str, module: str = "benchmarks.online") -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        "DRAFTLOOP_CACHE_DIR": str(settings.cache_dir),
        "OMP_NUM_THREADS": "1",
        "DRAFTLOOP_DTYPE": "float32",  # auto may pick bfloat16 on a CPU where it is faster; the test pins it
    }
    env.pop("DRAFTLOOP_OPD_TRAIN", None)
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def test_quick_run_writes_versions_and_plot(settings: Settings, sft_checkpoints: Path, tmp_path: Path) -> None:
    out, save_dir = tmp_path / "online.json", tmp_path / "published"
    proc = run_bench(
        settings, "--quick", "--no-gate", "--out", str(out),
        "--checkpoint-dir", str(sft_checkpoints), "--save-dir", str(save_dir), "--opd", '{"epochs": 1}',
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())

    assert result["model"] == "smollm2-135m-instruct" and result["dtype"] == "float32"
    cfg = result["config"]
    assert (cfg["rounds"], cfg["prompts_per_round"], cfg["gate"], cfg["opd"]["epochs"]) == (2, 3, False, 1)
    assert cfg["traffic_prompts"] == "sharegpt train[4:10]"  # after the 4 prompts the SFT run trained on

    versions = result["versions"]
    assert [v["version"] for v in versions] == [0, 1, 2]  # SFT, then one published version per (ungated) round
    for v in versions:
        assert {"version", "blocks_trained", "tau", "speedup_vs_target_only"} <= set(v)
        assert 1.0 <= v["tau"] <= 1 + result["num_speculative_tokens"] and v["speedup_vs_target_only"] > 0
    assert versions[0]["blocks_trained"] == 0 and versions[0]["checkpoint"] == result["sft"]["checkpoint"]
    assert 0 < versions[1]["blocks_trained"] < versions[2]["blocks_trained"]
    assert result["sft_tau"] == versions[0]["tau"]

    rounds = result["rounds"]
    assert [(r["round"], r["served_version"], r["new_version"]) for r in rounds] == [(1, 0, 1), (2, 1, 2)]
    for r in rounds:
        assert r["requests"] == 3 and r["blocks"] >= r["train_blocks"] > 0 and r["optimizer_steps"] >= 1
        assert r["gate_tau_before"] is not None and r["gate_tau_after"] is not None
    assert versions[2]["blocks_trained"] == sum(r["train_blocks"] for r in rounds)

    g = result["goal"]
    assert g["sft_tau"] == versions[0]["tau"] and g["final_tau"] == versions[-1]["tau"]
    assert g["met"] == (g["final_tau"] >= 1.10 * g["sft_tau"])

    # published versions are real checkpoints, each the child of the one before
    for number in checkpoints.list_versions(save_dir):
        manifest = eagle3.read_manifest(checkpoints.version_path(save_dir, number))
        assert (manifest["trainer"], manifest["parent_version"]) == ("opd", number - 1)
    assert checkpoints.list_versions(save_dir) == [1, 2]

    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "round 2/2" in proc.stderr  # progress lines per round


def test_without_an_sft_checkpoint_it_says_what_to_run(settings: Settings, tmp_path: Path) -> None:
    proc = run_bench(settings, "--quick", "--out", str(tmp_path / "o.json"), "--checkpoint-dir", str(tmp_path / "none"))
    assert proc.returncode != 0
    assert "draftloop train-sft" in proc.stderr
    assert not (tmp_path / "o.json").exists()
