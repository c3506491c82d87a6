"""Correctness of speculative decoding on the serving device and dtype (on a
GPU: CUDA, bfloat16), for scripts/gpu_check.sh.

    python -m benchmarks.gpu_check --out results/gpu/correctness.json [--device cuda] [--dtype bfloat16]

1. Greedy: each drafter (ngram, draft_model, and the newest eagle3 checkpoint
   as eagle3 and hybrid, or an untrained full-length head when there is none)
   decodes held-out prompts; its output is compared with target-only decoding
   in the same dtype. bfloat16 is not bit-exact between a 1-row and a k-row
   pass, so an output may part ways at an argmax near-tie: every first
   difference must be one (the target's logit gap there at most `TIE_GAP`).
2. Rejection sampling on the device: the first emitted token of a verify step
   with a fixed draft distribution follows the target's, not the draft's
   (chi-square, as tests/test_sampling.py does on the CPU).
3. Sampled decoding end to end: over many seeds, the token the first verify
   step emits, given the most frequent first token, follows the target's
   conditional distribution (chi-square against the target's probabilities).
Writes JSON; exits 1 when a check fails."""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from benchmarks.speedup import agreement, device_name, divergence_gaps, strip_eos
from service import checkpoints
from service.config import Settings
from service.drafters import eagle3, registry
from service.drafters.base import Drafter
from service.drafters.draft_model import DraftModelDrafter
from service.drafters.hybrid import HybridDrafter
from service.drafters.ngram import NgramDrafter
from service.drafters.none import NoDrafter
from service.engine import Engine
from service.runtime import Target, load_target
from service.sampling import SamplingParams, make_generator, rejection_verify
from worker.prompts import chat_ids, sharegpt_prompts

log = logging.getLogger("benchmarks.gpu_check")

TIE_GAP = 0.25  # logits: a couple of bf16 rounding steps at the logit sizes of a small LM's argmax


def chi2_critical(dof: int, z: float = 3.09) -> float:
    """The upper 0.1 % point of chi-square with `dof` degrees of freedom
    (Wilson-Hilferty; z = 3.09 is the normal's 0.1 % point)."""
    a = 2.0 / (9.0 * dof)
    return dof * (1.0 - a + z * math.sqrt(a)) ** 3


def chi2(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson statistic of `counts` (V,) against `probs` (V,): cells expecting
    fewer than `min_expected` are pooled into one -> (statistic, degrees of freedom)."""
    expected = probs.double() * counts.sum()
    big = expected >= min_expected
    obs = torch.cat([counts.double()[big], counts.double()[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return stat, max(int(keep.sum()) - 1, 1)


def drafters(target: Target, settings: Settings) -> dict[str, Drafter]:
    """The drafters to check: the served kinds, eagle3 from the newest checkpoint
    (or an untrained head that always drafts K tokens)."""
    newest = checkpoints.load_newest(
        settings.checkpoint_dir, lambda path: registry.load("eagle3", path, target)
    )
    if newest is not None:
        head = newest.value
    else:
        log.warning("no eagle3 checkpoint in %s: checking an untrained head", settings.checkpoint_dir)
        cfg = eagle3.Eagle3Config.for_target(target.model.cfg, draft_vocab_size=4096)
        fresh = eagle3.Eagle3Head(cfg)
        fresh.reset_parameters(torch.Generator().manual_seed(0))
        head = eagle3.Eagle3Drafter(fresh, target.model, min_confidence=0.0)
    return {
        "ngram": NgramDrafter(settings.ngram_max, settings.ngram_min),
        "draft_model": DraftModelDrafter(target.model, settings.draft_model_layers),
        "eagle3": head,
        "hybrid": HybridDrafter(
            head, NgramDrafter(settings.ngram_max, settings.ngram_min), settings.hybrid_min_match
        ),
    }


def greedy_check(
    target: Target, kinds: dict[str, Drafter], prompts: list[list[int]], k: int, max_new: int
) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=max_new)

    def run(drafter: Drafter, kk: int) -> list[list[int]]:
        engine = Engine(target.model, drafter, target.eos_token_ids, kk)
        return [strip_eos(engine.generate(p, params), target.eos_token_ids) for p in prompts]

    ref = run(NoDrafter(), 0)
    rows = {}
    for name, drafter in kinds.items():
        outs = run(drafter, k)
        gaps = divergence_gaps(target.model, prompts, outs, ref) if outs != ref else []
        rows[name] = {
            **agreement(outs, ref),
            "divergence_logit_gaps": gaps,
            "ok": all(g <= TIE_GAP for g in gaps),
        }
    return rows


def rejection_check(device: torch.device, trials: int) -> dict:
    p1 = torch.tensor([0.05, 0.4, 0.3, 0.2, 0.05], device=device)
    q1 = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.2], device=device)
    p = torch.stack([p1, torch.full_like(p1, 0.2)])  # (K+1 = 2, V)
    gen = make_generator(0, device)
    counts = torch.zeros(5)
    for _ in range(trials):
        draft = torch.multinomial(q1, 1, generator=gen)
        n, nxt = rejection_verify(draft, q1.unsqueeze(0), p, gen)
        counts[int(draft[0]) if n else nxt] += 1
    stat, dof = chi2(counts, p1.cpu())
    return {
        "trials": trials,
        "chi2": round(stat, 2),
        "critical_0.1%": round(chi2_critical(dof), 2),
        "ok": stat < chi2_critical(dof),
    }


def sampled_check(target: Target, drafter: Drafter, prompt: list[int], k: int, runs: int) -> dict:
    engine = Engine(target.model, drafter, target.eos_token_ids, k)
    pairs = []
    for seed in range(runs):
        out = engine.generate(
            prompt, SamplingParams(temperature=1.0, max_tokens=3, seed=seed, ignore_eos=True)
        )
        pairs.append((out[0], out[1]))
    first, _ = Counter(a for a, _ in pairs).most_common(1)[0]
    seconds = [b for a, b in pairs if a == first]
    with torch.inference_mode():
        ids = torch.tensor(prompt + [first], device=target.model.device)
        logits, _, _ = target.model(ids, target.model.new_cache(len(ids)), last_only=True)
    probs = torch.softmax(logits[-1].float(), dim=-1).cpu()
    counts = torch.bincount(torch.tensor(seconds), minlength=probs.numel()).float()
    stat, dof = chi2(counts, probs)
    drafted = engine.stats.num_draft_tokens
    return {"runs": runs, "conditioned_on": first, "samples": len(seconds), "chi2": round(stat, 2), "dof": dof,
            "critical_0.1%": round(chi2_critical(dof), 2), "draft_tokens": drafted,
            "ok": stat < chi2_critical(dof) and drafted > 0}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("results/gpu/correctness.json"))
    ap.add_argument("--device", default=None, help="default: DRAFTLOOP_DEVICE (auto: CUDA when present)")
    ap.add_argument("--dtype", default=None, help="default: DRAFTLOOP_DTYPE (auto: bfloat16 on CUDA)")
    ap.add_argument("--num-prompts", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--sampled-runs", type=int, default=1000)
    ap.add_argument("--rejection-trials", type=int, default=20000)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    overrides = {key: v for key in ("device", "dtype") if (v := getattr(args, key))}
    settings = Settings(**overrides)
    target = load_target(settings)
    k = settings.num_speculative_tokens
    prompts = [chat_ids(target.tokenizer, t) for t in sharegpt_prompts("heldout", limit=args.num_prompts)]
    kinds = drafters(target, settings)
    result: dict[str, Any] = {
        "device": device_name(target.model.device),
        "dtype": str(target.model.dtype).removeprefix("torch."),
        "k": k,
    }
    checks = {
        "greedy": lambda: greedy_check(target, kinds, prompts, k, args.max_new_tokens),
        "rejection_sampling": lambda: rejection_check(target.model.device, args.rejection_trials),
        "sampled": lambda: sampled_check(target, kinds["eagle3"], prompts[0], k, args.sampled_runs),
    }
    for name, check in checks.items():  # one at a time, timed: a run cut short still shows how far it got
        t0 = time.perf_counter()
        result[name] = check()
        log.info("%s check in %.1f s: %s", name, time.perf_counter() - t0, json.dumps(result[name]))
    ok = (
        all(r["ok"] for r in result["greedy"].values())
        and result["rejection_sampling"]["ok"]
        and result["sampled"]["ok"]
    )
    result["ok"] = ok
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log.info("%s: %s", "PASS" if ok else "FAIL", json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
