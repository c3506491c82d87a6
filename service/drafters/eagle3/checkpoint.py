"""The eagle3 checkpoint format: `<checkpoint_dir>/eagle3/v{N}/` holding
`model.safetensors` (head weights + `d2t`) and `manifest.json`, written
atomically by `service.checkpoints.store.save_version`; loading validates
target id, shapes and the weights' sha256 before anything is served.

Format 2 adds the head's own final norm and draft-vocab LM head (`norm.weight`,
`lm_head.weight`). Format-1 checkpoints still load: those two start as the
target's norm and LM-head rows, the frozen copies format 1 served with."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ...checkpoints import store
from ...checkpoints.store import MANIFEST_FILE, CheckpointError
from ...fileutil import sha256_file
from ...llama import LlamaConfig, LlamaModel
from .config import Eagle3Config
from .drafter import Eagle3Drafter
from .head import Eagle3Head

log = logging.getLogger(__name__)

FORMAT = "draftloop-eagle3"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
FORMAT1_MISSING = ("norm.weight", "lm_head.weight")  # tensors format 1 did not store
WEIGHTS_FILE = "model.safetensors"
KIND_DIR = "eagle3"



def save_checkpoint(
    head: Eagle3Head,
    checkpoint_dir: str | Path,
    target_model_id: str,
    parent_version: int | None = None,
    trained_on: dict[str, int] | None = None,
    eval_tau: dict[str, float | None] | None = None,
    extra: dict[str, Any] | None = None,
    extra_files: Callable[[Path], dict[str, Any]] | None = None,
) -> Path:
    """Write head weights + manifest as the next version `eagle3/v{N}` under
    checkpoint_dir, atomically (temp dir, fsync, rename). Returns the directory.
    `extra_files(tmp)` writes files of the trainer's into the version (e.g. its
    optimizer state) and returns manifest fields naming them; loading reads
    only the weights file, so they never change what a server serves."""

    def write_files(tmp: Path) -> dict[str, Any]:
        state = {k: v.detach().to("cpu").contiguous() for k, v in head.state_dict().items()}
        weights = tmp / WEIGHTS_FILE
        save_file(state, str(weights), metadata={"format": FORMAT})
        cfg = head.cfg
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": "eagle3",
            "version": None,  # set by the store, once the number is taken
            "parent_version": parent_version,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "target_model": target_model_id,
            "target_hidden_size": cfg.hidden_size,
            "target_vocab_size": cfg.target_vocab_size,
            "target_num_layers": cfg.target_num_layers,
            "hidden_layers": list(cfg.hidden_layers),
            "draft_vocab_size": cfg.draft_vocab_size,
            "architecture": cfg.to_dict(),
            "weights_file": WEIGHTS_FILE,
            "weights_sha256": sha256_file(weights),
            "dtype": str(state["fc.weight"].dtype).removeprefix("torch."),
            "trained_on": trained_on or {},
            "eval": {"tau_before": None, "tau_after": None, **(eval_tau or {})},
            **(extra or {}),
            **(extra_files(tmp) if extra_files is not None else {}),
        }

    return store.save_version(checkpoint_dir, KIND_DIR, write_files)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """An eagle3 manifest; CheckpointError when missing, unreadable or of another format."""
    manifest = store.read_manifest(path)
    mpath = Path(path) / MANIFEST_FILE
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath}: not a {FORMAT} manifest")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{mpath}: format_version {manifest.get('format_version')!r}, expected one of {READABLE_VERSIONS}")
    return manifest


def _check_target(path: Path, manifest: dict[str, Any], tcfg: LlamaConfig, target_model_id: str) -> Eagle3Config:
    """The manifest's head architecture, checked against the target -> its config."""
    if manifest.get("target_model") != target_model_id:
        raise CheckpointError(
            f"{path}: trained for target {manifest.get('target_model')!r}, but the target is {target_model_id!r}"
        )
    for key, want in (
        ("target_hidden_size", tcfg.hidden_size),
        ("target_vocab_size", tcfg.vocab_size),
        ("target_num_layers", tcfg.num_layers),
    ):
        if manifest.get(key) != want:
            raise CheckpointError(f"{path}: {key} is {manifest.get(key)!r}, the target has {want}")
    cfg = Eagle3Config.from_dict(manifest.get("architecture") or {})
    if list(cfg.hidden_layers) != list(manifest.get("hidden_layers", [])) or not all(
        0 <= i < tcfg.num_layers for i in cfg.hidden_layers
    ):
        raise CheckpointError(
            f"{path}: hidden_layers {manifest.get('hidden_layers')} do not fit a {tcfg.num_layers}-layer target"
        )
    try:
        expect = Eagle3Config.for_target(tcfg, cfg.draft_vocab_size, cfg.hidden_layers)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    if cfg != dataclasses.replace(expect, rms_norm_eps=cfg.rms_norm_eps, fc_norm=cfg.fc_norm):
        raise CheckpointError(f"{path}: head architecture {cfg.to_dict()} does not match the target's {expect.to_dict()}")
    return cfg


def _read_weights(path: Path, manifest: dict[str, Any]) -> dict[str, Tensor]:
    """The weights file, its sha256 checked against the manifest's."""
    weights = path / (manifest.get("weights_file") or WEIGHTS_FILE)
    if not weights.is_file():
        raise CheckpointError(f"{path}: weights file {weights.name} is missing")
    digest = sha256_file(weights)
    if digest != manifest.get("weights_sha256"):
        raise CheckpointError(
            f"{weights}: sha256 {digest[:16]}... does not match the manifest's "
            f"{str(manifest.get('weights_sha256'))[:16]}... (corrupt or partially written checkpoint)"
        )
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: unreadable safetensors ({exc})") from None


def _check_state(weights: Path, head: Eagle3Head, state: dict[str, Tensor], vocab_size: int, format_version: int) -> None:
    """Tensor names and shapes as the head expects (for that format); d2t valid target ids."""
    skip = FORMAT1_MISSING if format_version == 1 else ()
    want = {k: tuple(v.shape) for k, v in head.state_dict().items() if k not in skip}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if want != got:
        bad = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
        detail = ", ".join(f"{k}: expected {want.get(k)}, found {got.get(k)}" for k in bad[:4])
        raise CheckpointError(f"{weights}: wrong tensor shapes ({detail})")
    d2t = state["d2t"]
    if d2t.dtype != torch.long or int(d2t.min()) < 0 or int(d2t.max()) >= vocab_size:
        raise CheckpointError(f"{weights}: d2t must hold int64 ids in [0, {vocab_size})")
    if torch.unique(d2t).numel() != d2t.numel():
        raise CheckpointError(f"{weights}: d2t has duplicate target ids")


def read_state(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any], Eagle3Config]:
    """A version's weights without a target -> (state, manifest, architecture):
    format, sha256 and the tensor names and shapes checked (format 2 only: a
    format-1 checkpoint lacks the head's own norm and LM head). For export."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format {manifest['format_version']} has no {FORMAT1_MISSING}; load and re-save it")
    cfg = Eagle3Config.from_dict(manifest.get("architecture") or {})
    state = _read_weights(path, manifest)
    weights = path / (manifest.get("weights_file") or WEIGHTS_FILE)
    with torch.device("meta"):  # the names and shapes only
        shapes = Eagle3Head(cfg)
    _check_state(weights, shapes, state, cfg.target_vocab_size, FORMAT_VERSION)
    return state, manifest, cfg


def load_head(path: str | Path, target_model: LlamaModel, target_model_id: str) -> tuple[Eagle3Head, dict[str, Any]]:
    """Validate and load a checkpoint directory -> (head attached to the target,
    manifest). Raises CheckpointError naming what is wrong."""
    path = Path(path)
    manifest = read_manifest(path)
    cfg = _check_target(path, manifest, target_model.cfg, target_model_id)
    state = _read_weights(path, manifest)
    head = Eagle3Head(cfg)
    version = manifest["format_version"]
    _check_state(path / (manifest.get("weights_file") or WEIGHTS_FILE), head, state, target_model.cfg.vocab_size, version)
    head.load_state_dict(state, strict=version != 1)
    if version == 1:
        head.init_output_from(target_model)
    return head.attach(target_model), manifest


def load_checkpoint(path: str | Path, target) -> Eagle3Drafter:
    """A ready drafter from `eagle3/v{N}`; `target` is a service.runtime.Target."""
    head, manifest = load_head(path, target.model, target.model_id)
    drafter = Eagle3Drafter(head, target.model, version=str(manifest["version"]), manifest=manifest)
    log.info(
        "eagle3 drafter v%s loaded from %s (draft vocab %d)", manifest["version"], path, head.cfg.draft_vocab_size
    )
    return drafter
