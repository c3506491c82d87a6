"""Drafter kinds that are loaded from a checkpoint directory: kind -> loader
`(path, target) -> Drafter`. The start-up code (`service.runtime`) and the
hot reloader (`service.reloader`) load every version through it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .base import Drafter

if TYPE_CHECKING:
    from ..runtime import Target

Loader = Callable[[Path, "Target"], Drafter]


def _load_eagle3(path: Path, target: Target) -> Drafter:
    from . import eagle3  # torch-heavy: imported on first use

    drafter = eagle3.load_checkpoint(path, target)
    # the draft-length rule of this machine's measured verify-cost curve (service.costmodel)
    drafter.stop_thresholds = tuple(getattr(target, "stop_thresholds", ()) or ())
    return drafter


LOADERS: dict[str, Loader] = {"eagle3": _load_eagle3}


def register(kind: str, loader: Loader) -> None:
    """Make checkpoints of `kind` loadable (replaces an earlier loader)."""
    LOADERS[kind] = loader


def loader_for(kind: str, loaders: Mapping[str, Loader] | None = None) -> Loader:
    """The loader of `kind` (from `loaders` when given, else the registry);
    ValueError for a kind without one."""
    found = (LOADERS if loaders is None else loaders).get(kind)
    if found is None:
        raise ValueError(f"no loader for drafter kind {kind!r}")
    return found


def load(kind: str, path: Path, target: Target) -> Drafter:
    """A drafter of `kind` from the checkpoint directory `path`."""
    return loader_for(kind)(path, target)
