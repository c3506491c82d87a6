"""The block log's consumer: how the Draft-OPD worker reads block records and
token contexts back from Redis with a consumer group (the block record
contract, docs/architecture.md). Every raw stream command the worker needs
(XGROUP, XINFO, XREADGROUP, XACK, XPENDING) lives here."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import redis

from .codec import decode, unpack_context
from .record import BlockRecord, SchemaError, context_key

log = logging.getLogger(__name__)

Entry = tuple[str, BlockRecord]  # (stream entry id, its record)
_PAGE = 1000  # entries per XREADGROUP / XACK round trip


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def entry_id_key(entry_id: str) -> tuple[int, int]:
    """Sort key of a stream entry id (`<ms>-<seq>`): stream order."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass
class RequestContext:
    """A request's logged token context (see `codec`)."""

    prompt_len: int | None  # None: the prompt record was lost
    tokens: np.ndarray  # (T,) int64 token ids by sequence position; -1 where nothing was logged

    @property
    def prompt_ids(self) -> list[int] | None:
        """The prompt, or None if any of it is missing."""
        if self.prompt_len is None:
            return None
        ids = self.tokens[: self.prompt_len]
        return None if len(ids) < self.prompt_len or (ids < 0).any() else ids.tolist()

    def prefix(self, rec: BlockRecord) -> list[int] | None:
        """Tokens before the block's first drafted token, or None if any is missing."""
        ids = self.tokens[: rec.position]
        return None if len(ids) < rec.position or (ids < 0).any() else ids.tolist()


@dataclass(frozen=True)
class PendingSummary:
    """The group's delivered-but-unacked entries, over all its consumers."""

    count: int
    first_id: str | None
    last_id: str | None


TRAINING_GROUP = "opd"  # the consumer group the workers train from (worker.update)


def group_backlog(client: redis.Redis, stream: str, group: str = TRAINING_GROUP) -> tuple[int, int]:
    """(undelivered, pending) entries of `group` on `stream`: not yet read by a
    worker, and read but not acked (a worker mid-update, or one that died)."""
    return BlockConsumer(client, stream, group, "backlog-probe").waiting(at_least=100_000)


class BlockConsumer:
    """One named consumer of one consumer group on the block stream.

    A consumer that read entries and died before acking finds them again as its
    own pending entries: `read` hands those back first, then new ones."""

    def __init__(self, client: redis.Redis, stream: str, group: str, name: str) -> None:
        self.redis = client
        self.stream = stream
        self.group = group
        self.name = name

    def ensure_group(self, start_id: str = "0") -> None:
        """Create the consumer group (and the stream) unless it exists."""
        try:
            self.redis.xgroup_create(self.stream, self.group, id=start_id, mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def waiting(self, at_least: int | None = None) -> tuple[int, int]:
        """(undelivered, pending) entries of the group, without consuming
        anything; (0, 0) without the group. When Redis cannot tell the lag
        (after deletions), undelivered entries are counted with XRANGE, up to
        `at_least` (None: all)."""
        for info in self.redis.xinfo_groups(self.stream):
            if _text(info["name"]) != self.group:
                continue
            lag = info.get("lag")
            if lag is None:
                last = _text(info["last-delivered-id"])
                lag = len(self.redis.xrange(self.stream, min=f"({last}", max="+", count=at_least))
            return int(lag), int(info["pending"])
        return 0, 0

    def read(self, max_entries: int) -> tuple[list[Entry], list[str]]:
        """This consumer's pending entries, then new ones, up to `max_entries`
        -> ((id, record) list, ids that cannot be used: trimmed or undecodable).
        Nothing is acked: `ack` every id once its outcome is recorded."""
        raw: list[tuple[str, dict | None]] = []
        last = "0"
        while len(raw) < max_entries:  # pending: page through this consumer's PEL
            page = self._read_page(last, max_entries - len(raw))
            if not page:
                break
            raw += page
            last = raw[-1][0]
        while len(raw) < max_entries:  # then new entries
            page = self._read_page(">", max_entries - len(raw))
            if not page:
                break
            raw += page
        return _decode_entries(raw)

    def _read_page(self, start: str, wanted: int) -> list[tuple[str, dict | None]]:
        got = self.redis.xreadgroup(self.group, self.name, {self.stream: start}, count=min(_PAGE, wanted))
        return [(_text(eid), fields) for eid, fields in (got[0][1] if got else [])]

    def ack(self, ids: Sequence[str]) -> int:
        """XACK `ids` (in chunks); returns how many were pending."""
        chunks = (ids[start : start + _PAGE] for start in range(0, len(ids), _PAGE))
        return sum(int(self.redis.xack(self.stream, self.group, *chunk)) for chunk in chunks)

    def pending(self) -> PendingSummary:
        """How many entries the group has pending, and the first and last id."""
        info = self.redis.xpending(self.stream, self.group)
        if not info["pending"]:
            return PendingSummary(0, None, None)
        return PendingSummary(int(info["pending"]), _text(info["min"]), _text(info["max"]))

    def pending_ids(self, count: int) -> list[str]:
        """The ids of up to `count` of the group's pending entries, in stream order."""
        rows = self.redis.xpending_range(self.stream, self.group, min="-", max="+", count=count)
        return [_text(row["message_id"]) for row in rows]

    def read_contexts(self, request_ids: Iterable[str]) -> dict[str, RequestContext]:
        """The logged context of each request (one pipelined GET each); requests
        whose context expired or was never written are missing from the result."""
        rids = list(dict.fromkeys(request_ids))
        pipe = self.redis.pipeline(transaction=False)
        for rid in rids:
            pipe.get(context_key(self.stream, rid))
        out = {}
        for rid, raw in zip(rids, pipe.execute(), strict=True):
            unpacked = unpack_context(raw)
            if unpacked is not None:
                out[rid] = RequestContext(*unpacked)
        return out


def _decode_entries(raw: Iterable[tuple[str, dict | None]]) -> tuple[list[Entry], list[str]]:
    entries: list[Entry] = []
    bad: list[str] = []
    for eid, fields in raw:
        if not fields:  # trimmed away while pending
            bad.append(eid)
            continue
        try:
            entries.append((eid, decode(fields)))
        except SchemaError as e:
            log.warning("skipping block record %s: %s", eid, e)
            bad.append(eid)
    return entries, bad
