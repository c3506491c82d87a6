"""The self-improving loop in one process: does Draft-OPD on served traffic
lift the SFT drafter's acceptance on prompts it never saw?

    python -m benchmarks.online --out results/online.json [--prompts FILE.jsonl] [--quick]

From the newest SFT EAGLE-3 checkpoint (`draftloop train-sft`), each round:
1. serve `--prompts-per-round` training-split prompts with the current drafter
   through the real engine (speculative decoding, sampled at `--temperature`,
   a fixed seed per request), with `worker.train.rollouts.BlockCollector` as the block
   sink: exactly the records the Redis block log keeps in serving;
2. `worker.train.opd.opd_update` on that round's blocks, as the worker's
   `opd_update` task runs it (held-out requests by hash gate the update);
3. publish (`save_checkpoint`, then load it back as the server would) only when
   the gate passes, like the worker; otherwise the old version keeps serving;
4. after each published version, greedy τ and tokens/s on the held-out prompts
   (or `--prompts`) against target-only decoding, with
   `benchmarks.speedup.measure` (methods interleaved, median of `--repeats`).
Version 0 is the SFT drafter, measured first. Each round trains on its own
blocks only, as the worker acks what it used.

Traffic prompts are the training split after the first N that SFT trained on
(N from the SFT checkpoint's manifest), so OPD sees prompts SFT did not; the
held-out split is never trained on by either. Everything is seeded: the same
checkpoint and settings give the same blocks and τ (tokens/s varies with the
machine). OPD settings: `OPDConfig` with `OPD_DEFAULTS` (smaller batches, more
epochs: a round has fewer blocks than a worker run), then DRAFTLOOP_OPD_TRAIN,
then `--opd '{"epochs": 3}'`. Published versions go to `--save-dir` (default
`<checkpoint-dir>/online/<UTC time>/eagle3/v{N}`), never where servers look.

Writes the JSON (`versions`: version, blocks_trained, tau,
speedup_vs_target_only, ...; `rounds`: every update, published or not; the
goal, τ on held-out prompts >= 1.10 x the SFT drafter's, and whether it is
met) and a plot of τ per version next to it (`.png`).

Run times (full and `--quick`, float32 and bfloat16) are in docs/results.md."""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.speedup import EngineMethod, device_name, measure
from service import checkpoints
from service.config import Settings
from service.drafters import eagle3
from service.drafters.none import NoDrafter
from worker.prompts import chat_ids, eval_prompts, sharegpt_exchanges, sharegpt_prompts
from service.runtime import Target, load_target
from service.sampling import SamplingParams
from worker.train.config import OPDConfig, validate_overrides
from worker.train.loop import read_optimizer
from worker.train.opd import UpdateResult, opd_update, save_update
from worker.train.rollouts import BlockCollector, serve_for_blocks

log = logging.getLogger("benchmarks.online")

GOAL_RATIO = 1.10  # held-out τ of the final version over the SFT drafter's
# A round here has far fewer blocks than a worker run takes: smaller batches and
# more epochs give the update enough optimizer steps to move (why these two
# values: docs/results.md, "Figures formerly in code comments").
OPD_DEFAULTS: dict[str, Any] = {"batch_tokens": 512, "epochs": 4}


@dataclass
class Version:
    """A drafter the benchmark served: the SFT one (0) or a published update."""

    number: int
    path: Path
    blocks_trained: int  # blocks of all the updates from SFT up to this version
    round: int | None  # the round that published it


# ---------------------------------------------------------------------------
# drafters and prompts


def newest_sft(checkpoint_dir: Path, target: Target) -> tuple[Path, dict[str, Any]]:
    """The newest eagle3 checkpoint trained by SFT that loads for `target`."""
    for number in reversed(checkpoints.list_versions(checkpoint_dir)):
        path = checkpoints.version_path(checkpoint_dir, number)
        try:
            manifest = eagle3.read_manifest(path)
            if manifest.get("trainer") == "sft":
                eagle3.load_head(path, target.model, target.model_id)  # validates it for this target
                return path, manifest
        except eagle3.CheckpointError as exc:
            log.warning("skipping eagle3 v%d: %s", number, exc)
    raise SystemExit(
        f"no SFT eagle3 checkpoint for {target.model_id} in {checkpoint_dir}: "
        "run `draftloop train-sft` first (or pass --checkpoint-dir)"
    )


def sft_prompt_count(manifest: dict[str, Any]) -> int:
    """How many leading training-split prompts the SFT run used: its trajectory
    prompts, and the prompts of its teacher-forced exchanges (the first
    `num_exchanges` prompts that have a usable reply)."""
    cfg = (manifest.get("sft") or {}).get("config") or {}
    used = int(cfg.get("num_prompts") or 0)
    n_ex = int(cfg.get("num_exchanges") or 0)
    if n_ex:
        exchanges = sharegpt_exchanges("train", limit=n_ex)
        if exchanges:
            order = sharegpt_prompts("train", limit=100_000)
            used = max(used, order.index(exchanges[-1][0]) + 1)
    return used


def traffic_prompts(target: Target, skip: int, count: int) -> list[list[int]]:
    texts = sharegpt_prompts("train", limit=skip + count)[skip:]
    if len(texts) < count:
        raise SystemExit(f"the training split has {skip + len(texts)} prompts; {skip} + {count} asked for")
    return [chat_ids(target.tokenizer, t) for t in texts]


def drafter_for(version: Version, target: Target) -> eagle3.Eagle3Drafter:
    """The version's checkpoint loaded as a server loads it (sha256 and shapes
    checked), numbered as this benchmark numbers versions."""
    head, manifest = eagle3.load_head(version.path, target.model, target.model_id)
    return eagle3.Eagle3Drafter(head, target.model, version=str(version.number), manifest=manifest)


# ---------------------------------------------------------------------------
# one round


def serve(
    target: Target, version: Version, prompts: list[list[int]], k: int, params: SamplingParams, first_seed: int,
    tag: str, greedy_eval: bool = True,
) -> tuple[BlockCollector, dict[str, Any]]:
    """Serve `prompts` with the version's drafter (request i seeded first_seed + i),
    collecting every verify block as the block log would; with `greedy_eval`
    (the evaluation is greedy) as `serve_for_blocks` rolls out for it."""
    collector, stats = serve_for_blocks(
        target, drafter_for(version, target), k, prompts, params, first_seed, tag, greedy_eval=greedy_eval
    )
    stats["served_tau"], stats["serve_seconds"] = stats.pop("tau"), stats.pop("seconds")
    return collector, stats


def update(target: Target, version: Version, blocks: BlockCollector, cfg: OPDConfig) -> UpdateResult:
    """One Draft-OPD update of the version on the blocks it served (the core of
    worker.update.run_update), AdamW resumed from the version's optimizer state as the worker does."""
    head, manifest = eagle3.load_head(version.path, target.model, target.model_id)  # float32, as the worker trains it
    model, model_id = target.model, target.model_id
    state = read_optimizer(Path(version.path), manifest) if cfg.carry_optimizer else None
    return opd_update(head, model, blocks.records, blocks.contexts, version.number, model_id, cfg, optimizer_state=state)


def publish(
    result: UpdateResult, parent: Version, save_dir: Path, target: Target, cfg: OPDConfig, round_no: int,
    benchmark: str = "online",
) -> Version:
    """Write the updated head as the next checkpoint, with the worker's manifest fields."""
    path = save_update(result, save_dir, target.model_id, parent.number, {"config": asdict(cfg), "benchmark": benchmark, "round": round_no})
    return Version(parent.number + 1, path, parent.blocks_trained + result.train_blocks, round_no)


def round_row(
    round_no: int, served: Version, stats: dict[str, Any], result: UpdateResult, new: Version | None,
    seconds: float,
) -> dict[str, Any]:
    losses = [h["loss"] for h in result.train.history]
    return {
        "round": round_no,
        "served_version": served.number,
        **stats,
        "train_blocks": result.train_blocks,
        "heldout_blocks": result.after.blocks,
        "gate_tau_before": _r(result.before.tau),  # E[τ] on the round's held-out blocks (the publish gate)
        "gate_tau_after": _r(result.after.tau),
        "loss_first": _r(losses[0]) if losses else None,
        "loss_last": _r(losses[-1]) if losses else None,
        "optimizer_steps": result.train.steps,
        "published": new is not None,
        "new_version": new.number if new else None,
        "update_seconds": round(seconds, 1),
    }


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


# ---------------------------------------------------------------------------
# evaluation


class Evaluator:
    """Greedy τ and tokens/s of a version on the evaluation prompts, against
    target-only decoding measured in the same interleaved run."""

    def __init__(self, target: Target, prompts: list[list[int]], k: int, max_new: int, repeats: int):
        self.target, self.prompts, self.k, self.max_new, self.repeats = target, prompts, k, max_new, repeats
        self.target_only = EngineMethod("target_only", target, NoDrafter(), 0)

    def __call__(self, version: Version) -> dict[str, Any]:
        method = EngineMethod(f"v{version.number}", self.target, drafter_for(version, self.target), self.k)
        base, row = measure([self.target_only, method], self.prompts, self.max_new, self.repeats, log.debug)
        return {
            "version": version.number,
            "blocks_trained": version.blocks_trained,
            "tau": row["tau"],
            "speedup_vs_target_only": row["speedup_vs_target_only"],
            "tokens_per_s": row["tokens_per_s"],
            "target_only_tokens_per_s": base["tokens_per_s"],
            "per_position_acceptance": row.get("per_position_acceptance"),
            "round": version.round,
            "checkpoint": str(version.path),
        }


def goal(versions: list[dict[str, Any]]) -> dict[str, Any]:
    """The loop's result is the version it ends on; the goal is on that one."""
    sft, final = versions[0]["tau"], versions[-1]["tau"]
    return {
        "description": f"held-out greedy tau of the final version >= {GOAL_RATIO:.2f} x the SFT drafter's",
        "sft_tau": sft,
        "target_tau": round(GOAL_RATIO * sft, 4),
        "final_tau": final,
        "best_tau": max(v["tau"] for v in versions),
        "gain": round(final / sft - 1, 4),
        "met": final >= GOAL_RATIO * sft,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    vs = result["versions"]
    x = [v["version"] for v in vs]
    fig, (ax_tau, ax_speed) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_tau.plot(x, [v["tau"] for v in vs], "o-", label="held-out greedy τ")
    ax_tau.axhline(result["goal"]["sft_tau"], ls="--", c="gray", label="SFT drafter (v0)")
    ax_tau.axhline(result["goal"]["target_tau"], ls=":", c="tab:green", label=f"goal: {GOAL_RATIO:.2f} × SFT")
    for v in vs:
        ax_tau.annotate(
            f"{v['blocks_trained']} blocks", (v["version"], v["tau"]),
            textcoords="offset points", xytext=(0, 7), ha="center", fontsize=7,
        )
    ax_tau.set(xlabel="published drafter version", ylabel="acceptance length τ", title="Draft-OPD on served traffic")
    ax_tau.legend(fontsize=8)
    ax_speed.plot(x, [v["speedup_vs_target_only"] for v in vs], "o-", c="tab:orange")
    ax_speed.axhline(1.0, ls="--", c="gray")
    title = f"{result['model']}, {result['dtype']}, {result['device']}"
    ax_speed.set(xlabel="published drafter version", ylabel="speedup vs target-only", title=title)
    for ax in (ax_tau, ax_speed):
        ax.set_xticks(x)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------
# the loop


DEFAULTS = dict(rounds=5, prompts_per_round=24, max_new_tokens=64, eval_prompts=8, eval_max_new_tokens=64, repeats=1)
QUICK = dict(rounds=2, prompts_per_round=3, max_new_tokens=16, eval_prompts=2, eval_max_new_tokens=12, repeats=1)


@dataclass
class Setup:
    target: Target
    k: int
    sft_path: Path
    sft_manifest: dict[str, Any]
    save_dir: Path
    cfg: OPDConfig
    skip: int  # training-split prompts SFT used; traffic starts after them
    traffic: list[list[int]]
    eval_prompts: list[list[int]]


@dataclass
class Start:
    """What a loop benchmark starts from (`start`)."""

    settings: Settings
    target: Target
    sft_path: Path
    sft_manifest: dict[str, Any]
    save_dir: Path


def start(args: argparse.Namespace, name: str) -> Start:
    """The target (--dtype), the newest SFT checkpoint in --checkpoint-dir, and
    where published versions go: --save-dir, or <checkpoint-dir>/<name>/<UTC time>."""
    settings = Settings(**({"dtype": args.dtype} if args.dtype else {}))
    target = load_target(settings)
    checkpoint_dir = Path(args.checkpoint_dir or settings.checkpoint_dir)
    sft_path, manifest = newest_sft(checkpoint_dir, target)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Start(settings, target, sft_path, manifest, args.save_dir or checkpoint_dir / name / stamp)


def prepare(args: argparse.Namespace) -> Setup:
    s = start(args, "online")
    settings, target = s.settings, s.target
    skip = sft_prompt_count(s.sft_manifest)
    return Setup(
        target=target,
        k=args.num_speculative_tokens or settings.num_speculative_tokens,
        sft_path=s.sft_path,
        sft_manifest=s.sft_manifest,
        save_dir=s.save_dir,
        cfg=OPDConfig(**{**OPD_DEFAULTS, **settings.opd_train, **args.opd}),
        skip=skip,
        traffic=traffic_prompts(target, skip, args.rounds * args.prompts_per_round),
        eval_prompts=[chat_ids(target.tokenizer, t) for t in eval_prompts(args.prompts, args.eval_prompts)],
    )


def run_rounds(args: argparse.Namespace, st: Setup) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """v0 measured, then serve -> update -> (publish -> measure) per round
    -> (versions, rounds)."""
    evaluate = Evaluator(st.target, st.eval_prompts, st.k, args.eval_max_new_tokens, args.repeats)
    current = Version(0, st.sft_path, 0, None)
    versions = [evaluate(current)]
    sft_tau = versions[0]["tau"]
    log.info("v0 (SFT): held-out τ %.3f, %.2fx target-only", sft_tau, versions[0]["speedup_vs_target_only"])
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_new_tokens)
    rounds: list[dict[str, Any]] = []
    n = args.prompts_per_round
    for r in range(1, args.rounds + 1):
        lo = (r - 1) * n
        prompts = st.traffic[lo : lo + n]
        blocks, stats = serve(
            st.target, current, prompts, st.k, params, args.seed + lo, f"round{r}", not args.served_rollouts
        )
        t0 = time.perf_counter()
        result = update(st.target, current, blocks, st.cfg)
        ok = result.train_blocks > 0 and (result.offline_not_worse or args.no_gate)
        new = publish(result, current, st.save_dir, st.target, st.cfg, r) if ok else None
        rounds.append(round_row(r, current, stats, result, new, time.perf_counter() - t0))
        log.info(
            "round %d/%d: v%d served %d requests, %d blocks, τ %.3f (T=%g) | OPD %d steps: gate %s -> %s, %s",
            r, args.rounds, current.number, stats["requests"], stats["blocks"], stats["served_tau"],
            args.temperature,
            result.train.steps, rounds[-1]["gate_tau_before"], rounds[-1]["gate_tau_after"],
            f"published v{new.number}" if new else "not published",
        )
        if new is not None:
            current = new
            v = evaluate(current)
            versions.append(v)
            log.info(
                "v%d: held-out τ %.3f (%+.1f%% vs SFT), %.2fx target-only",
                v["version"], v["tau"], 100 * (v["tau"] / sft_tau - 1), v["speedup_vs_target_only"],
            )
    return versions, rounds


def report(
    args: argparse.Namespace, st: Setup, versions: list[dict], rounds: list[dict], seconds: float
) -> dict[str, Any]:
    m = st.sft_manifest
    return {
        "model": st.target.name,
        "device": device_name(st.target.model.device),
        "dtype": str(st.target.model.dtype).removeprefix("torch."),
        "num_speculative_tokens": st.k,
        "config": {
            "rounds": args.rounds,
            "prompts_per_round": args.prompts_per_round,
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "seed": args.seed,
            "traffic_prompts": f"sharegpt train[{st.skip}:{st.skip + len(st.traffic)}]",
            "eval_prompts": str(args.prompts) if args.prompts else f"sharegpt heldout[:{len(st.eval_prompts)}]",
            "num_eval_prompts": len(st.eval_prompts),
            "eval_max_new_tokens": args.eval_max_new_tokens,
            "repeats": args.repeats,
            "gate": not args.no_gate,
            "opd": asdict(st.cfg),
        },
        "sft": {"checkpoint": str(st.sft_path), "version": m.get("version"), "trained_on": m.get("trained_on")},
        "sft_tau": versions[0]["tau"],
        "versions": versions,
        "rounds": rounds,
        "goal": goal(versions),
        "save_dir": str(st.save_dir),
        "seconds": round(seconds, 1),
    }


# ---------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = ap.add_argument
    add("--out", type=Path, default=Path("results/online.json"), help="the plot goes next to it (.png)")
    add("--prompts", type=Path, help='JSONL of {"prompt": ...} to evaluate on; default: the held-out split')
    add("--rounds", type=int, help=f"serve + update rounds (default {DEFAULTS['rounds']})")
    add("--prompts-per-round", type=int, help=f"requests served per round (default {DEFAULTS['prompts_per_round']})")
    add("--max-new-tokens", type=int, help=f"per served request (default {DEFAULTS['max_new_tokens']})")
    add("--temperature", type=float, default=1.0, help="of the served traffic with --served-rollouts (evaluation is greedy)")
    add("--served-rollouts", action="store_true",
        help="roll out as served (--temperature, the drafter's confidence stop); default: as the greedy evaluation decodes")
    add("--eval-prompts", type=int, help=f"evaluation prompts (default {DEFAULTS['eval_prompts']})")
    add("--eval-max-new-tokens", type=int, help=f"per evaluation prompt (default {DEFAULTS['eval_max_new_tokens']})")
    add("--repeats", type=int, help="timed repetitions per evaluation; tokens/s is their median (default 1)")
    add("-k", "--num-speculative-tokens", type=int, help="default: DRAFTLOOP_NUM_SPECULATIVE_TOKENS")
    add("--dtype", choices=["float32", "bfloat16"], help="target weights; default: DRAFTLOOP_DTYPE")
    add("--opd", default="", help='JSON object of OPDConfig overrides, e.g. \'{"epochs": 3}\'')
    add("--no-gate", action="store_true", help="publish every update, even one the gate refuses (ablation)")
    add("--seed", type=int, default=0, help="of the served requests")
    add("--checkpoint-dir", type=Path, help="where the SFT checkpoint is; default: DRAFTLOOP_CHECKPOINT_DIR")
    add("--save-dir", type=Path, help="where published versions go; default: <checkpoint-dir>/online/<UTC time>")
    add("--quick", action="store_true", help="tiny, for tests: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    return settle_args(ap, ap.parse_args(argv), QUICK, DEFAULTS)


def settle_args(
    ap: argparse.ArgumentParser, args: argparse.Namespace, quick: dict[str, Any], defaults: dict[str, Any]
) -> argparse.Namespace:
    """Unset sizes from `quick` (with --quick) or `defaults`, and --opd checked
    against OPDConfig: what the loop benchmarks' flags share."""
    for key, value in (quick if args.quick else defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.opd = validate_overrides("--opd", args.opd, OPDConfig)
    except ValueError as exc:
        ap.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    t0 = time.perf_counter()
    st = prepare(args)
    log.info(
        "SFT drafter %s; traffic: train split [%d:%d] at temperature %g; OPD %s",
        st.sft_path, st.skip, st.skip + len(st.traffic), args.temperature, asdict(st.cfg),
    )
    versions, rounds = run_rounds(args, st)
    out = report(args, st, versions, rounds, time.perf_counter() - t0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    plot(out, args.out.with_suffix(".png"))
    g = out["goal"]
    log.info(
        "final v%d: τ %.3f vs SFT %.3f (%+.1f%%): goal %s; wrote %s and its .png",
        versions[-1]["version"], g["final_tau"], g["sft_tau"], 100 * g["gain"], "met" if g["met"] else "not met",
        args.out,
    )
    return out


if __name__ == "__main__":
    main()
