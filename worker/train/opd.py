"""The Draft-OPD trainer: served blocks -> replay of the drafter at the served
block starts -> Draft-OPD loss -> a candidate EAGLE-3 head, with the offline
held-out evaluation (`worker.train.evaluate`) before and after as diagnostics;
whether it is published is `worker.train.gate`'s decision (real decoding
against the serving drafter); see docs/architecture.md. No
Celery, no Redis here: `worker.update` feeds it records and token contexts read
from the block log; a benchmark can feed it records it produced in-process.

Replay (checked against `Eagle3Drafter.propose` in tests/test_opd.py): a block
at position P (context length before its first drafted token) was drafted from
anchor P-2 -- the head read the fused target feature at P-2 with the embedding
of the pending token x_{P-1} and proposed d_1 (target row 0); its step j read
its own previous output with the embedding of d_j and proposed d_{j+1} (target
row j). So the block is replayed by `Eagle3Head.unroll` at anchor P-2 with
step tokens [x_{P-1}, d_1, ..., d_K]: S = K+1 steps give q at the K+1 target
rows (row K, the bonus position, is never drafted in serving but its target
row is logged, so it is trained too). One target forward over a request's
context gives the features of all its blocks, and blocks of one request sit at
distinct anchors, so one unroll per request covers them all (anchors that start
no block only supply the step-0 keys, as the catch-up does in serving).

Accepted prefix: the head being trained decides it (`losses.replay_accepted`:
the leading rows where its argmax is the teacher's choice, the logged top-1
that serving verified against), so the streams follow the student rather than
the served head, whose logged `num_accepted` is stale after the first update
(`accept="served"` keeps the logged one, an ablation). On the serving head and
greedy blocks the two agree (tested).

Target distributions. Rows on the emitted context -- row 0 and one more per
served accepted draft (`BlockExample.exact_rows`) -- read the target's exact
distribution: the worker's target forward over the request's context gives
its final hidden there, and the target's LM-head rows of the block's draft
vocab give p (`losses.exact_teacher_logp`, softmax over the draft ids the
block could draft, as the SFT loss does), so those rows are the full TTT
cross-entropy (forward KL = CE − H(p), the same gradient) on exact teacher
rows (`teacher="logged"`: the logged top-k there too). The logged top-k stays
the check that the replay is serving's: the recomputed full-vocabulary top-1
is compared with the logged one on those rows (`replay_check`, in the
update's report). Rows past the first served rejection are conditioned on
rejected drafts, which the emitted context does not hold: they read the
logged top-k of the target's raw distribution, mapped onto the draft
vocabulary (`d2t`); target ids outside the draft vocab are dropped, and p is
renormalised over the draft vocab. The mass outside the logged top-k is
unknown; its handling depends on the KL direction (`tail="auto"`):
- forward KL(p‖q): p is the logged top-k inside the draft vocab, renormalised,
  and 0 elsewhere ("renorm"). Spreading the unknown tail evenly instead would
  teach q to put that mass on every draft id, which flattens q. A row whose
  whole top-k lies outside the draft vocab contributes 0.
- reverse KL(q‖p): needs p > 0 wherever q has mass, so the mass outside the
  logged top-k (1 - Σ top-k, at least 1e-6) is spread evenly over the draft
  ids not in the top-k ("spread").
`tail="spread"` uses the spread target in both directions.

Optimizer: AdamW's moments travel with the versions (`save_update` writes them
beside the weights; `worker.update` hands the serving version's back), resumed
when they fit the head, else fresh with a linear warm-up; the LR follows a
cosine decay over the update's planned steps (epochs x batches).

Off-policy blocks: a block drafted by another drafter kind (ngram, a draft
model, the lookup tokens of a hybrid; `worker.train.blocks.on_policy`) is
dropped. A block drafted by version v while training version c has age
c - v; its weight is `offpolicy_decay ** age`, and blocks older than
`max_age` (or of another target model) are dropped. Blocks with K = 0 are not
trained on (their tokens are still part of later blocks' contexts).

Ablations (for the benchmark): `mode` forward_kl_all / reverse_kl_all,
`gamma=1.0`, and `anchors="random"`: random anchors in the generated part of
each request, fed the emitted tokens (teacher forcing) with the target rows
logged at those positions; every row then counts as accepted, so only the
forward-KL stream is left -- there is no drafter-induced state."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from service.blocklog import BlockRecord
from service.drafters.eagle3 import Eagle3Head
from service.llama import LlamaModel

from .blocks import BuildStats, build_requests
from .config import OPDConfig
from .data import ReplayBatch, RequestBlocks, collate_requests, request_batches, split_heldout
from .evaluate import EvalResult, evaluate
from .features import compute_features
from .loop import (
    autocast,
    load_optimizer_tensors,
    make_optimizer,
    optimizer_step,
    optimizer_tensors,
    trainable_copy,
    trainable_params,
    use_bf16,
    warmup_cosine_lr,
    write_optimizer,
)
from .losses import OPDLoss, block_accepted, blocks_loss, replay_logq

log = logging.getLogger(__name__)

Progress = Callable[..., None]
REPLAY_MATCH_WARN = 0.98  # below this share of matching top-1 rows, the replay is not serving's: logged


def batch_loss(head: Eagle3Head, batch: ReplayBatch, cfg: OPDConfig) -> OPDLoss:
    return blocks_loss(replay_logq(head, batch), batch, cfg, head.frozen.lm_rows)


@dataclass
class TrainResult:
    history: list[dict[str, Any]]  # per optimizer step: epoch, loss, loss_acc, loss_rej, lr, accepted, blocks
    epoch_loss: list[float]  # block-weighted mean training loss of each epoch
    steps: int
    seconds: float
    stopped_early: bool
    carried_optimizer: bool = False  # AdamW resumed from the serving version's moments
    optimizer: dict[str, Tensor] = field(default_factory=dict)  # AdamW state after training (`optimizer_tensors`)


def _train_step(
    head: Eagle3Head, opt: torch.optim.Optimizer, batch: ReplayBatch, cfg: OPDConfig, lr: float, epoch: int, bf16: bool
) -> dict[str, Any]:
    """One optimizer step on `batch` at learning rate `lr` -> its history record,
    with the accepted drafts per block as served and as the trained head replays them."""
    with autocast(batch.features.device, bf16):
        logq = replay_logq(head, batch)
        out = blocks_loss(logq, batch, cfg, head.frozen.lm_rows)
    drafted = batch.num_draft > 0
    accepted = block_accepted(logq, batch, cfg)[drafted].float()
    grad_norm = optimizer_step(opt, trainable_params(head), out.loss, lr, cfg.grad_clip)
    return {
        "epoch": epoch,
        "loss": float(out.loss.detach()),
        "loss_acc": float(out.loss_acc.detach()),
        "loss_rej": float(out.loss_rej.detach()),
        "grad_norm": float(grad_norm),
        "lr": lr,
        "accepted_served": float(batch.num_accepted[drafted].float().mean()) if accepted.numel() else None,
        "accepted_replay": float(accepted.mean()) if accepted.numel() else None,
        "blocks": int(batch.rows.numel()),
        "tokens": int(batch.key_valid.sum()) * batch.step_tokens.shape[0],
    }


def start_optimizer(
    head: Eagle3Head, cfg: OPDConfig, state: Mapping[str, Tensor] | None
) -> tuple[torch.optim.Optimizer, bool]:
    """AdamW for `head`, resumed from `state` (a version's `optimizer_tensors`)
    when `cfg.carry_optimizer` and it fits -> (optimizer, resumed)."""
    opt = make_optimizer(head, cfg)
    if not cfg.carry_optimizer or not state:
        return opt, False
    why = load_optimizer_tensors(head, opt, state)
    if why is not None:
        log.info("opd: the carried optimizer state does not fit (%s); AdamW starts fresh", why)
    return opt, why is None


def train_opd(
    head: Eagle3Head,
    requests: Sequence[RequestBlocks],
    cfg: OPDConfig,
    progress: Progress | None = None,
    on_step: Callable[[dict[str, Any]], bool] | None = None,
    optimizer_state: Mapping[str, Tensor] | None = None,
) -> TrainResult:
    """Train `head` in place (float32 weights; `trainable_copy` makes one) on the
    blocks of `requests` (features computed). AdamW (resumed from
    `optimizer_state` when it fits, else fresh with a linear warm-up), a cosine
    LR decay over the update's steps, gradient clipping, `cfg.epochs` shuffled
    passes (`cfg.steps`: exactly that many steps, the cosine over them). `on_step(record)` (benchmarks) sees each step's history record,
    whose `tokens` counts the head token-positions processed (non-padding
    context positions x unrolled steps), and stops training by returning True."""
    t0 = time.perf_counter()
    device = head.fc.weight.device
    bf16 = use_bf16(device, cfg.fast_bf16)
    opt, carried = start_optimizer(head, cfg, optimizer_state)
    batches = request_batches(requests, cfg.batch_tokens) if requests else []
    planned = (cfg.epochs * len(batches) if cfg.steps is None else cfg.steps) if batches else 0
    warmup = 0 if carried else cfg.warmup_steps
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, Any]] = []
    epoch_loss: list[float] = []
    stopped = False
    head.train()
    for epoch in range(math.ceil(planned / len(batches)) if batches else 0):
        total, weight = 0.0, 0.0
        for bi in torch.randperm(len(batches), generator=gen).tolist()[: planned - len(history)]:
            if cfg.max_seconds is not None and time.perf_counter() - t0 > cfg.max_seconds:
                log.warning("opd training stopped after %.0f s (max_seconds)", time.perf_counter() - t0)
                stopped = True
                break
            batch = collate_requests([requests[i] for i in batches[bi]], device, torch.float32)
            lr = warmup_cosine_lr(len(history), cfg.lr, warmup, planned)
            history.append(_train_step(head, opt, batch, cfg, lr, epoch, bf16))
            total, weight = total + history[-1]["loss"] * history[-1]["blocks"], weight + history[-1]["blocks"]
            if on_step is not None and on_step(history[-1]):
                stopped = True
                break
        if weight:
            epoch_loss.append(total / weight)
            log.info("opd epoch %d: loss %.4f over %d blocks (%d steps)", epoch, epoch_loss[-1], int(weight), len(history))
            if progress is not None:
                progress("training", epoch=epoch + 1, epochs=cfg.epochs, loss=epoch_loss[-1])
        if stopped:
            break
    head.eval()
    state = optimizer_tensors(head, opt)
    return TrainResult(history, epoch_loss, len(history), time.perf_counter() - t0, stopped, carried, state)


# ---------------------------------------------------------------------------
# one update, end to end (what the Celery task runs)


@dataclass
class UpdateResult:
    head: Eagle3Head  # the trained copy (float32)
    stats: BuildStats
    train_requests: int
    train_blocks: int
    heldout_requests: int
    train: TrainResult
    before: EvalResult  # offline E[τ] on the held-out blocks: a diagnostic, not the publish gate
    after: EvalResult
    heldout_ids: list[str] = field(default_factory=list)  # held-out requests (the gate decodes their prompts)
    replay: dict[str, Any] = field(default_factory=dict)  # replay == serving: recomputed vs logged target top-1 (`replay_check`)

    @property
    def offline_not_worse(self) -> bool:
        """The offline check: held-out E[τ] along the served paths did not drop.
        A diagnostic (and the in-process benchmark's gate); the worker publishes
        on `worker.train.gate`'s decision."""
        return self.before.tau is not None and self.after.tau is not None and self.after.tau >= self.before.tau


def _split(
    build: Callable[[OPDConfig], tuple[list[RequestBlocks], BuildStats]], cfg: OPDConfig
) -> tuple[list[RequestBlocks], list[RequestBlocks], BuildStats]:
    """-> (training requests, held-out requests, build stats). The held-out
    evaluation is always on served blocks, whatever `cfg.anchors`."""
    requests, stats = build(cfg)
    train, held = split_heldout(requests, cfg.heldout_fraction)
    if cfg.anchors == "random":
        served, _ = build(replace(cfg, anchors="served"))
        held_ids = {r.request_id for r in held}
        held = [r for r in served if r.request_id in held_ids]
    n_train = sum(r.num_blocks for r in train)
    log.info(
        "opd: %d records -> %d train blocks (%d requests), %d held-out blocks (%d requests); %s",
        stats.records, n_train, len(train), sum(r.num_blocks for r in held), len(held), stats.as_dict(),
    )  # fmt: skip
    return train, held, stats


def opd_update(
    head: Eagle3Head,
    model: LlamaModel,
    records: Sequence[BlockRecord],
    contexts: Mapping[str, Sequence[int] | np.ndarray | Tensor],
    current_version: int,
    target_model: str | None = None,
    cfg: OPDConfig | None = None,
    progress: Progress | None = None,
    optimizer_state: Mapping[str, Tensor] | None = None,
) -> UpdateResult:
    """Build examples, split off held-out requests, compute features, evaluate the
    current head, train a copy (AdamW resumed from `optimizer_state`, the serving
    version's, when it fits), evaluate it. `head` (the serving version,
    attached to `model`) is not modified."""
    cfg = cfg or OPDConfig()
    progress = progress or (lambda *a, **k: None)
    vocab = model.cfg.vocab_size

    def build(c: OPDConfig) -> tuple[list[RequestBlocks], BuildStats]:
        return build_requests(records, contexts, head.d2t, vocab, current_version, target_model, c)

    train, held, stats = _split(build, cfg)
    progress("features", requests=len(train) + len(held))
    compute_features(model, train, head.cfg.hidden_layers, fast_bf16=use_bf16(model.device, cfg.fast_bf16))
    compute_features(model, held, head.cfg.hidden_layers, fast_bf16=False)  # evaluation in float32
    student = trainable_copy(head, model)
    progress("evaluating", which="before")
    before = evaluate(student, held, cfg)
    n_train = sum(r.num_blocks for r in train)
    progress("training", epoch=0, epochs=cfg.epochs, blocks=n_train)
    result = train_opd(student, train, cfg, progress, optimizer_state=optimizer_state)
    progress("evaluating", which="after")
    after = evaluate(student, held, cfg)
    log.info(
        "opd: held-out E[τ] %s -> %s over %d blocks (served τ %s)",
        _fmt(before.tau), _fmt(after.tau), after.blocks, _fmt(after.served_tau),
    )  # fmt: skip
    held_ids = [r.request_id for r in held]
    replay = replay_check([*train, *held])
    if replay["rows"] and replay["top1_match"] < REPLAY_MATCH_WARN:
        log.warning("opd: the recomputed target's top-1 matches the logged one on only %.3f of %d rows", replay["top1_match"], replay["rows"])
    return UpdateResult(student, stats, len(train), n_train, len(held), result, before, after, held_ids, replay)


def replay_check(requests: Sequence[RequestBlocks]) -> dict[str, Any]:
    """How well the worker's target forward reproduces serving: the share of
    exact rows whose recomputed top-1 is the logged one (1.0 up to numerical
    near-ties; lower means another target, dtype or context than served)."""
    match = sum(r.replay_top1[0] for r in requests)
    rows = sum(r.replay_top1[1] for r in requests)
    return {"rows": rows, "top1_match": match / rows if rows else None}


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def save_update(
    result: UpdateResult, checkpoint_dir, target_model_id: str, parent_version: int, opd_info: dict[str, Any]
):
    """Write an update's head as the next `eagle3/v{N}` with the manifest fields
    every OPD checkpoint carries (`opd_info` goes under "opd"), and its AdamW
    state beside the weights (`worker.train.loop.OPTIMIZER_FILE`, for the next
    update). -> its directory."""
    from service.drafters.eagle3 import save_checkpoint

    state = result.train.optimizer
    return save_checkpoint(
        result.head,
        checkpoint_dir,
        target_model_id,
        parent_version=parent_version,
        trained_on={
            "blocks": result.train_blocks,
            "requests": result.train_requests,
            "heldout_blocks": result.after.blocks,
            "optimizer_steps": result.train.steps,
        },
        eval_tau={"tau_before": result.before.tau, "tau_after": result.after.tau},
        extra={"trainer": "opd", "opd": {**opd_info, "replay": result.replay}},
        extra_files=(lambda tmp: write_optimizer(state, tmp)) if state else None,
    )
