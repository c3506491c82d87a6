"""All settings, read once from `DRAFTLOOP_*` environment variables (and `.env`)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
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
    # auto (CPU: the faster of float32 and bfloat16 here, measured once and cached; CUDA: bfloat16)
    # | float32 | bfloat16 | float16
    dtype: str = "auto"
    # CPU float32: prepack the target's linear weights for oneDNN (service/packed.py;
    # multi-row verify passes cost far less); false: plain F.linear (MKL)
    pack_weights: bool = True
    max_model_len: int = 2048

    # speculative decoding
    # auto (the eagle3 version the Redis pointer names, else the newest on disk, served as
    # hybrid; no eagle3 version at all: ngram) | hybrid | eagle3 | draft_model | ngram | none
    drafter: str = "auto"
    num_speculative_tokens: int = Field(4, ge=0, le=16)
    draft_model: str | None = None  # for drafter=draft_model; None = the target's first layers
    draft_model_layers: int = 4
    ngram_max: int = 3
    ngram_min: int = 1
    hybrid_min_match: int = 2  # suffix tokens an n-gram match needs before lookup drafts first (hybrid)
    # draft-length stop: auto (from the measured verify-cost curve, service.costmodel) | a number in [0, 1]
    min_confidence: str = "auto"
    # how many tokens each sequence drafts per step: adaptive (from its running acceptance and
    # the batch, over the measured cost curve: service/speculation.py) | fixed (up to K always)
    speculation: Literal["adaptive", "fixed"] = "adaptive"
    # adaptive: a sequence held at K = 0 this many steps in a row drafts its full K once, so its
    # acceptance, the block log and the regression guard keep getting data (0: never)
    speculation_explore_every: int = Field(16, ge=0)

    # server
    host: str = "127.0.0.1"
    port: int = 8000
    max_num_seqs: int = Field(8, ge=1)  # sequences decoded together in one batch; more wait in a FIFO queue
    # prompt tokens prefilled per engine iteration, over all prefilling sequences: a long prompt
    # delays the running decodes by at most one chunk per step
    prefill_chunk: int = Field(256, ge=1)
    # before reporting ready, decode one full batch of dummy sequences (service/warmup.py), so
    # first requests skip first-time allocations and start-up memory holds the working set
    warmup: bool = True
    max_queue: int = 256
    max_body_bytes: int = 1_000_000
    admin_token: str | None = None
    # API keys (service/api/auth.py): a comma list, or a file path (starts with / ./ ../ ~/),
    # one key per line; unset or empty: no key needed. SecretStr: never in a repr or log.
    api_keys: SecretStr | None = None
    metrics_auth: Literal["open", "key"] = "open"  # /metrics without a key, or behind the API keys

    # self-improving loop
    redis_url: str = "redis://127.0.0.1:6379/0"
    checkpoint_dir: Path = Path("checkpoints")
    block_stream: str = "draftloop:blocks"
    block_stream_maxlen: int = 200_000
    block_topk: int = 20
    block_queue_size: int = 10_000
    block_log: bool = True
    # the per-request token context (prompt + emitted ids) beside the stream: kept this long;
    # block_contexts=false stores none (no prompt retained; Draft-OPD then cannot replay any block)
    block_context_ttl_s: int = Field(3600, ge=1)
    block_contexts: bool = True
    # live regression guard (service/guard.py): after a swap to a newer version, compare
    # per-request served τ with the previous version's; roll the pointer back when worse
    guard: bool = True
    guard_window: int = Field(200, ge=2)  # requests of each version compared
    guard_min_requests: int = Field(30, ge=2)  # before any verdict
    guard_margin: float = Field(0.05, ge=0.0)  # τ drop tolerated, as a fraction of the old τ
    guard_speed_margin: float = Field(0.15, ge=0.0)  # decode tokens/s drop tolerated (load moves it too)
    guard_z: float = Field(3.0, gt=0.0)  # width of the confidence bound, in standard errors
    guard_cooldown_s: int = Field(3600, ge=1)  # a rolled-back version cannot be published again before
    opd_interval_s: float = 120.0
    opd_min_blocks: int = 256
    # JSON objects of trainer overrides (NoDecode: parsed by `_json_object`, so a bad
    # value gets an error naming the variable). The worker checks their keys and
    # types against its trainer configs when it starts.
    opd_train: Annotated[dict[str, Any], NoDecode] = Field(
        default_factory=dict, description="overrides of the worker's OPDConfig for opd_update"
    )
    sft_bootstrap: Annotated[dict[str, Any], NoDecode] = Field(
        default_factory=dict, description="overrides of the worker's SFTConfig for the SFT bootstrap"
    )

    @field_validator("opd_train", "sft_bootstrap", mode="before")
    @classmethod
    def _trainer_overrides(cls, value: Any, info: ValidationInfo) -> dict[str, Any]:
        name = info.field_name
        return json_object(f"DRAFTLOOP_{name.upper()}", value, _TRAINER_CONFIG_NAMES[name])


_TRAINER_CONFIG_NAMES = {"opd_train": "OPDConfig", "sft_bootstrap": "SFTConfig"}  # named in error messages


def json_object(name: str, value: Any, what: str) -> dict[str, Any]:
    """A JSON object (or dict) -> the dict; "" or None -> {}. Errors name `name`.
    `what` names the object's fields in the error for a non-object."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object of {what} fields, got {value!r}")
    return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
