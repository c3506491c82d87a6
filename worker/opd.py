"""The Draft-OPD trainer (DESIGN §7): served blocks -> replay of the drafter at
the served block starts -> Draft-OPD loss -> a better EAGLE-3 head, and the
offline held-out evaluation that gates publishing. No Celery, no Redis here:
`worker.tasks` feeds it records and token contexts read from the block log; a
benchmark can feed it records it produced in-process.

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

Target distributions: the logged top-k of the target's raw distribution, mapped
onto the draft vocabulary (`d2t`); target ids outside the draft vocab are
dropped, and p is renormalised over the draft vocab (what the SFT bootstrap
trains towards). The mass outside the logged top-k is unknown; its handling
depends on the KL direction (`tail="auto"`):
- forward KL(p‖q): p is the logged top-k inside the draft vocab, renormalised,
  and 0 elsewhere ("renorm"). Spreading the unknown tail evenly instead would
  teach q to put that mass on every draft id (measured: it flattens q and
  lowers the acceptance of a young drafter for many steps). A row whose whole
  top-k lies outside the draft vocab contributes 0.
- reverse KL(q‖p): needs p > 0 wherever q has mass, so the mass outside the
  logged top-k (1 - Σ top-k, at least 1e-6) is spread evenly over the draft
  ids not in the top-k ("spread").
`tail="spread"` uses the spread target in both directions.

Off-policy blocks: a block drafted by version v while training version c has
age c - v; its weight is `offpolicy_decay ** age`, and blocks older than
`max_age` (or of another target model) are dropped. Blocks with K = 0 are not
trained on (their tokens are still part of later blocks' contexts).

Evaluation (the publish gate): the expected acceptance length of held-out
blocks along their served draft paths, E[τ] = 1 + Σ_{i=1..K} Π_{j<i} β_j
(DESIGN §5), averaged over blocks with K > 0, with β_j the probability that a
draft from q is accepted at row j under the block's own verification rule:
greedy blocks (temperature 0) accept when q's argmax is the target's argmax;
sampled blocks have β_j = Σ_x min(p_j(x), q_j(x)) at the request's temperature.
Replaying the serving head on greedy blocks gives back the served τ exactly
(tested). `tau_overlap`, β = Σ min(p, q) at temperature 1 for every block, is
reported beside it. Sums run over the logged top-k ids inside the draft vocab.

Ablations (DESIGN §7, for the benchmark): `mode` forward_kl_all /
reverse_kl_all, `gamma=1.0`, and `anchors="random"`: random anchors in the
generated part of each request, fed the emitted tokens (teacher forcing) with
the target rows logged at those positions; every row then counts as accepted,
so only the forward-KL stream is left -- there is no drafter-induced state."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from service.blocklog import BlockRecord
from service.drafters.eagle3 import Eagle3Head, FrozenTarget, shifted_tokens
from service.llama import LlamaModel

from .opd_loss import Mode, OPDLoss, densify_topk, opd_loss
from .sft import bf16_is_fast, length_batches

log = logging.getLogger(__name__)

Anchors = Literal["served", "random"]
Progress = Callable[..., None]

_MIN_TAIL_MASS = 1e-6  # floor of the target's mass outside its logged top-k (as opd_loss.densify_topk)
# Log-prob of draft ids a block could not draft (context ids not seen yet): finite, so
# that 0·log 0 terms of either KL direction stay 0 instead of 0·inf = nan; exp() is 0.
_MASKED = -1e4


@dataclass
class OPDConfig:
    epochs: int = 2  # passes over the training blocks
    lr: float = 3e-4  # Adam, constant after a short warm-up
    warmup_steps: int = 5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_tokens: int = 2048  # padded requests x context length per optimizer step
    gamma: float = 0.8  # rejected-stream decay γ^(slot-1)
    lam_acc: float = 1.0
    lam_rej: float = 1.0
    mode: Mode = "opd"  # "opd" | "forward_kl_all" | "reverse_kl_all" (ablations)
    anchors: Anchors = "served"  # "random": ablation, see the module docstring
    offpolicy_decay: float = 0.5  # weight of a block drafted `age` versions ago: decay ** age
    max_age: int = 3  # blocks drafted more than this many versions ago are dropped
    tail: Literal["auto", "spread"] = "auto"  # target tail per KL direction (module docstring)
    heldout_fraction: float = 0.1  # of request ids (fixed hash split), for the publish gate
    seed: int = 0
    context_vocab: bool = True  # as Eagle3Drafter: the request's own out-of-vocab ids join the draft vocab
    fast_bf16: bool | None = None  # bf16 autocast for training and features; None: where bf16 is fast
    max_seconds: float | None = None  # stop training (between steps) after this long


# ---------------------------------------------------------------------------
# examples


@dataclass
class BlockExample:
    """One block, ready to replay: the head runs from `anchor` fed `step_tokens`."""

    anchor: int  # P - 2: the target feature the first draft step reads
    step_tokens: list[int]  # K+1 ids fed at steps 0..K: [x_{P-1}, d_1, ..., d_K]
    num_draft: int  # K
    num_accepted: int
    top_ids: Tensor  # (K+1, k) int64 draft-vocab ids of the target's top-k, -1 outside the draft vocab
    top_logprobs: Tensor  # (K+1, k) float32 raw target log p of those ids
    weight: float  # off-policy weight
    position: int  # P
    drafter_version: str
    served_logq: list[float] = field(default_factory=list)  # (K,) log q the serving drafter logged
    temperature: float = 0.0  # the request's sampling temperature (for the evaluation)


@dataclass
class RequestBlocks:
    """A request's context and its blocks; `features` is filled by `compute_features`."""

    request_id: str
    tokens: Tensor  # (T,) int64 context tokens 0..T-1 (all the replay reads)
    examples: list[BlockExample]
    ctx_ids: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # (C,) context vocab ids
    ctx_first: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # (C,) first position of each
    features: Tensor | None = None  # (T, 3d) target taps at the head's layers
    ctx_rows: Tensor | None = None  # (C, d) the target's LM-head rows of ctx_ids

    @property
    def num_blocks(self) -> int:
        return len(self.examples)


@dataclass
class BuildStats:
    records: int = 0
    used: int = 0
    empty: int = 0  # K = 0: not trained on
    no_context: int = 0  # prefix not rebuildable (context expired, a record lost)
    stale: int = 0  # older than max_age, unparsable version, or another target model
    too_short: int = 0  # P < 2: no anchor

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def draft_index(d2t: Tensor, vocab_size: int) -> Tensor:
    """d2t (Vd,) draft id -> target id  ->  t2d (V,) target id -> draft id, -1 outside."""
    t2d = torch.full((vocab_size,), -1, dtype=torch.long)
    t2d[d2t.long().cpu()] = torch.arange(d2t.numel())
    return t2d


def block_age(drafter_version: str, current_version: int) -> int | None:
    """Versions between the block's drafter and the one being trained; None when
    the logged version is not a number (then the block is dropped)."""
    try:
        return max(0, current_version - int(drafter_version))
    except (TypeError, ValueError):
        return None


def is_heldout(request_id: str, fraction: float) -> bool:
    """Fixed split of request ids by hash (stable across runs and machines)."""
    h = int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big")
    return h < fraction * 2**64


def split_heldout(requests: Sequence[RequestBlocks], fraction: float) -> tuple[list[RequestBlocks], list[RequestBlocks]]:
    """(train, held-out) by `is_heldout`. With two or more requests neither side is
    left empty: if the hash leaves one empty, the request with the lowest hash
    moves to the held-out side (or the highest to training)."""
    train = [r for r in requests if not is_heldout(r.request_id, fraction)]
    held = [r for r in requests if is_heldout(r.request_id, fraction)]
    if len(requests) >= 2 and fraction > 0 and (not train or not held):
        key = lambda r: hashlib.sha256(r.request_id.encode()).digest()  # noqa: E731
        if not held:
            held = [min(train, key=key)]
            train = [r for r in train if r is not held[0]]
        else:
            train = [max(held, key=key)]
            held = [r for r in held if r is not train[0]]
    return train, held


def _context_array(ctx: Sequence[int] | np.ndarray | Tensor) -> np.ndarray:
    return np.asarray(ctx.tolist() if isinstance(ctx, Tensor) else ctx, dtype=np.int64)


def contexts_from_prefixes(
    records: Sequence[BlockRecord], prefixes: Sequence[Sequence[int] | None]
) -> dict[str, np.ndarray]:
    """Request contexts (as `build_requests` takes them) from the output of
    `service.blocklog.block_prefixes`: each block's prefix plus its emitted
    tokens, merged per request; -1 where nothing is known."""
    out: dict[str, np.ndarray] = {}
    for rec, prefix in zip(records, prefixes, strict=True):
        if prefix is None:
            continue
        known = np.asarray([*prefix, *rec.emitted_tokens()], dtype=np.int64)
        cur = out.get(rec.request_id)
        if cur is None or len(cur) < len(known):
            grown = np.full(len(known), -1, dtype=np.int64)
            if cur is not None:
                grown[: len(cur)] = cur
            cur = grown
        cur[: len(known)] = np.where(cur[: len(known)] < 0, known, cur[: len(known)])
        out[rec.request_id] = cur
    return out


def build_requests(
    records: Iterable[BlockRecord],
    contexts: Mapping[str, Sequence[int] | np.ndarray | Tensor],
    d2t: Tensor,
    vocab_size: int,
    current_version: int,
    target_model: str | None = None,
    cfg: OPDConfig | None = None,
) -> tuple[list[RequestBlocks], BuildStats]:
    """Group usable blocks by request, with the context tokens each replay needs.

    records: block records (any order; duplicates by (request, position) are kept once)
    contexts: request id -> token ids by sequence position, -1 where unknown
      (`RequestContext.tokens` of `service.blocklog.read_contexts`, or
      `contexts_from_prefixes`)
    d2t: (Vd,) the head's draft -> target id map
    current_version: the version being trained (for the off-policy weights)
    target_model: drop blocks served by another target (None: keep all)"""
    cfg = cfg or OPDConfig()
    stats = BuildStats()
    t2d = draft_index(d2t, vocab_size)
    by_req: dict[str, dict[int, BlockRecord]] = {}
    for rec in records:
        stats.records += 1
        age = block_age(rec.drafter_version, current_version)
        if age is None or age > cfg.max_age or (target_model is not None and rec.target_model != target_model):
            stats.stale += 1
        elif rec.num_draft == 0 and cfg.anchors == "served":
            stats.empty += 1
        elif rec.position < 2:
            stats.too_short += 1
        else:
            by_req.setdefault(rec.request_id, {})[rec.position] = rec
    out: list[RequestBlocks] = []
    for rid, blocks in by_req.items():
        ctx = contexts.get(rid)
        tokens = _context_array(ctx) if ctx is not None else np.zeros(0, dtype=np.int64)
        if cfg.anchors == "random":
            req = _random_anchor_request(rid, blocks, tokens, t2d, current_version, cfg, stats)
        else:
            req = _served_request(rid, blocks, tokens, t2d, current_version, cfg, stats)
        if req is not None:
            out.append(req)
    out.sort(key=lambda r: r.request_id)
    return out, stats


def context_vocab(tokens: np.ndarray, static_ids: set[int]) -> tuple[list[int], list[int]]:
    """The per-sequence context vocabulary of `Eagle3Drafter`: ids of `tokens`
    outside the static draft vocab, in order of first occurrence -> (ids, first
    positions). A block at P drafted with those first seen before P (its
    drafter had scanned seq.tokens[:P]); they sit after the static ids, at
    draft index Vd + j."""
    ids: list[int] = []
    first: list[int] = []
    seen: set[int] = set()
    for pos, t in enumerate(tokens.tolist()):
        if t not in static_ids and t not in seen:
            seen.add(t)
            ids.append(t)
            first.append(pos)
    return ids, first


def _map_topk(rec_ids: Sequence[Sequence[int]], t2d: Tensor, ctx: Mapping[int, int] | None = None) -> Tensor:
    """Target ids -> draft indices: the static map, then the block's context ids; -1 outside both."""
    ids = torch.tensor(rec_ids, dtype=torch.long)
    out = torch.where((ids >= 0) & (ids < t2d.numel()), t2d[ids.clamp(0, t2d.numel() - 1)], torch.full_like(ids, -1))
    if ctx:
        flat, ids_flat = out.view(-1), ids.view(-1).tolist()
        for i, t in enumerate(ids_flat):
            if flat[i] < 0 and t in ctx:
                flat[i] = ctx[t]
    return out


def _with_context(
    rid: str, tokens: np.ndarray, t2d: Tensor, examples: list[BlockExample], rows: list, cfg: OPDConfig
) -> RequestBlocks:
    """The request's context vocabulary, and each example's target ids mapped onto
    its draft vocab. rows[i]: example i's top-k target ids."""
    end = max(ex.position for ex in examples)  # every block reads tokens[:P] (its anchor P-2, pending token P-1)
    tokens = tokens[:end]
    vd = int((t2d >= 0).sum())
    ctx_ids, ctx_first = context_vocab(tokens, set(torch.nonzero(t2d >= 0).flatten().tolist())) if cfg.context_vocab else ([], [])
    for ex, top in zip(examples, rows, strict=True):
        ctx = {t: vd + j for j, (t, f) in enumerate(zip(ctx_ids, ctx_first)) if f < ex.position}
        ex.top_ids = _map_topk(top, t2d, ctx)
    return RequestBlocks(
        rid,
        torch.from_numpy(tokens.copy()),
        examples,
        ctx_ids=torch.tensor(ctx_ids, dtype=torch.long),
        ctx_first=torch.tensor(ctx_first, dtype=torch.long),
    )


def _served_request(
    rid: str,
    blocks: dict[int, BlockRecord],
    tokens: np.ndarray,
    t2d: Tensor,
    current_version: int,
    cfg: OPDConfig,
    stats: BuildStats,
) -> RequestBlocks | None:
    examples: list[BlockExample] = []
    rows = []
    for pos in sorted(blocks):
        rec = blocks[pos]
        if len(tokens) < pos or (tokens[:pos] < 0).any():  # the prefix has a hole
            stats.no_context += 1
            continue
        age = block_age(rec.drafter_version, current_version) or 0
        examples.append(
            BlockExample(
                anchor=pos - 2,
                step_tokens=[int(tokens[pos - 1]), *rec.draft_tokens],
                num_draft=rec.num_draft,
                num_accepted=rec.num_accepted,
                top_ids=torch.zeros(0),  # mapped below, with the context vocab
                top_logprobs=torch.tensor(rec.target_top_logprobs, dtype=torch.float32),
                weight=cfg.offpolicy_decay**age,
                position=pos,
                drafter_version=rec.drafter_version,
                served_logq=list(rec.draft_logprobs),
                temperature=rec.temperature,
            )
        )
        rows.append(rec.target_top_ids)
    stats.used += len(examples)
    if not examples:
        return None
    return _with_context(rid, tokens, t2d, examples, rows, cfg)


def _random_anchor_request(
    rid: str,
    blocks: dict[int, BlockRecord],
    tokens: np.ndarray,
    t2d: Tensor,
    current_version: int,
    cfg: OPDConfig,
    stats: BuildStats,
) -> RequestBlocks | None:
    """Ablation: as many examples as the request has drafted blocks, at random
    anchors of the emitted sequence, teacher-forced, K rows each. The target row
    at emitted position i is row i - P of the block at P that emitted it (rows
    0..num_accepted lie on the emitted sequence)."""
    rows: dict[int, tuple[list[int], list[float], float]] = {}  # position -> (top ids, top logprobs, weight)
    for pos, rec in blocks.items():
        w = cfg.offpolicy_decay ** (block_age(rec.drafter_version, current_version) or 0)
        for j in range(rec.num_accepted + 1):
            rows[pos + j] = (rec.target_top_ids[j], rec.target_top_logprobs[j], w)
    drafted = [rec for rec in blocks.values() if rec.num_draft > 0]
    stats.empty += len(blocks) - len(drafted)
    if not drafted:
        return None
    k = max(rec.num_draft for rec in drafted)
    valid_len = int(np.argmax(tokens < 0)) if (tokens < 0).any() else len(tokens)
    # anchor a: feeds x_{a+1} .. x_{a+k+1}, rows at positions a+2 .. a+k+2 must be logged
    cands = [a for a in range(valid_len) if a + k + 1 < valid_len and all(a + 2 + j in rows for j in range(k + 1))]
    if not cands:
        stats.no_context += len(drafted)
        return None
    gen = torch.Generator().manual_seed(cfg.seed + int.from_bytes(hashlib.sha256(rid.encode()).digest()[:4], "big"))
    pick = torch.randperm(len(cands), generator=gen)[: len(drafted)].tolist()
    examples, tops = [], []
    for i in sorted(pick):
        a = cands[i]
        r = [rows[a + 2 + j] for j in range(k + 1)]
        tops.append([x[0] for x in r])
        examples.append(
            BlockExample(
                anchor=a,
                step_tokens=[int(t) for t in tokens[a + 1 : a + k + 2]],
                num_draft=k,
                num_accepted=k,
                top_ids=torch.zeros(0),
                top_logprobs=torch.tensor([x[1] for x in r], dtype=torch.float32),
                weight=min(x[2] for x in r),
                position=a + 2,
                drafter_version="teacher",
            )
        )
    stats.used += len(examples)
    stats.no_context += len(drafted) - len(examples)
    return _with_context(rid, tokens, t2d, examples, tops, cfg)


class BlockCollector:
    """An in-process block sink (`Engine(block_sink=collector)`): keeps the block
    records and each request's token context exactly as the Redis block log
    would, for benchmarks and tests that train without Redis."""

    def __init__(self, target_model: str):
        self.target_model = target_model
        self.records: list[BlockRecord] = []
        self.contexts: dict[str, list[int]] = {}

    def __call__(self, obs) -> None:  # obs: service.engine.BlockObservation
        rec = BlockRecord.from_observation(obs, self.target_model)
        ctx = self.contexts.setdefault(obs.request_id, [])
        if obs.prompt_ids is not None:
            ctx[: len(obs.prompt_ids)] = obs.prompt_ids
        emitted = rec.emitted_tokens()
        ctx.extend([-1] * (rec.position + len(emitted) - len(ctx)))
        ctx[rec.position : rec.position + len(emitted)] = emitted
        self.records.append(rec)

    def clear(self) -> None:
        self.records.clear()
        self.contexts.clear()


def serve_for_blocks(
    target, drafter, k: int, prompts: Sequence[Sequence[int]], params, first_seed: int, tag: str
) -> tuple[BlockCollector, dict[str, Any]]:
    """Serve `prompts` through the real engine with `drafter` (request i sampled
    with seed first_seed + i, id f"{tag}-{i}") into a BlockCollector: the blocks
    the Redis log would hold, for benchmarks that train in-process. `target` is
    a service.runtime.Target, `params` the requests' SamplingParams."""
    from dataclasses import replace

    from service.engine import Engine

    collector = BlockCollector(target.model_id)
    engine = Engine(target.model, drafter, target.eos_token_ids, k, block_sink=collector)
    t0, tokens = time.perf_counter(), 0
    for i, ids in enumerate(prompts):
        tokens += len(engine.generate(list(ids), replace(params, seed=first_seed + i), request_id=f"{tag}-{i}"))
    stats = {
        "requests": len(prompts),
        "tokens": tokens,
        "blocks": len(collector.records),
        "tau": round(engine.stats.tau, 4),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return collector, stats


# ---------------------------------------------------------------------------
# target features


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


@torch.inference_mode()
def compute_features(
    model: LlamaModel, requests: Sequence[RequestBlocks], hidden_layers: Sequence[int], fast_bf16: bool = False
) -> None:
    """One target forward per request over its context; fills `features` (T, 3d)
    with the residual streams after `hidden_layers` (the serving taps) and
    `ctx_rows`, the LM-head rows of the request's context vocabulary."""
    layers = tuple(hidden_layers)
    for req in requests:
        if req.features is not None:
            continue
        ids = req.tokens.to(model.device)
        cache = model.new_cache(ids.numel())
        with _autocast(model.device, fast_bf16):
            _, _, taps = model(ids, cache, hidden_layers=layers, logits=False)
        req.features = torch.cat(taps, dim=-1).to(model.dtype)
        req.ctx_rows = model.lm_head.weight.detach()[req.ctx_ids.to(model.device)]


# ---------------------------------------------------------------------------
# replay


@dataclass
class _Batch:
    features: Tensor  # (B, T, 3d)
    step_tokens: Tensor  # (S, B, T)
    key_valid: Tensor  # (B, T)
    rows: Tensor  # (N,) request index of each block
    anchors: Tensor  # (N,) anchor of each block
    p_ids: Tensor  # (N, S, k) draft-vocab ids; -1 outside the draft vocab, -2 padding
    p_logprobs: Tensor  # (N, S, k)
    num_draft: Tensor  # (N,)
    num_accepted: Tensor  # (N,)
    weight: Tensor  # (N,)
    temperature: Tensor  # (N,)
    ctx_rows: Tensor  # (B, C, d) LM-head rows of each request's context vocab (C = the largest; padded)
    ctx_valid: Tensor  # (N, C) bool: context id j was in block n's draft vocab


def _collate(requests: Sequence[RequestBlocks], device: torch.device, dtype: torch.dtype) -> _Batch:
    steps = 1 + max(ex.num_draft for r in requests for ex in r.examples)
    t = max(r.tokens.numel() for r in requests)
    b = len(requests)
    d3 = requests[0].features.shape[-1]
    feats = torch.zeros(b, t, d3, dtype=dtype, device=device)
    toks = torch.zeros(b, t, dtype=torch.long)
    for i, r in enumerate(requests):
        n = r.tokens.numel()
        feats[i, :n] = r.features.to(device=device, dtype=dtype)
        toks[i, :n] = r.tokens
    valid = torch.arange(t)[None, :] < torch.tensor([r.tokens.numel() for r in requests])[:, None]
    c = max(r.ctx_ids.numel() for r in requests)
    ctx_rows = torch.zeros(b, c, requests[0].features.shape[-1] // 3, dtype=dtype, device=device)
    for i, r in enumerate(requests):
        if r.ctx_ids.numel():
            ctx_rows[i, : r.ctx_ids.numel()] = r.ctx_rows.to(device=device, dtype=dtype)
    step_tokens = shifted_tokens(toks, steps)  # anchors that start no block: teacher forcing (unused)
    n_blocks = sum(r.num_blocks for r in requests)
    k = max(ex.top_ids.shape[1] for r in requests for ex in r.examples)
    p_ids = torch.full((n_blocks, steps, k), -2, dtype=torch.long)  # -2: padding (-1: outside the draft vocab)
    p_lp = torch.zeros(n_blocks, steps, k)
    rows, anchors, nd, na, w, temp, ctx_valid = [], [], [], [], [], [], []
    i = 0
    for bi, r in enumerate(requests):
        for ex in r.examples:
            kk = ex.num_draft
            step_tokens[: kk + 1, bi, ex.anchor] = torch.tensor(ex.step_tokens[: kk + 1])
            p_ids[i, : kk + 1, : ex.top_ids.shape[1]] = ex.top_ids
            p_lp[i, : kk + 1, : ex.top_ids.shape[1]] = ex.top_logprobs
            rows.append(bi)
            anchors.append(ex.anchor)
            nd.append(kk)
            na.append(ex.num_accepted)
            w.append(ex.weight)
            temp.append(ex.temperature)
            first = F.pad(r.ctx_first, (0, c - r.ctx_first.numel()), value=2**62)  # padding: never valid
            ctx_valid.append(first < ex.position)
            i += 1
    to = dict(device=device)
    return _Batch(
        feats,
        step_tokens.to(**to),
        valid.to(**to),
        torch.tensor(rows, **to),
        torch.tensor(anchors, **to),
        p_ids,
        p_lp,
        torch.tensor(nd),
        torch.tensor(na),
        torch.tensor(w, dtype=torch.float32),
        torch.tensor(temp, dtype=torch.float32),
        ctx_rows,
        torch.stack(ctx_valid).to(device) if c else torch.zeros(n_blocks, 0, dtype=torch.bool, device=device),
    )


def replay_logq(head: Eagle3Head, batch: _Batch) -> Tensor:
    """The head's log q at every block row over the block's draft vocab: static
    ids, then the context ids (masked where the block had not seen them yet)
    -> (N, S, Vd + C) float32."""
    hidden = head.unroll_hidden(batch.features, batch.step_tokens, batch.key_valid)  # (S, B, T, d)
    h = hidden[:, batch.rows, batch.anchors].transpose(0, 1)  # (N, S, d)
    logits = head.logits(h)  # (N, S, Vd)
    if batch.ctx_rows.shape[1]:
        fz = head.frozen
        hn = F.rms_norm(h, (h.shape[-1],), fz.norm_weight, fz.norm_eps)
        ctx = torch.einsum("nsd,ncd->nsc", hn, batch.ctx_rows[batch.rows].to(hn.dtype))  # (N, S, C)
        ctx = ctx.masked_fill(~batch.ctx_valid[:, None, :], _MASKED)
        logits = torch.cat([logits, ctx.to(logits.dtype)], dim=-1)
    return torch.log_softmax(logits.float(), dim=-1)


def target_logp(
    p_ids: Tensor, p_logprobs: Tensor, draft_vocab: int, tail: str = "spread", valid: Tensor | None = None
) -> Tensor:
    """The target's row distributions on the draft vocab (see the module docstring).

    p_ids: (N, S, k) draft ids, -1 for logged target ids outside the draft vocab, -2 padding
    p_logprobs: (N, S, k) raw target log p
    valid: (N, draft_vocab) bool, the ids each block could draft (None: all)
    returns (N, S, draft_vocab) log-probs: p restricted to the draft vocab, renormalised;
    "spread": the mass outside the logged top-k spread over the other (valid) ids;
    "renorm": none there. Ids outside `valid` get `_MASKED`."""
    p = p_logprobs.float().exp()
    known = torch.where(p_ids >= -1, p, torch.zeros_like(p)).sum(-1, keepdim=True)  # all logged ids
    outside = (1.0 - known).clamp(min=_MIN_TAIL_MASS)
    inside = torch.where(p_ids >= 0, p, torch.zeros_like(p)).sum(-1, keepdim=True)
    log_z = torch.log(inside + outside)
    out = densify_topk(p_ids, p_logprobs.float() - log_z, draft_vocab, tail=tail)  # type: ignore[arg-type]
    if valid is None:
        return out
    mask = valid[:, None, :].to(out.device)
    out = out.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(out, dim=-1, keepdim=True)
    out = out - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # renormalise over the valid ids
    return out.masked_fill(~mask, _MASKED)


def _valid_ids(batch: _Batch, static: int) -> Tensor | None:
    """(N, Vd + C) bool: static ids, then the context ids each block had seen."""
    if not batch.ctx_valid.shape[1]:
        return None
    n = batch.ctx_valid.shape[0]
    return torch.cat([torch.ones(n, static, dtype=torch.bool, device=batch.ctx_valid.device), batch.ctx_valid], dim=1)


def batch_loss(head: Eagle3Head, batch: _Batch, cfg: OPDConfig) -> OPDLoss:
    return blocks_loss(replay_logq(head, batch), batch, cfg)


def blocks_loss(logq: Tensor, batch: _Batch, cfg: OPDConfig, weighted: bool = True) -> OPDLoss:
    """Draft-OPD loss of replayed blocks, logq (N, S, Vd). Each stream reads the
    target with the tail its KL direction needs (module docstring): two
    `opd_loss` calls, one per stream, recombined with the λ weights."""
    vd = logq.shape[-1]
    valid = _valid_ids(batch, vd - batch.ctx_valid.shape[1])
    spread = target_logp(batch.p_ids, batch.p_logprobs, vd, "spread", valid).to(logq.device)
    fwd_p = spread if cfg.tail == "spread" else target_logp(batch.p_ids, batch.p_logprobs, vd, "renorm", valid).to(logq.device)
    p_acc = spread if cfg.mode == "reverse_kl_all" else fwd_p
    p_rej = fwd_p if cfg.mode == "forward_kl_all" else spread
    kw = dict(gamma=cfg.gamma, mode=cfg.mode, block_weight=batch.weight.to(logq.device) if weighted else None)
    first = opd_loss(logq, p_acc, batch.num_accepted, batch.num_draft, **kw)
    acc, rej = first.loss_acc, first.loss_rej
    if p_rej is not p_acc:
        rej = opd_loss(logq, p_rej, batch.num_accepted, batch.num_draft, **kw).loss_rej
    loss = (cfg.lam_acc * acc + cfg.lam_rej * rej) / (cfg.lam_acc + cfg.lam_rej)
    return OPDLoss(loss, acc, rej)


def make_batches(requests: Sequence[RequestBlocks], batch_tokens: int) -> list[list[int]]:
    """Request indices grouped by length, padded size B x T <= batch_tokens
    (a longer request is a batch of its own)."""
    return length_batches([r.tokens.numel() for r in requests], batch_tokens)


# ---------------------------------------------------------------------------
# training


def trainable_copy(head: Eagle3Head, model: LlamaModel) -> Eagle3Head:
    """A float32 copy of `head` to train, attached to float32 copies of the frozen
    target tensors when the target runs in a lower precision."""
    new = Eagle3Head(head.cfg)
    new.load_state_dict({k: v.detach().float() if v.is_floating_point() else v for k, v in head.state_dict().items()})
    new.to(model.device)
    fz = FrozenTarget.from_model(model, new.d2t)
    if model.dtype != torch.float32:
        fz = FrozenTarget(fz.embed.float(), fz.norm_weight.float(), fz.norm_eps, fz.lm_rows.float(), fz.cos, fz.sin)
    new.frozen = fz
    return new


@dataclass
class TrainResult:
    history: list[dict[str, Any]]  # per optimizer step: epoch, loss, loss_acc, loss_rej, blocks
    epoch_loss: list[float]  # block-weighted mean training loss of each epoch
    steps: int
    seconds: float
    stopped_early: bool


def train_opd(
    head: Eagle3Head,
    requests: Sequence[RequestBlocks],
    cfg: OPDConfig,
    progress: Progress | None = None,
    on_step: Callable[[dict[str, Any]], bool] | None = None,
) -> TrainResult:
    """Train `head` in place (float32 weights; `trainable_copy` makes one) on the
    blocks of `requests` (features computed). Adam with a linear warm-up, gradient
    clipping, `cfg.epochs` shuffled passes. `on_step(record)` (benchmarks) sees
    each step's history record, whose `tokens` counts the head token-positions
    processed (non-padding context positions x unrolled steps), and stops
    training by returning True."""
    t0 = time.perf_counter()
    device = head.fc.weight.device
    fast = bf16_is_fast(device) if cfg.fast_bf16 is None else cfg.fast_bf16
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    batches = make_batches(requests, cfg.batch_tokens) if requests else []
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, Any]] = []
    epoch_loss: list[float] = []
    step, stopped = 0, False
    head.train()
    for epoch in range(cfg.epochs if batches else 0):
        total, weight = 0.0, 0.0
        for bi in torch.randperm(len(batches), generator=gen).tolist():
            if cfg.max_seconds is not None and time.perf_counter() - t0 > cfg.max_seconds:
                log.warning("opd training stopped after %.0f s (max_seconds)", time.perf_counter() - t0)
                stopped = True
                break
            batch = _collate([requests[i] for i in batches[bi]], device, torch.float32)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
            with _autocast(device, fast):
                out = batch_loss(head, batch, cfg)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            n = int(batch.rows.numel())
            history.append(
                {
                    "epoch": epoch,
                    "loss": float(out.loss.detach()),
                    "loss_acc": float(out.loss_acc.detach()),
                    "loss_rej": float(out.loss_rej.detach()),
                    "grad_norm": float(grad_norm),
                    "blocks": n,
                    "tokens": int(batch.key_valid.sum()) * batch.step_tokens.shape[0],
                }
            )
            total, weight = total + float(out.loss.detach()) * n, weight + n
            step += 1
            if on_step is not None and on_step(history[-1]):
                stopped = True
                break
        if weight:
            epoch_loss.append(total / weight)
            log.info("opd epoch %d: loss %.4f over %d blocks (%d steps)", epoch, epoch_loss[-1], int(weight), step)
            if progress is not None:
                progress("training", epoch=epoch + 1, epochs=cfg.epochs, loss=epoch_loss[-1])
        if stopped:
            break
    head.eval()
    return TrainResult(history, epoch_loss, step, time.perf_counter() - t0, stopped)


# ---------------------------------------------------------------------------
# evaluation


@dataclass
class EvalResult:
    tau: float | None  # mean E[τ] under each block's own sampling rule (the publish gate); None: no block
    tau_overlap: float | None  # mean E[τ] with β = Σ min(p, q) at temperature 1 (DESIGN §5)
    blocks: int  # held-out blocks with K > 0
    loss: float | None  # Draft-OPD loss on the held-out blocks
    beta: list[float]  # mean per-row β of `tau` (over blocks drafting that row)
    served_tau: float | None  # the served acceptance length of the same blocks (num_accepted + 1)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def expected_tau(beta: Tensor, num_draft: Tensor) -> Tensor:
    """E[τ] = 1 + Σ_{i=1..K} Π_{j<i} β_j per block.
    beta: (N, S) per-row acceptance probability; num_draft: (N,) K of each block."""
    k = beta.shape[1]
    rows = torch.arange(k, device=beta.device)[None, :]
    b = torch.where(rows < num_draft[:, None].to(beta.device), beta, torch.zeros_like(beta))
    return 1.0 + torch.cumprod(b, dim=1).sum(1)


def acceptance_beta(logq: Tensor, p_ids: Tensor, p_logprobs: Tensor, temperature: Tensor | None = None) -> Tensor:
    """Per-row acceptance probability of a draft from q under the verification
    rule of DESIGN §5, on the logged top-k ids inside the draft vocab.

    logq: (N, S, Vd) draft log q; p_ids, p_logprobs: (N, S, k) the target's
    top-k (draft ids, -1/-2 none); temperature: (N,) each block's request
    temperature (None: 1 for all) -> (N, S)
    - temperature 0: 1 when q's argmax is the target's argmax (the top-1 id), else 0
    - temperature T > 0: Σ_x min(p_T(x), q_T(x)), p_T ∝ p^(1/T) and q_T ∝ q^(1/T);
      p_T is renormalised over the logged top-k when T != 1 (the request's
      top-k/top-p are not logged), and at T = 1 it is the raw p (a lower bound)"""
    dev = logq.device
    ids, lp = p_ids.to(dev), p_logprobs.float().to(dev)
    valid = ids >= 0
    t = torch.ones(logq.shape[0], device=dev) if temperature is None else temperature.float().to(dev)
    tt = t.clamp(min=1e-3)[:, None, None]
    q_t = torch.log_softmax(logq / tt, dim=-1).exp().gather(-1, ids.clamp(min=0))
    lp_valid = torch.where(ids >= -1, lp, torch.full_like(lp, float("-inf")))  # every logged id
    p_t = torch.where((tt == 1.0), lp_valid.exp(), torch.softmax(lp_valid / tt, dim=-1))
    overlap = torch.where(valid, torch.minimum(p_t, q_t), torch.zeros_like(q_t)).sum(-1)
    top1 = lp_valid.argmax(-1, keepdim=True)  # the target's argmax among the logged ids
    top1_draft = ids.gather(-1, top1).squeeze(-1)  # -1 when it is outside the draft vocab
    greedy = (logq.argmax(-1) == top1_draft).float()
    return torch.where((t == 0)[:, None], greedy, overlap)


@torch.no_grad()
def evaluate(head: Eagle3Head, requests: Sequence[RequestBlocks], cfg: OPDConfig | None = None) -> EvalResult:
    """Held-out evaluation of `head` along the served draft paths (float32): E[τ]
    of each block with K > 0, under its request's sampling rule (`tau`) and
    under the temperature-1 overlap of DESIGN §5 (`tau_overlap`)."""
    cfg = cfg or OPDConfig()
    was_training = head.training
    head.eval()
    device = head.fc.weight.device
    taus, overlaps, served = [], [], []
    beta_sum = beta_cnt = None
    loss_sum, loss_w = 0.0, 0
    for idx in make_batches(requests, max(cfg.batch_tokens, 1)):
        batch = _collate([requests[i] for i in idx], device, torch.float32)
        logq = replay_logq(head, batch)
        drafted = batch.num_draft > 0
        beta = acceptance_beta(logq, batch.p_ids, batch.p_logprobs, batch.temperature).cpu()  # (N, S)
        beta1 = acceptance_beta(logq, batch.p_ids, batch.p_logprobs).cpu()
        taus.append(expected_tau(beta, batch.num_draft)[drafted])
        overlaps.append(expected_tau(beta1, batch.num_draft)[drafted])
        served.append((batch.num_accepted + 1)[drafted].float())
        rows = (torch.arange(beta.shape[1])[None, :] < batch.num_draft[:, None]).float()
        beta_sum = _pad_add(beta_sum, (beta * rows).sum(0))
        beta_cnt = _pad_add(beta_cnt, rows.sum(0))
        n = int(drafted.sum())
        loss_sum, loss_w = loss_sum + float(blocks_loss(logq, batch, cfg, weighted=False).loss) * n, loss_w + n
    head.train(was_training)

    def mean(parts: list[Tensor]) -> float | None:
        x = torch.cat(parts) if parts else torch.zeros(0)
        return float(x.mean()) if x.numel() else None

    return EvalResult(
        tau=mean(taus),
        tau_overlap=mean(overlaps),
        blocks=int(sum(x.numel() for x in taus)),
        loss=loss_sum / loss_w if loss_w else None,
        beta=[] if beta_sum is None else [float(b / c) for b, c in zip(beta_sum, beta_cnt) if c > 0],
        served_tau=mean(served),
    )


def _pad_add(a: Tensor | None, b: Tensor) -> Tensor:
    if a is None:
        return b
    n = max(a.numel(), b.numel())
    return F.pad(a, (0, n - a.numel())) + F.pad(b, (0, n - b.numel()))


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
    before: EvalResult
    after: EvalResult

    @property
    def improved(self) -> bool:
        """Publish gate: evaluated, and not worse than the serving head."""
        return self.before.tau is not None and self.after.tau is not None and self.after.tau >= self.before.tau


def opd_update(
    head: Eagle3Head,
    model: LlamaModel,
    records: Sequence[BlockRecord],
    contexts: Mapping[str, Sequence[int] | np.ndarray | Tensor],
    current_version: int,
    target_model: str | None = None,
    cfg: OPDConfig | None = None,
    progress: Progress | None = None,
) -> UpdateResult:
    """Build examples, split off held-out requests, compute features, evaluate the
    current head, train a copy, evaluate it. `head` (the serving version,
    attached to `model`) is not modified."""
    cfg = cfg or OPDConfig()
    progress = progress or (lambda *a, **k: None)
    requests, stats = build_requests(
        records, contexts, head.d2t, model.cfg.vocab_size, current_version, target_model, cfg
    )
    train, held = split_heldout(requests, cfg.heldout_fraction)
    if cfg.anchors == "random":  # the held-out evaluation is always on served blocks
        served_cfg = OPDConfig(**{**asdict(cfg), "anchors": "served"})
        served, _ = build_requests(records, contexts, head.d2t, model.cfg.vocab_size, current_version, target_model, served_cfg)
        held_ids = {r.request_id for r in held}
        held = [r for r in served if r.request_id in held_ids]
    n_train = sum(r.num_blocks for r in train)
    log.info(
        "opd: %d records -> %d train blocks (%d requests), %d held-out blocks (%d requests); %s",
        stats.records, n_train, len(train), sum(r.num_blocks for r in held), len(held), stats.as_dict(),
    )
    fast = bf16_is_fast(model.device) if cfg.fast_bf16 is None else cfg.fast_bf16
    progress("features", requests=len(train) + len(held))
    compute_features(model, train, head.cfg.hidden_layers, fast_bf16=fast)
    compute_features(model, held, head.cfg.hidden_layers, fast_bf16=False)  # evaluation in float32
    student = trainable_copy(head, model)
    progress("evaluating", which="before")
    before = evaluate(student, held, cfg)
    progress("training", epoch=0, epochs=cfg.epochs, blocks=n_train)
    result = train_opd(student, train, cfg, progress)
    progress("evaluating", which="after")
    after = evaluate(student, held, cfg)
    log.info(
        "opd: held-out E[τ] %s -> %s over %d blocks (served τ %s)",
        _fmt(before.tau), _fmt(after.tau), after.blocks, _fmt(after.served_tau),
    )
    return UpdateResult(student, stats, len(train), n_train, len(held), result, before, after)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def save_update(
    result: UpdateResult, checkpoint_dir, target_model_id: str, parent_version: int, opd_info: dict[str, Any]
):
    """Write an update's head as the next `eagle3/v{N}` with the manifest fields
    every OPD checkpoint carries (`opd_info` goes under "opd"). -> its directory."""
    from service.drafters.eagle3 import save_checkpoint

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
        extra={"trainer": "opd", "opd": opd_info},
    )
