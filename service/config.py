"""All settings, read once from `DRAFTLOOP_*` environment variables (and `.env`)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, TypeAdapter, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_MODEL = "smollm2-135m-instruct"  # the embedded default (service.modelstore)


def _default_cache_dir() -> Path:
    import os

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "draftloop"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DRAFTLOOP_", env_file=".env", extra="ignore")

    # models
    target_model: str = Field(DEFAULT_MODEL, description="HF folder/hub id, or the embedded default")
    served_model_name: str | None = Field(None, description="name clients pass as `model`")
    cache_dir: Path = Field(default_factory=_default_cache_dir)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16
    max_model_len: int = 2048

    # speculative decoding
    # auto (the eagle3 version the Redis pointer names, else the newest on disk, else ngram)
    # | eagle3 | draft_model | ngram | none
    drafter: str = "auto"
    num_speculative_tokens: int = Field(4, ge=0, le=16)
    draft_model: str | None = None  # for drafter=draft_model; None = the target's first layers
    draft_model_layers: int = 4
    ngram_max: int = 3
    ngram_min: int = 1

    # server
    host: str = "127.0.0.1"
    port: int = 8000
    max_num_seqs: int = 8  # sequences interleaved step by step; more wait in a FIFO queue
    max_queue: int = 256
    max_body_bytes: int = 1_000_000
    admin_token: str | None = None

    # self-improving loop
    redis_url: str = "redis://127.0.0.1:6379/0"
    checkpoint_dir: Path = Path("checkpoints")
    block_stream: str = "draftloop:blocks"
    block_stream_maxlen: int = 200_000
    block_topk: int = 20
    block_queue_size: int = 10_000
    block_log: bool = True
    opd_interval_s: float = 120.0
    opd_min_blocks: int = 256
    # JSON objects of trainer overrides (NoDecode: parsed by `_trainer_overrides`,
    # so a bad value gets an error naming the variable and the key)
    opd_train: Annotated[dict[str, Any], NoDecode] = Field(
        default_factory=dict, description="overrides of worker.opd.OPDConfig for opd_update"
    )
    sft_bootstrap: Annotated[dict[str, Any], NoDecode] = Field(
        default_factory=dict, description="overrides of worker.sft.SFTConfig for the SFT bootstrap"
    )

    @field_validator("opd_train", "sft_bootstrap", mode="before")
    @classmethod
    def _trainer_overrides(cls, value: Any, info: ValidationInfo) -> dict[str, Any]:
        name = info.field_name
        return trainer_overrides(f"DRAFTLOOP_{name.upper()}", value, _TRAINER_CONFIGS[name]())


def _opd_config() -> type:
    from worker.opd import OPDConfig  # lazily: only the worker and benchmarks need the trainers

    return OPDConfig


def _sft_config() -> type:
    from worker.sft import SFTConfig

    return SFTConfig


_TRAINER_CONFIGS = {"opd_train": _opd_config, "sft_bootstrap": _sft_config}


def trainer_overrides(name: str, value: Any, config_cls: type) -> dict[str, Any]:
    """A JSON object (or dict) of `config_cls` dataclass fields -> the overrides,
    type-checked and coerced; "" or None -> {}. Errors name `name` and the key.
    Checked when settings are read, so a typo fails at start-up, not in a task."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object of {config_cls.__name__} fields, got {value!r}")
    known = set(config_cls.__dataclass_fields__)
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"{name}: unknown key {unknown[0]!r}; {config_cls.__name__} has {sorted(known)}")
    try:
        parsed = TypeAdapter(config_cls).validate_python(value)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(x) for x in err["loc"])
        raise ValueError(f"{name}: bad value for key {key!r}: {err['msg']} (got {err['input']!r})") from None
    return {k: getattr(parsed, k) for k in value}


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
