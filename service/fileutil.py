"""File helpers shared by the model store, the checkpoint store and the
worker's report writer: content hashing, durable writes (fsync) and atomic
replacement of small text files.

Imports no torch: the API's admin routes and the worker use it."""

from __future__ import annotations

import hashlib
import os
import uuid
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


def write_text_atomic(path: str | Path, text: str, durable: bool = False) -> None:
    """Replace `path` with `text` so a reader sees the old file or the new one,
    never a partial one (a uniquely named temp file in the same folder, then
    rename). `durable`: fsync the file and the folder, so the new entry
    survives a crash."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # matches no glob of the real names
    try:
        tmp.write_text(text)
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(path.parent)
