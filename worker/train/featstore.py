"""The on-disk cache of SFT target features: greedy target trajectories with
the taps the head reads (bfloat16) and the target's final hidden, generated
once in batches and memory-mapped, so training epochs never rerun the target.

Layout: `<cache_dir>/features-<key>/shard-<digest>/` holds one generation batch
as numpy arrays (`tokens`, `taps` (N, L*d) and `final` (N, d) as bfloat16 bits
in uint16, `offsets`, `prompt_lens`, `last_next`), written to a temp folder and
renamed, so a shard is there complete or not at all. `<key>` addresses the
generation settings (target id, tapped layers, reply length, EOS ids, dtype);
each shard's `<digest>` addresses its prompts within them, so a killed
generation resumes where it stopped and a run over a prefix of the same
prompts reuses the shards it shares.

Served requests' own tokens (the worker's bootstrap reads them from the block
log) go into `served-<digest>` shards of the same folder (`add_served`), and
every one written so far is read back (`served_store`).

Prompts are taken in groups (in their given order), sorted by length within a
group to limit padding, and cut into generation batches."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from service.llama import LlamaModel

from .data import Trajectories, TrajectoryIndex
from .features import bf16_copy, forced_batch, generate_batch

log = logging.getLogger(__name__)

ARRAYS = ("tokens", "taps", "final", "offsets", "prompt_lens", "last_next")
GROUP_BATCHES = 8  # generation batches per length-sorted group of prompts


def digest(obj) -> str:
    """A short content address of a JSON-serialisable object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _bits(t: Tensor) -> np.ndarray:  # (...) bfloat16 -> (...) uint16 bits
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


def _bf16(a: np.ndarray) -> Tensor:  # (...) uint16 bits -> (...) bfloat16
    return torch.from_numpy(np.array(a).view(np.int16)).view(torch.bfloat16)  # a copy: memmaps are read-only


def write_shard(path: Path, part: Trajectories) -> None:
    """`part` as one shard folder, atomically (temp folder, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    arrays = {
        "tokens": part.tokens.to(torch.int32).numpy(),
        "taps": _bits(part.features.to(torch.bfloat16)),
        "final": _bits(part.final.to(torch.bfloat16)),
        "offsets": part.offsets.numpy(),
        "prompt_lens": part.prompt_lens.numpy(),
        "last_next": part.last_next.numpy(),
    }
    for name, arr in arrays.items():
        np.save(tmp / f"{name}.npy", arr)
    os.replace(tmp, path)


@dataclass
class _Shard:
    tokens: np.ndarray  # (N,) int32
    taps: np.ndarray  # (N, L*d) uint16, memory-mapped
    final: np.ndarray  # (N, d) uint16, memory-mapped
    offsets: np.ndarray  # (n+1,) int64
    prompt_lens: np.ndarray  # (n,) int64
    last_next: np.ndarray  # (n,) int64

    @classmethod
    def open(cls, path: Path) -> _Shard:
        return cls(**{name: np.load(path / f"{name}.npy", mmap_mode="r") for name in ARRAYS})


class FeatureStore(TrajectoryIndex):
    """The `Trajectories` interface over memory-mapped shards: index tensors in
    memory, `rows(i)` reads trajectory i's taps of the `use_layers` (a subset of
    the stored `layers`) and its final hidden from disk."""

    def __init__(self, shards: Sequence[_Shard], layers: Sequence[int], use_layers: Sequence[int]):
        missing = sorted(set(use_layers) - set(layers))
        if missing:
            raise ValueError(f"layers {missing} are not in the feature cache (it holds {list(layers)})")
        self.shards = list(shards)
        self.layers, self.use_layers = tuple(layers), tuple(use_layers)
        self.select = [list(layers).index(i) for i in use_layers]
        self.num_layers = len(layers)
        self.tokens = torch.from_numpy(np.concatenate([np.asarray(s.tokens) for s in shards]).astype(np.int64))
        lengths = np.concatenate([np.diff(s.offsets) for s in shards])
        self.offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        self.prompt_lens = torch.from_numpy(np.concatenate([s.prompt_lens for s in shards]).astype(np.int64))
        self.last_next = torch.from_numpy(np.concatenate([s.last_next for s in shards]).astype(np.int64))
        self._where = [(k, j) for k, s in enumerate(shards) for j in range(len(s.prompt_lens))]

    @classmethod
    def merged(cls, stores: Sequence[FeatureStore]) -> FeatureStore:
        """One store over the shards of `stores` (same layers), in order."""
        return cls([s for st in stores for s in st.shards], stores[0].layers, stores[0].use_layers)

    def rows(self, i: int) -> tuple[Tensor, Tensor]:
        """Trajectory i's (taps of the used layers (T_i, 3d), final (T_i, d)), bfloat16."""
        k, j = self._where[i]
        shard = self.shards[k]
        s, e = int(shard.offsets[j]), int(shard.offsets[j + 1])
        taps = _bf16(shard.taps[s:e])
        d = taps.shape[1] // self.num_layers
        taps = taps.view(e - s, self.num_layers, d)[:, self.select].reshape(e - s, -1)
        return taps, _bf16(shard.final[s:e])


def cache_layers(layers: Sequence[int]) -> tuple[int, ...]:
    """The layers to tap when generating for a head reading `layers`: the
    outputs of those layers and of the layers before them (the inputs of
    `layers`, EAGLE-3's and vLLM's taps), so either choice trains from one cache."""
    return tuple(sorted(set(layers) | {i - 1 for i in layers if i > 0}))


def _generation_batches(prompt_ids: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Prompt indices in groups of GROUP_BATCHES batches (given order), each group
    sorted by length, cut into batches of `batch_size`."""
    group = batch_size * GROUP_BATCHES
    out = []
    for g in range(0, len(prompt_ids), group):
        order = sorted(range(g, min(g + group, len(prompt_ids))), key=lambda i: len(prompt_ids[i]))
        out += [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return out


@dataclass
class GenerationSettings:
    """What a trajectory depends on besides its prompt (the cache key)."""

    model_id: str
    layers: tuple[int, ...]  # tapped layers (residual stream after each), ascending
    max_new_tokens: int
    eos_ids: tuple[int, ...]
    bf16: bool  # generated by a bfloat16 copy of the target

    def key(self) -> str:
        return digest([self.model_id, list(self.layers), self.max_new_tokens, list(self.eos_ids), self.bf16])


def build_store(
    model: LlamaModel,
    prompt_ids: Sequence[Sequence[int]],
    settings: GenerationSettings,
    cache_dir: Path,
    use_layers: Sequence[int],
    batch_size: int = 128,
    max_seconds: float | None = None,
) -> FeatureStore:
    """Generate the shards of `prompt_ids` not cached yet (for at most
    `max_seconds` of generation, None: all), then open every shard that exists
    -> a FeatureStore reading `use_layers`."""
    folder = Path(cache_dir) / f"features-{settings.key()}"
    folder.mkdir(parents=True, exist_ok=True)
    batches = _generation_batches(prompt_ids, batch_size)
    paths = [folder / f"shard-{digest([list(prompt_ids[i]) for i in b])}" for b in batches]
    todo = [(b, p) for b, p in zip(batches, paths) if not p.exists()]
    log.info("feature cache %s: %d of %d shards cached, %d to generate", folder, len(batches) - len(todo), len(batches), len(todo))
    gen_model, t0, n_tok = None, time.perf_counter(), 0
    bar = tqdm(todo, desc="trajectories", unit="batch")
    for batch, path in bar:
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            log.info("generation budget of %.0f s spent: %d shards left for a later run", max_seconds, len(todo) - bar.n)
            break
        if gen_model is None:
            gen_model = bf16_copy(model) if settings.bf16 and model.dtype != torch.bfloat16 else model
        part = generate_batch(gen_model, [prompt_ids[j] for j in batch], settings.max_new_tokens, set(settings.eos_ids), settings.layers)
        write_shard(path, part)
        n_tok += part.tokens.numel()
        bar.set_postfix(positions=n_tok, pos_per_s=f"{n_tok / (time.perf_counter() - t0):.0f}")
    shards = [_Shard.open(p) for p in paths if p.exists()]
    if not shards:
        raise RuntimeError(f"no trajectories in {folder}: the generation budget ended before the first batch")
    store = FeatureStore(shards, settings.layers, use_layers)
    log.info("trajectories: %d sequences, %d positions in %s", len(store), store.tokens.numel(), folder)
    return store


SERVED_PREFIX = "served-"


def add_served(
    model: LlamaModel,
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]],  # (prompt ids, completion ids)
    settings: GenerationSettings,
    cache_dir: Path,
    batch_size: int = 32,
) -> int:
    """Teacher-forced features of served (prompt, completion) pairs into new
    `served-*` shards (length-sorted batches; a batch already cached is skipped)
    -> positions written."""
    folder = Path(cache_dir) / f"features-{settings.key()}"
    folder.mkdir(parents=True, exist_ok=True)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]) + len(sequences[i][1]))
    gen_model, written = None, 0
    for start in range(0, len(order), batch_size):
        part = [sequences[i] for i in order[start : start + batch_size]]
        path = folder / f"{SERVED_PREFIX}{digest([[list(p), list(c)] for p, c in part])}"
        if path.exists():
            continue
        if gen_model is None:
            gen_model = bf16_copy(model) if settings.bf16 and model.dtype != torch.bfloat16 else model
        traj = forced_batch(gen_model, part, settings.layers)
        write_shard(path, traj)
        written += traj.tokens.numel()
    return written


def served_store(settings: GenerationSettings, cache_dir: Path, use_layers: Sequence[int]) -> FeatureStore | None:
    """Every served shard written under these settings (None: none yet)."""
    folder = Path(cache_dir) / f"features-{settings.key()}"
    paths = sorted(p for p in folder.glob(f"{SERVED_PREFIX}*") if not p.name.endswith(".tmp"))
    return FeatureStore([_Shard.open(p) for p in paths], settings.layers, use_layers) if paths else None
