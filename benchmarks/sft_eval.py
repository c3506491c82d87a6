"""Held-out greedy acceptance of an eagle3 checkpoint through the real engine.

    python -m benchmarks.sft_eval --checkpoint DIR [--num-prompts 24] [-k 4] --out results/sft_scale.json

Greedy decoding of held-out prompts (never trained on) at K draft tokens, for:
the eagle3 head with no confidence stop and with the default one, the head
without its per-sequence context vocabulary, and the ngram (prompt lookup)
drafter as the reference. Reports τ (accepted + 1 per verify step), the
per-position acceptance and the wall time of each arm, plus the checkpoint's
SFT manifest figures; `command` in the JSON reproduces the file."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

from service.config import Settings
from service.drafters.eagle3 import DEFAULT_MIN_CONFIDENCE, Eagle3Drafter, load_head
from service.drafters.ngram import NgramDrafter
from service.runtime import load_target
from worker.prompts import chat_ids, eval_prompts
from worker.train.evaluate import evaluate_tau

log = logging.getLogger("benchmarks.sft_eval")


def _arms(head, target) -> dict:
    """Drafter name -> a fresh drafter."""
    return {
        "eagle3_no_stop": lambda: Eagle3Drafter(head, target.model, min_confidence=0.0),
        "eagle3_default_stop": lambda: Eagle3Drafter(head, target.model, min_confidence=DEFAULT_MIN_CONFIDENCE),
        "eagle3_no_stop_no_context_vocab": lambda: Eagle3Drafter(head, target.model, context_vocab=False, min_confidence=0.0),
        "ngram": lambda: NgramDrafter(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True, help="an eagle3/v{N} directory")
    ap.add_argument("--out", type=Path, default=Path("results/sft_scale.json"))
    ap.add_argument("--num-prompts", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arms", default=None, help="comma-separated subset of the arms")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    settings = Settings()
    target = load_target(settings)
    head, manifest = load_head(args.checkpoint, target.model, target.model_id)
    prompts = [chat_ids(target.tokenizer, p) for p in eval_prompts(None, args.num_prompts)]
    arms = _arms(head, target)
    chosen = args.arms.split(",") if args.arms else list(arms)
    results = {}
    for name in chosen:
        t0 = time.perf_counter()
        tau, per_pos = evaluate_tau(target, arms[name](), prompts, args.k, args.max_new_tokens)
        results[name] = {"tau": round(tau, 4), "per_position_acceptance": [round(a, 4) for a in per_pos], "seconds": round(time.perf_counter() - t0, 1)}
        log.info("%s: τ %.3f, per-position acceptance %s", name, tau, results[name]["per_position_acceptance"])
    report = {
        "command": "python -m benchmarks.sft_eval " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads, "dtype": str(target.model.dtype)},
        "held_out_prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "k": args.k,
        "checkpoint": {k: manifest.get(k) for k in ("version", "format_version", "hidden_layers", "draft_vocab_size", "trained_on")}
        | {"sft": {k: v for k, v in manifest.get("sft", {}).items() if k != "config"}, "sft_config": manifest.get("sft", {}).get("config")},
        "arms": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
