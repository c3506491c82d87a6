"""All settings, read once from `DRAFTLOOP_*` environment variables (and `.env`)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

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
    drafter: str = "auto"  # auto (newest eagle3 checkpoint, else ngram) | eagle3 | draft_model | ngram | none
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


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
