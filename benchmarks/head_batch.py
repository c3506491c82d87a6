"""Draft time of one engine iteration: the EAGLE-3 head's steps batched across
sequences (`service.drafting`) against each sequence drafting alone.

    python -m benchmarks.head_batch [--batches 1,4,8] [--k 4] [--iterations 12] [--threads 1]

The default model in float32 (prepacked, as served) and an untrained head that
drafts every slot (the cost does not depend on its quality). N copies of a
held-out prompt's state draft K tokens per iteration in two identical worlds,
one through `drafting.draft` (lock-step), one sequence at a time through
`propose`; then every sequence commits one accepted draft with fixed taps
(no target forward: only drafting is timed), so each iteration's catch-up has
two rows, as in steady decoding. Prints the median seconds per iteration."""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from service import drafting
from service.config import Settings
from service.drafters import eagle3
from service.engine import Engine, Sequence
from service.runtime import load_target
from service.sampling import SamplingParams


def _head(target) -> eagle3.Eagle3Drafter:
    cfg = eagle3.Eagle3Config.for_target(target.model.cfg, draft_vocab_size=8192)
    head = eagle3.Eagle3Head(cfg)
    head.reset_parameters(torch.Generator().manual_seed(0))
    head.d2t.copy_(torch.arange(cfg.draft_vocab_size))
    return eagle3.Eagle3Drafter(head, target.model, min_confidence=0.0)


def _world(target, drafter, prompt: list[int], n: int, k: int) -> tuple[list[Sequence], list[torch.Tensor]]:
    model = target.model
    cache = model.new_cache(len(prompt) + 8)
    _, _, taps = model(torch.tensor(prompt), cache, hidden_layers=drafter.hidden_layers)
    seqs = []
    for i in range(n):
        seq = Sequence(f"b{i}", list(prompt), SamplingParams(temperature=0.0), lambda _: None)
        seq.drafter, seq.capacity, seq.tokens = drafter, len(prompt) + 4096, [*prompt, 1]
        drafter.begin(seq, taps)
        seqs.append(seq)
    return seqs, [t[-(k + 1) :] for t in taps]  # stand-in verify taps: (K+1, d) each


def _commit(seqs: list[Sequence], proposals, verify_taps) -> None:
    for seq, p in zip(seqs, proposals):
        seq.tokens += [*p.tokens[:1], 2]
        seq.drafter.commit(seq, min(1, len(p.tokens)), verify_taps)


def measure(target, drafter, prompt: list[int], n: int, k: int, iterations: int) -> dict[str, float]:
    engine = Engine(target.model, drafter, set(), k)
    batched, taps = _world(target, drafter, prompt, n, k)
    alone, _ = _world(target, drafter, prompt, n, k)
    times = {"batched": [], "alone": []}
    for it in range(iterations + 1):
        t0 = time.perf_counter()
        got = [d.proposal for d in drafting.draft(engine, batched, [k] * n)]
        t1 = time.perf_counter()
        want = [s.drafter.propose(s, k, s.params, s.gen) for s in alone]
        t2 = time.perf_counter()
        assert [p.tokens for p in got] == [p.tokens for p in want]
        if it:  # the first iteration's catch-up covers the whole prompt
            times["batched"].append(t1 - t0)
            times["alone"].append(t2 - t1)
        _commit(batched, got, taps)
        _commit(alone, want, taps)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    target = load_target(Settings(dtype="float32", drafter="ngram", block_log=False))
    drafter = _head(target)
    prompt = target.tokenizer.encode(
        "Write a short story about a robot who learns to paint, in five sentences."
    )
    with torch.inference_mode():
        for n in map(int, args.batches.split(",")):
            s = measure(target, drafter, prompt, n, args.k, args.iterations)
            row = {"batch": n, "k": args.k, **{f"{name}_ms": round(1000 * v, 2) for name, v in s.items()}}
            print(json.dumps({**row, "speedup": round(s["alone"] / s["batched"], 2)}), flush=True)


if __name__ == "__main__":
    main()
