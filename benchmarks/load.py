"""Throughput and latency under concurrent load (closed loop).

    python -m benchmarks.load --out results/load.json
        [--concurrency 1 2 4 8 16 32] [--seconds 60] [--configs none ngram]
        [--max-tokens 128] [--k 4]

For each configuration (`none`: target-only decoding, DRAFTLOOP_DRAFTER=none;
`ngram`: fixed-K prompt-lookup speculation) a real `draftloop serve` starts
(float32, block log off, DRAFTLOOP_MAX_NUM_SEQS = the largest concurrency so
every stream can join the batch). At each concurrency c, c clients of the
official `openai` package each send streamed chat completions (greedy,
`max_tokens`, held-out ShareGPT prompts) back to back for `--seconds`; no
request starts after that. Reported per point: aggregate completion tok/s
(all tokens / wall time until the last request finished), request latency
and time to first token (p50, p99), and the mean sequences per target forward
of the server (`draftloop_batch_size`). A PNG of tok/s against concurrency
lands beside the JSON."""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks.soak_stack import ROOT, Child, free_port, scrape, wait_for

log = logging.getLogger("load")

CONFIGS = {"none": {"DRAFTLOOP_DRAFTER": "none"}, "ngram": {"DRAFTLOOP_DRAFTER": "ngram"}}


@dataclass
class Request:
    latency_s: float
    ttft_s: float | None
    tokens: int


def start_server(workdir: Path, env_extra: dict[str, str]) -> tuple[Child, str]:
    """`draftloop serve` on a free port with `env_extra`, once healthy."""
    port = free_port()
    env = {
        **os.environ, "PYTHONPATH": str(ROOT), "DRAFTLOOP_BLOCK_LOG": "false", "DRAFTLOOP_DTYPE": "float32",
        "DRAFTLOOP_CHECKPOINT_DIR": str(workdir / "checkpoints"), **env_extra,
    }  # fmt: skip
    cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    server = Child("server", cmd, env, workdir / f"server-{env_extra.get('DRAFTLOOP_DRAFTER')}.log").start()
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if not server.alive:
            raise RuntimeError(f"the server exited:\n{server.tail()}")
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for("the server", healthy, 600)
    return server, url


def one_request(client: Any, model: str, prompt: str, max_tokens: int) -> Request:
    """One streamed greedy chat completion; tokens from the usage chunk."""
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return Request(time.perf_counter() - t0, ttft, tokens)


def closed_loop(url: str, prompts: list[str], concurrency: int, seconds: float, max_tokens: int) -> dict[str, Any]:
    """`concurrency` clients, each sending requests back to back until the deadline."""
    import openai

    model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    done: list[Request] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client_loop(index: int) -> None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        n = index
        while time.perf_counter() < deadline:
            prompt = prompts[n % len(prompts)]
            n += concurrency
            try:
                result = one_request(client, model, prompt, max_tokens)
            except Exception as exc:  # noqa: BLE001 -- counted in the report; the load goes on
                with lock:
                    errors.append(repr(exc)[:200])
                continue
            with lock:
                done.append(result)

    before = scrape(url)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = scrape(url)
    return summarize(done, errors, wall, concurrency, before, after)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 4)


def summarize(
    done: list[Request], errors: list[str], wall: float, concurrency: int, before: dict, after: dict
) -> dict[str, Any]:
    tokens = sum(r.tokens for r in done)
    latencies = [r.latency_s for r in done]
    ttfts = [r.ttft_s for r in done if r.ttft_s is not None]
    forwards = after.get("draftloop_batch_size_count", 0) - before.get("draftloop_batch_size_count", 0)
    seqs = after.get("draftloop_batch_size_sum", 0) - before.get("draftloop_batch_size_sum", 0)
    return {
        "concurrency": concurrency,
        "requests": len(done),
        "errors": len(errors),
        "first_errors": errors[:3],
        "wall_s": round(wall, 2),
        "completion_tokens": tokens,
        "tok_per_s": round(tokens / wall, 2) if wall > 0 else None,
        "latency_p50_s": _pct(latencies, 0.5),
        "latency_p99_s": _pct(latencies, 0.99),
        "ttft_p50_s": _pct(ttfts, 0.5),
        "ttft_p99_s": _pct(ttfts, 0.99),
        "mean_latency_s": round(statistics.fmean(latencies), 4) if latencies else None,
        "mean_batch_size": round(seqs / forwards, 2) if forwards else None,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (ax_tps, ax_lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, points in result["configs"].items():
        xs = [p["concurrency"] for p in points]
        ax_tps.plot(xs, [p["tok_per_s"] or 0 for p in points], "o-", label=name)
        ax_lat.plot(xs, [p["latency_p50_s"] or 0 for p in points], "o-", label=f"{name} p50")
        ax_lat.plot(xs, [p["latency_p99_s"] or 0 for p in points], "x--", label=f"{name} p99")
    ax_tps.set(xscale="log", xlabel="concurrent streams", ylabel="aggregate completion tok/s", title="throughput")
    ax_lat.set(xscale="log", xlabel="concurrent streams", ylabel="request latency (s)", title="latency")
    for ax in (ax_tps, ax_lat):
        ax.set_xticks(result["concurrency"], [str(c) for c in result["concurrency"]])
        ax.legend(fontsize=8)
    fig.suptitle(f"max_tokens {result['max_tokens']}, K={result['k']}, float32", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def held_out_prompts(limit: int) -> list[str]:
    from worker.prompts import sharegpt_prompts

    return list(sharegpt_prompts("heldout", limit=limit))


def run(args: argparse.Namespace) -> dict[str, Any]:
    prompts = held_out_prompts(64)
    workdir = Path(tempfile.mkdtemp(prefix="draftloop-load-"))
    result: dict[str, Any] = {
        "concurrency": args.concurrency, "seconds": args.seconds, "max_tokens": args.max_tokens,
        "k": args.k, "configs": {},
    }  # fmt: skip
    for name in args.configs:
        env = {
            **CONFIGS[name],
            "DRAFTLOOP_NUM_SPECULATIVE_TOKENS": str(args.k),
            "DRAFTLOOP_MAX_NUM_SEQS": str(max(args.concurrency)),
        }
        server, url = start_server(workdir, env)
        try:
            points = []
            for c in args.concurrency:
                point = closed_loop(url, prompts, c, args.seconds, args.max_tokens)
                log.info("%s c=%d: %s", name, c, point)
                points.append(point)
            result["configs"][name] = points
        finally:
            server.stop()
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "load.json")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--seconds", type=float, default=60.0, help="load time per concurrency point")
    ap.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["none", "ngram"])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=4, help="draft length of the speculative configuration")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the openai client logs every request
    args = parse_args(argv)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))
    log.info("wrote %s and %s", args.out, args.out.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
