"""Speculative decoding speedup, side by side in one process.

    python -m benchmarks.speedup --out results/speedup.json [--prompts FILE.jsonl] [--dtypes float32,bfloat16] [--device cuda]

Greedy decoding of held-out prompts (or any JSONL of {"prompt": ...}) with:
target-only decoding, each drafter kind (eagle3 when a checkpoint exists), and
transformers' own generate() (target-only and prompt lookup) as the outside
baselines, for each weight dtype asked for. Methods are interleaved within each
repetition so machine noise hits them alike; tokens/s is the median over
repetitions.

Each row also says how its greedy output compares with target-only decoding in
the same dtype (`greedy_identical`: prompts whose output is the same token for
token). In float32 every drafter must match exactly. In bfloat16 the CPU
kernels round differently for a 1-row and a k-row pass (oneDNN's accumulation
order depends on the row count), so an argmax near-tie can flip and outputs
part ways: that is the same caveat vLLM and SGLang carry in bf16, reported here
rather than hidden."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from service import checkpoints
from service.config import Settings
from service.costmodel import cpu_model
from service.drafters.base import Drafter
from service.drafters.draft_model import DraftModelDrafter
from service.drafters.ngram import NgramDrafter
from service.drafters.none import NoDrafter
from service.engine import Engine
from worker.prompts import chat_ids, eval_prompts
from service.runtime import Target, load_target, pick_device
from service.sampling import SamplingParams

log = logging.getLogger("benchmarks.speedup")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def strip_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """Output up to (not including) the first end-of-sequence token."""
    return next((tokens[:i] for i, t in enumerate(tokens) if t in eos), tokens)


class EngineMethod:
    """One of our engine configurations; keeps its stats across repetitions."""

    def __init__(self, name: str, target: Target, drafter: Drafter, k: int, block_sink=None):
        self.name = name
        self.eos = target.eos_token_ids
        self.engine = Engine(target.model, drafter, target.eos_token_ids, k, block_sink=block_sink)

    def run(self, prompts: list[list[int]], max_new: int) -> list[list[int]]:
        params = SamplingParams(temperature=0.0, max_tokens=max_new)
        return [strip_eos(self.engine.generate(p, params), self.eos) for p in prompts]

    def extra(self) -> dict:
        s = self.engine.stats
        if s.num_drafts == 0:
            return {"tau": 1.0}
        return {
            "tau": round(s.tau, 3),
            "per_position_acceptance": [round(a, 3) for a in s.per_position_acceptance() if a > 0],
            "step_ms": {k: round(v, 2) for k, v in self.engine.timing.per_step_ms().items()},
        }


class HFGenerateMethod:
    """transformers' generate() on the same weights (the outside baseline)."""

    def __init__(self, name: str, target: Target, prompt_lookup: int | None):
        from transformers import AutoModelForCausalLM

        self.name = name
        self.model = AutoModelForCausalLM.from_pretrained(target.path, dtype=target.model.dtype).to(
            target.model.device
        ).eval()
        self.eos = target.eos_token_ids
        self.prompt_lookup = prompt_lookup

    def run(self, prompts: list[list[int]], max_new: int) -> list[list[int]]:
        outs = []
        kw = {"prompt_lookup_num_tokens": self.prompt_lookup} if self.prompt_lookup else {}
        eos = sorted(self.eos)
        with torch.inference_mode():
            for p in prompts:
                ids = torch.tensor([p], device=self.model.device)
                out = self.model.generate(
                    ids, max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=eos[0], **kw
                )
                outs.append(strip_eos(out[0, len(p) :].tolist(), self.eos))
        return outs

    def extra(self) -> dict:
        return {"tau": None}


def build_methods(target: Target, settings: Settings, k: int, kinds: list[str], hf: bool = True) -> list:
    methods: list = [EngineMethod("target_only", target, NoDrafter(), 0)]
    for kind in kinds:
        if kind == "ngram":
            methods.append(EngineMethod("ngram", target, NgramDrafter(settings.ngram_max, settings.ngram_min), k))
        elif kind == "draft_model":
            layers = settings.draft_model_layers
            methods.append(EngineMethod("draft_model", target, DraftModelDrafter(target.model, layers), k))
        elif kind in ("eagle3", "hybrid"):
            from service.drafters import registry
            from service.runtime import serve_as

            newest = checkpoints.load_newest(settings.checkpoint_dir, lambda path: registry.load("eagle3", path, target))
            if newest is None:
                log.warning("no eagle3 checkpoint in %s: %s row skipped", settings.checkpoint_dir, kind)
                continue
            drafter = serve_as(settings.model_copy(update={"drafter": kind}), newest.value)
            methods.append(EngineMethod(kind, target, drafter, k))
        else:
            raise SystemExit(f"unknown drafter kind {kind!r}")
    if hf:
        methods.append(HFGenerateMethod("hf_generate", target, None))
        methods.append(HFGenerateMethod("hf_generate_prompt_lookup", target, k))
    return methods


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def agreement(outs: list[list[int]], ref: list[list[int]]) -> dict:
    """How a method's greedy outputs compare with target-only's: prompts identical
    token for token, and the mean share of each reference output reproduced
    before the first difference."""
    same = sum(o == r for o, r in zip(outs, ref))
    prefix = [first_difference(o, r) / max(1, len(r)) for o, r in zip(outs, ref)]
    return {"greedy_identical": f"{same}/{len(ref)}", "greedy_prefix_agreement": round(statistics.mean(prefix), 3)}


def divergence_gaps(model, prompts: list[list[int]], outs: list[list[int]], ref: list[list[int]]) -> list[float]:
    """Where an output first parts from target-only's: the target's logit of its
    own token minus the logit of the other one, from one prefill of the common
    prefix. A gap of a rounding step or two (bf16 has 8 bits of mantissa: 0.06
    at a logit of 16) means an argmax near-tie flipped by kernel rounding, not a
    verification error."""
    gaps = []
    with torch.inference_mode():
        for p, o, r in zip(prompts, outs, ref):
            n = first_difference(o, r)
            if n >= min(len(o), len(r)):
                continue
            ids = torch.tensor(p + r[:n], device=model.device)
            logits, _, _ = model(ids, model.new_cache(len(ids)), last_only=True)
            gaps.append(round(float(logits[-1, r[n]] - logits[-1, o[n]]), 4))
    return gaps


def measure(
    methods: list,
    prompts: list[list[int]],
    max_new: int,
    repeats: int,
    progress: Callable,
    model=None,
    baseline: str = "target_only",
) -> list[dict]:
    """Interleaved timed runs -> one row per method; speedups and greedy agreement
    are relative to the method named `baseline`. With `model` (the target), rows
    whose greedy output differs from the baseline's carry the logit gaps at the
    first differences (`divergence_gaps`)."""
    # warm-up: first calls allocate and fault pages in; on a GPU every new shape also
    # picks its kernels (a first repetition there ran at a third of the speed), so all prompts
    cuda = model is not None and model.device.type == "cuda"
    for m in methods:
        m.run(prompts if cuda else prompts[:1], max_new if cuda else 8)
    times: dict[str, list[float]] = {m.name: [] for m in methods}
    tokens: dict[str, list[int]] = {m.name: [] for m in methods}
    outputs: dict[str, list[list[int]]] = {}
    for r in range(repeats):
        for m in methods:
            t0 = time.perf_counter()
            outs = m.run(prompts, max_new)
            dt = time.perf_counter() - t0
            n = sum(map(len, outs))
            outputs.setdefault(m.name, outs)
            times[m.name].append(dt)
            tokens[m.name].append(n)
            progress(f"rep {r + 1}/{repeats} {m.name:28s} {n / dt:7.1f} tok/s")
    base = statistics.median(n / t for n, t in zip(tokens[baseline], times[baseline]))
    rows = []
    for m in methods:
        tps = statistics.median(n / t for n, t in zip(tokens[m.name], times[m.name]))
        rows.append(
            {
                "method": m.name,
                "tokens_per_s": round(tps, 2),
                **m.extra(),
                "speedup_vs_target_only": round(tps / base, 3),
                **agreement(outputs[m.name], outputs[baseline]),
            }
        )
        if model is not None and outputs[m.name] != outputs[baseline]:
            rows[-1]["divergence_logit_gaps"] = divergence_gaps(model, prompts, outputs[m.name], outputs[baseline])
    return rows


def measurement_args(description: str | None, out: str, repeats: int) -> argparse.ArgumentParser:
    """The flags every tokens/s benchmark takes: where the JSON goes, which
    prompts, how many tokens each, how many timed passes."""
    formatter = argparse.RawDescriptionHelpFormatter
    ap = argparse.ArgumentParser(description=description, formatter_class=formatter)
    ap.add_argument("--out", type=Path, default=Path(out))
    ap.add_argument("--prompts", type=Path, help='JSONL of {"prompt": ...}; default: the held-out split')
    ap.add_argument("--num-prompts", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=repeats)
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = measurement_args(__doc__, "results/speedup.json", repeats=3)
    ap.add_argument("-k", "--num-speculative-tokens", type=int, default=None)
    ap.add_argument("--drafters", default="ngram,eagle3,hybrid", help="comma-separated kinds (also: draft_model)")
    ap.add_argument(
        "--dtypes",
        default=None,
        help="comma-separated weight dtypes, each measured as its own section "
        "(default on CPU: float32,bfloat16; else the DRAFTLOOP_DTYPE setting)",
    )
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers generate() rows")
    ap.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: DRAFTLOOP_DEVICE, auto: CUDA if present)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    settings = Settings(**({"device": args.device} if args.device else {}))
    dtypes = [d for d in (args.dtypes or "").split(",") if d] or (
        ["float32", "bfloat16"] if pick_device(settings.device).type == "cpu" else [settings.dtype]
    )
    texts = eval_prompts(args.prompts, args.num_prompts)
    k = args.num_speculative_tokens or settings.num_speculative_tokens
    rows: list[dict] = []
    costs: dict[str, dict] = {}
    target = None
    for dtype in dtypes:
        target = None  # free the previous copy before loading the next
        target = load_target(settings.model_copy(update={"dtype": dtype}))
        costs[dtype] = target.cost
        prompts = [chat_ids(target.tokenizer, t) for t in texts]
        methods = build_methods(target, settings, k, [s for s in args.drafters.split(",") if s], hf=not args.no_hf)
        section = measure(methods, prompts, args.max_new_tokens, args.repeats, lambda msg, d=dtype: log.info("%s %s", d, msg), target.model)
        rows += [{"dtype": str(target.model.dtype).removeprefix("torch."), **r} for r in section]
    fastest = max(r["tokens_per_s"] for r in rows if r["method"] == "target_only")
    for r in rows:
        r["speedup_vs_fastest_target_only"] = round(r["tokens_per_s"] / fastest, 3)
    assert target is not None
    result = {
        "model": target.name,
        "device": device_name(target.model.device),
        "cpu_model": cpu_model(),
        "cost_model": costs,  # per dtype: the verify-cost curve and the stop thresholds derived from it
        "dtypes": dtypes,
        "prompts": str(args.prompts) if args.prompts else f"sharegpt heldout[:{len(texts)}]",
        "num_prompts": len(texts),
        "max_new_tokens": args.max_new_tokens,
        "num_speculative_tokens": k,
        "repeats": args.repeats,
        "fastest_target_only_tokens_per_s": fastest,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        log.info(
            "%-9s %-28s %7.2f tok/s  tau %-5s  %.2fx same dtype  %.2fx fastest target-only  greedy identical %s",
            r["dtype"], r["method"], r["tokens_per_s"], r["tau"], r["speedup_vs_target_only"],
            r["speedup_vs_fastest_target_only"], r["greedy_identical"],
        )
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
