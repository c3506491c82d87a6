"""What the SFT and Draft-OPD training loops share: bf16 autocast where it is
fast, the AdamW optimizer and its LR schedules, one optimizer step, the
resumable optimizer state (the SFT bootstrap's state directory; the AdamW
moments a Draft-OPD version carries in its `optimizer.safetensors`), and a
float32 trainable copy of a head."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from service.drafters.eagle3 import Eagle3Head, FrozenTarget
from service.fileutil import sha256_file, write_text_atomic
from service.llama import LlamaModel

log = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer.safetensors"  # AdamW moments beside a version's weights (not read by servers)


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 matmuls beat float32 here: CUDA, or a CPU with AMX / AVX512-BF16."""
    if device.type == "cuda":
        return True
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, n, None) for n in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(bool(c()) for c in checks if c is not None)


def use_bf16(device: torch.device, fast_bf16: bool | None) -> bool:
    """A config's `fast_bf16`: None means where bf16 matmuls are fast."""
    return bf16_is_fast(device) if fast_bf16 is None else fast_bf16


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def trainable_params(head: Eagle3Head) -> list[torch.nn.Parameter]:
    return [p for p in head.parameters() if p.requires_grad]


OUTPUT_PARAMS = ("norm.weight", "lm_head.weight")  # the head's final norm and LM head, from the target's


def make_optimizer(head: Eagle3Head, cfg, output_lr_scale: float = 1.0) -> torch.optim.AdamW:
    """AdamW over the head's trainable parameters; `cfg` has lr and weight_decay
    (an SFTConfig or an OPDConfig). The final norm and LM head (initialised from
    the target's) form a second group whose LR is scaled by `output_lr_scale`."""
    named = [(n, p) for n, p in head.named_parameters() if p.requires_grad]
    body = [p for n, p in named if n not in OUTPUT_PARAMS]
    output = [p for n, p in named if n in OUTPUT_PARAMS]
    groups = [{"params": body, "lr_scale": 1.0}, {"params": output, "lr_scale": output_lr_scale}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)


def cosine_lr(step: int, frac: float, lr: float, warmup_steps: int) -> float:
    """Linear warm-up over `warmup_steps`, then a cosine decay to 10% of `lr` as
    `frac` (the spent fraction of the budget after the warm-up) goes 0 -> 1."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(max(frac, 0.0), 1.0))))


def warmup_cosine_lr(step: int, lr: float, warmup_steps: int, total_steps: int) -> float:
    """`cosine_lr` over a budget of `total_steps` optimizer steps (SFT; Draft-OPD over an update's planned steps)."""
    return cosine_lr(step, (step - warmup_steps) / max(1, total_steps - warmup_steps), lr, warmup_steps)


def optimizer_step(
    opt: torch.optim.Optimizer,
    params: Iterable[Tensor],
    loss: Tensor,  # () scalar
    lr: float,
    grad_clip: float,
) -> Tensor:
    """Set the LR (times each group's `lr_scale`), backpropagate `loss` (a
    scalar), clip, step -> the gradient norm."""
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    return grad_norm


def optimizer_tensors(head: Eagle3Head, opt: torch.optim.Optimizer) -> dict[str, Tensor]:
    """AdamW's per-parameter state by parameter name: `<name>.<key>` (step, exp_avg, exp_avg_sq)."""
    index = {id(p): n for n, p in head.named_parameters()}
    out = {}
    for p, st in opt.state.items():
        for k, v in st.items():
            out[f"{index[id(p)]}.{k}"] = v.detach().reshape(-1).cpu() if v.dim() == 0 else v.detach().contiguous().cpu()
    return out


def load_optimizer_tensors(head: Eagle3Head, opt: torch.optim.Optimizer, tensors: Mapping[str, Tensor]) -> str | None:
    """`optimizer_tensors` back into `opt` -> None, or why they do not fit (then
    `opt` is untouched): every trainable parameter needs its moments, of its shape."""
    loaded = {}
    for name, p in head.named_parameters():
        if not p.requires_grad:
            continue
        st = {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.") and "." not in k.removeprefix(f"{name}.")}
        if set(st) != {"step", "exp_avg", "exp_avg_sq"}:
            return f"no AdamW state for {name}"
        if st["exp_avg"].shape != p.shape or st["exp_avg_sq"].shape != p.shape:
            return f"{name}: state of shape {tuple(st['exp_avg'].shape)}, the parameter is {tuple(p.shape)}"
        # copies: AdamW updates its state in place, and the caller's tensors must stay as given
        loaded[p] = {"step": st["step"].reshape(()).float().clone(), **{k: st[k].to(p, copy=True) for k in ("exp_avg", "exp_avg_sq")}}
    for p, st in loaded.items():
        opt.state[p] = st
    return None


def write_optimizer(tensors: Mapping[str, Tensor], directory: Path) -> dict[str, Any]:
    """Write a version's `OPTIMIZER_FILE` into `directory` (a version being saved)
    -> the manifest fields naming it and its sha256."""
    path = Path(directory) / OPTIMIZER_FILE
    save_file(dict(tensors), str(path))
    return {"optimizer_file": OPTIMIZER_FILE, "optimizer_sha256": sha256_file(path)}


def read_optimizer(directory: Path, manifest: Mapping[str, Any]) -> dict[str, Tensor] | None:
    """A version's AdamW state, when its file is there and its sha256 is the
    manifest's; None otherwise (logged: the update then starts AdamW fresh)."""
    name = manifest.get("optimizer_file")
    path = Path(directory) / str(name or OPTIMIZER_FILE)
    if not name or not path.is_file():
        log.info("opd: %s has no optimizer state; AdamW starts fresh", directory)
        return None
    if sha256_file(path) != manifest.get("optimizer_sha256"):
        log.warning("opd: %s does not match its manifest's sha256; AdamW starts fresh", path)
        return None
    return load_file(str(path))


def save_state(path: Path, head: Eagle3Head, opt: torch.optim.Optimizer, meta: dict) -> None:
    """Head weights + AdamW moments in safetensors, counters in JSON; atomic."""
    tensors = {f"head.{k}": v.detach().contiguous() for k, v in head.state_dict().items()}
    tensors.update({f"opt.{k}": v for k, v in optimizer_tensors(head, opt).items()})
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "state.safetensors.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, path / "state.safetensors")
    write_text_atomic(path / "state.json", json.dumps(meta))


def load_state(path: Path, head: Eagle3Head, opt: torch.optim.Optimizer) -> dict | None:
    """What `save_state` wrote, back into `head` and `opt` -> its meta (None: nothing saved)."""
    if not (path / "state.json").exists() or not (path / "state.safetensors").exists():
        return None
    meta = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "state.safetensors"))
    head.load_state_dict({k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")})
    for name, p in head.named_parameters():
        st = {k.removeprefix(f"opt.{name}."): v for k, v in tensors.items() if k.startswith(f"opt.{name}.")}
        if st:
            st["step"] = st["step"].reshape(())
            opt.state[p] = st
    return meta


def trainable_copy(head: Eagle3Head, model: LlamaModel) -> Eagle3Head:
    """A float32 copy of `head` to train, attached to float32 copies of the frozen
    target tensors when the target runs in a lower precision."""
    new = Eagle3Head(head.cfg)
    new.load_state_dict({k: v.detach().float() if v.is_floating_point() else v for k, v in head.state_dict().items()})
    new.to(model.device)
    frozen = FrozenTarget.from_model(model, new.d2t)
    if model.dtype != torch.float32:
        frozen = FrozenTarget(
            frozen.embed.float(), frozen.norm_weight.float(), frozen.norm_eps, frozen.lm_rows.float(), frozen.cos, frozen.sin
        )
    new.frozen = frozen
    return new
