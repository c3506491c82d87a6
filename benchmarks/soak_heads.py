"""Drafter heads for the soak and the guard's end-to-end test: a good one and a
genuinely bad one, both written through the real checkpoint store.

- `good_head`: an EAGLE-3 head trained by the real SFT trainer
  (`worker.train.sft.train_sft`) for a few dozen steps on the target's greedy
  continuations of the traffic's own prompts. It is overfit on purpose: the
  soak replays those prompts greedily, so the head drafts long there (served
  τ well above 1), which gives the regression guard something to lose.
- `bad_head`: the same architecture with every weight randomised (fc, the
  decoder layer and the LM head at std 1): it drafts confident noise, so
  nearly every drafted token is rejected (served τ ≈ 1).

Both return the checkpoint directory (`<checkpoint_dir>/eagle3/v{N}`, the next
version, written atomically); publishing is the caller's (the pointer path)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from service.drafters import eagle3
from worker.train.config import SFTConfig
from worker.train.sft import train_sft

log = logging.getLogger(__name__)

GOOD_SFT = {
    "max_new_tokens": 32,
    "gen_batch_size": 8,
    "gen_minutes": None,
    "draft_vocab_size": 2048,
    "ttt_steps": 4,
    "train_steps": 50,
    "train_minutes": None,
    "batch_tokens": 512,
    "warmup_steps": 2,
    "lr": 3e-3,
    "eval_prompts": 0,
    "num_exchanges": 0,
    "fast_bf16": False,
    "save_every_s": 3600.0,
}


def good_head(target, prompts: Sequence[str], checkpoint_dir: Path, features_dir: Path, **overrides) -> Path:
    """SFT on `prompts` (strings, through the chat template) -> the checkpoint directory.
    `features_dir`: where the trainer caches the trajectories (a scratch directory)."""
    cfg = SFTConfig(**{**GOOD_SFT, "num_prompts": len(prompts), **overrides})
    result = train_sft(target, list(prompts), checkpoint_dir, features_dir, cfg, exchanges=())
    log.info("good head: %s after %d steps", result.checkpoint, len(result.history))
    return Path(result.checkpoint)


def bad_head(target, like: Path, checkpoint_dir: Path, seed: int = 1) -> Path:
    """A head of `like`'s shape (its draft vocabulary too) with every weight
    randomised -> the checkpoint directory."""
    head, _ = eagle3.load_head(like, target.model, target.model_id)
    gen = torch.Generator().manual_seed(seed)
    head.reset_parameters(gen, std=1.0, fc_identity=False)
    with torch.no_grad():
        head.lm_head.weight.normal_(0.0, 1.0, generator=gen)
    return Path(eagle3.save_checkpoint(head, checkpoint_dir, target.model_id, extra={"trainer": "randomised"}))
