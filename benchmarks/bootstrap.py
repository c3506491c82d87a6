"""The first hour of `make run`, measured: `draftloop up` (server, Celery worker
and beat, a Redis of its own) from an empty checkpoint store, under steady
chat traffic, with served τ and the drafter version sampled from the server.

    python -m benchmarks.bootstrap --minutes 60 --out results/bootstrap.json [--rate 0.5]

The stack is the product's own entry point, as a new user starts it: nothing
is preloaded except the converted default model (linked from the model cache,
so the run does not convert it again). Traffic is `benchmarks.traffic` (the
ShareGPT training split, greedy, at `--rate` requests/s). Every `--every`
seconds the sampler reads /metrics (τ over the window: accepted / drafts + 1)
and /health (the drafter kind and version serving). The report has, per
drafter version, the served τ over the windows it served and tokens per decode
step (every step, K = 0 ones too: served τ counts only the steps that drafted,
which flatters a drafter that drafts only on a sure match, as ngram does); the published
versions' manifests (held-out evaluation, gate decision); the worker's gate
refusals; and the goals of the drafter issue: each published version's served
τ at least the one before it, and the last at least 1.3x the ngram τ of the
first minutes. A PNG of served τ and version against time goes beside it."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.soak_stack import ROOT, Child, free_port, wait_healthy
from benchmarks.traffic import main as traffic_main
from benchmarks.traffic import read_metrics, tau_between
from service.config import Settings
from service.costmodel import cpu_model
from service.stack import allocator_env

log = logging.getLogger("benchmarks.bootstrap")

FIRST_MINUTES = 5.0  # the ngram baseline: served τ over the first minutes, before any publish
GOAL_OVER_NGRAM = 1.3


def link_model_cache(user_cache: Path, cache: Path) -> None:
    """A fresh cache that reuses the converted default model (models/ only)."""
    (cache / "models").mkdir(parents=True, exist_ok=True)
    for model in (user_cache / "models").iterdir():
        dest = cache / "models" / model.name
        if not dest.exists():
            dest.symlink_to(model.resolve())


def sample(url: str, last: dict[str, float], t: float) -> tuple[dict[str, Any], dict[str, float]]:
    """One sample: τ since `last` and the drafter serving -> (record, metrics now)."""
    now = read_metrics(url, "unused")
    drafter = httpx.get(f"{url}/health", timeout=10).json().get("drafter", {})
    def delta(name: str) -> float:
        return now.get(name, 0.0) - last.get(name, 0.0)

    drafts = delta("draftloop_spec_decode_drafts_total")
    # tokens per decode step, every step counted (K = 0 ones too): served τ counts only steps
    # that drafted, so a drafter that drafts only on a sure match (ngram) scores high on it
    steps = delta("draftloop_draft_length_count")
    decoded = delta("draftloop_generation_tokens_total") - delta("draftloop_time_to_first_token_seconds_count")
    record = {
        "minute": round(t / 60, 2),
        "tau": None if (tau := tau_between(last, now)) is None else round(tau, 4),
        "tokens_per_step": round(decoded / steps, 4) if steps > 0 else None,
        "steps": int(steps),
        "drafts": int(drafts),
        "kind": drafter.get("kind"),
        "version": drafter.get("version"),
    }
    return record, now


def per_version(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Served τ per (kind, version) in serving order, pooled over its windows
    (weighted by drafts: accepted / drafts over all of them, + 1)."""
    out: list[dict[str, Any]] = []
    for s in samples:
        if s["tau"] is None or s["drafts"] == 0:
            continue
        key = (s["kind"], s["version"])
        if not out or (out[-1]["kind"], out[-1]["version"]) != key:
            out.append({"kind": s["kind"], "version": s["version"], "from_minute": s["minute"], "drafts": 0, "accepted": 0.0})
        out[-1]["drafts"] += s["drafts"]
        out[-1]["accepted"] += (s["tau"] - 1) * s["drafts"]
        if s.get("tokens_per_step") is not None:
            out[-1]["steps"] = out[-1].get("steps", 0) + s["steps"]
            out[-1]["decoded"] = out[-1].get("decoded", 0.0) + s["tokens_per_step"] * s["steps"]
        out[-1]["to_minute"] = s["minute"]
    for row in out:
        row["served_tau"] = round(1 + row.pop("accepted") / row["drafts"], 4)
        if row.get("steps"):
            row["tokens_per_step"] = round(row.pop("decoded") / row["steps"], 4)
    return out


def ngram_baseline(samples: list[dict[str, Any]], minutes: float = FIRST_MINUTES) -> float | None:
    """Served τ of the ngram drafter over the first `minutes` (drafts-weighted)."""
    first = [s for s in samples if s["minute"] <= minutes and s["kind"] == "ngram" and s["drafts"] and s["tau"]]
    drafts = sum(s["drafts"] for s in first)
    return round(1 + sum((s["tau"] - 1) * s["drafts"] for s in first) / drafts, 4) if drafts else None


def goals(versions: list[dict[str, Any]], ngram_tau: float | None) -> dict[str, Any]:
    """The drafter issue's bootstrap goals over the published eagle3/hybrid versions."""
    published = [v for v in versions if v["kind"] in ("eagle3", "hybrid")]
    taus = [v["served_tau"] for v in published]
    monotone = all(b >= a for a, b in itertools.pairwise(taus))
    last = taus[-1] if taus else None
    ratio = round(last / ngram_tau, 3) if last is not None and ngram_tau else None
    return {
        "published_versions_served": len(published),
        "each_version_at_least_the_one_before": monotone if published else None,
        "ngram_tau_first_minutes": ngram_tau,
        "last_version_tau": last,
        "last_over_ngram": ratio,
        "goal_last_over_ngram": GOAL_OVER_NGRAM,
        "goal_met": bool(published) and monotone and ratio is not None and ratio >= GOAL_OVER_NGRAM,
    }


def manifests(checkpoint_dir: Path) -> list[dict[str, Any]]:
    """The published checkpoints' manifests (the gate's evidence with each)."""
    out = []
    for path in sorted(checkpoint_dir.glob("*/v*/manifest.json"), key=lambda p: (p.parent.parent.name, int(p.parent.name[1:]))):
        try:
            out.append({"path": str(path.parent.relative_to(checkpoint_dir)), **json.loads(path.read_text())})
        except (OSError, ValueError) as exc:
            out.append({"path": str(path.parent), "error": repr(exc)})
    return out


def gate_reports(checkpoint_dir: Path) -> list[dict[str, Any]]:
    """Every update's report (`worker.reports`: the gate's decision and its
    interval, published or not), oldest first."""
    out = []
    for path in sorted((checkpoint_dir / "reports").glob("*-v*.json")):
        try:
            out.append({"file": path.name, **json.loads(path.read_text())})
        except (OSError, ValueError) as exc:
            out.append({"file": path.name, "error": repr(exc)})
    return out


def worker_decisions(log_path: Path) -> list[str]:
    """The worker's lines about publishing and refusing (the gate's decisions)."""
    if not log_path.exists():
        return []
    pattern = re.compile(r"publish|refus|gate|bootstrap", re.IGNORECASE)
    return [line.strip()[:400] for line in log_path.read_text(errors="replace").splitlines() if pattern.search(line)][-200:]


def plot(samples: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    pts = [(s["minute"], s["tau"]) for s in samples if s["tau"] is not None]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], ".-", label="served τ (window)")
    ax.set_xlabel("minutes of traffic")
    ax.set_ylabel("served τ")
    ax2 = ax.twinx()
    ax2.step([s["minute"] for s in samples], [int(s["version"] or 0) for s in samples], "r-", where="post", label="drafter version")
    ax2.set_ylabel("drafter version", color="r")
    ax.set_title("make run: the first hour (served τ and drafter version)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--rate", type=float, default=0.5, help="requests per second")
    ap.add_argument("--every", type=float, default=30.0, help="seconds between samples")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a new temporary folder (kept: logs)")
    ap.add_argument("--out", type=Path, default=Path("results/bootstrap.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="draftloop-bootstrap-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cache, checkpoints = workdir / "cache", workdir / "checkpoints"
    link_model_cache(Path(Settings().cache_dir), cache)
    port, redis_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ, **allocator_env(), "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        "PYTHONUNBUFFERED": "1", "DRAFTLOOP_CACHE_DIR": str(cache), "DRAFTLOOP_CHECKPOINT_DIR": str(checkpoints),
        "DRAFTLOOP_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "DRAFTLOOP_PORT": str(port),
    }  # fmt: skip
    env.pop("OMP_NUM_THREADS", None)  # `draftloop up` splits the cores between server and worker
    stack = Child("up", [sys.executable, "-m", "service.cli", "up"], env, workdir / "up.log").start()
    log.info("draftloop up in %s (logs: %s)", workdir, workdir / "up.log")
    samples: list[dict[str, Any]] = []
    try:
        wait_healthy(stack, url, 900)
        seconds = 60.0 * args.minutes
        traffic = threading.Thread(
            target=traffic_main, args=(["--url", url, "--rate", str(args.rate), "--duration", str(seconds), "--report-every", "300"],),
            name="traffic", daemon=True,
        )  # fmt: skip
        t0 = time.monotonic()
        traffic.start()
        last = read_metrics(url, "unused")
        while (t := time.monotonic() - t0) < seconds:
            time.sleep(min(args.every, max(0.0, seconds - t)))
            if not stack.alive:
                raise RuntimeError(f"draftloop up exited:\n{stack.tail()}")
            record, last = sample(url, last, time.monotonic() - t0)
            samples.append(record)
            log.info("minute %5.1f: τ %s over %d drafts, %s v%s", record["minute"], record["tau"], record["drafts"], record["kind"], record["version"])
        traffic.join(timeout=600)
    finally:
        stack.stop(timeout_s=60)
    versions = per_version(samples)
    report = {
        "command": f"python -m benchmarks.bootstrap --minutes {args.minutes:g} --rate {args.rate:g}",
        "cpu": cpu_model(),
        "minutes": args.minutes,
        "rate_per_s": args.rate,
        "versions": versions,
        "goals": goals(versions, ngram_baseline(samples)),
        "published": manifests(checkpoints),
        "gate_reports": gate_reports(checkpoints),
        "worker_decisions": worker_decisions(workdir / "up.log"),
        "samples": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    plot(samples, args.out.with_suffix(".png"))
    log.info("wrote %s: %s", args.out, json.dumps(report["goals"]))


if __name__ == "__main__":
    main()
