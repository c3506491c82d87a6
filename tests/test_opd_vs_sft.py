"""benchmarks/opd_vs_sft.py --quick: every phase runs on the real default model
(tiny sizes, ~1-2 min) and writes the JSON the issue asks for, and the plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .conftest import ROOT


def test_quick_run_writes_the_report(settings, default_model_dir, tmp_path):
    out = tmp_path / "opd_vs_sft.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DRAFTLOOP_CACHE_DIR": str(settings.cache_dir)}
    cmd = [sys.executable, "-m", "benchmarks.opd_vs_sft", "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())

    assert {
        "sft_curve",
        "arms",
        "budget_tokens",
        "model",
        "device",
        "config",
        "timings_s",
        "goal",
    } <= r.keys()
    assert r["sft_curve"] and all(
        {"epoch", "budget_tokens", "tau", "per_position_acceptance"} <= p.keys() for p in r["sft_curve"]
    )
    names = {"sft_continued", "opd", "forward_kl_all", "reverse_kl_all", "no_decay", "random_anchors"}
    k = r["config"]["plan"]["k"]
    for arm in r["arms"]:
        assert {
            "name",
            "temperature",
            "tau",
            "speedup_vs_target_only",
            "per_position_acceptance",
        } <= arm.keys()
        assert (
            arm["tau"] >= 1.0
            and arm["speedup_vs_target_only"] > 0
            and len(arm["per_position_acceptance"]) == k
        )
    assert {(a["name"], a["temperature"]) for a in r["arms"]} == {(n, t) for n in names for t in (0.0, 1.0)}
    assert len(r["arms"]) == 2 * len(names)

    # equal budgets: every arm reached the same budget and stopped at the step that did
    budget = r["budget_tokens"]
    assert budget > 0
    for name in names:
        t = r["training"][name]
        assert budget <= t["trained_tokens"] < budget + t["max_step_tokens"], (name, t)
    assert all(a["trained_tokens"] == r["training"][a["name"]]["trained_tokens"] for a in r["arms"])

    goal = r["goal"]
    assert (
        isinstance(goal["met"], bool)
        and goal["statement"]
        and set(goal["opd_above_ablation"]) == names - {"sft_continued", "opd"}
    )
    png = out.with_suffix(".png")
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
