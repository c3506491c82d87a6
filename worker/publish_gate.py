"""Whether the worker publishes a trained head: the one decision both update
paths (the SFT bootstrap and Draft-OPD, `worker.update`) take, by
`worker.train.gate` against the drafter the servers serve, built as they
build it (`service.runtime.build_drafter`, following the Redis pointer). The
bootstrap's checkpoint is moved out of the store while it is judged (`stage`)
and back only when published (`unstage`), so neither a server starting
without a pointer nor the next run serves a refused one."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import redis

from service.config import Settings
from service.drafters.base import Drafter
from service.drafters.eagle3 import Eagle3Head

from .train.config import OPDConfig

if TYPE_CHECKING:
    from service.runtime import Target

    from .train.gate import GateResult

log = logging.getLogger(__name__)

UNPUBLISHED_DIR = "unpublished"  # under the checkpoint dir, beside the kinds' directories
KEEP_REFUSED = 3  # refused candidates kept for inspection; older ones are deleted (a bootstrap retries each tick)


def serving_drafter(
    r: redis.Redis, settings: Settings, target: Target, before_eagle3: bool = False
) -> Drafter:
    """The drafter a server with these settings serves now; `before_eagle3`:
    what it serves while no eagle3 version exists (the bootstrap's incumbent:
    ngram for `auto`; target-only for `eagle3`, which cannot start without one)."""
    from service.drafters.none import NoDrafter
    from service.runtime import FOLLOWING_KINDS, build_drafter

    if before_eagle3 and settings.drafter in FOLLOWING_KINDS:
        if settings.drafter == "eagle3":
            return NoDrafter()
        settings = settings.model_copy(update={"drafter": "ngram"})
    try:
        return build_drafter(settings, target, r)
    except FileNotFoundError as exc:  # DRAFTLOOP_DRAFTER=eagle3 and nothing on disk
        log.warning("gate: the servers cannot start (%s); comparing with target-only decoding", exc)
        return NoDrafter()


def publish_decision(
    r: redis.Redis,
    settings: Settings,
    target: Target,
    head: Eagle3Head,
    served_prompts: Sequence[Sequence[int]],
    cfg: OPDConfig,
    before_eagle3: bool = False,
) -> GateResult:
    """The gate's decision on `head` against the serving drafter, on the served
    held-out prompts topped up from the end of ShareGPT's held-out split (the
    benchmarks evaluate on its start), at the served K."""
    incumbent = serving_drafter(r, settings, target, before_eagle3)
    return gate_decision(target, incumbent, head, served_prompts, cfg, settings.num_speculative_tokens)


def gate_decision(
    target: Target, incumbent: Drafter, head: Eagle3Head, served_prompts: Sequence[Sequence[int]], cfg: OPDConfig, k: int
) -> GateResult:
    """`publish_decision` once the incumbent is known (benchmarks that serve
    in-process pass theirs): the candidate wrapped as the incumbent's kind,
    both decoded on the gate's prompts at K = `k`."""
    from .train.gate import candidate_drafter, gate_prompts, run_gate

    max_prompt_len = target.model.max_len - cfg.gate_max_tokens - k - 1
    prompts = gate_prompts(target.tokenizer, served_prompts, cfg.gate_requests, max_prompt_len)
    candidate = candidate_drafter(incumbent, head, target.model)
    return run_gate(target, incumbent, candidate, prompts, k, cfg)


def _move(src: Path, dest: Path) -> None:
    try:
        os.rename(src, dest)  # atomic on one file system
    except OSError:
        shutil.move(str(src), str(dest))


def stage(path: Path, checkpoint_dir: Path) -> Path:
    """Move a version directory the gate has not passed out of the store, to
    `<checkpoint_dir>/unpublished/<kind>-v{N}-<UTC time>`: invisible to every
    loader; the newest refused ones stay there for inspection."""
    folder = Path(checkpoint_dir) / UNPUBLISHED_DIR
    folder.mkdir(parents=True, exist_ok=True)
    prune_refused(folder, keep=KEEP_REFUSED - 1)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    dest = folder / f"{path.parent.name}-{path.name}-{stamp}"
    _move(path, dest)
    log.info("checkpoint %s staged at %s until the gate decides", path, dest)
    return dest


def prune_refused(folder: Path, keep: int) -> None:
    """Delete all but the `keep` most recently staged candidates in `folder`."""
    staged = sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime_ns)
    for old in staged[: max(len(staged) - keep, 0)]:
        shutil.rmtree(old, ignore_errors=True)


def unstage(staged: Path, path: Path) -> Path:
    """Back into the store at `path` (the version it was written as) -> `path`."""
    if path.exists():
        raise FileExistsError(f"{path} was claimed while {staged} was judged")
    _move(staged, path)
    return path
