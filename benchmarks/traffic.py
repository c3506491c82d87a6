"""Steady chat traffic from the training split, so the loop has blocks to learn
from and a new user can watch τ rise on /metrics.

    python -m benchmarks.traffic [--url http://127.0.0.1:8000] [--rate 0.5] [--duration 600] [--api-key KEY]

Prompts come from the ShareGPT *training* split only (never the held-out split
that evaluations use). Requests are sent at `--rate` per second by up to
`--concurrency` threads, for at most `--duration` seconds or `--requests`
requests; every `--report-every` seconds it prints τ read from the server's
/metrics and the drafter version serving. `--api-key` (default: $OPENAI_API_KEY)
is sent as `Authorization: Bearer` to a server with DRAFTLOOP_API_KEYS set."""

from __future__ import annotations

import argparse
import itertools
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from service.config import Settings
from worker.prompts import chat_ids, sharegpt_prompts
from service.runtime import local_model_dir


def read_metrics(url: str, api_key: str) -> dict[str, float]:
    # the key too, in case the server has DRAFTLOOP_METRICS_AUTH=key
    text = httpx.get(f"{url}/metrics", timeout=10, headers={"Authorization": f"Bearer {api_key}"}).text
    values: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if not s.labels:
                values[s.name] = s.value
    return values


def tau_between(before: dict[str, float], after: dict[str, float]) -> float | None:
    drafts = after.get("draftloop_spec_decode_drafts_total", 0) - before.get("draftloop_spec_decode_drafts_total", 0)
    acc = after.get("draftloop_spec_decode_accepted_tokens_total", 0) - before.get(
        "draftloop_spec_decode_accepted_tokens_total", 0
    )
    return 1 + acc / drafts if drafts > 0 else None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--rate", type=float, default=0.5, help="requests per second")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--duration", type=float, default=600.0, help="seconds (upper bound)")
    ap.add_argument("--requests", type=int, default=10_000, help="requests (upper bound)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--report-every", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "unused"), help="one of DRAFTLOOP_API_KEYS")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(local_model_dir(Settings().target_model, Settings()))
    prompts = list(sharegpt_prompts("train"))
    random.Random(args.seed).shuffle(prompts)
    client = OpenAI(base_url=f"{args.url}/v1", api_key=args.api_key, timeout=300, max_retries=0)
    model = client.models.list().data[0].id
    ok = failed = 0
    lock = threading.Lock()

    def one(prompt: str) -> None:
        nonlocal ok, failed
        try:
            client.completions.create(
                model=model,
                prompt=chat_ids(tokenizer, prompt),  # token ids through the target's chat template
                max_tokens=args.max_tokens,
                temperature=args.temperature,
            )
            with lock:
                ok += 1
        except Exception as exc:  # count and go on: traffic must keep flowing
            with lock:
                failed += 1
            print(f"request failed: {exc}", flush=True)

    start = time.monotonic()
    last_report, last_metrics = start, read_metrics(args.url, args.api_key)
    with ThreadPoolExecutor(args.concurrency) as pool:
        for i, prompt in zip(range(args.requests), itertools.cycle(prompts)):
            now = time.monotonic()
            if now - start > args.duration:
                break
            while pool._work_queue.qsize() >= args.concurrency:  # keep the backlog bounded
                time.sleep(0.05)
            pool.submit(one, prompt)
            if now - last_report >= args.report_every:
                m = read_metrics(args.url, args.api_key)
                tau = tau_between(last_metrics, m)
                print(
                    f"[{now - start:6.0f}s] sent {i + 1} ok {ok} failed {failed} "
                    f"tau(last {args.report_every:.0f}s) {tau if tau is None else round(tau, 3)} "
                    f"drafter v{m.get('draftloop_drafter_version', 0):.0f}",
                    flush=True,
                )
                last_report, last_metrics = now, m
            time.sleep(max(0.0, start + (i + 1) / args.rate - time.monotonic()))
    print(f"done: {ok} ok, {failed} failed in {time.monotonic() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
