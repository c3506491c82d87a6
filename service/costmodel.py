"""The verify-cost curve of this machine and the rules built on it.

At start-up the server times one target forward of 1 .. K+1 rows on top of a
KV cache of a typical length, in the serving dtype (`measure_curve`), and
caches the curve per (model, dtype, device, torch version, CPU model) under
DRAFTLOOP_CACHE_DIR so a restart reads it back (`cached_curve`). Two pure
rules use it:

- `stop_thresholds`: how far a drafter keeps drafting (the draft-length
  decision, replacing a constant confidence stop);
- `fastest_dtype`: which dtype DRAFTLOOP_DTYPE=auto serves on a CPU.

For batches it also times a few wider forwards (`batch_widths`: up to
max_num_seqs x (K+1) rows, the most one batched verify can carry), so the
adaptive draft-length rule (`service.speculation`) knows what extra rows cost
when many sequences share a step (`cached_points`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .fileutil import write_text_atomic

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 256  # KV-cache length the curve is measured on (a typical mid-request context)
DEFAULT_REPEATS = 7
BF16_MARGIN = 0.05  # bfloat16 must be this much faster than float32 to be picked (float32 is exact)


# ---- the rules (pure) ------------------------------------------------------


def stop_thresholds(seconds: Sequence[float], draft_cost: float = 0.0) -> list[float]:
    """Per draft slot s (0-based), the chain probability below which the token
    at slot s is not drafted. seconds[n-1]: one target forward of n rows.

    Rule: drafting the token at slot s lengthens the verify pass from s+1 to
    s+2 rows, which costs t(s+2) - t(s+1) now (plus `draft_cost`, the drafter's
    own step). It pays off only if the token is accepted, which needs every
    draft up to it accepted: probability c_s (the chain). An accepted token
    saves one later one-row step, worth t(1). So keep drafting while
        c_s * t(1) >= t(s+2) - t(s+1) + draft_cost,
    i.e. threshold_s = (t(s+2) - t(s+1) + draft_cost) / t(1), clipped to
    [0, 1] and made non-decreasing (the chain only shrinks, so a drafter can
    stop at the first slot that fails). Returns len(seconds) - 1 values."""
    if len(seconds) < 2 or seconds[0] <= 0:
        return []
    out: list[float] = []
    running = 0.0
    for s in range(len(seconds) - 1):
        marginal = max(seconds[s + 1] - seconds[s], 0.0) + draft_cost
        running = max(running, min(marginal / seconds[0], 1.0))
        out.append(running)
    return out


def threshold_at(thresholds: Sequence[float], slot: int, fallback: float) -> float:
    """The stop threshold of draft slot `slot`: the measured rule when there is
    one (slots past the curve reuse its last value), else `fallback`."""
    if not thresholds:
        return fallback
    return thresholds[min(slot, len(thresholds) - 1)]


def resolve_thresholds(setting: str, seconds: Sequence[float] | None, num_slots: int) -> list[float]:
    """DRAFTLOOP_MIN_CONFIDENCE -> per-slot thresholds: "auto" derives them from
    the measured curve (empty without one: the drafter's default applies); a
    number is a constant confidence stop."""
    if setting.strip().lower() == "auto":
        return stop_thresholds(seconds) if seconds else []
    try:
        value = float(setting)
    except ValueError:
        raise ValueError(f"DRAFTLOOP_MIN_CONFIDENCE: auto or a number in [0, 1], not {setting!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"DRAFTLOOP_MIN_CONFIDENCE must be in [0, 1]; got {value}")
    return [value] * max(num_slots, 1)


def fastest_dtype(curves: Mapping[str, Sequence[float]], margin: float = BF16_MARGIN) -> str:
    """Rule: float32 (exact against float32 references) unless another dtype's
    verify-cost curve (1 .. K+1 rows) is cheaper by `margin` on its mean and
    dearer by no more than `margin` at any width; then the one of those with
    the lowest mean. One row alone misleads both ways: on a CPU without bf16
    instructions a one-row bf16 step is faster (half the weight bytes) while a
    5-row verify is 1.6x slower; on one with AMX a one-row step costs the same
    in both dtypes while bf16 verifies 5 rows 17 % cheaper (docs/results.md)."""
    base = curves.get("float32")
    if base is None:
        return min(curves, key=lambda name: statistics.fmean(curves[name]))
    better = [
        name for name, curve in curves.items()
        if name != "float32"
        and statistics.fmean(curve) <= statistics.fmean(base) * (1.0 - margin)
        and all(t <= b * (1.0 + margin) for t, b in zip(curve, base, strict=True))
    ]  # fmt: skip
    return min(better, key=lambda name: statistics.fmean(curves[name])) if better else "float32"


# ---- measurement -------------------------------------------------------------


def batch_widths(k: int, max_num_seqs: int) -> list[int]:
    """Row counts past one verify (K+1 rows) worth timing for batched steps:
    powers of two up to, and then, max_num_seqs x (K+1)."""
    top = max_num_seqs * (k + 1)
    widths = [w for w in (8, 16, 32, 64, 128, 256) if k + 1 < w < top]
    return [*widths, top] if top > k + 1 else widths


def measure_curve(
    model: torch.nn.Module,
    max_rows: int,
    context: int = DEFAULT_CONTEXT,
    repeats: int = DEFAULT_REPEATS,
) -> list[float]:
    """Median seconds of one target forward of n = 1 .. max_rows rows (full
    logits, as a verify pass) after `context` cached positions."""
    return measure_widths(model, range(1, max_rows + 1), context, repeats)


def measure_widths(
    model: torch.nn.Module,
    widths: Sequence[int],
    context: int = DEFAULT_CONTEXT,
    repeats: int = DEFAULT_REPEATS,
) -> list[float]:
    """Median seconds of one target forward of each width in `widths` rows."""
    return measure_interleaved({"model": model}, widths, context, repeats)["model"]


def measure_interleaved(
    models: Mapping[str, torch.nn.Module],
    widths: Sequence[int],
    context: int = DEFAULT_CONTEXT,
    repeats: int = DEFAULT_REPEATS,
) -> dict[str, list[float]]:
    """name -> median seconds of one forward of each width, the models taking
    turns within every repetition: drift on a shared machine (a neighbour's
    load, the clock) then hits them alike, where curves measured one after the
    other were seen to rank two dtypes both ways in back-to-back starts."""
    max_rows = max(widths)
    state = {}
    with torch.inference_mode():
        for name, model in models.items():
            ids = torch.arange(context + max_rows, device=model.device) % model.cfg.vocab_size  # (context + max_rows,)
            cache = model.new_cache(context + max_rows)
            model(ids[:context], cache, logits=False)
            state[name] = (ids, cache)
        times: dict[str, list[list[float]]] = {name: [[] for _ in widths] for name in models}
        for i in range(repeats + 1):  # the first round warms up
            for j, n in enumerate(widths):
                for name, model in models.items():
                    ids, cache = state[name]
                    cache.rollback(context)
                    t0 = time.perf_counter()
                    model(ids[context : context + n], cache)
                    if model.device.type == "cuda":
                        torch.cuda.synchronize(model.device)
                    if i:
                        times[name][j].append(time.perf_counter() - t0)
    return {name: [statistics.median(ts) for ts in per] for name, per in times.items()}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def curve_key(
    model_id: str, dtype: torch.dtype, device: torch.device, max_rows: int, context: int, packed: bool = False
) -> dict:
    """What a cached curve is valid for."""
    from .packed import KERNELS

    return {
        "packed": KERNELS if packed else False,
        "model": model_id,
        "dtype": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "rows": max_rows,
        "context": context,
    }


def _curve_path(cache_dir: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / "costmodel" / f"{digest}.json"


def read_curve(cache_dir: Path, key: dict) -> list[float] | None:
    """The cached curve of `key`, or None."""
    try:
        stored = json.loads(_curve_path(cache_dir, key).read_text())
        if stored.get("key") == key:
            return [float(s) for s in stored["seconds"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def cached_curve(
    model: torch.nn.Module,
    model_id: str,
    max_rows: int,
    cache_dir: Path,
    context: int = DEFAULT_CONTEXT,
) -> list[float]:
    """The curve of `model` (1 .. max_rows rows) from the cache, measured and stored on a miss."""
    return _cached(model, model_id, list(range(1, max_rows + 1)), cache_dir, context, dense=True)


def cached_points(
    model: torch.nn.Module, model_id: str, widths: Sequence[int], cache_dir: Path, context: int = DEFAULT_CONTEXT
) -> list[tuple[int, float]]:
    """(rows, seconds) of `model` at `widths` rows, from the cache or measured."""
    if not widths:
        return []
    seconds = _cached(model, model_id, list(widths), cache_dir, context, dense=False)
    return list(zip(widths, seconds))


def _cached(
    model: torch.nn.Module, model_id: str, widths: list[int], cache_dir: Path, context: int, dense: bool
) -> list[float]:
    from .packed import is_packed

    key = curve_key(model_id, model.dtype, model.device, max(widths), context, is_packed(model))
    if not dense:  # a sparse set of widths is another measurement than the dense 1..max curve
        key["widths"] = widths
    found = read_curve(cache_dir, key)
    if found is not None:
        return found
    t0 = time.perf_counter()
    seconds = measure_curve(model, max(widths), context) if dense else measure_widths(model, widths, context)
    log.info("verify-cost curve %s measured in %.1f s", key["dtype"], time.perf_counter() - t0)
    store_curve(cache_dir, key, seconds)
    return seconds


def store_curve(cache_dir: Path, key: dict, seconds: Sequence[float]) -> None:
    path = _curve_path(cache_dir, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps({"key": key, "seconds": list(seconds)}))  # readers never see a partial file
    except OSError as exc:
        log.warning("could not cache the verify-cost curve at %s: %s", path, exc)
