"""Speculative decoding speedup, side by side in one process.

    python -m benchmarks.speedup --out results/speedup.json [--prompts FILE.jsonl]

Greedy decoding of held-out prompts (or any JSONL of {"prompt": ...}) with:
target-only decoding, each drafter kind (eagle3 when a checkpoint exists), and
transformers' own generate() (target-only and prompt lookup) as the outside
baselines. Methods are interleaved within each repetition so machine noise
hits them alike; tokens/s is the median over repetitions."""

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

from service.config import Settings
from service.drafters.base import Drafter
from service.drafters.draft_model import DraftModelDrafter
from service.drafters.ngram import NgramDrafter
from service.engine import Engine, NoDrafter
from service.prompts import chat_ids, load_prompts, sharegpt_prompts
from service.runtime import Target, load_target
from service.sampling import SamplingParams

log = logging.getLogger("benchmarks.speedup")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class EngineMethod:
    """One of our engine configurations; keeps its stats across repetitions."""

    def __init__(self, name: str, target: Target, drafter: Drafter, k: int):
        self.name = name
        self.engine = Engine(target.model, drafter, target.eos_token_ids, k)

    def run(self, prompts: list[list[int]], max_new: int) -> int:
        params = SamplingParams(temperature=0.0, max_tokens=max_new)
        return sum(len(self.engine.generate(p, params)) for p in prompts)

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
        self.eos = sorted(target.eos_token_ids)
        self.prompt_lookup = prompt_lookup

    def run(self, prompts: list[list[int]], max_new: int) -> int:
        total = 0
        kw = {"prompt_lookup_num_tokens": self.prompt_lookup} if self.prompt_lookup else {}
        with torch.inference_mode():
            for p in prompts:
                ids = torch.tensor([p], device=self.model.device)
                out = self.model.generate(
                    ids, max_new_tokens=max_new, do_sample=False, eos_token_id=self.eos, pad_token_id=self.eos[0], **kw
                )
                new = out[0, len(p) :].tolist()
                total += next((i for i, t in enumerate(new) if t in self.eos), len(new))
        return total

    def extra(self) -> dict:
        return {"tau": None}


def build_methods(target: Target, settings: Settings, k: int, kinds: list[str]) -> list:
    methods: list = [EngineMethod("target_only", target, NoDrafter(), 0)]
    for kind in kinds:
        if kind == "ngram":
            methods.append(EngineMethod("ngram", target, NgramDrafter(settings.ngram_max, settings.ngram_min), k))
        elif kind == "draft_model":
            layers = settings.draft_model_layers
            methods.append(EngineMethod("draft_model", target, DraftModelDrafter(target.model, layers), k))
        elif kind == "eagle3":
            from service.drafters import eagle3

            drafter = eagle3.load_latest(settings.checkpoint_dir, target)
            if drafter is None:
                log.warning("no eagle3 checkpoint in %s: eagle3 row skipped", settings.checkpoint_dir)
                continue
            methods.append(EngineMethod("eagle3", target, drafter, k))
        else:
            raise SystemExit(f"unknown drafter kind {kind!r}")
    methods.append(HFGenerateMethod("hf_generate", target, None))
    methods.append(HFGenerateMethod("hf_generate_prompt_lookup", target, k))
    return methods


def measure(methods: list, prompts: list[list[int]], max_new: int, repeats: int, progress: Callable) -> list[dict]:
    for m in methods:  # warm-up: first calls allocate and fault pages in
        m.run(prompts[:1], 8)
    times: dict[str, list[float]] = {m.name: [] for m in methods}
    tokens: dict[str, list[int]] = {m.name: [] for m in methods}
    for r in range(repeats):
        for m in methods:
            t0 = time.perf_counter()
            n = m.run(prompts, max_new)
            dt = time.perf_counter() - t0
            times[m.name].append(dt)
            tokens[m.name].append(n)
            progress(f"rep {r + 1}/{repeats} {m.name:28s} {n / dt:7.1f} tok/s")
    base = statistics.median(n / t for n, t in zip(tokens["target_only"], times["target_only"]))
    rows = []
    for m in methods:
        tps = statistics.median(n / t for n, t in zip(tokens[m.name], times[m.name]))
        rows.append(
            {"method": m.name, "tokens_per_s": round(tps, 2), **m.extra(), "speedup_vs_target_only": round(tps / base, 3)}
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("results/speedup.json"))
    ap.add_argument("--prompts", type=Path, help="JSONL of {\"prompt\": ...}; default: built-in held-out split")
    ap.add_argument("--num-prompts", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("-k", "--num-speculative-tokens", type=int, default=None)
    ap.add_argument("--drafters", default="ngram,draft_model,eagle3", help="comma-separated kinds")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    settings = Settings()
    target = load_target(settings)
    k = args.num_speculative_tokens or settings.num_speculative_tokens
    texts = load_prompts(args.prompts) if args.prompts else list(sharegpt_prompts("heldout", limit=args.num_prompts))
    prompts = [chat_ids(target.tokenizer, t) for t in texts[: args.num_prompts]]
    methods = build_methods(target, settings, k, [s for s in args.drafters.split(",") if s])
    rows = measure(methods, prompts, args.max_new_tokens, args.repeats, log.info)
    result = {
        "model": target.name,
        "device": device_name(target.model.device),
        "dtype": str(target.model.dtype).removeprefix("torch."),
        "prompts": str(args.prompts) if args.prompts else f"sharegpt heldout[:{len(prompts)}]",
        "num_prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "num_speculative_tokens": k,
        "repeats": args.repeats,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        log.info("%-28s %7.2f tok/s  tau %s  speedup %.2fx", r["method"], r["tokens_per_s"], r["tau"], r["speedup_vs_target_only"])
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
