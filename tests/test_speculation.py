"""Adaptive speculation (service/speculation.py): the draft-length rule on
hand-made cost curves, and the running acceptance estimate."""

from __future__ import annotations

import pytest

from service.speculation import AcceptanceTracker, choose_lengths, curve_cost, expected_tokens


def test_expected_tokens_is_the_chain_sum() -> None:
    assert expected_tokens(0.5, 0) == 1.0
    assert expected_tokens(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)


def test_curve_cost_interpolates_and_extrapolates_upwards() -> None:
    cost = curve_cost([(1, 10.0), (5, 14.0), (16, 30.0)])
    assert cost(1) == 10.0 and cost(3) == pytest.approx(12.0) and cost(5) == 14.0
    assert cost(16) == 30.0 and cost(27) == pytest.approx(30.0 + 16.0)  # the last slope beyond
    assert curve_cost([(1, 2.0)])(4) == pytest.approx(8.0)  # one point: proportional


def test_free_rows_draft_to_the_cap_and_full_price_rows_never_draft() -> None:
    flat = curve_cost([(1, 1.0), (64, 1.0)])
    assert choose_lengths([0.3, 0.6], [4, 4], flat) == [4, 4]
    linear = curve_cost([(1, 1.0), (64, 64.0)])  # a row costs a whole step: a draft never pays
    assert choose_lengths([0.9, 0.99], [4, 4], linear) == [0, 0]


def test_one_sequence_on_a_cpu_like_curve_drafts_by_its_acceptance() -> None:
    cpu = curve_cost([(1, 1.0), (2, 1.1), (5, 1.35)])  # the 5-row verify at 1.35x a one-row step
    assert choose_lengths([0.9], [4], cpu) == [4]
    assert choose_lengths([0.05], [4], cpu) == [0]
    mid = choose_lengths([0.3], [4], cpu)[0]
    assert 0 < mid < 4


def test_a_big_batch_drafts_less_and_gives_the_drafts_to_the_best_sequences() -> None:
    cpu = curve_cost([(1, 1.0), (8, 1.5), (16, 2.5), (64, 9.0)])
    alone = choose_lengths([0.5], [4], cpu)
    batch = choose_lengths([0.5] * 16, [4] * 16, cpu)
    assert sum(batch) / 16 < alone[0]
    mixed = choose_lengths([0.9, 0.1, 0.9, 0.1], [4] * 4, cpu)
    assert mixed[0] == mixed[2] > 0 and mixed[1] == mixed[3] == 0


def test_draft_cost_and_caps_are_respected() -> None:
    flat = curve_cost([(1, 1.0), (64, 1.0)])
    assert choose_lengths([0.5, 0.5], [2, 0], flat) == [2, 0]
    assert choose_lengths([0.5], [4], flat, draft_cost=10.0) == [0]  # a draft step dearer than it yields
    assert choose_lengths([], [], flat) == []


def test_acceptance_tracker_follows_the_recent_blocks() -> None:
    t = AcceptanceTracker()
    assert t.alpha == 0.5
    for _ in range(30):
        t.observe(4, 4)  # every draft accepted
    assert t.alpha > 0.95
    for _ in range(30):
        t.observe(4, 0)  # then none
    assert t.alpha < 0.2  # the old accepts fade at DECAY per step
    before = t.alpha
    t.observe(0, 0)  # a step that drafted nothing says nothing
    assert t.alpha == before


def test_batch_widths_reach_the_largest_batched_verify() -> None:
    from service.costmodel import batch_widths

    assert batch_widths(4, 8) == [8, 16, 32, 40]
    assert batch_widths(4, 1) == []  # one sequence: the dense 1..K+1 curve is all there is
    assert batch_widths(0, 16) == [8, 16]


def test_policy_fixed_drafts_to_the_caps_and_adaptive_probes_again_after_idling() -> None:
    from service.speculation import DraftLengthPolicy

    trackers = [AcceptanceTracker(), AcceptanceTracker()]
    assert DraftLengthPolicy("fixed").lengths(trackers, [4, 2]) == [4, 2]
    assert DraftLengthPolicy("adaptive", ()).lengths(trackers, [4, 2]) == [4, 2]  # no curve: fixed
    cpu = [(1, 1.0), (2, 1.1), (5, 1.35)]
    policy = DraftLengthPolicy("adaptive", cpu)
    t = AcceptanceTracker()
    for _ in range(40):
        t.observe(4, 0)  # a drafter that is never right
    assert policy.lengths([t], [4]) == [0]
    steps = 0
    while policy.lengths([t], [4]) == [0]:  # held at 0, the estimate drifts back until it probes
        steps += 1
        assert steps < 200
    assert steps > 3
    policy.observe_draft(0.5, 1)  # drafting is dear: a cost per token the rule takes into account
    assert policy.draft_cost > 0
    with pytest.raises(ValueError):
        DraftLengthPolicy("sometimes")


def test_floors_are_kept_and_their_rows_count_in_the_others_choice() -> None:
    step = curve_cost([(1, 1.0), (5, 1.0), (6, 6.0), (64, 64.0)])  # 5 rows free, then full price
    free = choose_lengths([0.5, 0.5], [4, 4], step)
    assert sum(free) == 3  # two rows + three drafts fill the free five
    pinned = choose_lengths([0.5, 0.5], [4, 4], step, floors=[4, 0])
    # the pinned four fill the free rows; the other's draft now costs a full row:
    # K=0: 2.9375 tokens / 6 = 0.490, K=1: 3.4375 / 7 = 0.491, K=2: 3.6875 / 8 = 0.461
    assert pinned == [4, 1]


def test_held_steps_explore_a_cap_every_n_sequence_steps() -> None:
    """Drafting so dear that the rule never drafts (the soak's stuck state): without
    exploration K stays 0 for good; with explore_every=5, after 5 sequence-steps at
    K = 0 the longest-idle sequence drafts its cap (short requests explore too)."""
    from service.speculation import DraftLengthPolicy

    cpu = [(1, 1.0), (2, 1.1), (5, 1.35)]
    stuck = DraftLengthPolicy("adaptive", cpu)
    stuck.observe_draft(10.0, 1)  # one slow draft: 1 s per token, never measured again at K = 0
    t = AcceptanceTracker()
    assert all(stuck.lengths([t], [4]) == [0] for _ in range(100))
    explore = DraftLengthPolicy("adaptive", cpu, explore_every=5)
    explore.observe_draft(10.0, 1)
    a = AcceptanceTracker()
    assert [explore.lengths([a], [4])[0] for _ in range(12)] == [0, 0, 0, 0, 0, 4] * 2
    two = DraftLengthPolicy("adaptive", cpu, explore_every=4)
    two.observe_draft(10.0, 1)
    b, c, none = AcceptanceTracker(), AcceptanceTracker(), AcceptanceTracker()
    ks = [two.lengths([b, c, none], [4, 3, 0]) for _ in range(6)]
    # every 4 held sequence-steps one explores: b first (the tie), then c (idle longest by then)
    assert ks == [[0, 0, 0], [0, 0, 0], [4, 0, 0], [0, 0, 0], [0, 0, 0], [0, 3, 0]]
    assert none.held == 0  # no cap: never counted, never explores
    with pytest.raises(ValueError):
        DraftLengthPolicy("adaptive", cpu, explore_every=-1)
