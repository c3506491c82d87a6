"""Builds what the server runs from Settings: tokenizer, target, drafter, engine."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import DEFAULT_MODEL, Settings
from .drafters.base import Drafter
from .drafters.draft_model import DraftModelDrafter
from .drafters.ngram import NgramDrafter
from .engine import NoDrafter
from .llama import LlamaModel, load_llama
from .modelstore import resolve_model

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(eq=False)  # hashed by identity: tests cache per-target references
class Target:
    model: LlamaModel
    tokenizer: object  # a transformers tokenizer
    path: Path
    name: str  # the id clients pass as `model`
    model_id: str  # the target's identity recorded in checkpoints and block records
    eos_token_ids: set[int]


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if setting not in DTYPES:
        raise ValueError(f"DRAFTLOOP_DTYPE must be one of auto, {', '.join(DTYPES)}; got {setting!r}")
    return DTYPES[setting]


def local_model_dir(name: str, settings: Settings) -> Path:
    resolved = resolve_model(name, settings)
    path = Path(resolved)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download  # a hub id: fetch (or find in the HF cache)

    return Path(snapshot_download(str(resolved), allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"]))


def load_target(settings: Settings) -> Target:
    from transformers import AutoTokenizer

    path = local_model_dir(settings.target_model, settings)
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    model = load_llama(path, dtype=dtype, device=device, max_len=settings.max_model_len + 64)
    tok = AutoTokenizer.from_pretrained(path)
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    cfg_eos = json.loads((path / "config.json").read_text()).get("eos_token_id")
    eos |= set(cfg_eos if isinstance(cfg_eos, list) else [cfg_eos] if cfg_eos is not None else [])
    name = settings.served_model_name or (
        DEFAULT_MODEL if settings.target_model == DEFAULT_MODEL else Path(settings.target_model).name
    )
    log.info("target %s loaded from %s on %s/%s", name, path, device, dtype)
    return Target(model, tok, path, name, settings.target_model, eos)


def build_drafter(settings: Settings, target: Target) -> Drafter:
    """`auto`: the newest eagle3 checkpoint in the checkpoint directory, else ngram."""
    kind = settings.drafter
    if kind in ("auto", "eagle3"):
        try:
            from .drafters import eagle3
        except ImportError:
            eagle3 = None
        found = eagle3.load_latest(settings.checkpoint_dir, target) if eagle3 is not None else None
        if found is not None:
            return found
        if kind == "eagle3":
            raise FileNotFoundError(
                f"DRAFTLOOP_DRAFTER=eagle3 but no eagle3 checkpoint in {settings.checkpoint_dir}; "
                "run `draftloop train-sft` first"
            )
        log.warning("no eagle3 checkpoint in %s: falling back to the ngram drafter", settings.checkpoint_dir)
        kind = "ngram"
    if kind == "ngram":
        return NgramDrafter(settings.ngram_max, settings.ngram_min)
    if kind == "draft_model":
        if settings.draft_model is None:
            return DraftModelDrafter(target.model, settings.draft_model_layers, name=f"first-{settings.draft_model_layers}-layers")
        draft = load_llama(
            local_model_dir(settings.draft_model, settings),
            dtype=target.model.dtype,
            device=target.model.device,
            max_len=target.model.max_len,
        )
        if draft.cfg.vocab_size != target.model.cfg.vocab_size:
            raise ValueError("the draft model's vocabulary differs from the target's")
        return DraftModelDrafter(draft, name=Path(settings.draft_model).name)
    if kind == "none":
        return NoDrafter()
    raise ValueError(f"unknown DRAFTLOOP_DRAFTER {kind!r}: use auto, eagle3, draft_model, ngram or none")
