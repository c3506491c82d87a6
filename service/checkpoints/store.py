"""The files side of drafter versions, for any drafter kind:
`<checkpoint_dir>/<kind>/v{N}/` holding the kind's files and `manifest.json`.

A version directory is complete once its manifest is present: `save_version`
fills a temporary directory, fsyncs it and renames it into place, so a reader
never sees a half-written version. Old versions stay on disk for rollback.
What the files of a kind are (e.g. the eagle3 weights) is the kind's own
format module; the layout and the contract are described in
docs/architecture.md.

Imports no torch and no web framework: the worker and the API both use it."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..fileutil import fsync_path

log = logging.getLogger(__name__)

DEFAULT_KIND = "eagle3"
MANIFEST_FILE = "manifest.json"
VERSION_DIR = re.compile(r"^v(\d+)$")  # the one spelling of a version directory's name
MAX_CLAIM_ATTEMPTS = 100


class CheckpointError(ValueError):
    """A checkpoint that must not be served (wrong target, shapes, hash, format)."""


def version_path(checkpoint_dir: str | Path, version: int, kind: str = DEFAULT_KIND) -> Path:
    """`<checkpoint_dir>/<kind>/v{version}` (whether or not it exists)."""
    return Path(checkpoint_dir) / kind / f"v{int(version)}"


def version_of(path: str | Path) -> int | None:
    """N for a directory named `v{N}`, else None."""
    match = VERSION_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete(path: str | Path) -> bool:
    """Whether a version directory holds its manifest (was renamed into place)."""
    return (Path(path) / MANIFEST_FILE).is_file()


def list_versions(checkpoint_dir: str | Path, kind: str = DEFAULT_KIND) -> list[int]:
    """Versions of `kind` with a complete directory (manifest present), oldest first."""
    root = Path(checkpoint_dir) / kind
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        version = version_of(path)
        if version is not None and is_complete(path):
            found.append(version)
    return sorted(found)


def _claimed_versions(root: Path) -> list[int]:
    """Every `v{N}` directory under root, complete or not: numbers already taken."""
    return sorted(v for p in root.iterdir() if (v := version_of(p)) is not None) if root.is_dir() else []


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a version directory as a dict. Raises CheckpointError
    when it is missing, unreadable or not a JSON object."""
    mpath = Path(path) / MANIFEST_FILE
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {MANIFEST_FILE}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{mpath}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{mpath}: the manifest is not a JSON object")
    return manifest


def save_version(
    checkpoint_dir: str | Path,
    kind: str,
    write_files: Callable[[Path], dict[str, Any]],
) -> Path:
    """Write the next version of `kind` atomically and return its directory.

    `write_files(tmp)` writes the kind's files into the temporary directory
    `tmp` (fsynced by the caller or not: they are fsynced here) and returns the
    manifest; its "version" field is set here to the number this call claims.
    The directory is renamed into place as `v{N}` with N one past the highest
    taken number; when another writer takes N first, the next one is tried."""
    root = Path(checkpoint_dir) / kind
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        manifest = write_files(tmp)
        for name in os.listdir(tmp):
            fsync_path(tmp / name)
        return _claim_next(root, tmp, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _claim_next(root: Path, tmp: Path, manifest: dict[str, Any]) -> Path:
    """Rename `tmp` to the next free `v{N}` under root (manifest written last)."""
    for _ in range(MAX_CLAIM_ATTEMPTS):
        taken = _claimed_versions(root)
        version = taken[-1] + 1 if taken else 1
        manifest["version"] = version
        mpath = tmp / MANIFEST_FILE
        mpath.write_text(json.dumps(manifest, indent=2) + "\n")
        fsync_path(mpath)
        fsync_path(tmp)
        dest = root / f"v{version}"
        try:
            os.rename(tmp, dest)  # atomic; fails if dest exists and is non-empty
        except OSError:
            if dest.exists():
                continue
            raise
        fsync_path(root)
        log.info("saved %s checkpoint v%d to %s", root.name, version, dest)
        return dest
    raise RuntimeError(f"could not claim a version number under {root}")
