"""Soak test of the whole loop under steady traffic, with faults injected.

    python -m benchmarks.soak --minutes M --out results/soak.json [--clients 2]

Starts its own stack (benchmarks/soak_stack.py): a Redis on a free port (AOF
on; never the shared one), a `draftloop serve` server with an API key
(drafter `auto`, block log on, a small regression-guard window) and a Celery
worker with tiny Draft-OPD settings. v1 is an EAGLE-3 head trained by the real
SFT trainer on the traffic's prompts (benchmarks/soak_heads.py), published
through the pointer. Client threads (the official `openai` client, streaming
and not) send requests the whole time, while the soak, in order:

1. `worker_kill`: sends `opd_update` and kill -9s the worker once the update
   is under way (Celery PROGRESS), then starts a new worker;
2. `redis_restart`: SHUTDOWN of Redis, a few seconds down, started again;
3. `update`: `opd_update` on the new worker (resent while the dead worker's
   training lock holds) until it finishes: the real worker publishes or not;
4. `disconnects`: streaming clients that hang up after their first event;
5. `corrupt_checkpoint`: a version directory whose weights do not match its
   manifest, dropped into the store and named by the pointer;
6. `bad_drafter`: a head with randomised weights, saved through the
   checkpoint store and published through the pointer; the guard must roll
   it back.

Baseline and after-phases last a fraction of M each; the faults take what they
take (the report has their times). The JSON report: requests sent / ok /
failed by reason, p50/p99 latency per phase, server RSS (start, after warm-up,
end, and every 30 s),
Redis memory, stream length against its cap, block records written / dropped,
versions published / refused / rolled back, and each fault with what it left
in the report and on /metrics. Benchmarks may import anything (worker too)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from celery import Celery

from benchmarks.soak_heads import bad_head, good_head
from benchmarks.soak_stack import SoakStack, scrape, wait_for
from benchmarks.soak_traffic import Traffic
from service import checkpoints
from service.config import Settings
from worker.app import OPD_UPDATE_TASK
from worker.prompts import chat_ids, sharegpt_prompts
from worker.update import GROUP

log = logging.getLogger("soak")

MODEL = "smollm2-135m-instruct"
STREAM = "draftloop:blocks"
STREAM_MAXLEN = 5000  # the cap the report checks the stream against
# Under adaptive speculation a request drafts a few blocks, not every step, so its
# served τ is noisy: with 12 requests a side the guard kept a random head (τ 1.04
# against 1.58, inside z=3 standard errors); 20-40 a side resolve it in seconds.
GUARD = {"window": 40, "min_requests": 20}
OPD_TRAIN = {  # seconds, not minutes, on one core: the soak is about faults, not about τ
    "epochs": 1, "batch_tokens": 256, "max_seconds": 10.0, "gate_requests": 2, "gate_max_tokens": 12, "gate_resamples": 200,
}
RSS_EVERY_S = 30.0  # server RSS sampling period
REFUSED = "draftloop_drafter_reloads_total{outcome=refused}"
ROLLBACK_REASONS = ("tau_regression", "speed_regression")
ROLLBACKS = "draftloop_drafter_rollbacks_total"  # summed over ROLLBACK_REASONS
DROPPED = "draftloop_block_records_dropped_total"
WRITTEN = "draftloop_block_records_written_total"
ABORTS = "draftloop_requests_total{finish_reason=abort}"
BACKLOG_PENDING = "draftloop_block_backlog{state=pending}"  # the killed worker's read, unacked blocks


class Soak:
    """One run: the stack, the traffic, the faults, the report."""

    def __init__(self, workdir: Path, cache_dir: Path, minutes: float, clients: int):
        self.minutes = minutes
        self.stack = SoakStack(
            workdir, cache_dir,
            server_env={
                "DRAFTLOOP_DRAFTER": "auto", "DRAFTLOOP_BLOCK_LOG": "true",
                "DRAFTLOOP_BLOCK_STREAM_MAXLEN": str(STREAM_MAXLEN),
                "DRAFTLOOP_GUARD_WINDOW": str(GUARD["window"]),
                "DRAFTLOOP_GUARD_MIN_REQUESTS": str(GUARD["min_requests"]),
            },
            worker_env={"DRAFTLOOP_OPD_MIN_BLOCKS": "40", "DRAFTLOOP_OPD_TRAIN": json.dumps(OPD_TRAIN)},
        )  # fmt: skip
        self.clients = clients
        self.faults: list[dict[str, Any]] = []
        self.t0 = 0.0
        self.target = None
        self.prompts: list[str] = [p for p in sharegpt_prompts("train", limit=60) if len(p) < 120][:8]
        self.traffic: Traffic | None = None
        self.rss: list[tuple[float, int]] = []  # (seconds since traffic start, server RSS bytes)
        self.warm_rss: int | None = None  # at the end of the steady baseline, before the first fault
        self._sampling = threading.Event()

    # ---- set-up ---------------------------------------------------------------
    def setup(self) -> None:
        from service.runtime import load_target

        torch.set_num_threads(1)
        s = self.stack
        self.target = load_target(Settings(cache_dir=s.cache_dir, dtype="float32"))
        s.start_redis()
        v1 = good_head(self.target, self.prompts, s.checkpoint_dir, s.workdir / "sft-cache")
        checkpoints.publish_version(s.redis, 1, v1)
        s.start_server()
        s.start_worker()
        ids = [chat_ids(self.target.tokenizer, p) for p in self.prompts]
        self.traffic = Traffic(s.url, s.api_key, MODEL, ids, clients=self.clients)
        self.celery = Celery("soak", broker=s.redis_url, backend=s.redis_url)

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 1)

    def phase(self, name: str) -> None:
        log.info("[%6.1f s] phase %s", self.now(), name)
        self.traffic.phase = name

    def fault(self, name: str, fn, metric: str | None = None) -> dict[str, Any]:
        """Run one fault, recording when, what it left, and the /metrics delta of `metric`."""
        self.phase(name)
        before = scrape(self.stack.url)
        at = self.now()
        details = fn()
        after = scrape(self.stack.url)
        entry = {"fault": name, "at_s": at, "took_s": round(self.now() - at, 1), **details}
        if metric is not None:
            delta = after.get(metric, 0.0) - before.get(metric, 0.0)
            entry.update(metric=metric, metric_delta=delta, on_metrics=delta > 0)
        else:
            entry.update(metric=None, on_metrics=None)
        log.info("fault %s: %s", name, entry)
        self.faults.append(entry)
        return entry

    # ---- the faults -------------------------------------------------------------
    def kill_worker(self) -> dict[str, Any]:
        res = self.celery.send_task(OPD_UPDATE_TASK)
        wait_for("the update to start", lambda: res.state == "PROGRESS", 180 * self.minutes + 120, 0.1)
        phase = (res.info or {}).get("phase")
        self.stack.worker.kill9()
        pending = self.stack.redis.xpending(STREAM, GROUP)["pending"]
        self.stack.start_worker()
        return {"update_phase_at_kill": phase, "blocks_read_not_acked": pending, "in_report": phase is not None}

    def restart_redis(self) -> dict[str, Any]:
        run_id = self.stack.redis.info("server")["run_id"]
        pointer = checkpoints.read_pointer(self.stack.redis)
        self.stack.restart_redis(down_s=4.0)
        restarted = self.stack.redis.info("server")["run_id"] != run_id
        kept = checkpoints.read_pointer(self.stack.redis) == pointer
        return {"down_s": 4.0, "restarted": restarted, "pointer_kept": kept, "in_report": restarted}

    def update(self) -> dict[str, Any]:
        deadline = time.monotonic() + 240 * self.minutes + 300
        while True:
            res = self.celery.send_task(OPD_UPDATE_TASK)
            wait_for("opd_update", res.ready, max(1.0, deadline - time.monotonic()), 0.5)
            out = res.get(timeout=10) if res.successful() else {"status": f"failed: {res.result!r}"}
            if out.get("status") != "locked" or time.monotonic() > deadline:
                break
            time.sleep(3)  # the killed worker's lock expires within its TTL
        return {"status": out.get("status"), "new_version": out.get("new_version"), "in_report": "status" in out}

    def disconnect(self, n: int = 3) -> dict[str, Any]:
        ids = self.traffic.prompts
        got = [self.traffic.disconnect(ids[i % len(ids)]) for i in range(n)]
        time.sleep(2.0)  # the server notices the closed connections on its next write
        return {"clients": n, "cut_after_first_event": sum(got), "in_report": all(got)}

    def corrupt_checkpoint(self) -> dict[str, Any]:
        s = self.stack
        good = checkpoints.version_path(s.checkpoint_dir, 1)
        version = max(checkpoints.list_versions(s.checkpoint_dir)) + 1
        tmp = s.checkpoint_dir / "eagle3" / f".soak-corrupt-{version}"
        shutil.copytree(good, tmp)
        manifest = json.loads((tmp / "manifest.json").read_text())
        (tmp / "manifest.json").write_text(json.dumps({**manifest, "version": version}))
        weights = tmp / manifest["weights_file"]
        weights.write_bytes(random.Random(version).randbytes(weights.stat().st_size))  # sha256 no longer matches
        tmp.rename(checkpoints.version_path(s.checkpoint_dir, version))
        checkpoints.publish_version(s.redis, version, checkpoints.version_path(s.checkpoint_dir, version))
        wait_for("the server to refuse it", lambda: scrape(s.url).get(REFUSED, 0) > 0, 60)
        return {"version": version, "in_report": True}

    def bad_drafter(self) -> dict[str, Any]:
        s = self.stack
        before = self.serving_version()
        # the serving version needs a baseline of its own requests before the swap
        served = self.ok_count()
        wait_for("a baseline for the guard", lambda: self.ok_count() >= served + GUARD["min_requests"] + 2, 300)
        path = bad_head(self.target, checkpoints.version_path(s.checkpoint_dir, 1), s.checkpoint_dir)
        version = checkpoints.version_of(path)
        checkpoints.publish_version(s.redis, version, path)
        wait_for("the server to serve it", lambda: self.serving_version() == version, 60)
        t_swap = time.monotonic()
        after_s = None
        try:
            wait_for("the rollback", lambda: scrape(s.url).get(ROLLBACKS, 0) > 0, 120 * self.minutes + 180)
            after_s = round(time.monotonic() - t_swap, 1)
            # the counter moves first, then the server follows the pointer back
            wait_for("the server to serve the old version again", lambda: self.serving_version() == before, 30)
        except TimeoutError:
            pass
        pointer = checkpoints.read_pointer(s.redis) or {}
        rolled = pointer.get("version") == before and self.serving_version() == before
        cool = bool(s.redis.exists(checkpoints.cooldown_key(version)))
        return {
            "version": version, "previous": before, "rolled_back": rolled, "cooldown_set": cool,
            "rollback_after_s": after_s, "in_report": rolled,
        }  # fmt: skip

    # ---- helpers ------------------------------------------------------------------
    def serving_version(self) -> int | None:
        v = scrape(self.stack.url).get("draftloop_drafter_version")
        return int(v) if v is not None else None

    def ok_count(self) -> int:
        return sum(o.ok for o in list(self.traffic.outcomes))

    def sample_rss(self) -> None:
        """Server RSS every RSS_EVERY_S until the run ends (a thread)."""
        while not self._sampling.wait(RSS_EVERY_S):
            rss = self.stack.server_rss()
            if rss is not None:
                self.rss.append((self.now(), rss))

    # ---- the run ------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        s = self.stack
        steady_s = 60.0 * self.minutes * 0.15
        rss0, redis0 = s.server_rss(), s.redis_info()
        self.t0 = time.monotonic()
        self.traffic.start()
        sampler = threading.Thread(target=self.sample_rss, name="rss", daemon=True)
        sampler.start()
        try:
            time.sleep(steady_s)
            self.warm_rss = s.server_rss()
            self.fault("worker_kill", self.kill_worker, BACKLOG_PENDING)
            self.fault("redis_restart", self.restart_redis, DROPPED)
            self.fault("update", self.update)
            self.fault("disconnects", self.disconnect, ABORTS)
            self.fault("corrupt_checkpoint", self.corrupt_checkpoint, REFUSED)
            self.fault("bad_drafter", self.bad_drafter, ROLLBACKS)
            self.phase("after")
            time.sleep(max(steady_s, 60.0 * self.minutes - self.now()))
        finally:
            self.traffic.stop()
            self._sampling.set()
        return self.report(rss0, redis0)

    def report(self, rss0: int | None, redis0: dict[str, int]) -> dict[str, Any]:
        s = self.stack
        m = scrape(s.url)
        rss1, redis1 = s.server_rss(), s.redis_info()
        reports = [json.loads(p.read_text()) for p in sorted((s.checkpoint_dir / "reports").glob("*.json"))]
        stream_len = s.redis.xlen(STREAM)
        return {
            "minutes": self.minutes, "wall_s": self.now(), "clients": self.clients,
            "requests": self.traffic.summary(),
            "server_rss_bytes": rss_report(rss0, self.warm_rss, rss1, self.rss),
            "redis": {"start": redis0, "end": redis1},
            "stream": {"length": stream_len, "maxlen": STREAM_MAXLEN, "within_cap": stream_len <= STREAM_MAXLEN * 1.1},
            "block_records": {"written": m.get(WRITTEN), "dropped": m.get(DROPPED)},
            "versions": {
                "published_by_worker": [r["new_version"] for r in reports if r.get("status") == "published"],
                "worker_runs": [{"kind": r.get("kind"), "status": r.get("status")} for r in reports],
                "refused": m.get(REFUSED, 0.0), "rolled_back": m.get(ROLLBACKS, 0.0),
                "serving_at_end": self.serving_version(), "pointer_at_end": checkpoints.read_pointer(s.redis),
            },
            "faults": self.faults,
            "all_faults_in_report": all(f["in_report"] for f in self.faults),
        }  # fmt: skip


def rss_report(start: int | None, warm: int | None, end: int | None, series: list[tuple[float, int]]) -> dict[str, Any]:
    """Server RSS at start (before traffic), warm (after the baseline phase) and
    end; `growth` is end over start (warm-up included, the goal's figure),
    `growth_after_warmup` end over warm; `series` the samples, to tell a leak
    (a steady climb) from warm-up and fault steps."""

    def ratio(a: int | None, b: int | None) -> float | None:
        return (b / a - 1) if a and b else None

    known = [r for _, r in series] + [r for r in (start, warm, end) if r]
    return {
        "start": start, "warm": warm, "end": end, "peak": max(known) if known else None,
        "growth": ratio(start, end), "growth_after_warmup": ratio(warm, end),
        "series": [[t, r] for t, r in series],
    }  # fmt: skip


def soak(minutes: float, out: Path | None, clients: int = 2, cache_dir: Path | None = None) -> dict[str, Any]:
    """Run a soak of `minutes` (traffic time) and write its JSON report to `out`."""
    cache = Path(cache_dir or Settings().cache_dir)
    workdir = Path(tempfile.mkdtemp(prefix="draftloop-soak-"))
    run = Soak(workdir, cache, minutes, clients)
    try:
        run.setup()
        report = run.run()
    finally:
        if run.traffic is not None:
            run.traffic.stop()
        run.stack.stop()
    report["workdir"] = str(workdir)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str))
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="traffic time (faults included)")
    ap.add_argument("--out", type=Path, default=Path("results/soak.json"))
    ap.add_argument("--clients", type=int, default=2, help="client threads sending requests back to back")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    report = soak(args.minutes, args.out, args.clients)
    req = report["requests"]
    print(json.dumps({k: report[k] for k in ("wall_s", "all_faults_in_report")} | {
        "sent": req["sent"], "ok": req["ok"], "failed": req["failed"], "failures": req["failures_by_reason"],
        "rss": report["server_rss_bytes"], "versions": report["versions"]}, indent=2, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
