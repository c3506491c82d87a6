"""Probe: what one Draft-OPD update does to the held-out gate, for several
optimiser settings on one fixed set of served blocks.

    python -m benchmarks.opd_probe [--min-confidence 0.3] [--prompts 64]

The newest eagle3 checkpoint serves training-split prompts 800.. (beyond what
the default SFT run and the online benchmark use) at temperature 1 through the
engine, into a `worker.train.rollouts.BlockCollector`; then the worker's own `opd_update`
runs once per setting from the same checkpoint, and the held-out gate E[τ]
before and after is printed. `--min-confidence 0` serves K-token blocks (the
drafter's confidence stop off). Prints; writes nothing."""

from __future__ import annotations

import argparse
import json

import torch

from service import checkpoints
from service.config import Settings
from service.drafters import eagle3
from worker.prompts import chat_ids, sharegpt_prompts
from service.runtime import load_target
from service.sampling import SamplingParams
from worker.train.config import OPDConfig
from worker.train.opd import opd_update
from worker.train.rollouts import serve_for_blocks

SETTINGS = [
    {"lr": 3e-4, "epochs": 4, "batch_tokens": 512},
    {"lr": 3e-4, "epochs": 1, "batch_tokens": 512},
    {"lr": 1e-4, "epochs": 2, "batch_tokens": 512},
    {"lr": 1e-3, "epochs": 1, "batch_tokens": 2048},
]
FIRST_PROMPT = 800


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--min-confidence", type=float, default=eagle3.DEFAULT_MIN_CONFIDENCE)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--settings", type=json.loads, default=SETTINGS, help="JSON list of OPDConfig overrides")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    settings = Settings(dtype=args.dtype)
    target = load_target(settings)
    versions = checkpoints.list_versions(settings.checkpoint_dir)
    if not versions:
        raise SystemExit(f"no eagle3 checkpoint in {settings.checkpoint_dir}: run `draftloop train-sft` first")
    version = versions[-1]
    path = checkpoints.version_path(settings.checkpoint_dir, version)
    drafter = eagle3.load_checkpoint(path, target)
    drafter.min_confidence = args.min_confidence
    head, _ = eagle3.load_head(path, target.model, target.model_id)  # float32 copy, as the worker trains
    texts = sharegpt_prompts("train", limit=FIRST_PROMPT + args.prompts)[FIRST_PROMPT:]
    prompts = [chat_ids(target.tokenizer, t) for t in texts]
    params = SamplingParams(temperature=1.0, max_tokens=64)
    # as served (temperature 1, --min-confidence): this probe sets the rollout policy itself
    blocks, stats = serve_for_blocks(
        target, drafter, settings.num_speculative_tokens, prompts, params, 0, "probe", greedy_eval=False
    )
    drafted = sum(len(r.draft_tokens) for r in blocks.records) / max(1, sum(bool(r.draft_tokens) for r in blocks.records))
    print(f"served {stats['requests']} requests: {stats['blocks']} blocks, τ {stats['tau']}, {drafted:.2f} drafted tokens per block")
    for overrides in args.settings:
        r = opd_update(head, target.model, blocks.records, blocks.contexts, version, target.model_id, OPDConfig(**overrides))
        print(f"{overrides}: held-out gate E[τ] {r.before.tau:.4f} -> {r.after.tau:.4f} ({r.after.tau - r.before.tau:+.4f})")


if __name__ == "__main__":
    main()
