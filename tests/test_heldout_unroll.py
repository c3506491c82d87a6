"""The pure part of benchmarks.heldout_unroll: per-step and chained top-1."""

from benchmarks.heldout_unroll import chain_stats


def test_chain_stats_counts_steps_and_chains() -> None:
    hits = [[True, True, False], [True, False, True], [False, True, True], [True]]  # the last anchor: 1 step left
    out = chain_stats(hits, 3)
    assert out["top1"] == [3 / 4, 2 / 3, 2 / 3]
    # step 2 counts where step 1 was right and a step 2 exists (2 anchors, 1 hit); step 3 where 1 and 2 were (1, 0)
    assert out["top1_given_earlier"] == [3 / 4, 1 / 2, 0.0]
    assert out["tau_every_anchor"] == 1.0 + (2 + 1 + 0 + 1) / 4
