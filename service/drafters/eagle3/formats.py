"""The eagle3 head in the two formats other engines load: `speculators` (what
vLLM reads; vllm-project/speculators) and `sglang` (SpecForge's layout, what
SGLang reads). Pure functions between our head's state dict / architecture and
each format's tensor names / config.json, in both directions, plus reading a
format folder. The commands are `service.export` and `worker.importer`.

What differs from our head, and how it is converted (checked against
speculators `models/eagle3/{config,core,model_definitions}.py`, vLLM
`llama_eagle3.py` + `transformers_utils/configs/speculators/algos.py`, SGLang
`llama_eagle3.py` + `set_eagle3_layers_to_capture`, SpecForge
`modeling/draft/llama3_eagle.py` and `configs/*-eagle3*.json`):

- Layer taps. Our `hidden_layers` name the target layers whose *outputs* the
  head reads. vLLM (and speculators, whose training data vLLM extracts) capture
  the residual stream *before* layer i: id = ours + 1. SGLang captures before
  layer id + 1: id = ours. Neither engine can tap the last layer's output.
  Without explicit ids both engines default to before (2, L//2, L-3).
- Per-tap norms before fc (`feature_norms`) are EAGLE-3.1's `fc_norm`
  (`fc_norm.{0,1,2}.weight`); a plain EAGLE-3 head has none (`cfg.fc_norm` False).
- The residual of the layer is the un-normed hidden (`norm_before_residual`
  False, written explicitly: vLLM defaults to True when the key is absent,
  speculators to False); logits read norm(h), the next step reads h
  (`norm_output` False).
- q/k/v are one fused matrix here, three in the formats.
- `d2t`: here draft id -> target id; in the formats an int64 offset,
  target = i + d2t[i]. `t2d`: a bool mask over the target vocabulary.
- Not carried: the per-request context vocabulary of `Eagle3Drafter`
  (target ids seen in a request join its draft vocabulary), a serving-time
  feature of ours; an exported head drafts from the static draft vocabulary only.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from ...llama import LlamaConfig
from .config import Eagle3Config

FORMATS = ("speculators", "sglang")
SPECULATORS_VERSION = (
    "0.9.0"  # the release the export was verified against (tests/test_export_speculators.py)
)
LAYER = {"speculators": "layers.0.", "sglang": "midlayer."}
ARCHITECTURES = {"speculators": ["Eagle3DraftModel"], "sglang": ["LlamaForCausalLMEagle3"]}

# our name -> the format's name (a `{L}` stands for the format's layer prefix)
_NAMES = {
    "fc.weight": "fc.weight",
    "norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    "input_norm.weight": "{L}input_layernorm.weight",
    "hidden_norm.weight": "{L}hidden_norm.weight",
    "o_proj.weight": "{L}self_attn.o_proj.weight",
    "post_attention_norm.weight": "{L}post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "{L}mlp.gate_proj.weight",
    "mlp.up_proj.weight": "{L}mlp.up_proj.weight",
    "mlp.down_proj.weight": "{L}mlp.down_proj.weight",
    **{f"feature_norms.{i}.weight": f"fc_norm.{i}.weight" for i in range(3)},
}
_QKV = ("{L}self_attn.q_proj.weight", "{L}self_attn.k_proj.weight", "{L}self_attn.v_proj.weight")
# foreign tensors besides the renamed ones: the vocabulary maps (read apart), and what an
# import does not take: the target's own copies (an embedding is checked by the importer), training state
_OTHER = ("d2t", "embed_tokens.weight", "t2d", "verifier_lm_head.weight", "verifier_norm.weight")


class FormatError(ValueError):
    """A head that cannot be converted, or a folder that is not a head of either format."""


# ---------------------------------------------------------------------------
# layer taps


def default_capture(num_layers: int) -> list[int]:
    """Both engines' default taps without explicit ids: before layers (2, L//2, L-3)."""
    return [2, num_layers // 2, num_layers - 3]


def layer_ids_out(hidden_layers: Sequence[int], fmt: str, num_layers: int) -> list[int]:
    """Our tapped layers (outputs) -> the format's `eagle_aux_hidden_state_layer_ids`."""
    if max(hidden_layers) >= num_layers - 1:
        raise FormatError(
            f"the head reads the output of layer {max(hidden_layers)}, the target's last; vLLM and SGLang "
            "capture hidden states before a layer, so they cannot feed it"
        )
    return [i + 1 for i in hidden_layers] if fmt == "speculators" else list(hidden_layers)


def layer_ids_in(ids: Sequence[int] | None, fmt: str, num_layers: int) -> tuple[int, ...]:
    """The format's ids (None: the engines' default) -> our tapped layers (outputs)."""
    if ids is None:
        return tuple(i - 1 for i in default_capture(num_layers))
    if fmt == "sglang":
        return tuple(int(i) for i in ids)
    if min(ids) < 1:
        raise FormatError(
            f"aux layer id 0 is the embedding output (ids {list(ids)}); the head reads layer outputs only"
        )
    return tuple(int(i) - 1 for i in ids)


# ---------------------------------------------------------------------------
# tensors


def _name(template: str, fmt: str) -> str:
    return template.replace("{L}", LAYER[fmt])


def export_tensors(
    state: dict[str, Tensor],  # our head's state dict (format 2), d2t (Vd,) int64 ids
    cfg: Eagle3Config,
    fmt: str,
) -> dict[str, Tensor]:
    """Our state dict -> the format's tensors: renamed, q/k/v split, d2t as
    offsets and t2d as a mask (both left out when the draft vocabulary is the
    target's, in order, as the engines expect then)."""
    out = {_name(_NAMES[k], fmt): v for k, v in state.items() if k in _NAMES}
    q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    for name, part in zip(_QKV, state["qkv_proj.weight"].split([q_width, kv_width, kv_width])):
        out[_name(name, fmt)] = part
    ids = state["d2t"].to(torch.long)
    base = torch.arange(ids.numel(), dtype=torch.long)
    if ids.numel() < cfg.target_vocab_size or not torch.equal(ids, base):
        out["d2t"] = ids - base
        t2d = torch.zeros(cfg.target_vocab_size, dtype=torch.bool)
        t2d[ids] = True
        out["t2d"] = t2d
    return {k: v.contiguous() for k, v in out.items()}


def _canonical(name: str) -> str:
    """Either format's (or a `model.`-prefixed) name -> the speculators spelling."""
    name = name.removeprefix("model.")
    return "layers.0." + name.removeprefix("midlayer.") if name.startswith("midlayer.") else name


def import_tensors(tensors: dict[str, Tensor], cfg: Eagle3Config) -> dict[str, Tensor]:
    """A format's tensors (either spelling) -> our state dict for `cfg`; refuses
    extra layers, biases, unknown names and a bad vocabulary map."""
    found = {_canonical(k): v for k, v in tensors.items()}
    wanted = {_name(v, "speculators"): k for k, v in _NAMES.items()}
    qkv = [_name(n, "speculators") for n in _QKV]
    unknown = sorted(k for k in found if k not in wanted and k not in qkv and k not in _OTHER)
    if unknown:
        raise FormatError(
            f"tensors our head has no place for: {unknown[:6]} (more layers, biases or another design)"
        )
    state: dict[str, Tensor] = {}
    for theirs, ours in wanted.items():
        if theirs in found:
            state[ours] = found[theirs]
    missing = [k for k in qkv if k not in found]
    if missing:
        raise FormatError(f"missing tensors {missing}")
    state["qkv_proj.weight"] = torch.cat([found[k] for k in qkv])
    state["d2t"] = _draft_ids(found.get("d2t"), found.get("t2d"), cfg)
    return state


def _draft_ids(offsets: Tensor | None, t2d: Tensor | None, cfg: Eagle3Config) -> Tensor:
    """d2t offsets (or none: the identity) -> (Vd,) int64 target ids, checked against t2d."""
    vd, v = cfg.draft_vocab_size, cfg.target_vocab_size
    if offsets is None:
        if vd != v:
            raise FormatError(f"a draft vocabulary of {vd} < {v} ids needs a d2t map, and there is none")
        return torch.arange(vd, dtype=torch.long)
    if offsets.shape != (vd,) or offsets.dtype.is_floating_point:
        raise FormatError(f"d2t must be ({vd},) integer offsets, got {tuple(offsets.shape)} {offsets.dtype}")
    ids = offsets.to(torch.long) + torch.arange(vd, dtype=torch.long)
    if int(ids.min()) < 0 or int(ids.max()) >= v or torch.unique(ids).numel() != vd:
        raise FormatError(f"d2t does not map the draft vocabulary to {vd} distinct target ids in [0, {v})")
    if t2d is not None and (t2d.shape != (v,) or int(t2d.sum()) != vd or not bool(t2d.bool()[ids].all())):
        raise FormatError("t2d does not mark exactly the target ids of d2t")
    return ids


# ---------------------------------------------------------------------------
# config.json


def _layer_fields(cfg: Eagle3Config, max_position_embeddings: int) -> dict[str, Any]:
    """The Llama fields of the head's one decoder layer."""
    return {
        "model_type": "llama",
        "vocab_size": cfg.target_vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": 1,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": max_position_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
    }


def export_config(
    cfg: Eagle3Config,
    fmt: str,
    num_speculative_tokens: int,
    verifier: str,
    verifier_architectures: Sequence[str],
    max_position_embeddings: int,
    dtype: str,
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """The format's config.json for our head (norm flags explicit)."""
    ids = layer_ids_out(cfg.hidden_layers, fmt, cfg.target_num_layers)
    flags = {
        "norm_before_residual": False,
        "norm_before_fc": False,
        "fc_norm": cfg.fc_norm,
        "norm_output": False,
    }
    common = {"draft_vocab_size": cfg.draft_vocab_size, "target_hidden_size": cfg.hidden_size, **flags}
    if fmt == "sglang":
        return {
            "architectures": ARCHITECTURES[fmt],
            **_layer_fields(cfg, max_position_embeddings),
            **common,
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": ids, "use_aux_hidden_state": True},
            "torch_dtype": dtype,
            "draftloop": provenance,
        }
    proposal = {"proposal_type": "greedy", "speculative_tokens": num_speculative_tokens}
    return {
        "architectures": ARCHITECTURES[fmt],
        "speculators_model_type": "eagle3",
        "speculators_version": SPECULATORS_VERSION,
        "transformer_layer_config": {**_layer_fields(cfg, max_position_embeddings), "torch_dtype": dtype},
        **common,
        "eagle_aux_hidden_state_layer_ids": ids,
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [proposal],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier, "architectures": list(verifier_architectures)},
        },
        "torch_dtype": dtype,
        "draftloop": provenance,
    }


def detect_format(config: dict[str, Any]) -> str:
    """Which format a config.json is in; FormatError when neither."""
    if "speculators_model_type" in config:
        if config["speculators_model_type"] != "eagle3":
            raise FormatError(f"speculators model type {config['speculators_model_type']!r}, not eagle3")
        return "speculators"
    if "draft_vocab_size" in config and config.get("num_hidden_layers") is not None:
        return "sglang"
    raise FormatError(
        "config.json is neither a speculators eagle3 config nor an SGLang/SpecForge eagle3 config"
    )


def _refusals(layer: dict[str, Any], flags: dict[str, Any], tcfg: LlamaConfig) -> list[str]:
    """What in a foreign head our head cannot represent for this target."""
    bad = []
    if layer.get("model_type", "llama") != "llama":
        bad.append(f"a {layer.get('model_type')!r} decoder layer (ours is a Llama layer)")
    for key in ("norm_before_residual", "norm_before_fc", "norm_output"):
        if flags.get(key):
            bad.append(f"{key}=true")
    if layer.get("num_hidden_layers", 1) != 1:
        bad.append(f"{layer.get('num_hidden_layers')} decoder layers (ours has one)")
    if layer.get("hidden_act", "silu") != "silu":
        bad.append(f"hidden_act {layer.get('hidden_act')!r}")
    if layer.get("attention_bias") or layer.get("mlp_bias"):
        bad.append("biases")
    rope = layer.get("rope_parameters") or layer.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        bad.append(f"rope scaling {rope}")
    theta = rope.get("rope_theta", layer.get("rope_theta", 10000.0))
    if not math.isclose(theta, tcfg.rope_theta, rel_tol=1e-6):
        bad.append(f"rope_theta {theta} (the target's is {tcfg.rope_theta}; the head shares its RoPE tables)")
    heads = layer.get("num_attention_heads")
    shape = {
        "hidden_size": (layer.get("hidden_size"), tcfg.hidden_size),
        "target_hidden_size": (flags.get("target_hidden_size") or layer.get("hidden_size"), tcfg.hidden_size),
        "vocab_size": (layer.get("vocab_size"), tcfg.vocab_size),
        "intermediate_size": (layer.get("intermediate_size"), tcfg.intermediate_size),
        "num_attention_heads": (heads, tcfg.num_heads),
        "num_key_value_heads": (layer.get("num_key_value_heads", heads), tcfg.num_kv_heads),
        "head_dim": (
            layer.get("head_dim") or (layer.get("hidden_size") or 0) // max(heads or 1, 1),
            tcfg.head_dim,
        ),
    }
    bad += [f"{k} {got} (the target's is {want})" for k, (got, want) in shape.items() if got != want]
    return bad


def import_config(config: dict[str, Any], tcfg: LlamaConfig) -> tuple[str, Eagle3Config]:
    """A foreign config.json -> (format, our head's architecture for this target);
    FormatError naming everything our head cannot represent."""
    fmt = detect_format(config)
    layer = (config.get("transformer_layer_config") or {}) if fmt == "speculators" else config
    ids = config.get("eagle_aux_hidden_state_layer_ids")
    if fmt == "sglang":
        ids = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids", ids)
    bad = _refusals(layer, config, tcfg)
    vd = config.get("draft_vocab_size") or tcfg.vocab_size
    if not 0 < vd <= tcfg.vocab_size:
        bad.append(f"draft_vocab_size {vd}")
    if bad:
        raise FormatError("the head cannot be represented here: " + "; ".join(bad))
    layers = layer_ids_in(ids, fmt, tcfg.num_layers)
    try:
        cfg = Eagle3Config.for_target(tcfg, vd, layers, fc_norm=bool(config.get("fc_norm", False)))
    except ValueError as exc:
        raise FormatError(f"layer ids {ids} ({fmt}) -> taps {list(layers)}: {exc}") from None
    return fmt, dataclasses.replace(cfg, rms_norm_eps=layer.get("rms_norm_eps", cfg.rms_norm_eps))


def read_folder(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A local format folder -> (config.json, every tensor of its *.safetensors)."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: no readable config.json ({exc})") from None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FormatError(f"{path}: no *.safetensors weights (pickled .bin weights are not read)")
    tensors: dict[str, Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return config, tensors
