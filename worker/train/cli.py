"""`draftloop train-sft` (`python -m worker.train.cli`): bootstrap the EAGLE-3
drafter head by SFT on target trajectories (worker.train.sft)."""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from .config import SFTConfig

log = logging.getLogger("worker.train.sft")

# flag -> SFTConfig field, for the flags that set one field each (help: the field's meaning)
CONFIG_FLAGS: dict[str, tuple[str, str | None]] = {
    "--num-prompts": ("num_prompts", None),
    "--max-new-tokens": ("max_new_tokens", None),
    "--gen-batch-size": ("gen_batch_size", None),
    "--gen-minutes": ("gen_minutes", "minutes of trajectory generation per run (uncached prompts; none: all)"),
    "--num-exchanges": (
        "num_exchanges",
        "ShareGPT exchanges (prompt + reply) used teacher-forced, besides the trajectories; ignored with --prompts",
    ),
    "--exchange-max-tokens": ("exchange_max_tokens", None),
    "--draft-vocab-size": ("draft_vocab_size", None),
    "--ttt-steps": ("ttt_steps", "draft steps unrolled in training"),
    "--steps": ("train_steps", "training budget in optimizer steps (none: no step limit)"),
    "--minutes": ("train_minutes", "training budget in minutes (none: no time limit)"),
    "--max-tokens": ("train_tokens", "training budget in head token-positions (none: no limit)"),
    "--batch-tokens": ("batch_tokens", None),
    "--lr": ("lr", None),
    "--output-lr-scale": ("output_lr_scale", "LR factor of the head's final norm and LM head"),
    "--seed": ("seed", None),
    "--eval-prompts": ("eval_prompts", "held-out prompts for the τ evaluation (0: skip)"),
    "--eval-k": ("eval_k", None),
    "--hidden-layers": ("hidden_layers", "three target layers whose outputs the head reads, e.g. 1,14,26"),
    "--init-layer": ("init_layer", "start the head's decoder layer from this target layer's weights (-1: the last; none: random)"),
}
_OPTIONAL = {"gen_minutes": float, "train_steps": int, "train_minutes": float, "train_tokens": int, "init_layer": int}  # "none" unsets


def _flag_type(name: str, default):
    """The argparse type of a config field's flag."""
    if name == "hidden_layers":
        return lambda text: tuple(int(x) for x in text.split(","))
    if name in _OPTIONAL:
        kind = _OPTIONAL[name]
        return lambda text: None if text.lower() == "none" else kind(text)
    return type(default)


def build_parser() -> argparse.ArgumentParser:
    defaults = SFTConfig()
    p = argparse.ArgumentParser(
        prog="draftloop train-sft",
        description="Bootstrap the EAGLE-3 drafter head by SFT on target trajectories. Rerunning the same "
        "command resumes: cached trajectories are reused and training continues from its saved state.",
    )
    p.add_argument("--prompts", type=Path, help="JSONL file of {\"prompt\": ...} (default: built-in ShareGPT train split)")
    for flag, (name, help_) in CONFIG_FLAGS.items():
        default = getattr(defaults, name)
        metavar = flag.removeprefix("--").replace("-", "_").upper()
        p.add_argument(flag, dest=name, metavar=metavar, type=_flag_type(name, default), default=default, help=help_)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads on CPU (default 1: on a small shared CPU more threads can run slower, "
        "since the bf16 matmuls saturate one core)",
    )
    p.add_argument("--generate-only", action="store_true", help="fill the trajectory cache, then stop (no training)")
    p.add_argument("--checkpoint-dir", type=Path, help="default: DRAFTLOOP_CHECKPOINT_DIR")
    p.add_argument("--cache-dir", type=Path, help="default: DRAFTLOOP_CACHE_DIR")
    return p


def _prompts(args: argparse.Namespace, cfg: SFTConfig) -> tuple[list[str], tuple | None]:
    """(training prompts, exchanges: () for a user's prompt file, which comes without replies)."""
    from worker.prompts import load_prompts, sharegpt_prompts

    if args.prompts:
        return load_prompts(args.prompts)[: cfg.num_prompts], ()
    return list(sharegpt_prompts("train", limit=cfg.num_prompts)), None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from service.config import Settings
    from service.runtime import load_target

    from .sft import prepare_data, train_sft

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in (("checkpoint_dir", args.checkpoint_dir), ("cache_dir", args.cache_dir)) if v is not None}
    settings = Settings(**overrides)
    cfg = SFTConfig(**{name: getattr(args, name) for name, _ in CONFIG_FLAGS.values()})
    t0 = time.perf_counter()
    target = load_target(settings)
    prompts, exchanges = _prompts(args, cfg)
    if args.generate_only:
        data, resp = prepare_data(target, prompts, settings.cache_dir, cfg, exchanges)
        log.info("cached %d trajectories (%d generated tokens) in %.0f s", len(data), resp.numel(), time.perf_counter() - t0)
        return 0
    result = train_sft(target, prompts, settings.checkpoint_dir, settings.cache_dir, cfg, exchanges)
    log.info(
        "wrote %s (τ %s) in %.0f s; serve it with DRAFTLOOP_DRAFTER=auto DRAFTLOOP_CHECKPOINT_DIR=%s",
        result.checkpoint,
        f"{result.tau:.3f}" if result.tau is not None else "not evaluated",
        time.perf_counter() - t0,
        settings.checkpoint_dir,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
