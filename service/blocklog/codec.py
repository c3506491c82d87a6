"""The block log's wire format: block records as Redis stream entries, and
token contexts as packed words (the block record contract, docs/architecture.md).

Redis layout (S = the stream name, default `draftloop:blocks`):

- `S` — stream, one entry per verify step, `XADD S MAXLEN ~ N`. Fields:
  `schema_version` (ASCII int), `request_id` (UTF-8) and `data` (msgpack map:
  scalars as msgpack values, id lists as little-endian uint32 bytes, the
  target's top-k log-probs as float16 bytes, the K per-token log-probs as
  float32 bytes; from schema version 2 `drafter_kind` and `draft_sources`, K
  ASCII letters). Version-1 records (before either) still decode: a numbered
  drafter version then means the eagle3 head drafted every token ("e" each),
  anything else "unknown" ("?" each).
- `S:ctx:<request_id>` — string, the request's token context, little-endian
  uint32 words with a TTL refreshed by every write:
  word 0 = 1 + len(prompt) (0: the prompt record never arrived);
  word 1 + i = 1 + id of the token at sequence position i (0: not logged).
  The prompt record writes words 0..len(prompt) once (`SETRANGE`); each block
  writes its emitted tokens (accepted drafts, then `next_token`) at words
  1 + position ... Writes land by offset, so their order does not matter, and a
  record lost on the way leaves zero words a consumer can see.

A consumer rebuilds the prefix of any block with one `GET` per request:
prefix = context[:position] (`RequestContext.prefix`), refused when it has a
hole. Hence the producer's rule: log every step that emits tokens, including
the first token after prefill and steps that drafted nothing, as blocks with
K = 0 (no drafted tokens, one target row: still the target's own state, usable
by the accepted stream); a token no record covers leaves every later block of
that request without a prefix."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgpack
import numpy as np

from .record import SCHEMA_VERSION, BlockRecord, PromptRecord, SchemaError

_U32 = np.dtype("<u4")
_F16 = np.dtype("<f2")
_F32 = np.dtype("<f4")


# --- token contexts ---------------------------------------------------------------------


def pack_tokens(ids: Sequence[int]) -> bytes:
    """Token ids as context words: id + 1, so that 0 marks a hole."""
    return (np.asarray(ids, dtype=np.int64) + 1).astype(_U32).tobytes()


def prompt_context_bytes(rec: PromptRecord) -> bytes:
    """Context words 0..len(prompt): the prompt length, then the prompt's tokens."""
    return np.asarray([len(rec.prompt_ids) + 1], dtype=_U32).tobytes() + pack_tokens(rec.prompt_ids)


def block_context_offset(rec: BlockRecord) -> int:
    """Byte offset of the block's first emitted token in its request's context."""
    return 4 * (1 + rec.position)


def unpack_context(raw: bytes | None) -> tuple[int | None, np.ndarray] | None:
    """A context key's value -> (prompt length or None if the prompt record was
    lost, (T,) int64 token ids by position with -1 where nothing was logged);
    None for a missing or empty key."""
    if not raw:
        return None
    words = np.frombuffer(raw[: len(raw) // 4 * 4], dtype=_U32).astype(np.int64)
    return (int(words[0]) - 1 if words[0] else None), words[1:] - 1


# --- stream entries ---------------------------------------------------------------------


def encode(rec: BlockRecord) -> dict[str, bytes]:
    """Stream fields of one block record (see the module docstring)."""
    num_draft = len(rec.draft_tokens)
    top_ids = np.asarray(rec.target_top_ids, dtype=np.int64)  # (K+1, k)
    top_lp = np.asarray(rec.target_top_logprobs, dtype=np.float32)  # (K+1, k)
    if top_ids.ndim != 2 or top_ids.shape[0] != num_draft + 1 or top_lp.shape != top_ids.shape:
        raise SchemaError(
            f"target top-k must be (K+1) x k with K={num_draft}: ids {top_ids.shape}, logprobs {top_lp.shape}"
        )
    if len(rec.draft_logprobs) != num_draft or len(rec.target_draft_logprobs) != num_draft:
        raise SchemaError("draft_logprobs and target_draft_logprobs need one value per drafted token")
    if not 0 <= rec.num_accepted <= num_draft:
        raise SchemaError(f"num_accepted={rec.num_accepted} outside 0..{num_draft}")
    if len(rec.draft_sources) != num_draft:
        raise SchemaError(f"draft_sources {rec.draft_sources!r}: one letter per draft (K={num_draft})")
    data = {
        "step": rec.step,
        "drafter_version": rec.drafter_version,
        "target_model": rec.target_model,
        "temperature": float(rec.temperature),
        "position": rec.position,
        "num_accepted": rec.num_accepted,
        "next_token": rec.next_token,
        "k": top_ids.shape[1],
        "draft_tokens": np.asarray(rec.draft_tokens, dtype=_U32).tobytes(),
        "draft_logprobs": np.asarray(rec.draft_logprobs, dtype=_F32).tobytes(),
        "target_top_ids": top_ids.astype(_U32).tobytes(),
        "target_top_logprobs": top_lp.astype(_F16).tobytes(),  # the bulk of a record; float16 halves it
        "target_draft_logprobs": np.asarray(rec.target_draft_logprobs, dtype=_F32).tobytes(),
        "drafter_kind": rec.drafter_kind,
        "draft_sources": rec.draft_sources,
    }
    return {
        "schema_version": str(rec.schema_version).encode(),
        "request_id": rec.request_id.encode(),
        "data": msgpack.packb(data, use_bin_type=True),
    }


def _field(fields: Mapping, name: str) -> bytes:
    value = fields.get(name.encode(), fields.get(name))
    if value is None:
        raise SchemaError(f"block record lacks field {name!r}")
    return value.encode() if isinstance(value, str) else value


def _rows(buf: bytes, dtype: np.dtype, num_rows: int, topk: int, out: type) -> list:
    """A (num_rows, topk) array stored as `dtype` bytes, as nested lists of `out`."""
    return np.frombuffer(buf, dtype=dtype).reshape(num_rows, topk).astype(out).tolist()


READABLE_VERSIONS = (1, SCHEMA_VERSION)


def _provenance(data: Mapping, version: int, num_draft: int) -> tuple[str, str]:
    """(drafter_kind, draft_sources) of a record; for version 1 inferred from the
    drafter version: only eagle3 checkpoints have numbered versions (1, 2, ...)."""
    if version >= 2:
        return str(data["drafter_kind"]), str(data["draft_sources"])
    numbered = str(data["drafter_version"]).isdigit() and str(data["drafter_version"]) != "0"
    return ("eagle3", "e" * num_draft) if numbered else ("unknown", "?" * num_draft)


def decode(fields: Mapping) -> BlockRecord:
    """Inverse of `encode`; accepts bytes or str keys (as redis-py returns them)."""
    try:
        version = int(_field(fields, "schema_version"))
    except ValueError as e:
        raise SchemaError(f"bad schema_version: {e}") from None
    if version not in READABLE_VERSIONS:
        raise SchemaError(f"unknown block record schema_version {version} (reads {READABLE_VERSIONS})")
    try:
        data = msgpack.unpackb(_field(fields, "data"), raw=False)
        topk = int(data["k"])
        draft = np.frombuffer(data["draft_tokens"], dtype=_U32)
        num_rows = len(draft) + 1
        kind, sources = _provenance(data, version, len(draft))
        return BlockRecord(
            schema_version=version,
            request_id=_field(fields, "request_id").decode(),
            step=int(data["step"]),
            drafter_version=data["drafter_version"],
            target_model=data["target_model"],
            temperature=float(data["temperature"]),
            position=int(data["position"]),
            draft_tokens=draft.astype(np.int64).tolist(),
            draft_logprobs=np.frombuffer(data["draft_logprobs"], dtype=_F32).tolist(),
            num_accepted=int(data["num_accepted"]),
            next_token=int(data["next_token"]),
            target_top_ids=_rows(data["target_top_ids"], _U32, num_rows, topk, np.int64),
            target_top_logprobs=_rows(data["target_top_logprobs"], _F16, num_rows, topk, np.float32),
            target_draft_logprobs=np.frombuffer(data["target_draft_logprobs"], dtype=_F32).tolist(),
            drafter_kind=kind,
            draft_sources=sources,
        )
    except SchemaError:
        raise
    except (KeyError, ValueError, TypeError, msgpack.UnpackException) as e:
        raise SchemaError(f"malformed block record: {e!r}") from None
