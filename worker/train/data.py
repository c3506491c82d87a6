"""Training data and its collation: SFT trajectories, Draft-OPD request blocks
(built from block records by `worker.train.blocks`), the one length-bucketing
routine both trainers batch with, and the fixed held-out split of requests."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from service.drafters.eagle3 import shifted_tokens

# ---------------------------------------------------------------------------
# length bucketing


def length_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped by length so that B x max_len <= batch_tokens (a longer
    item is a batch of its own): little padding, bounded batch memory."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in order:
        n = lengths[i]
        if cur and max(longest, n) * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        batches.append(cur)
    return batches


# ---------------------------------------------------------------------------
# SFT trajectories


class TrajectoryIndex:
    """What a trajectory set indexes: `tokens` (N,), `offsets` (n+1,),
    `prompt_lens` (n,) and `last_next` (n,) tensors; subclasses add `rows(i)`."""

    tokens: Tensor
    offsets: Tensor
    prompt_lens: Tensor
    last_next: Tensor

    def __len__(self) -> int:
        return self.prompt_lens.numel()

    def length(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def response_tokens(self) -> Tensor:
        """The generated tokens of every trajectory, concatenated -> (M,) int64."""
        parts = [self.tokens[int(self.offsets[i]) + int(self.prompt_lens[i]) : int(self.offsets[i + 1])] for i in range(len(self))]
        return torch.cat(parts) if parts else self.tokens[:0]


@dataclass
class Trajectories(TrajectoryIndex):
    """Every fed position of every trajectory, concatenated (N positions), in memory.
    `worker.train.featstore.FeatureStore` offers the same interface over memory-mapped
    shards on disk; the trainer reads either through `rows` and the index tensors."""

    tokens: Tensor  # (N,) int64
    features: Tensor  # (N, L*d) bfloat16, target taps at L layers (the head's three, or more)
    final: Tensor  # (N, d) bfloat16, the target's final normed hidden (its logits = final @ lm_head.T)
    offsets: Tensor  # (n+1,) int64, trajectory i is offsets[i]:offsets[i+1]
    prompt_lens: Tensor  # (n,) int64
    last_next: Tensor  # (n,) int64, the target's argmax after each trajectory's last position (-1: unknown)

    def rows(self, i: int) -> tuple[Tensor, Tensor]:
        """Trajectory i's (features (T_i, L*d), final (T_i, d))."""
        s, e = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.features[s:e], self.final[s:e]

    @classmethod
    def from_parts(
        cls,
        tokens: Sequence[Tensor],  # (T_i,) int64 each
        features: Sequence[Tensor],  # (T_i, L*d) each
        final: Sequence[Tensor],  # (T_i, d) each
        prompt_lens: Tensor,  # (n,) int64
        last_next: Tensor,  # (n,) int64
    ) -> Trajectories:
        """One trajectory per entry of the three lists."""
        lengths = torch.tensor([t.numel() for t in tokens], dtype=torch.long)
        return cls(
            tokens=torch.cat(list(tokens)),
            features=torch.cat(list(features)),
            final=torch.cat(list(final)),
            offsets=torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
            prompt_lens=prompt_lens,
            last_next=last_next,
        )


@dataclass
class Batch:
    """A padded batch of SFT trajectories."""

    features: Tensor  # (B, T, 3d) float32
    tokens: Tensor  # (B, T) int64
    final: Tensor  # (B, T, d) float32
    valid: Tensor  # (B, T) bool
    prompt_lens: Tensor  # (B,)
    lengths: Tensor  # (B,)
    next_ids: Tensor  # (B, T) int64: the target's argmax after position t on greedy trajectories (-1: unknown)

    def to(self, device: torch.device) -> Batch:
        """The batch on `device` (a no-op copy-free return where it already is)."""
        if self.tokens.device == device:
            return self
        return Batch(*(getattr(self, f.name).to(device) for f in fields(self)))


def trajectory_batches(data: TrajectoryIndex, batch_tokens: int) -> list[list[int]]:
    """Trajectory indices of `data` (Trajectories or a FeatureStore) grouped by
    length so B x max_len <= batch_tokens."""
    return length_batches(data.offsets.diff().tolist(), batch_tokens)


def collate(data: TrajectoryIndex, idx: Sequence[int], dtype=torch.float32) -> Batch:
    """Trajectories `idx` of `data` (Trajectories or a FeatureStore), padded."""
    lens = torch.tensor([data.length(i) for i in idx])
    t, b = int(lens.max()), len(idx)
    rows = [data.rows(i) for i in idx]
    feats = torch.zeros(b, t, rows[0][0].shape[1], dtype=dtype)
    final = torch.zeros(b, t, rows[0][1].shape[1], dtype=dtype)
    toks = torch.zeros(b, t, dtype=torch.long)
    nxt = torch.full((b, t), -1, dtype=torch.long)
    for row, (i, (f, h)) in enumerate(zip(idx, rows)):
        s, e = int(data.offsets[i]), int(data.offsets[i + 1])
        feats[row, : e - s] = f
        final[row, : e - s] = h
        toks[row, : e - s] = data.tokens[s:e]
        nxt[row, : e - s - 1] = data.tokens[s + 1 : e]
        nxt[row, e - s - 1] = data.last_next[i]
    valid = torch.arange(t).unsqueeze(0) < lens.unsqueeze(1)
    return Batch(feats, toks, final, valid, data.prompt_lens[list(idx)], lens, nxt)


# ---------------------------------------------------------------------------
# Draft-OPD blocks


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
    # rows 0..exact_rows-1 lie on the emitted context (row j at position P-1+j): the
    # target's exact distribution there is one LM-head product of its final hidden
    exact_rows: int = 1
    logged_top1: list[int] = field(default_factory=list)  # (K+1,) target id of each row's logged top-1 (replay check)


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
    final: Tensor | None = None  # (T, d) the target's final normed hidden (exact teacher rows)
    replay_top1: tuple[int, int] = (0, 0)  # (exact rows whose recomputed argmax is the logged top-1, exact rows)

    @property
    def num_blocks(self) -> int:
        return len(self.examples)


def request_batches(requests: Sequence[RequestBlocks], batch_tokens: int) -> list[list[int]]:
    """Request indices grouped by length, padded size B x T <= batch_tokens
    (a longer request is a batch of its own)."""
    return length_batches([r.tokens.numel() for r in requests], batch_tokens)


def _request_hash(request_id: str) -> bytes:
    return hashlib.sha256(request_id.encode()).digest()


def is_heldout(request_id: str, fraction: float) -> bool:
    """Fixed split of request ids by hash (stable across runs and machines)."""
    return int.from_bytes(_request_hash(request_id)[:8], "big") < fraction * 2**64


def split_heldout(requests: Sequence[RequestBlocks], fraction: float) -> tuple[list[RequestBlocks], list[RequestBlocks]]:
    """(train, held-out) by `is_heldout`. With two or more requests neither side is
    left empty: if the hash leaves one empty, the request with the lowest hash
    moves to the held-out side (or the highest to training)."""
    train = [r for r in requests if not is_heldout(r.request_id, fraction)]
    held = [r for r in requests if is_heldout(r.request_id, fraction)]
    if len(requests) >= 2 and fraction > 0 and (not train or not held):
        key = lambda r: _request_hash(r.request_id)  # noqa: E731
        if not held:
            held = [min(train, key=key)]
            train = [r for r in train if r is not held[0]]
        else:
            train = [max(held, key=key)]
            held = [r for r in held if r is not train[0]]
    return train, held


@dataclass
class ReplayBatch:
    """Requests padded to one batch, with the block rows to replay."""

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
    exact_final: Tensor  # (R, d) the target's final hidden at the blocks' rows on the emitted context
    exact_index: Tensor  # (N, S) int64: row of exact_final for block n's row j, -1 where only the logged top-k


def _pad_requests(requests: Sequence[RequestBlocks], device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> features (B, T, 3d), tokens (B, T), key_valid (B, T), ctx_rows (B, C, d)."""
    t = max(r.tokens.numel() for r in requests)
    batch, feature_dim = len(requests), requests[0].features.shape[-1]
    feats = torch.zeros(batch, t, feature_dim, dtype=dtype, device=device)
    toks = torch.zeros(batch, t, dtype=torch.long)
    num_ctx = max(r.ctx_ids.numel() for r in requests)
    ctx_rows = torch.zeros(batch, num_ctx, feature_dim // 3, dtype=dtype, device=device)
    for i, r in enumerate(requests):
        feats[i, : r.tokens.numel()] = r.features.to(device=device, dtype=dtype)
        toks[i, : r.tokens.numel()] = r.tokens
        if r.ctx_ids.numel():
            ctx_rows[i, : r.ctx_ids.numel()] = r.ctx_rows.to(device=device, dtype=dtype)
    valid = torch.arange(t)[None, :] < torch.tensor([r.tokens.numel() for r in requests])[:, None]
    return feats, toks, valid, ctx_rows


def _exact_rows(requests: Sequence[RequestBlocks], steps: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """-> (final hidden (R, d) at every block row on the emitted context, (N, S)
    index into it, -1 elsewhere). Needs `final` (`compute_features`)."""
    n_blocks = sum(r.num_blocks for r in requests)
    index = torch.full((n_blocks, steps), -1, dtype=torch.long)
    parts, n, count = [], 0, 0
    for r in requests:
        for ex in r.examples:
            rows = min(ex.exact_rows, ex.num_draft + 1) if r.final is not None else 0
            if rows > 0:
                parts.append(r.final[ex.position - 1 : ex.position - 1 + rows])
                index[n, :rows] = torch.arange(count, count + rows)
                count += rows
            n += 1
    width = next((r.final.shape[-1] for r in requests if r.final is not None), 0)
    final = torch.cat(parts).to(device=device, dtype=torch.float32) if parts else torch.zeros(0, width, device=device)
    return final, index.to(device)


def collate_requests(requests: Sequence[RequestBlocks], device: torch.device, dtype: torch.dtype) -> ReplayBatch:
    steps = 1 + max(ex.num_draft for r in requests for ex in r.examples)
    feats, toks, valid, ctx_rows = _pad_requests(requests, device, dtype)
    num_ctx = ctx_rows.shape[1]
    step_tokens = shifted_tokens(toks, steps)  # anchors that start no block: teacher forcing (unused)
    n_blocks = sum(r.num_blocks for r in requests)
    top_k = max(ex.top_ids.shape[1] for r in requests for ex in r.examples)
    p_ids = torch.full((n_blocks, steps, top_k), -2, dtype=torch.long)  # -2: padding (-1: outside the draft vocab)
    p_lp = torch.zeros(n_blocks, steps, top_k)
    cols: dict[str, list] = {k: [] for k in ("rows", "anchors", "num_draft", "num_accepted", "weight", "temp", "ctx_valid")}
    for bi, r in enumerate(requests):
        first = F.pad(r.ctx_first, (0, num_ctx - r.ctx_first.numel()), value=2**62)  # padding: never valid
        for ex in r.examples:
            i, num_draft = len(cols["rows"]), ex.num_draft
            step_tokens[: num_draft + 1, bi, ex.anchor] = torch.tensor(ex.step_tokens[: num_draft + 1])
            p_ids[i, : num_draft + 1, : ex.top_ids.shape[1]] = ex.top_ids
            p_lp[i, : num_draft + 1, : ex.top_ids.shape[1]] = ex.top_logprobs
            for key, value in zip(cols, (bi, ex.anchor, num_draft, ex.num_accepted, ex.weight, ex.temperature, first < ex.position)):
                cols[key].append(value)
    return ReplayBatch(
        feats,
        step_tokens.to(device=device),
        valid.to(device=device),
        torch.tensor(cols["rows"], device=device),
        torch.tensor(cols["anchors"], device=device),
        p_ids,
        p_lp,
        torch.tensor(cols["num_draft"]),
        torch.tensor(cols["num_accepted"]),
        torch.tensor(cols["weight"], dtype=torch.float32),
        torch.tensor(cols["temp"], dtype=torch.float32),
        ctx_rows,
        torch.stack(cols["ctx_valid"]).to(device) if num_ctx else torch.zeros(n_blocks, 0, dtype=torch.bool, device=device),
        *_exact_rows(requests, steps, device),
    )
