"""EAGLE-3 head dimensions: which target layers feed it and how wide it is,
derived from the target's LlamaConfig and recorded in each checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ...checkpoints.store import CheckpointError
from ...llama import LlamaConfig


def default_hidden_layers(num_layers: int) -> tuple[int, int, int]:
    """Low, middle and high target layers (residual stream after each), as in
    EAGLE-3: e.g. (2, 15, 27) for 30 layers."""
    if num_layers < 3:
        raise ValueError(f"an EAGLE-3 head needs a target with >= 3 layers, got {num_layers}")
    mid = num_layers // 2
    return (min(2, num_layers // 4), mid, max(num_layers - 3, mid + 1))


@dataclass(frozen=True)
class Eagle3Config:
    """The head's architecture; `for_target` derives it from the target's config."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    hidden_layers: tuple[int, int, int]
    draft_vocab_size: int
    target_vocab_size: int
    target_num_layers: int
    # RMS-normalise each tap before fc (what EAGLE-3.1 calls fc_norm); False only
    # for heads imported from a format that fuses the raw streams (plain EAGLE-3)
    fc_norm: bool = True

    @classmethod
    def for_target(
        cls,
        cfg: LlamaConfig,
        draft_vocab_size: int,
        hidden_layers: tuple[int, ...] | None = None,
        fc_norm: bool = True,
    ) -> Eagle3Config:
        layers = tuple(hidden_layers) if hidden_layers else default_hidden_layers(cfg.num_layers)
        if len(layers) != 3 or sorted(set(layers)) != list(layers) or not 0 <= layers[0] <= layers[-1] < cfg.num_layers:
            raise ValueError(f"hidden_layers must be 3 increasing layer indices below {cfg.num_layers}, got {layers}")
        return cls(
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            rms_norm_eps=cfg.rms_norm_eps,
            rope_theta=cfg.rope_theta,
            hidden_layers=layers,  # type: ignore[arg-type]
            draft_vocab_size=min(draft_vocab_size, cfg.vocab_size),
            target_vocab_size=cfg.vocab_size,
            target_num_layers=cfg.num_layers,
            fc_norm=fc_norm,
        )

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> Eagle3Config:
        names = {f.name for f in dataclasses.fields(cls)}
        optional = {f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        missing = names - optional - fields.keys()
        if missing:
            raise CheckpointError(f"architecture config lacks {sorted(missing)}")
        return cls(**{k: (tuple(fields[k]) if k == "hidden_layers" else fields[k]) for k in names & fields.keys()})

    def to_dict(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        fields["hidden_layers"] = list(self.hidden_layers)
        return fields

    def layer_config(self) -> LlamaConfig:
        """The head's decoder layer dimensions, as a LlamaConfig (for MLP)."""
        return LlamaConfig(
            vocab_size=self.target_vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_layers=1,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            max_position_embeddings=0,
            tie_word_embeddings=False,
        )
