"""`draftloop export-drafter`: one eagle3 version written as a folder vLLM
(`speculators` format) or SGLang (`sglang`, SpecForge's layout) loads:
config.json, model.safetensors and README.md (how to launch the engine with
it, and what the export leaves out). The conversion itself is
`service.drafters.eagle3.formats`; this module picks the version, reads the
target's config, and writes the folder atomically."""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .checkpoints import store
from .config import DEFAULT_MODEL, Settings
from .drafters.eagle3 import KIND_DIR, read_state
from .drafters.eagle3.config import Eagle3Config
from .drafters.eagle3.formats import FORMATS, FormatError, export_config, export_tensors
from .fileutil import fsync_path

log = logging.getLogger(__name__)

# the hub id of the embedded default (ours is its Q4_1 GGUF, dequantized: close, not equal)
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHTS_FILE = "model.safetensors"


def pick_version(checkpoint_dir: Path, version: int | None) -> Path:
    """The version directory to export: `version`, or the newest complete one."""
    versions = store.list_versions(checkpoint_dir, KIND_DIR)
    if not versions:
        raise FileNotFoundError(f"no {KIND_DIR} checkpoint in {checkpoint_dir}")
    chosen = versions[-1] if version is None else version
    if chosen not in versions:
        raise FileNotFoundError(f"{KIND_DIR} v{chosen} is not in {checkpoint_dir} (have {versions})")
    return store.version_path(checkpoint_dir, chosen, KIND_DIR)


def target_config(name: str, settings: Settings) -> dict[str, Any]:
    """The target's Hugging Face config.json: the embedded default's, a local
    folder's, or a hub id's (fetched alone; an error names the way out offline)."""
    if name == DEFAULT_MODEL or Path(name).is_dir():
        from .modelstore import resolve_model

        return json.loads((Path(resolve_model(name, settings)) / "config.json").read_text())
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(name, "config.json")).read_text())
    except Exception as exc:  # offline, unknown id, gated repo: one message
        raise FileNotFoundError(
            f"cannot read the config.json of target {name!r} ({exc}); pass a local folder"
        ) from None


def default_verifier(target_model: str) -> str:
    """What the export names as the verifier (the model vLLM/SGLang serve)."""
    return EMBEDDED_HUB_ID if target_model == DEFAULT_MODEL else target_model


def readme(
    fmt: str, out_dir: Path, verifier: str, k: int, cfg: Eagle3Config, provenance: dict[str, Any]
) -> str:
    """How to launch an engine with the folder, and what the export does not carry."""
    spec = json.dumps({"model": str(out_dir), "method": "eagle3", "num_speculative_tokens": k})
    launch = {
        "speculators": f"vllm serve {verifier} \\\n  --speculative-config '{spec}'",
        "sglang": f"python -m sglang.launch_server --model-path {verifier} \\\n"
        f"  --speculative-algorithm EAGLE3 --speculative-draft-model-path {out_dir} \\\n"
        f"  --speculative-num-steps {k} --speculative-eagle-topk 1 --speculative-num-draft-tokens {k + 1}",
    }[fmt]
    norm = (
        "`fc_norm: true` (EAGLE-3.1 per-tap norms): needs an engine that reads it (vLLM with "
        "vllm-project/vllm#42764 and #46488; SGLang with EAGLE-3.1 support). An older engine "
        "ignores the `fc_norm.*` weights and drafts badly, without an error.\n"
        if cfg.fc_norm
        else ""
    )
    embedded = (
        f"- The draftloop target was the embedded default (a dequantized Q4_1 GGUF of {EMBEDDED_HUB_ID}); "
        "the engine serves the original weights, so acceptance there differs a little.\n"
        if provenance["target_model"] == DEFAULT_MODEL
        else ""
    )
    return f"""# draftloop eagle3 v{provenance["version"]}, {fmt} format

Exported by `draftloop export-drafter --format {fmt}` from {provenance["checkpoint"]}
(weights sha256 {provenance["weights_sha256"][:16]}...), for target `{verifier}`.

## Launch

```bash
{launch}
```

{norm}
## What differs from draftloop serving

- The per-request context vocabulary is not carried: draftloop adds the target ids
  seen in a request to that request's draft vocabulary; here the head drafts from its
  static draft vocabulary of {cfg.draft_vocab_size} ids only (measured cost: docs/results.md).
- Draft length: draftloop stops a draft by the head's chain confidence against the
  measured verify cost; the engine drafts its configured number of tokens.
- Taps: the head reads the outputs of target layers {list(cfg.hidden_layers)}; the config
  names them in the format's own convention (`eagle_aux_hidden_state_layer_ids`). Use this
  folder with the engine of its format only: the two engines count the ids differently.
{embedded}"""


def write_folder(out_dir: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], text: str) -> None:
    """config.json + model.safetensors + README.md into `out_dir`, atomically
    (a temporary sibling renamed into place); an existing non-empty folder is refused."""
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "README.md").write_text(text)
        for name in os.listdir(tmp):
            fsync_path(tmp / name)
        if out_dir.exists():
            out_dir.rmdir()
        os.rename(tmp, out_dir)
        fsync_path(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_drafter(
    settings: Settings,
    fmt: str,
    out_dir: Path,
    version: int | None = None,
    verifier: str | None = None,
    dtype: str | None = None,
) -> Path:
    """Export one eagle3 version (default: the newest) to `out_dir` -> out_dir.
    FormatError when the head cannot be expressed in the format."""
    if fmt not in FORMATS:
        raise FormatError(f"format {fmt!r}: one of {FORMATS}")
    out_dir = Path(out_dir).resolve()
    path = pick_version(Path(settings.checkpoint_dir), version)
    state, manifest, cfg = read_state(path)
    tcfg = target_config(manifest["target_model"], settings)
    verifier = verifier or default_verifier(manifest["target_model"])
    cast = DTYPES[dtype] if dtype else state["fc.weight"].dtype
    tensors = {
        k: (v.to(cast) if v.is_floating_point() else v) for k, v in export_tensors(state, cfg, fmt).items()
    }
    provenance = {
        "version": manifest["version"],
        "checkpoint": str(path),
        "target_model": manifest["target_model"],
        "weights_sha256": manifest["weights_sha256"],
        "hidden_layers": list(cfg.hidden_layers),
        "not_carried": ["context_vocab"],
    }
    k = settings.num_speculative_tokens
    config = export_config(
        cfg, fmt, k, verifier, tcfg.get("architectures") or [], int(tcfg.get("max_position_embeddings", 4096)),
        str(cast).removeprefix("torch."), provenance,
    )  # fmt: skip
    write_folder(out_dir, config, tensors, readme(fmt, out_dir, verifier, k, cfg, provenance))
    log.info("exported %s v%s as %s to %s", KIND_DIR, manifest["version"], fmt, out_dir)
    return out_dir
