"""Drafter versions: the files (`store`), the Redis pointer that says which
version to serve (`pointer`) and the resolver from one to the other
(`resolve`). The contract is described in docs/architecture.md.

The names below are re-exported so `from service import checkpoints;
checkpoints.publish_version(...)` works. Imports no torch and no web
framework: the API's admin routes and the worker use it."""

from __future__ import annotations

from .pointer import (
    DEFAULT_NAMESPACE,
    cooldown_key,
    decode_pointer,
    latest_key,
    pointer_key,
    pointer_payload,
    publish_version,
    read_latest,
    read_pointer,
    rollback_version,
    unpin,
    updates_channel,
)
from .resolve import (
    Loaded,
    load_current,
    load_newest,
    pointer_kind,
    read_pointer_at_startup,
    resolve_path,
)
from .store import (
    DEFAULT_KIND,
    MANIFEST_FILE,
    CheckpointError,
    is_complete,
    list_versions,
    read_manifest,
    save_version,
    version_of,
    version_path,
)

__all__ = [
    "DEFAULT_KIND",
    "DEFAULT_NAMESPACE",
    "MANIFEST_FILE",
    "CheckpointError",
    "Loaded",
    "cooldown_key",
    "decode_pointer",
    "is_complete",
    "latest_key",
    "list_versions",
    "load_current",
    "load_newest",
    "pointer_key",
    "pointer_kind",
    "pointer_payload",
    "publish_version",
    "read_latest",
    "read_manifest",
    "read_pointer",
    "read_pointer_at_startup",
    "resolve_path",
    "rollback_version",
    "save_version",
    "unpin",
    "updates_channel",
    "version_of",
    "version_path",
]
