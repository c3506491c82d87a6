"""File helpers shared by the model store, the checkpoint store and the
worker's report writer: content hashing and durable writes (fsync).

Imports no torch: the API's admin routes and the worker use it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in `chunk`-byte blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: str | Path) -> None:
    """fsync a file or a directory (after a rename, so the new entry is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
