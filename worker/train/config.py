"""The trainers' configurations (torch-free, so the Celery app can check the
DRAFTLOOP_OPD_TRAIN / DRAFTLOOP_SFT_BOOTSTRAP overrides at start-up without
loading the trainers).

Every field is validated and coerced to its annotated type when a config is
built (`OPDConfig(**overrides)`), and `validate_overrides` checks an override
object key by key, with errors naming the variable and the key."""

from __future__ import annotations

import typing
from dataclasses import dataclass, fields
from functools import cache
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError

from service.config import json_object

Mode = Literal["opd", "forward_kl_all", "reverse_kl_all"]
MODES: tuple[str, ...] = typing.get_args(Mode)
Anchors = Literal["served", "random"]
Tail = Literal["auto", "spread"]
Pool = Literal["token", "stream"]
POOLS: tuple[str, ...] = typing.get_args(Pool)
Accept = Literal["current", "served"]
Teacher = Literal["exact", "logged"]


class _Validated:
    """Coerces every dataclass field to its annotated type after __init__."""

    def __post_init__(self) -> None:
        for name, adapter in _field_adapters(type(self)).items():
            try:
                value = adapter.validate_python(getattr(self, name))
            except ValidationError as exc:
                raise ValueError(f"{type(self).__name__}: {_bad_value(name, exc)}") from None
            object.__setattr__(self, name, value)


@dataclass
class OPDConfig(_Validated):
    epochs: int = 2  # passes over the training blocks
    steps: int | None = None  # exactly this many optimizer steps (passes repeat as needed; None: epochs x batches)
    lr: float = 3e-4  # AdamW peak; cosine decay to 10% over the update's steps (worker.train.loop.cosine_lr)
    warmup_steps: int = 5  # linear warm-up, only when the optimizer starts fresh (no carried state)
    carry_optimizer: bool = True  # resume AdamW's moments from the serving version's optimizer file, when compatible
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_tokens: int = 2048  # padded requests x context length per optimizer step
    gamma: float = 0.8  # rejected-stream decay γ^(slot-1)
    lam_acc: float = 1.0
    # Weight of the rejected stream. 1.0 here (the paper's λ_rej); 0 is the official
    # EAGLE-3 recipe's (forward KL on the accepted rows only).
    lam_rej: float = 1.0
    pool: Pool = "token"  # "token": one token-weighted mean over both streams' rows; "stream": mean of the two means
    accept: Accept = "current"  # accepted prefix from the head being trained ("served": the logged num_accepted)
    teacher: Teacher = "exact"  # rows on the emitted context: the target's exact distribution ("logged": top-k)
    mode: Mode = "opd"  # "opd" | "forward_kl_all" | "reverse_kl_all" (ablations)
    anchors: Anchors = "served"  # "random": ablation, see worker.train.opd
    offpolicy_decay: float = 0.5  # weight of a block drafted `age` versions ago: decay ** age
    max_age: int = 3  # blocks drafted more than this many versions ago are dropped
    tail: Tail = "auto"  # target tail per KL direction (worker.train.opd)
    heldout_fraction: float = 0.1  # of request ids (fixed hash split): offline E[τ], the gate's prompts
    seed: int = 0
    context_vocab: bool = True  # as Eagle3Drafter: the request's own out-of-vocab ids join the draft vocab
    fast_bf16: bool | None = None  # bf16 autocast for training and features; None: where bf16 is fast
    max_seconds: float | None = None  # stop training (between steps) after this long
    # the publish gate (worker.train.gate): candidate vs the serving drafter, real decoding
    gate_requests: int = 16  # at least this many held-out requests (served ones, topped up from ShareGPT)
    gate_max_tokens: int = 48  # generated tokens per gate request
    gate_level: float = 0.95  # of the bootstrap interval whose lower bound must be above 0
    gate_resamples: int = 2000  # bootstrap resamples (seeded by `seed`)


@dataclass
class SFTConfig(_Validated):
    num_prompts: int = 10_000  # of the ShareGPT train split (all of it)
    max_new_tokens: int = 256
    gen_batch_size: int = 128
    gen_minutes: float | None = 25.0  # generation of uncached trajectories per run; None: every prompt
    draft_vocab_size: int = 8192
    ttt_steps: int = 7  # at least the largest K served
    # Training budget: it ends at the first of these that is spent (None: not a
    # limit; at least one is set); the cosine LR schedule runs over that budget.
    train_steps: int | None = None  # optimizer steps
    train_minutes: float | None = 30.0
    train_tokens: int | None = None  # head token-positions (non-padding positions x ttt_steps)
    # The worker's bootstrap spreads that budget over beat ticks: one tick trains
    # at most this much, then gates its head (None: no limit per tick).
    tick_minutes: float | None = None
    tick_steps: int | None = None
    batch_tokens: int = 2048  # padded B x T per optimizer step
    lr: float = 3e-3
    output_lr_scale: float = 0.1  # LR factor of the final norm and LM head (start as the target's)
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    save_every_s: float = 60.0
    eval_prompts: int = 8
    eval_max_tokens: int = 64
    eval_k: int = 4
    loss_on_prompt: bool = False  # distil at prompt anchors too (serving drafts from the reply only)
    fast_bf16: bool | None = None  # bf16 generation + autocast training; None: where bf16 matmuls are fast
    hidden_layers: tuple[int, ...] | None = None
    init_layer: int | None = None  # the head's decoder layer starts as this target layer (-1: the last); None: random
    # Teacher-forced data (off by default): ShareGPT exchanges (prompt + its own
    # reply, cut at exchange_max_tokens) through one batched prefill each, with
    # the target's distributions as labels (EAGLE-1's data); all of it is prompt,
    # so it trains only with loss_on_prompt.
    num_exchanges: int = 0
    exchange_max_tokens: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.train_steps is None and self.train_minutes is None and self.train_tokens is None:
            raise ValueError("SFTConfig: set a training budget (train_steps, train_minutes or train_tokens)")


TRAINER_CONFIGS: dict[str, type] = {"opd_train": OPDConfig, "sft_bootstrap": SFTConfig}  # Settings field -> config


@cache
def _field_adapters(config_cls: type) -> dict[str, TypeAdapter]:
    hints = typing.get_type_hints(config_cls)
    return {f.name: TypeAdapter(hints[f.name]) for f in fields(config_cls)}


def _bad_value(key: str, exc: ValidationError) -> str:
    err = exc.errors()[0]
    return f"bad value for key {key!r}: {err['msg']} (got {err['input']!r})"


def validate_overrides(name: str, value: Any, config_cls: type) -> dict[str, Any]:
    """A JSON object (or dict) of `config_cls` fields -> the overrides, type-checked
    and coerced; "" or None -> {}. Errors name `name` (the variable) and the key."""
    value = json_object(name, value, config_cls.__name__)
    adapters = _field_adapters(config_cls)
    unknown = sorted(set(value) - set(adapters))
    if unknown:
        raise ValueError(f"{name}: unknown key {unknown[0]!r}; {config_cls.__name__} has {sorted(adapters)}")
    out = {}
    for key, raw in value.items():
        try:
            out[key] = adapters[key].validate_python(raw)
        except ValidationError as exc:
            raise ValueError(f"{name}: {_bad_value(key, exc)}") from None
    return out


def check_trainer_settings(settings: Any) -> None:
    """Validate the trainer overrides of a `service.config.Settings` (its
    `opd_train` and `sft_bootstrap` dicts): raises ValueError naming the
    variable (DRAFTLOOP_OPD_TRAIN, ...) and the key."""
    for field_name, config_cls in TRAINER_CONFIGS.items():
        validate_overrides(f"DRAFTLOOP_{field_name.upper()}", getattr(settings, field_name), config_cls)
