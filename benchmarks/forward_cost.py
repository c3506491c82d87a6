"""The target's forward cost against the rows it carries, per dtype and kernel.

    python -m benchmarks.forward_cost --out results/forward_cost.json [--threads 2] [--rows 1,2,5,9,16,32,64]

One forward of n new rows on top of a KV cache of `--context` positions, full
logits (a verify pass), for n in `--rows`, with the float32 weights as MKL
gets them (`F.linear`), float32 prepacked for oneDNN with the q/k/v and
gate/up projections apart and fused (`service/packed.py`; fused is what the
server runs) and bfloat16; variants are interleaved within each
repetition and the median is kept. The ratio to one row is what the drafter's
stop rule and any batching stand on (`service/costmodel.py`). The file also
records which CPU it ran on and whether torch found bf16 / AMX instructions
there, since the ranking of the dtypes differs between machines, and how long
this core takes to read the float32 weights once: no one-row forward can be
faster than that."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from service.config import Settings
from service.costmodel import cpu_model
from service.llama import LlamaModel
from service.packed import is_packed, pack_linears, unfuse_projections
from service.runtime import load_target

log = logging.getLogger("benchmarks.forward_cost")


def forward_seconds(model: LlamaModel, rows: int, context: int, ids: torch.Tensor, cache) -> float:
    """One forward of `rows` new tokens after `context` cached positions (the cache is rolled back after)."""
    cache.rollback(context)
    t0 = time.perf_counter()
    model(ids[context : context + rows], cache)
    return time.perf_counter() - t0


def read_floor_ms(model: LlamaModel, repeats: int) -> dict[str, float]:
    """How long one core takes to stream the target's weight bytes once (a sum
    over a float32 buffer of that size, median of `repeats`): the floor under a
    one-row forward, which must read every weight from memory."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    weight_bytes = sum(storages.values())  # tied and fused weights (views) counted once
    buffer = torch.ones(weight_bytes // 4)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        buffer.sum()
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    return {"weight_mb": round(weight_bytes / 1e6, 1), "read_ms": round(ms, 2), "read_gb_per_s": round(weight_bytes / ms / 1e6, 1)}


def cpu_flags() -> dict[str, bool]:
    cpu = getattr(torch, "cpu", None)
    names = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_tile": "_is_amx_tile_supported", "avx512": "_is_avx512_supported"}
    return {k: bool(getattr(cpu, n)()) if hasattr(cpu, n) else False for k, n in names.items()}


def variants(target_model: LlamaModel, dtypes: list[str]) -> dict[str, LlamaModel]:
    """name -> model: float32 plain / packed with the projections apart /
    packed and fused (served), and other dtypes (plain)."""
    base = copy.deepcopy(target_model).float()
    out: dict[str, LlamaModel] = {}
    plain = copy.deepcopy(base)
    unfuse_projections(plain)
    for mod in plain.modules():  # unpack: the plain MKL path
        for name, child in list(mod.named_children()):
            if type(child).__name__ == "PackedLinear":
                lin = torch.nn.Linear(child.in_features, child.out_features, bias=False)
                lin.weight = child.weight
                setattr(mod, name, lin)
    if "float32" in dtypes:
        out["float32"] = plain
        for name, fuse in (("float32-packed-unfused", False), ("float32-packed", True)):
            packed = copy.deepcopy(plain)
            if pack_linears(packed, fuse=fuse) and is_packed(packed):
                out[name] = packed
    for name in dtypes:
        if name != "float32":
            out[name] = copy.deepcopy(plain).to(getattr(torch, name))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rows", default="1,2,5,9,16,32,64")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    rows = [int(x) for x in args.rows.split(",")]
    target = load_target(Settings(dtype="float32", drafter="none", block_log=False))
    models = variants(target.model, args.dtypes.split(","))
    ids = torch.arange(args.context + max(rows)) % target.model.cfg.vocab_size
    caches = {name: m.new_cache(args.context + max(rows)) for name, m in models.items()}
    times: dict[str, dict[int, list[float]]] = {name: {n: [] for n in rows} for name in models}
    with torch.inference_mode():
        for name, m in models.items():
            m(ids[: args.context], caches[name], logits=False)
        for rep in range(args.repeats + 1):  # the first repetition warms up
            for n in rows:
                for name, m in models.items():
                    t = forward_seconds(m, n, args.context, ids, caches[name])
                    if rep:
                        times[name][n].append(t)
            log.info("repetition %d/%d done", rep, args.repeats)
    curves = {name: {str(n): round(statistics.median(ts) * 1e3, 2) for n, ts in per.items()} for name, per in times.items()}
    ratios = {name: {n: round(c[n] / c["1"], 3) for n in c} for name, c in curves.items()}
    report = {
        "model": target.model_id,
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "torch": torch.__version__,
        "threads": args.threads,
        "context": args.context,
        "repeats": args.repeats,
        "weight_read_floor": read_floor_ms(models.get("float32", target.model), args.repeats),
        "ms_per_forward": curves,
        "ratio_to_one_row": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    floor = report["weight_read_floor"]
    print(f"reading the {floor['weight_mb']} MB of weights once: {floor['read_ms']} ms ({floor['read_gb_per_s']} GB/s)")
    for name, c in curves.items():
        print(f"{name:>16}: " + "  ".join(f"{n}:{ms:.1f}ms" for n, ms in c.items()))


if __name__ == "__main__":
    main()
