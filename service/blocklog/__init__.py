"""The block log: every verify step of the serving engine as a versioned
record in a Redis stream, and the request's token context beside it, read back
by the Draft-OPD worker (the block record contract, docs/architecture.md).

- `record`: the tensor-free contract (BlockObservation, BlockRecord, PromptRecord).
- `codec`: stream entries and context words on the wire.
- `writer`: BlockLogger, the server's never-blocking writer.
- `consumer`: BlockConsumer, the worker's consumer-group reader; `group_backlog`,
  what the server reports of it on /metrics.

Engine code: no web framework here (the worker imports it)."""

from .codec import decode, encode
from .consumer import (
    TRAINING_GROUP,
    BlockConsumer,
    Entry,
    PendingSummary,
    RequestContext,
    entry_id_key,
    group_backlog,
)
from .record import SCHEMA_VERSION, BlockObservation, BlockRecord, PromptRecord, SchemaError, context_key
from .writer import BlockLogger

__all__ = [
    "SCHEMA_VERSION",
    "TRAINING_GROUP",
    "BlockConsumer",
    "BlockLogger",
    "BlockObservation",
    "BlockRecord",
    "Entry",
    "PendingSummary",
    "PromptRecord",
    "RequestContext",
    "SchemaError",
    "context_key",
    "decode",
    "encode",
    "entry_id_key",
    "group_backlog",
]
