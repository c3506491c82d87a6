"""Throughput and latency under concurrent load, against a real server.

    python -m benchmarks.load --out results/load.json [--concurrency 1 2 4 8 16 32]
        [--configs target_only fixed adaptive] [--seconds 60] [--max-tokens 48] [--block-log]

For each configuration it starts one `draftloop serve` (float32 unless
--dtype, DRAFTLOOP_MAX_NUM_SEQS = the largest concurrency; the block log off,
or with --block-log on, into a stream of its own on DRAFTLOOP_REDIS_URL that
is deleted afterwards) and,
for each concurrency level c, runs c closed-loop clients (the official
`openai` client, streaming chat completions with usage in the last chunk): each
sends its next request as soon as the last one ends, until `--seconds` have
passed; requests started before then run to the end.

Configurations (DRAFTLOOP_DRAFTER / DRAFTLOOP_SPECULATION):
- `target_only`: no drafter, every step one row per sequence (batched);
- `fixed`: prompt lookup (ngram) drafting up to K every step;
- `adaptive`: the same drafter, K per sequence and step from its running
  acceptance and the batch (service/speculation.py).

Per level: aggregate tokens/s (completion tokens of every request / the time
from the first start to the last end), requests, p50/p99 latency, p50/p99
time to first token, errors, and the mean draft length the server chose
per sequence and step (`draftloop_draft_length` on /metrics), and with
--block-log the block records written and dropped (whether the log keeps
up: the records of a full queue are dropped, never waited for). Prompts are the held-out ShareGPT split, the same sequence for
every configuration. Writes the JSON and a PNG of throughput against
concurrency next to it."""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import redis

from benchmarks.soak_stack import scrape, start_serve
from benchmarks.soak_traffic import quantile
from service.config import Settings

log = logging.getLogger("benchmarks.load")

MODEL = "smollm2-135m-instruct"
BLOCK_METRICS = {"written": "draftloop_block_records_written_total", "dropped": "draftloop_block_records_dropped_total"}
CONFIGS: dict[str, dict[str, str]] = {
    "target_only": {"DRAFTLOOP_DRAFTER": "none", "DRAFTLOOP_SPECULATION": "fixed"},
    "fixed": {"DRAFTLOOP_DRAFTER": "ngram", "DRAFTLOOP_SPECULATION": "fixed"},
    "adaptive": {"DRAFTLOOP_DRAFTER": "ngram", "DRAFTLOOP_SPECULATION": "adaptive"},
}


@dataclass
class Request:
    start: float
    end: float
    ttft: float | None
    tokens: int
    error: str = ""


@dataclass
class Level:
    """c closed-loop clients for a fixed time."""

    url: str
    prompts: list[str]
    clients: int
    seconds: float
    max_tokens: int
    done: list[Request] = field(default_factory=list)

    def run(self) -> dict[str, Any]:
        lock = threading.Lock()
        deadline = time.monotonic() + self.seconds

        def client(i: int) -> None:
            api = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=600)
            n = 0
            while time.monotonic() < deadline:
                r = self._one(api, self.prompts[(i * 7919 + n) % len(self.prompts)])
                n += 1
                with lock:
                    self.done.append(r)

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return summarize(self.done, self.clients)

    def _one(self, api: openai.OpenAI, prompt: str) -> Request:
        t0 = time.monotonic()
        ttft, tokens = None, 0
        try:
            stream = api.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=self.max_tokens,
                temperature=0, stream=True, stream_options={"include_usage": True},
            )  # fmt: skip
            for chunk in stream:
                if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                    ttft = time.monotonic() - t0
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
        except openai.OpenAIError as exc:
            return Request(t0, time.monotonic(), ttft, tokens, type(exc).__name__)
        return Request(t0, time.monotonic(), ttft, tokens)


def summarize(done: list[Request], clients: int) -> dict[str, Any]:
    ok = [r for r in done if not r.error]
    span = max(r.end for r in done) - min(r.start for r in done) if done else 0.0
    tokens = sum(r.tokens for r in ok)
    latency = [r.end - r.start for r in ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    return {
        "concurrency": clients, "requests": len(done), "errors": len(done) - len(ok),
        "completion_tokens": tokens, "seconds": round(span, 2),
        "tokens_per_s": round(tokens / span, 2) if span > 0 else None,
        "latency_p50_s": quantile(latency, 0.5), "latency_p99_s": quantile(latency, 0.99),
        "ttft_p50_s": quantile(ttft, 0.5), "ttft_p99_s": quantile(ttft, 0.99),
    }  # fmt: skip


def run_config(name: str, args: argparse.Namespace, prompts: list[str], cache_dir: Path) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"draftloop-load-{name}-"))
    stream = f"draftloop:load:{uuid.uuid4().hex[:8]}"
    env = {
        **CONFIGS[name], "DRAFTLOOP_BLOCK_LOG": str(args.block_log).lower(), "DRAFTLOOP_BLOCK_STREAM": stream,
        "DRAFTLOOP_DTYPE": args.dtype,
        "DRAFTLOOP_MAX_NUM_SEQS": str(max(args.concurrency)), "DRAFTLOOP_MAX_QUEUE": str(4 * max(args.concurrency)),
    }  # fmt: skip
    server, url = start_serve(workdir, cache_dir, env)
    levels = []
    try:
        Level(url, prompts, 1, min(5.0, args.seconds), args.max_tokens).run()  # warm-up, not reported
        for c in args.concurrency:
            before = scrape(url)
            result = Level(url, prompts, c, args.seconds, args.max_tokens).run()
            after = scrape(url)
            steps = after.get("draftloop_draft_length_count", 0) - before.get("draftloop_draft_length_count", 0)
            drafted = after.get("draftloop_draft_length_sum", 0) - before.get("draftloop_draft_length_sum", 0)
            result["mean_k"] = round(drafted / steps, 3) if steps else None
            if args.block_log:
                result["block_records"] = {k: after.get(m, 0) - before.get(m, 0) for k, m in BLOCK_METRICS.items()}
            log.info("%s c=%d: %s", name, c, result)
            levels.append(result)
    finally:
        server.stop()
        if args.block_log:
            redis.Redis.from_url(Settings().redis_url).delete(stream)
    return {"config": name, "env": env, "levels": levels, "server_log": str(workdir / "server.log")}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for cfg in report["configs"]:
        xs = [lv["concurrency"] for lv in cfg["levels"]]
        ax.plot(xs, [lv["tokens_per_s"] or 0 for lv in cfg["levels"]], marker="o", label=cfg["config"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_title(f"draftloop under load ({report['dtype']}, {report['cpu']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def goals(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals, checked on this run's numbers."""
    by = {c["config"]: {lv["concurrency"]: lv for lv in c["levels"]} for c in report["configs"]}
    out: dict[str, Any] = {}
    base = by.get("target_only", {})
    if 1 in base and 16 in base and base[1]["tokens_per_s"]:
        best16 = max(cfg[16]["tokens_per_s"] or 0 for cfg in by.values() if 16 in cfg)
        out["x16_over_single_target_only"] = round(best16 / base[1]["tokens_per_s"], 2)
        out["x16_goal_6x_met"] = out["x16_over_single_target_only"] >= 6.0
    if "adaptive" in by and base:
        ratios = {c: round((lv["tokens_per_s"] or 0) / base[c]["tokens_per_s"], 3) for c, lv in by["adaptive"].items() if c in base and base[c]["tokens_per_s"]}  # fmt: skip
        out["adaptive_over_target_only"] = ratios
        out["adaptive_never_below"] = all(r >= 1.0 for r in ratios.values())
        out["adaptive_above_at_c_le_4"] = all(r > 1.0 for c, r in ratios.items() if c <= 4)
    for name, cfg in by.items():
        if 16 in cfg and cfg[16]["latency_p50_s"]:
            out.setdefault("p99_over_p50_at_16", {})[name] = round(cfg[16]["latency_p99_s"] / cfg[16]["latency_p50_s"], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("results/load.json"))
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--seconds", type=float, default=60.0, help="per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--dtype", default="float32", help="DRAFTLOOP_DTYPE of the server")
    ap.add_argument("--prompts", type=int, default=200, help="held-out ShareGPT prompts cycled through")
    ap.add_argument("--block-log", action="store_true", help="log blocks to Redis and report written / dropped")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from service.costmodel import cpu_model
    from worker.prompts import sharegpt_prompts

    prompts = list(sharegpt_prompts("heldout", limit=args.prompts))
    cache_dir = Path(Settings().cache_dir)
    report: dict[str, Any] = {
        "cpu": cpu_model(), "dtype": args.dtype, "seconds_per_level": args.seconds, "max_tokens": args.max_tokens,
        "configs": [run_config(name, args, prompts, cache_dir) for name in args.configs],
    }  # fmt: skip
    report["goals"] = goals(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    plot(report, args.out.with_suffix(".png"))
    print(json.dumps(report["goals"], indent=2))


if __name__ == "__main__":
    main()
