"""The arms of the traffic-shift benchmark (benchmarks/domain_shift.py): how
each turns one round of served traffic into a candidate head, and the
worker's publish gate deciding whether the candidate serves next.

- a `static`: no updates.
- b `online_sft`: OSD-style online distillation on the served (prompt,
  completion) pairs: teacher-forced target features of each pair
  (`worker.train.featstore.add_served`, i.e. `features.forced_batch`) and
  the SFT training-time-test loss (`worker.train.sft.train_head`: forward KL
  to the target's distribution over the draft vocabulary, at every reply
  position, unrolled K+1 steps).
- c `draft_opd`: `worker.train.opd.opd_update` on the round's blocks, as the
  worker's task runs it (`benchmarks.online.update`: AdamW carried in the
  version's optimizer file).
- d `draft_opd_no_rejected`: c with `lam_rej = 0` (forward KL on the accepted
  stream only).

Equal compute: every trained arm takes exactly `steps` optimizer steps per
round (`OPDConfig.steps`; SFT's `train_steps`) of at most `batch_tokens`
padded positions unrolled K+1 head steps, with the same AdamW (LR, weight
decay, clipping, one LR group: OPD's), the same cosine over the round's steps,
the same warm-up rule (only when AdamW starts fresh) and AdamW's moments
carried from the published version only. All arms hold out the same share of
requests by the same hash of their ids (`worker.train.data.split_heldout`):
never trained on, their prompts open the gate's list, as in the worker."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from torch import Tensor

from benchmarks.online import Version, drafter_for, publish, update
from service.drafters import eagle3
from service.runtime import Target
from worker.publish_gate import gate_decision
from worker.train.config import OPDConfig, SFTConfig
from worker.train.data import split_heldout
from worker.train.featstore import GenerationSettings, add_served, cache_layers, served_store
from worker.train.gate import GateResult
from worker.train.loop import (
    load_optimizer_tensors,
    make_optimizer,
    optimizer_tensors,
    trainable_copy,
    use_bf16,
    write_optimizer,
)
from worker.train.rollouts import BlockCollector
from worker.train.sft import train_head

log = logging.getLogger("benchmarks.shift_arms")

ARMS: dict[str, str] = {"a": "static", "b": "online_sft", "c": "draft_opd", "d": "draft_opd_no_rejected"}
OPD_OVERRIDES: dict[str, dict[str, Any]] = {"c": {}, "d": {"lam_rej": 0.0}}
BENCHMARK = "domain_shift"


@dataclass
class Candidate:
    """One round's trained head, before the gate."""

    head: eagle3.Eagle3Head
    heldout_ids: list[str]  # requests never trained on: their prompts open the gate's list
    train_items: int  # OPD: blocks; SFT: served (prompt, completion) pairs
    steps: int
    head_tokens: int  # head token-positions processed (positions x unrolled steps), summed over the steps
    seconds: float
    loss_first: float | None
    loss_last: float | None
    save: Callable[[Version, int], Version]  # (parent, round) -> the published version


@dataclass
class ArmState:
    arm: str
    version: Version  # what the arm serves now
    sft_optimizer: dict[str, Tensor] | None = None  # arm b: AdamW of the serving version (OPD keeps it on disk)


def arm_config(arm: str, cfg: OPDConfig) -> OPDConfig:
    """An arm's OPDConfig: the shared one (its `steps` per round for every trained arm), the arm's overrides."""
    return replace(cfg, **OPD_OVERRIDES.get(arm, {}))


def request_index(request_id: str) -> int:
    """`serve_for_blocks` names request i of a round f"{tag}-{i}"."""
    return int(request_id.rsplit("-", 1)[1])


def split_ids(request_ids: Sequence[str], fraction: float) -> tuple[list[str], list[str]]:
    """(train, held-out) request ids by the split Draft-OPD applies to its requests."""
    train, held = split_heldout([SimpleNamespace(request_id=r) for r in request_ids], fraction)  # type: ignore[arg-type]
    return [r.request_id for r in train], [r.request_id for r in held]


def _losses(history: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    return (history[0]["loss"], history[-1]["loss"]) if history else (None, None)


def opd_candidate(
    target: Target, state: ArmState, blocks: BlockCollector, cfg: OPDConfig, save_dir: Path
) -> Candidate | None:
    """Arms c and d: the worker's update on the round's blocks (None: no usable block)."""
    t0 = time.perf_counter()
    result = update(target, state.version, blocks, cfg)
    if result.train_blocks == 0:
        return None

    def save(parent: Version, round_no: int) -> Version:
        return publish(result, parent, save_dir, target, cfg, round_no, BENCHMARK)

    hist = result.train.history
    return Candidate(
        result.head, result.heldout_ids, result.train_blocks, result.train.steps, sum(h["tokens"] for h in hist),
        time.perf_counter() - t0, *_losses(hist), save,
    )


def online_sft_config(cfg: OPDConfig, steps: int, k: int, carried: bool) -> SFTConfig:
    """SFT's trainer under the Draft-OPD arms' optimizer and budget (equal compute)."""
    return SFTConfig(
        train_steps=steps, train_minutes=None, ttt_steps=k + 1, batch_tokens=cfg.batch_tokens, lr=cfg.lr,
        output_lr_scale=1.0, warmup_steps=0 if carried else cfg.warmup_steps, weight_decay=cfg.weight_decay,
        grad_clip=cfg.grad_clip, seed=cfg.seed, eval_prompts=0, fast_bf16=cfg.fast_bf16, save_every_s=1e9,
    )


def served_pairs(blocks: BlockCollector, prompts: Sequence[Sequence[int]], ids: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """(prompt, completion) of the requests `ids`: the served context past the prompt."""
    pairs = []
    for rid in ids:
        prompt = list(prompts[request_index(rid)])
        completion = [t for t in blocks.contexts[rid][len(prompt) :] if t >= 0]
        if completion:
            pairs.append((prompt, completion))
    return pairs


def sft_candidate(
    target: Target, state: ArmState, blocks: BlockCollector, prompts: Sequence[Sequence[int]], cfg: OPDConfig,
    k: int, save_dir: Path, tag: str,
) -> Candidate | None:
    """Arm b: the TTT loss on teacher-forced features of the round's served
    pairs (held-out requests left out), AdamW carried from the serving version."""
    t0 = time.perf_counter()
    train_ids, held_ids = split_ids(sorted(blocks.contexts), cfg.heldout_fraction)
    pairs = served_pairs(blocks, prompts, train_ids)
    if not pairs or not cfg.steps:
        return None
    model = target.model
    head = trainable_copy(eagle3.load_head(state.version.path, model, target.model_id)[0], model)
    opt = make_optimizer(head, cfg)  # one LR group, as Draft-OPD's
    carried = state.sft_optimizer is not None and load_optimizer_tensors(head, opt, state.sft_optimizer) is None
    sft_cfg = online_sft_config(cfg, cfg.steps, k, carried)
    layers = head.cfg.hidden_layers
    gen = GenerationSettings(target.model_id, cache_layers(layers), 0, tuple(sorted(target.eos_token_ids)), use_bf16(model.device, cfg.fast_bf16))
    add_served(model, pairs, gen, save_dir / "features" / tag)  # a folder per round: this round's pairs only
    store = served_store(gen, save_dir / "features" / tag, layers)
    history = train_head(head, store, sft_cfg, opt=opt)
    moments = optimizer_tensors(head, opt)

    def save(parent: Version, round_no: int) -> Version:
        path = eagle3.save_checkpoint(
            head, save_dir, target.model_id, parent_version=parent.number,
            trained_on={"pairs": len(pairs), "optimizer_steps": len(history)},
            extra={"trainer": "online_sft", "online_sft": {"config": asdict(sft_cfg), "benchmark": BENCHMARK, "round": round_no}},
            extra_files=lambda tmp: write_optimizer(moments, tmp),
        )
        state.sft_optimizer = moments
        return Version(int(Path(path).name.removeprefix("v")), Path(path), parent.blocks_trained + len(pairs), round_no)

    return Candidate(
        head, held_ids, len(pairs), len(history), sum(h["tokens"] for h in history), time.perf_counter() - t0,
        *_losses(history), save,
    )


def gate(target: Target, state: ArmState, cand: Candidate, prompts: Sequence[Sequence[int]], cfg: OPDConfig, k: int) -> GateResult:
    """The worker's gate: `cand` against the arm's serving version (loaded as a
    server loads it), on the held-out requests' prompts topped up from ShareGPT."""
    served = [list(prompts[request_index(rid)]) for rid in cand.heldout_ids]
    return gate_decision(target, drafter_for(state.version, target), cand.head, served, cfg, k)
