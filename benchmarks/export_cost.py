"""What exporting an eagle3 head costs in acceptance: greedy τ on held-out
prompts of the head as draftloop serves it (with the per-request context
vocabulary), the same head without it, and the head exported to a format and
imported back (what vLLM / SGLang get: the static draft vocabulary only).
Every drafter drafts K tokens every step (no confidence stop), as the engines do.

    python -m benchmarks.export_cost --checkpoint checkpoints/eagle3/v3 --out results/export_cost.json

The imported head must draft exactly what the native head without context
vocabulary drafts (the conversion is lossless); the difference to the native
head as served is the export's cost."""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from service.config import Settings
from service.drafters import eagle3
from service.engine import Engine
from service.export import export_drafter
from service.runtime import Target, load_target
from service.sampling import SamplingParams
from worker.importer import convert
from worker.prompts import chat_ids, sharegpt_prompts

log = logging.getLogger("benchmarks.export_cost")


def greedy_tau(
    target: Target, drafter: eagle3.Eagle3Drafter, prompts: list[list[int]], k: int, max_new: int
) -> dict:
    """τ (tokens per verify step) per request and pooled over all steps, and the outputs."""
    per_request, outs, accepted, drafts = [], [], 0, 0
    for ids in prompts:
        engine = Engine(target.model, drafter, target.eos_token_ids, k)
        outs.append(engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=max_new)))
        stats = engine.stats
        per_request.append(stats.tau if stats.num_drafts else 1.0)
        accepted, drafts = accepted + stats.num_accepted_tokens, drafts + stats.num_drafts
    return {"tau_mean_per_request": round(statistics.mean(per_request), 4),
            "tau_pooled": round(1.0 + accepted / max(drafts, 1), 4),
            "tau_per_request": [round(t, 3) for t in per_request], "outputs": outs}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--checkpoint", type=Path, required=True, help="an eagle3 version directory (…/eagle3/vN)"
    )
    ap.add_argument("--format", dest="fmt", default="speculators", choices=("speculators", "sglang"))
    ap.add_argument("--num-prompts", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("-k", "--num-speculative-tokens", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("results/export_cost.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    version = int(args.checkpoint.name.removeprefix("v"))
    settings = Settings(checkpoint_dir=args.checkpoint.parent.parent, dtype="float32", block_log=False)
    target = load_target(settings)
    head = eagle3.load_head(args.checkpoint, target.model, target.model_id)[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_drafter(settings, args.fmt, Path(tmp) / "head", version=version)
        imported = convert(folder, target)[0]
    prompts = [chat_ids(target.tokenizer, t) for t in sharegpt_prompts("heldout", limit=args.num_prompts)]
    variants = {
        "native": eagle3.Eagle3Drafter(head, target.model, context_vocab=True, min_confidence=0.0),
        "native_no_context_vocab": eagle3.Eagle3Drafter(
            head, target.model, context_vocab=False, min_confidence=0.0
        ),
        f"exported_{args.fmt}_imported": eagle3.Eagle3Drafter(
            imported, target.model, context_vocab=False, min_confidence=0.0
        ),
    }
    rows = {
        name: greedy_tau(target, d, prompts, args.num_speculative_tokens, args.max_new_tokens)
        for name, d in variants.items()
    }
    outs = {name: row.pop("outputs") for name, row in rows.items()}
    result = {
        "checkpoint": str(args.checkpoint),
        "target": target.name,
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "k": args.num_speculative_tokens,
        "prompts": f"sharegpt heldout[:{len(prompts)}]",
        "max_new_tokens": args.max_new_tokens,
        "draft_vocab_size": head.cfg.draft_vocab_size,
        "results": rows,
        "greedy_outputs_identical": len({json.dumps(o) for o in outs.values()}) == 1,
        "imported_drafts_as_native_without_context_vocab": rows[f"exported_{args.fmt}_imported"][
            "tau_per_request"
        ]
        == rows["native_no_context_vocab"]["tau_per_request"],
        "export_cost_tau": round(
            rows["native"]["tau_mean_per_request"]
            - rows[f"exported_{args.fmt}_imported"]["tau_mean_per_request"],
            4,
        ),  # fmt: skip
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log.info("%s", json.dumps({k: v for k, v in result.items() if k != "results"}))
    for name, row in rows.items():
        log.info("%-34s τ %.3f", name, row["tau_mean_per_request"])
    return result


if __name__ == "__main__":
    main()
