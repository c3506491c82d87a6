"""The bootstrap benchmark's report arithmetic (benchmarks/bootstrap.py): served
τ pooled per version by drafts, the ngram baseline of the first minutes, and
the drafter issue's goals over the published versions."""

from benchmarks.bootstrap import goals, ngram_baseline, per_version


def s(minute: float, tau: float | None, drafts: int, kind: str, version: str) -> dict:
    return {"minute": minute, "tau": tau, "drafts": drafts, "kind": kind, "version": version}


SAMPLES = [
    s(0.5, 1.6, 100, "ngram", "0"),
    s(1.0, 2.0, 300, "ngram", "0"),  # pooled by drafts: 1 + (60 + 300) / 400 = 1.9
    s(1.5, None, 0, "ngram", "0"),  # an idle window counts for nothing
    s(6.0, 2.1, 200, "hybrid", "1"),
    s(6.5, 2.3, 200, "hybrid", "1"),
    s(9.0, 2.6, 100, "hybrid", "2"),
]


def test_per_version_pools_windows_by_drafts_in_serving_order():
    rows = per_version(SAMPLES)
    assert [(r["kind"], r["version"]) for r in rows] == [("ngram", "0"), ("hybrid", "1"), ("hybrid", "2")]
    assert rows[0]["served_tau"] == 1.9 and rows[0]["drafts"] == 400
    assert rows[1]["served_tau"] == 2.2 and (rows[1]["from_minute"], rows[1]["to_minute"]) == (6.0, 6.5)


def test_tokens_per_step_pools_by_steps_when_sampled():
    rows = per_version([
        {**s(1.0, 2.0, 10, "ngram", "0"), "tokens_per_step": 1.2, "steps": 100},
        {**s(1.5, 2.0, 10, "ngram", "0"), "tokens_per_step": 1.5, "steps": 300},
    ])
    assert rows[0]["tokens_per_step"] == round((120 + 450) / 400, 4) and rows[0]["steps"] == 400
    assert "tokens_per_step" not in per_version(SAMPLES)[0]  # older samples had none


def test_ngram_baseline_uses_only_the_first_minutes_of_ngram():
    assert ngram_baseline(SAMPLES, minutes=5.0) == 1.9
    assert ngram_baseline(SAMPLES, minutes=0.75) == 1.6
    assert ngram_baseline([s(0.5, 1.5, 10, "hybrid", "1")]) is None


def test_goals_need_monotone_versions_and_the_ratio():
    rows = per_version(SAMPLES)
    met = goals(rows, 1.9)
    assert met["each_version_at_least_the_one_before"] is True
    assert met["last_over_ngram"] == round(2.6 / 1.9, 3) and met["goal_met"] is True
    worse = goals(per_version([*SAMPLES, s(12.0, 2.0, 500, "hybrid", "3")]), 1.9)
    assert worse["each_version_at_least_the_one_before"] is False and worse["goal_met"] is False
    assert goals(per_version(SAMPLES[:3]), 1.9)["goal_met"] is False  # nothing published: not met
