"""Is a head's low served acceptance a train/serve mismatch or a weak head?

    python -m benchmarks.heldout_unroll --checkpoint DIR/eagle3/vN [--num-prompts 10] --out results/heldout_unroll.json

For held-out prompts, float32, greedy, K = 4, no stop rule and no context
vocabulary (the same head both ways):
- served: the real engine drafts with the head (`Eagle3Drafter`); τ and
  per-position acceptance as served;
- offline: the engine's own greedy output is run through the target once
  (`batched_forward`, the trainers' feature path) and the head's training
  forward (`Eagle3Head.unroll`) scores every reply anchor: top-1 agreement per
  draft step, unconditional and given the earlier steps were right, and the
  mean accepted chain (+1), an every-anchor estimate of τ.
The two agree when serving runs the math training optimises; a large gap
would be a bug. Writes the JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from service.config import Settings
from service.drafters.eagle3 import Eagle3Drafter
from service.drafters.eagle3.checkpoint import load_head
from service.engine import Engine
from service.llama import batched_forward, new_padded_cache
from service.runtime import load_target
from service.sampling import SamplingParams
from worker.prompts import chat_ids, sharegpt_prompts


def chain_stats(hits: list[list[bool]], k: int) -> dict[str, list[float] | float]:
    """Per anchor, whether draft steps 1..(≤k) were right -> top-1 per step,
    top-1 given the earlier steps were right, and 1 + the mean accepted chain."""
    n, ok, n_cond, ok_cond, chains = [0] * k, [0] * k, [0] * k, [0] * k, []
    for row in hits:
        chain = 0
        for j, hit in enumerate(row):
            n[j] += 1
            ok[j] += hit
            if chain == j:
                n_cond[j] += 1
                ok_cond[j] += hit
                chain += hit
        chains.append(chain)
    return {
        "top1": [o / m if m else 0.0 for o, m in zip(ok, n)],
        "top1_given_earlier": [o / m if m else 0.0 for o, m in zip(ok_cond, n_cond)],
        "tau_every_anchor": 1.0 + sum(chains) / max(len(chains), 1),
    }


@torch.inference_mode()
def anchor_hits(head, model, prompt: list[int], reply: list[int], k: int) -> list[list[bool]]:
    """For each reply anchor t (t >= len(prompt) - 1), whether unroll step j's argmax
    is the token at t + j + 2 (j < k, while it exists)."""
    full = torch.tensor([prompt + reply])
    k_cache, v_cache = new_padded_cache(model, 1, full.shape[1])
    _, feats = batched_forward(model, full, k_cache, v_cache, 0, torch.zeros(1, dtype=torch.long), head.cfg.hidden_layers)
    logits = head.unroll(feats, full, k)  # k x (1, T, Vd)
    preds = [head.d2t[step[0].argmax(-1)] for step in logits]  # k x (T,)
    n = full.shape[1]
    return [
        [bool(preds[j][t] == full[0, t + j + 2]) for j in range(k) if t + j + 2 < n]
        for t in range(len(prompt) - 1, n - 2)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True, help="an eagle3/vN directory")
    ap.add_argument("--num-prompts", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("results/heldout_unroll.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    target = load_target(Settings(dtype="float32"))
    head, _ = load_head(args.checkpoint, target.model, target.model_id)
    head = head.float().eval()
    drafter = Eagle3Drafter(head, target.model, context_vocab=False, min_confidence=0.0)
    engine = Engine(target.model, drafter, target.eos_token_ids, args.k)
    hits: list[list[bool]] = []
    for text in sharegpt_prompts("heldout", limit=args.num_prompts):
        prompt = chat_ids(target.tokenizer, text)
        reply = engine.generate(list(prompt), SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens))
        hits += anchor_hits(head, target.model, list(prompt), reply, args.k)
    report = {
        "checkpoint": str(args.checkpoint), "prompts": args.num_prompts, "k": args.k,
        "served": {"tau": engine.stats.tau, "per_position_acceptance": engine.stats.per_position_acceptance()[: args.k]},
        "offline": chain_stats(hits, args.k), "anchors": len(hits),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
