"""Draft-OPD examples from block records: group usable blocks by request, with
the context tokens each replay needs, each block's target top-k mapped onto
its draft vocabulary (the static map plus the request's context vocabulary),
the off-policy weights, and which of its rows lie on the emitted context (the
served accepted drafts and the row after them: there the target's exact
distribution is recomputed, `BlockExample.exact_rows`). The replay rule is in
`worker.train.opd`."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from service.blocklog import BlockRecord

from .config import OPDConfig
from .data import BlockExample, RequestBlocks


@dataclass
class BuildStats:
    records: int = 0
    used: int = 0
    empty: int = 0  # K = 0: not trained on
    no_context: int = 0  # prefix not rebuildable (context expired, a record lost)
    stale: int = 0  # older than max_age, unparsable version, or another target model
    too_short: int = 0  # P < 2: no anchor
    off_policy: int = 0  # drafted by another drafter kind (ngram, draft model, ...): not the head's policy

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class _Build:
    """What building one request's examples reads besides its blocks and tokens."""

    t2d: Tensor  # (V,) target id -> draft id, -1 outside
    current_version: int
    cfg: OPDConfig
    stats: BuildStats

    def weight(self, rec: BlockRecord) -> float:
        return self.cfg.offpolicy_decay ** (block_age(rec.drafter_version, self.current_version) or 0)


def draft_index(d2t: Tensor, vocab_size: int) -> Tensor:  # d2t: (Vd,) int64
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


def on_policy(rec: BlockRecord) -> bool:
    """Whether a drafted block was drafted by the eagle3 head, the policy Draft-OPD
    trains: `drafter_kind` "eagle3", or "hybrid" with every drafted token from
    the head ("e" in `draft_sources`). Records that do not say (schema 1, or
    built without it: kind "unknown"): the engine logs `drafter.version`, a
    checkpoint number >= 1 for a loaded eagle3 head but "0" for ngram and
    none and a name for a draft model, so only a version >= 1 counts."""
    kind = getattr(rec, "drafter_kind", None)
    if kind in (None, "unknown"):
        try:
            return int(rec.drafter_version) >= 1
        except (TypeError, ValueError):
            return False
    if kind == "hybrid":
        sources = getattr(rec, "draft_sources", None) or ""
        return len(sources) == rec.num_draft and set(sources) <= {"e"}
    return kind == "eagle3"


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


def _usable_blocks(
    records: Iterable[BlockRecord], current_version: int, target_model: str | None, cfg: OPDConfig, stats: BuildStats
) -> dict[str, dict[int, BlockRecord]]:
    """request id -> position -> record, of the blocks that can be trained on:
    K = 0 blocks (target-only steps) of any drafter, drafted ones `on_policy`."""
    by_req: dict[str, dict[int, BlockRecord]] = {}
    for rec in records:
        stats.records += 1
        age = block_age(rec.drafter_version, current_version)
        if target_model is not None and rec.target_model != target_model:
            stats.stale += 1
        elif rec.num_draft > 0 and not on_policy(rec):
            stats.off_policy += 1
        elif age is None or age > cfg.max_age:
            stats.stale += 1
        elif rec.num_draft == 0 and cfg.anchors == "served":
            stats.empty += 1
        elif rec.position < 2:
            stats.too_short += 1
        else:
            by_req.setdefault(rec.request_id, {})[rec.position] = rec
    return by_req


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
    build = _Build(draft_index(d2t, vocab_size), current_version, cfg, BuildStats())
    out: list[RequestBlocks] = []
    for rid, blocks in _usable_blocks(records, current_version, target_model, cfg, build.stats).items():
        ctx = contexts.get(rid)
        tokens = _context_array(ctx) if ctx is not None else np.zeros(0, dtype=np.int64)
        make = _random_anchor_request if cfg.anchors == "random" else _served_request
        req = make(rid, blocks, tokens, build)
        if req is not None:
            out.append(req)
    out.sort(key=lambda r: r.request_id)
    return out, build.stats


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


def _map_topk(
    rec_ids: Sequence[Sequence[int]],  # (K+1, k) target ids
    t2d: Tensor,  # (V,) target id -> draft id, -1 outside
    ctx: Mapping[int, int] | None = None,  # context-vocab target id -> draft index
) -> Tensor:
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
    # every block reads tokens[:P] (its anchor P-2, pending token P-1); its exact rows
    # read the target's final hidden at positions P-1..P-2+exact_rows
    end = max(ex.position - 1 + ex.exact_rows for ex in examples)
    tokens = tokens[:end]
    static_size = int((t2d >= 0).sum())
    ctx_ids, ctx_first = context_vocab(tokens, set(torch.nonzero(t2d >= 0).flatten().tolist())) if cfg.context_vocab else ([], [])
    for ex, top in zip(examples, rows, strict=True):
        ctx = {t: static_size + j for j, (t, f) in enumerate(zip(ctx_ids, ctx_first)) if f < ex.position}
        ex.top_ids = _map_topk(top, t2d, ctx)
    return RequestBlocks(
        rid,
        torch.from_numpy(tokens.copy()),
        examples,
        ctx_ids=torch.tensor(ctx_ids, dtype=torch.long),
        ctx_first=torch.tensor(ctx_first, dtype=torch.long),
    )


def logged_top1(top_ids: Sequence[Sequence[int]], top_logprobs: Sequence[Sequence[float]]) -> list[int]:
    """Each row's logged top-1 target id (the verifier's argmax), -1 for an empty row."""
    return [int(ids[int(np.argmax(lps))]) if len(ids) else -1 for ids, lps in zip(top_ids, top_logprobs)]


def exact_rows(tokens: np.ndarray, position: int, num_accepted: int) -> int:
    """Rows of a block at `position` on the emitted context: row 0 (the prefix is
    known) and one more per accepted draft whose token the context holds."""
    accepted = tokens[position : position + num_accepted]
    known = int(np.argmax(accepted < 0)) if (accepted < 0).any() else len(accepted)
    return 1 + known


def _served_request(rid: str, blocks: dict[int, BlockRecord], tokens: np.ndarray, build: _Build) -> RequestBlocks | None:
    examples: list[BlockExample] = []
    rows = []
    for pos in sorted(blocks):
        rec = blocks[pos]
        if len(tokens) < pos or (tokens[:pos] < 0).any():  # the prefix has a hole
            build.stats.no_context += 1
            continue
        examples.append(
            BlockExample(
                anchor=pos - 2,
                step_tokens=[int(tokens[pos - 1]), *rec.draft_tokens],
                num_draft=rec.num_draft,
                num_accepted=rec.num_accepted,
                top_ids=torch.zeros(0),  # mapped below, with the context vocab
                top_logprobs=torch.tensor(rec.target_top_logprobs, dtype=torch.float32),
                weight=build.weight(rec),
                position=pos,
                drafter_version=rec.drafter_version,
                served_logq=list(rec.draft_logprobs),
                temperature=rec.temperature,
                exact_rows=exact_rows(tokens, pos, rec.num_accepted),
                logged_top1=logged_top1(rec.target_top_ids, rec.target_top_logprobs),
            )
        )
        rows.append(rec.target_top_ids)
    build.stats.used += len(examples)
    if not examples:
        return None
    return _with_context(rid, tokens, build.t2d, examples, rows, build.cfg)


def _random_anchors(rid: str, tokens: np.ndarray, logged: Mapping[int, tuple], steps: int, count: int, seed: int) -> list[int]:
    """Up to `count` random anchors a (ascending) whose fed tokens x_{a+1}..x_{a+steps}
    are known and whose target rows at positions a+2..a+steps+1 were logged."""
    valid_len = int(np.argmax(tokens < 0)) if (tokens < 0).any() else len(tokens)
    cands = [a for a in range(valid_len) if a + steps < valid_len and all(a + 2 + j in logged for j in range(steps))]
    gen = torch.Generator().manual_seed(seed + int.from_bytes(hashlib.sha256(rid.encode()).digest()[:4], "big"))
    pick = torch.randperm(len(cands), generator=gen)[:count].tolist() if cands else []
    return [cands[i] for i in sorted(pick)]


def _random_anchor_request(rid: str, blocks: dict[int, BlockRecord], tokens: np.ndarray, build: _Build) -> RequestBlocks | None:
    """Ablation: as many examples as the request has drafted blocks, at random
    anchors of the emitted sequence, teacher-forced, K rows each. The target row
    at emitted position i is row i - P of the block at P that emitted it (rows
    0..num_accepted lie on the emitted sequence)."""
    logged: dict[int, tuple[list[int], list[float], float]] = {}  # position -> (top ids, top logprobs, weight)
    for pos, rec in blocks.items():
        for j in range(rec.num_accepted + 1):
            logged[pos + j] = (rec.target_top_ids[j], rec.target_top_logprobs[j], build.weight(rec))
    drafted = [rec for rec in blocks.values() if rec.num_draft > 0]
    build.stats.empty += len(blocks) - len(drafted)
    if not drafted:
        return None
    k = max(rec.num_draft for rec in drafted)
    examples, tops = [], []
    for a in _random_anchors(rid, tokens, logged, k + 1, len(drafted), build.cfg.seed):
        row = [logged[a + 2 + j] for j in range(k + 1)]
        tops.append([x[0] for x in row])
        examples.append(
            BlockExample(
                anchor=a,
                step_tokens=[int(t) for t in tokens[a + 1 : a + k + 2]],
                num_draft=k,
                num_accepted=k,
                top_ids=torch.zeros(0),
                top_logprobs=torch.tensor([x[1] for x in row], dtype=torch.float32),
                weight=min(x[2] for x in row),
                position=a + 2,
                drafter_version="teacher",
                exact_rows=k + 1,  # teacher-forced on the emitted tokens: every row
                logged_top1=logged_top1([x[0] for x in row], [x[1] for x in row]),
            )
        )
    build.stats.used += len(examples)
    build.stats.no_context += len(drafted) - len(examples)
    return _with_context(rid, tokens, build.t2d, examples, tops, build.cfg) if examples else None
