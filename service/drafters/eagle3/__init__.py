"""EAGLE-3 drafter: the head (`head`), its dimensions (`config`), the drafter
the engine runs (`drafter`) and the checkpoint format (`checkpoint`). The
design is in docs/architecture.md.

Public names are re-exported here, so `from service.drafters.eagle3 import X`
and `eagle3.X` work for the trainers and the tests."""

from __future__ import annotations

from ...fileutil import fsync_path
from .checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    KIND_DIR,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    load_checkpoint,
    load_head,
    read_manifest,
    read_state,
    save_checkpoint,
)
from .config import Eagle3Config, default_hidden_layers
from .drafter import DEFAULT_MIN_CONFIDENCE, Eagle3Drafter
from .head import Eagle3Head, FrozenTarget, shifted_tokens

__all__ = [
    "DEFAULT_MIN_CONFIDENCE",
    "FORMAT",
    "FORMAT_VERSION",
    "KIND_DIR",
    "MANIFEST_FILE",
    "WEIGHTS_FILE",
    "CheckpointError",
    "Eagle3Config",
    "Eagle3Drafter",
    "Eagle3Head",
    "FrozenTarget",
    "default_hidden_layers",
    "fsync_path",
    "load_checkpoint",
    "load_head",
    "read_manifest",
    "read_state",
    "save_checkpoint",
    "shifted_tokens",
]
