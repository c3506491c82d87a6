"""benchmarks/domain_shift.py (the traffic-shift benchmark): the code-prompt
builder and HumanEval loading, the pure time-to-recover and goal functions,
and one `--quick` run of two arms (online SFT and Draft-OPD) end to end on
the real default model from a tiny SFT checkpoint."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from benchmarks.code_prompts import code_request, humaneval_prompts, stdlib_prompts, stdlib_stubs
from benchmarks.domain_shift import goals, main, merge_results, parse_args, tau_at, time_to_recover
from service import checkpoints
from service.config import Settings
from service.drafters import eagle3
from worker.train.loop import read_optimizer

from .test_online_bench import run_bench, sft_checkpoints  # noqa: F401  (the fixture: a tiny SFT checkpoint)

FAKE_MODULE = '''
import os


def documented(path: str, *, strict: bool = False) -> list[str]:
    """Split a path into its parts, checking each one when strict."""
    return path.split(os.sep)


def undocumented(x):
    return x


def _private(x):
    """A private helper with a long enough docstring to count."""
    return x


def terse(x):
    """Too short."""


class Box:
    def open(self, how="r"):
        """Open the box in the given mode and return a handle to it."""
        return how


def documented(path: str, *, strict: bool = False) -> list[str]:
    """Split a path into its parts, checking each one when strict."""
    return []
'''


def write_tree(root: Path) -> None:
    for rel in ("b.py", "a.py", "tests/test_a.py", "_private_mod.py", "pkg/test/helper.py", "pkg/site-packages/x.py"):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(FAKE_MODULE.replace("documented", rel.replace("/", "_").removesuffix(".py") + "_fn"))
    (root / "broken.py").write_text("def oops(:\n")


def test_stdlib_stubs_take_public_documented_functions_in_path_order(tmp_path: Path) -> None:
    write_tree(tmp_path)
    stubs = stdlib_stubs(tmp_path)
    # a.py before b.py; tests/, test/, site-packages and private modules skipped;
    # the duplicate definition once, the method kept, broken files passed over
    assert [s.splitlines()[0] for s in stubs] == [
        "def a_fn(path: str, *, strict: bool=False) -> list[str]:", "def open(self, how='r'):",
        "def b_fn(path: str, *, strict: bool=False) -> list[str]:",
    ]
    assert '"""Split a path into its parts, checking each one when strict."""' in stubs[0]
    assert all(s.rstrip().endswith('"""') for s in stubs)  # bodies dropped: the request is to write them
    assert stdlib_stubs(tmp_path) == stubs and stdlib_stubs(tmp_path, limit=2) == stubs[:2]


def test_stdlib_prompts_are_thousands_of_code_requests() -> None:
    prompts = stdlib_prompts()
    assert len(prompts) >= 2000 and len(set(prompts)) == len(prompts)
    head = "Write the body of this Python function.\n\n```python\n"
    assert all(p.startswith((head + "def ", head + "async def ")) and p.endswith('"""\n```') for p in prompts)
    assert not any("\ndef _" in p for p in prompts)


def test_humaneval_loads_164_prompts_in_task_order() -> None:
    prompts = humaneval_prompts()
    assert len(prompts) == 164
    assert "def has_close_elements(numbers: List[float], threshold: float) -> bool:" in prompts[0]
    assert "def sort_numbers(" in prompts[19]  # HumanEval/19: ordered by task number, not as strings (10 < 2)
    assert prompts[0] == code_request(textwrap.dedent(prompts[0].split("```python\n")[1].removesuffix("\n```")))
    assert humaneval_prompts(3) == prompts[:3]


def points(*taus: float) -> list[dict[str, float]]:
    return [{"minutes": 5.0 * i, "served_tokens": 1000 * i, "tau": t} for i, t in enumerate(taus)]


def test_time_to_recover_is_ninety_percent_of_the_final_gain() -> None:
    # start 1.2, final 1.6: the level is 1.56, first reached at minute 10
    assert time_to_recover(points(1.2, 1.4, 1.58, 1.5, 1.6)) == {"minutes": 10.0, "served_tokens": 2000, "tau_level": 1.56}
    assert time_to_recover(points(1.2, 1.6)) == {"minutes": 5.0, "served_tokens": 1000, "tau_level": 1.56}
    assert time_to_recover(points(1.3, 1.5, 1.3)) is None  # ended where it began: nothing recovered
    assert time_to_recover(points(1.3, 1.2)) is None
    assert time_to_recover(points(1.0, 1.5, 1.5), fraction=1.0)["minutes"] == 5.0


def arm(taus: tuple[float, ...], chat: tuple[float, float], published: list[dict] | None = None) -> dict:
    return {"name": "arm", "points": points(*taus), "chat_tau_start": chat[0], "rounds": [{"chat_tau_after": chat[1]}] * (len(taus) - 1), "published": published or []}


def test_goals_compare_arms_at_thirty_minutes_and_check_published_versions() -> None:
    lowering = {"humaneval_gain": 0.02, "chat_gain": -0.01, "not_lower": False}
    result = {"arms": {
        "a": arm((1.2,) * 9, (1.4, 1.4)),
        "b": arm((1.2, 1.3, 1.4, 1.4, 1.4, 1.4, 1.4, 1.4, 2.0), (1.4, 1.3)),
        "c": arm((1.2, 1.4, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5, 2.5), (1.4, 1.372), [lowering]),
    }}
    assert tau_at(result["arms"]["c"]["points"], 30.0) == 1.5 and tau_at(points(1.2), -1.0) is None
    g = goals(result)
    assert g["opd_over_static"]["value"] == 1.25 and g["opd_over_static"]["met"]  # minute 40's 2.5 is past the window
    assert g["opd_over_sft"]["value"] == round(1.5 / 1.4, 4) and g["opd_over_sft"]["met"]
    assert g["chat_drop"]["value"] == 0.02 and g["chat_drop"]["met"] and g["chat_drop"]["margin"] == 0.01
    assert g["no_lowering_published"]["value"] == 1 and g["no_lowering_published"]["met"] is False
    assert g["no_lowering_published"]["worst_gain"] == -0.01
    del result["arms"]["a"]
    assert goals(result)["opd_over_static"]["met"] is None


def part(arms: dict, **change) -> dict:
    base = {"model": "m", "device": "cpu", "dtype": "float32", "num_speculative_tokens": 4, "sft_checkpoint": "/ck/v1",
            "config": {"minutes": 15.0, "seed": 0, "arms": {a: a.upper() for a in arms}}, "arms": arms,
            "save_dir": f"/save/{''.join(arms)}", "seconds": 100.0 * len(arms)}
    return {**base, **change}


def test_merged_parts_hold_every_arm_and_the_goals_over_all_of_them(tmp_path: Path) -> None:
    a, b, c = arm((1.2,) * 4, (1.4, 1.4)), arm((1.2, 1.3, 1.3, 1.3), (1.4, 1.4)), arm((1.2, 1.5, 1.5, 1.5), (1.4, 1.4))
    merged = merge_results([part({"c": c}), part({"a": a, "b": b})])
    assert list(merged["arms"]) == ["a", "b", "c"] and list(merged["config"]["arms"]) == ["a", "b", "c"]
    assert merged["goals"]["opd_over_static"]["value"] == 1.25 and merged["goals"]["opd_over_sft"]["value"] == round(1.5 / 1.3, 4)
    assert merged["seconds"] == 200.0 and merged["seconds_per_part"] == [100.0, 200.0]  # side by side: the longest
    assert merged["save_dir"] == ["/save/c", "/save/ab"]
    with pytest.raises(ValueError, match="more than one part"):
        merge_results([part({"a": a}), part({"a": a, "c": c})])
    with pytest.raises(ValueError, match="sft_checkpoint"):
        merge_results([part({"a": a}), part({"c": c}, sft_checkpoint="/ck/v2")])
    with pytest.raises(ValueError, match="config minutes"):
        merge_results([part({"a": a}), part({"c": c}, config={"minutes": 30.0, "seed": 0, "arms": {"c": "C"}})])
    # the CLI: files in, one file and its plot out; a bad part is a clear exit, not a traceback
    paths = [tmp_path / "ab.json", tmp_path / "c.json"]
    for path, obj in zip(paths, (part({"a": a, "b": b}), part({"c": c})), strict=True):
        path.write_text(json.dumps(obj))
    out = main(["--merge", *map(str, paths), "--out", str(tmp_path / "all.json")])
    assert json.loads((tmp_path / "all.json").read_text())["goals"] == out["goals"]
    assert (tmp_path / "all.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="cannot merge"):
        main(["--merge", str(paths[0]), str(paths[0]), "--out", str(tmp_path / "x.json")])


def test_flags() -> None:
    args = parse_args(["--quick", "--arms", "c, a"])
    assert args.arms == ["c", "a"] and args.steps == 2 and args.minutes == 1.0
    assert parse_args([]).minutes == 30.0 and parse_args([]).arms == ["a", "b", "c", "d"]
    for bad in (["--arms", "a,e"], ["--steps", "0"], ["--opd", '{"nope": 1}']):
        with pytest.raises(SystemExit):
            parse_args(bad)


@pytest.mark.slow
def test_quick_run_of_online_sft_and_draft_opd(settings: Settings, sft_checkpoints: Path, tmp_path: Path) -> None:  # noqa: F811
    out, save_dir = tmp_path / "shift.json", tmp_path / "published"
    proc = run_bench(
        settings, "--quick", "--arms", "b,c", "--no-gate", "--out", str(out), "--checkpoint-dir", str(sft_checkpoints),
        "--save-dir", str(save_dir), module="benchmarks.domain_shift",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    cfg = result["config"]
    assert (cfg["rounds"], cfg["requests_per_round"], cfg["steps_per_round"], cfg["gate"]) == (2, 3, 2, False)
    assert (cfg["humaneval_prompts"], cfg["chat_heldout_prompts"], cfg["opd"]["steps"]) == (2, 2, 2)
    assert set(result["arms"]) == {"b", "c"}

    k = result["num_speculative_tokens"]
    for name, trainer in (("b", "online_sft"), ("c", "opd")):
        r = result["arms"][name]
        assert [p["minutes"] for p in r["points"]] == [0.0, 0.5, 1.0]
        tokens = [p["served_tokens"] for p in r["points"]]
        assert tokens[0] == 0 < tokens[1] < tokens[2] == sum(row["tokens"] for row in r["rounds"])
        for row in r["rounds"]:
            assert row["requests"] == 3 and 1.0 <= row["served_tau"] <= 1 + k and 1.0 <= row["humaneval_tau"] <= 1 + k
            assert row["optimizer_steps"] == 2 and row["head_tokens"] > 0  # equal steps in every trained arm
            assert row["round_seconds"] >= row["serve_seconds"] + row["train_seconds"] - 0.2  # (each rounded)
            assert row["gate"]["requests"] >= 2 and row["gate"]["publish"] == row["gate_passed"] and row["published"]
        assert [(row["served_version"], row["new_version"]) for row in r["rounds"]] == [(0, 1), (1, 2)]
        assert r["refused"] == sum(not row["gate_passed"] for row in r["rounds"])
        assert [v["version"] for v in r["published"]] == [1, 2]
        assert r["rounds"][1]["chat_tau_before"] == r["rounds"][0]["chat_tau_after"]
        folder = save_dir / name
        assert checkpoints.list_versions(folder) == [1, 2]
        for number in (1, 2):  # real checkpoints, each the child of the one before, AdamW beside it
            path = checkpoints.version_path(folder, number)
            manifest = eagle3.read_manifest(path)
            assert (manifest["trainer"], manifest["parent_version"]) == (trainer, number - 1)
            assert read_optimizer(path, manifest)
    b, c = result["arms"]["b"], result["arms"]["c"]
    assert result["goals"]["opd_over_sft"]["value"] == round(c["points"][-1]["tau"] / b["points"][-1]["tau"], 4)
    assert result["goals"]["opd_over_static"]["met"] is None  # arm a not run
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "arm b round 2/2" in proc.stderr and "arm c round 2/2" in proc.stderr
