"""What the block log costs a request: tokens/s with logging on vs off, in one run.

    python -m benchmarks.blocklog_overhead --out results/blocklog_overhead.json

Two engines on the same target and drafter serve the same held-out prompts,
interleaved repetition by repetition (`benchmarks.speedup.measure`): one with
no block sink, one with the server's own sink (`service.runtime.
build_block_sink`: top-k of the target's distributions on the decode path, a
bounded queue, the writer thread encoding and pipelining to a real Redis). The
goal (issue #4): the two within 3 %. The records go to a throwaway stream,
deleted at the end; the JSON also says how many were written and dropped."""

from __future__ import annotations

import json
import logging
import time

import redis

from benchmarks.speedup import EngineMethod, device_name, measure, measurement_args
from service.config import Settings
from service.metrics import Metrics
from service.runtime import build_block_sink, build_drafter, load_target
from worker.prompts import chat_ids, eval_prompts

log = logging.getLogger("benchmarks.blocklog_overhead")
GOAL = 0.03


def main(argv: list[str] | None = None) -> dict:
    ap = measurement_args(__doc__, "results/blocklog_overhead.json", repeats=5)
    ap.add_argument("--drafter", default="auto", help="as DRAFTLOOP_DRAFTER (auto: newest eagle3, else ngram)")
    ap.add_argument("--dtype", help="target weights; default: DRAFTLOOP_DTYPE")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    stream = f"draftloop:bench-blocks:{int(time.time())}"
    update = {"drafter": args.drafter, "block_log": True, "block_stream": stream}
    settings = Settings().model_copy(update=update | ({"dtype": args.dtype} if args.dtype else {}))
    client = redis.Redis.from_url(settings.redis_url)
    client.ping()  # the point is a real Redis: fail early without one
    target = load_target(settings)
    prompts = [chat_ids(target.tokenizer, t) for t in eval_prompts(args.prompts, args.num_prompts)]
    drafter = build_drafter(settings, target)
    k = settings.num_speculative_tokens
    metrics, on_close = Metrics(), []
    sink = build_block_sink(settings, metrics, target.model_id, on_close)
    methods = [EngineMethod("logging_off", target, drafter, k), EngineMethod("logging_on", target, drafter, k, sink)]
    try:
        rows = measure(methods, prompts, args.max_new_tokens, args.repeats, log.info, baseline="logging_off")
    finally:
        for close in on_close:
            close()
        written = int(client.xlen(stream))
        client.delete(stream)
    off, on = rows[0]["tokens_per_s"], rows[1]["tokens_per_s"]
    gap = 1 - on / off
    result = {
        "model": target.name,
        "device": device_name(target.model.device),
        "dtype": str(target.model.dtype).removeprefix("torch."),
        "drafter": f"{drafter.kind} v{drafter.version}",
        "num_speculative_tokens": k,
        "num_prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "tokens_per_s_logging_off": off,
        "tokens_per_s_logging_on": on,
        "slowdown": round(gap, 4),
        "tau": rows[1].get("tau"),
        "greedy_identical": rows[1]["greedy_identical"],
        "block_records_written": written,
        "block_records_dropped": int(metrics.registry.get_sample_value("draftloop_block_records_dropped_total") or 0),
        "goal": {"statement": f"logging on within {GOAL:.0%} of off", "met": abs(gap) <= GOAL},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log.info("logging off %.2f tok/s, on %.2f tok/s: %+.1f%%; %d records written", off, on, -100 * gap, written)
    return result


if __name__ == "__main__":
    main()
