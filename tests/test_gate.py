"""The publish gate (worker/train/gate.py, worker/publish_gate.py): the paired
bootstrap and its decision on hand-made τ, the on-policy rule for Draft-OPD
blocks, and, on the real default model, that a candidate identical to the
serving drafter is not published (a tie) and that a broken head is refused
against ngram."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from service.blocklog import BlockRecord
from service.drafters.eagle3 import Eagle3Config, Eagle3Drafter, Eagle3Head
from worker.train.blocks import build_requests, on_policy
from worker.train.config import OPDConfig
from worker.train.gate import bootstrap_ci, candidate_drafter, decide, gate_prompts, run_gate

TINY_GATE = OPDConfig(gate_requests=4, gate_max_tokens=12, gate_resamples=500)


# ---- the statistics ---------------------------------------------------------------------------


def test_bootstrap_ci_is_deterministic_with_a_seed():
    diffs = np.random.default_rng(1).normal(0.1, 0.3, size=20)
    assert bootstrap_ci(diffs, 0.95, 2000, seed=3) == bootstrap_ci(diffs, 0.95, 2000, seed=3)
    low, high = bootstrap_ci(diffs, 0.95, 2000, seed=3)
    assert low < float(diffs.mean()) < high
    narrow = bootstrap_ci(diffs, 0.5, 2000, seed=3)
    assert low < narrow[0] <= narrow[1] < high
    with pytest.raises(ValueError):
        bootstrap_ci([], 0.95, 100, 0)


def test_a_tie_never_passes():
    same = [1.2, 1.5, 1.9, 1.3]
    publish, reason, low, high = decide(same, same, 0.95, 2000, 0)
    assert not publish and "tie" in reason and low == high == 0.0
    # noise around no gain: not published either
    rng = np.random.default_rng(0)
    inc = rng.uniform(1.0, 2.0, size=32)
    cand = inc + np.where(np.arange(32) % 2 == 0, 0.2, -0.2)  # half gain, half lose: mean 0
    assert not decide(inc.tolist(), cand.tolist(), 0.95, 2000, 0)[0]


def test_a_clear_gain_passes_and_a_loss_does_not():
    rng = np.random.default_rng(0)
    inc = rng.uniform(1.0, 2.0, size=16)
    gain = inc + 0.3 + rng.normal(0, 0.05, size=16)
    publish, reason, low, high = decide(inc.tolist(), gain.tolist(), 0.95, 2000, 0)
    assert publish and 0.0 < low < 0.3 < high, reason
    assert not decide(gain.tolist(), inc.tolist(), 0.95, 2000, 0)[0]
    # one lucky request is not a gain
    assert not decide([1.0], [3.0], 0.95, 2000, 0)[0]
    with pytest.raises(ValueError):
        decide([1.0, 1.0], [1.0], 0.95, 100, 0)


# ---- the on-policy rule -----------------------------------------------------------------------


@dataclass
class KindRecord(BlockRecord):
    """A block record with the drafter kind fields newer records carry."""

    drafter_kind: str | None = None
    draft_sources: str | None = None


def rec(version: str = "2", draft=(4, 6), kind: str | None = None, sources: str | None = None, position=5) -> BlockRecord:
    k = len(draft)
    fields = dict(
        request_id="a", step=1, drafter_version=version, target_model="t", temperature=0.0, position=position,
        draft_tokens=list(draft), draft_logprobs=[-0.5] * k, num_accepted=0, next_token=8,
        target_top_ids=[[4, 6, 8]] * (k + 1), target_top_logprobs=[[-0.5, -1.5, -2.5]] * (k + 1),
        target_draft_logprobs=[-0.7] * k,
    )  # fmt: skip
    if kind is None:
        return BlockRecord(**fields)
    return KindRecord(**fields, drafter_kind=kind, draft_sources=sources)


def test_only_the_heads_own_blocks_are_on_policy():
    # records without drafter_kind: the engine logs "0" for ngram and none, a name for a draft model
    assert on_policy(rec("2")) and on_policy(rec("1"))
    assert not on_policy(rec("0")) and not on_policy(rec("first-4-layers"))
    assert on_policy(rec("2", kind="eagle3"))
    assert not on_policy(rec("2", kind="ngram")) and not on_policy(rec("2", kind="draft_model"))
    assert on_policy(rec("2", kind="hybrid", sources="ee"))
    assert not on_policy(rec("2", kind="hybrid", sources="en")) and not on_policy(rec("2", kind="hybrid"))
    recs = [
        rec("2", kind="eagle3", position=5),
        rec("2", kind="ngram", position=6),  # drafted by ngram: off-policy, whatever its version says
        rec("0", position=7),  # an old ngram record
        rec("0", draft=(), kind="ngram", position=4),  # a target-only step: not off-policy (K = 0)
    ]
    reqs, stats = build_requests(recs, {"a": list(range(10, 20))}, torch.arange(10) * 2, 50, 2, "t")
    assert (stats.used, stats.off_policy, stats.empty) == (1, 2, 1)
    assert [ex.position for ex in reqs[0].examples] == [5]


# ---- the real model ---------------------------------------------------------------------------


def seeded_head(target, zero: bool = False) -> Eagle3Head:
    head = Eagle3Head(Eagle3Config.for_target(target.model.cfg, draft_vocab_size=8192))
    head.reset_parameters(torch.Generator().manual_seed(0), std=0.05)
    if zero:  # broken: every weight zero, the head proposes draft id 0 everywhere
        with torch.no_grad():
            for p in head.parameters():
                p.zero_()
    return head.attach(target.model)


def test_gate_tops_up_from_the_end_of_the_held_out_split_not_the_evaluated_start():
    from worker.prompts import eval_prompts, gate_topup_prompts, sharegpt_prompts

    gate = gate_topup_prompts(64)
    assert len(gate) == 64 and gate[0] == sharegpt_prompts("heldout", limit=100_000)[-1]
    assert not set(gate) & set(eval_prompts(None, 200))  # what every benchmark reports on


@pytest.mark.slow
def test_a_candidate_identical_to_the_incumbent_is_not_published(target):
    head = seeded_head(target)
    incumbent = Eagle3Drafter(head, target.model, version="1")
    candidate = candidate_drafter(incumbent, head, target.model)
    assert isinstance(candidate, Eagle3Drafter) and candidate.min_confidence == 0.0
    prompts = gate_prompts(target.tokenizer, [], TINY_GATE.gate_requests, 512)
    assert len(prompts) == TINY_GATE.gate_requests
    out = run_gate(target, incumbent, candidate, prompts, 4, TINY_GATE)
    assert incumbent.min_confidence == 0.0  # full-length drafts for both
    assert out.requests == 4 and out.diff == 0.0 and out.incumbent_tau == out.candidate_tau
    assert not out.publish and "tie" in out.reason, out


@pytest.mark.slow
def test_a_broken_head_is_refused_against_ngram(target, settings):
    from worker.publish_gate import publish_decision

    served = [gate_prompts(target.tokenizer, [], 1, 512)[0]]  # one "served" prompt, topped up to 4
    out = publish_decision(None, settings, target, seeded_head(target, zero=True), served, TINY_GATE)  # type: ignore[arg-type]
    assert out.incumbent.startswith("ngram") and out.candidate.startswith("eagle3")
    assert out.requests == 4 and out.k == settings.num_speculative_tokens
    assert not out.publish and out.candidate_tau <= out.incumbent_tau, out
    assert out.as_dict()["low"] is not None


def test_a_staged_checkpoint_is_invisible_until_unstaged(tmp_path):
    from service import checkpoints
    from worker.publish_gate import stage, unstage

    path = checkpoints.save_version(tmp_path, "eagle3", lambda tmp: {"kind": "eagle3"})
    staged = stage(path, tmp_path)
    assert checkpoints.list_versions(tmp_path) == [] and staged.parent.name == "unpublished"
    assert unstage(staged, path) == path and checkpoints.list_versions(tmp_path) == [1]


def test_only_the_newest_refused_candidates_are_kept(tmp_path):
    import os

    from worker.publish_gate import prune_refused

    for i in range(5):
        d = tmp_path / f"eagle3-v{i}-stamp"
        d.mkdir()
        os.utime(d, ns=(i * 10**9, i * 10**9))
    prune_refused(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eagle3-v3-stamp", "eagle3-v4-stamp"]
