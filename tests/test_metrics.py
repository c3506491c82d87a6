"""/metrics after known requests, parsed with prometheus_client's own text
parser: the metric names (README "Metrics"; naming rules in
docs/architecture.md, "Where to add … a metric"), consistent spec-decode
counters, and the τ they imply equal to the τ the engine measured itself
(GET /health)."""

from __future__ import annotations

import itertools
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

MODEL = "smollm2-135m-instruct"
# repetitive prompts: the ngram drafter finds matches, so drafts get accepted
PROMPTS = [
    "1, 2, 3, 4, 5, 6, 7, 8,",
    "red green blue red green blue red green blue",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):",
]
MAX_TOKENS = 12


def read_metrics(http: httpx.Client) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    text = http.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(m: dict, name: str, **labels: str) -> float:
    return m[(name, tuple(sorted(labels.items())))]


def per_position(m: dict) -> list[float]:
    name = "draftloop_spec_decode_accepted_tokens_per_position_total"
    found = {int(dict(k[1])["position"]): v for k, v in m.items() if k[0] == name}
    return [found[i] for i in range(len(found))]


@pytest.fixture(scope="module")
def http(live_server_url: str):
    with httpx.Client(base_url=live_server_url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def traffic(live_server_url: str, http: httpx.Client):
    """Known greedy requests (all run to max_tokens); metrics before and after."""
    client = openai.OpenAI(base_url=f"{live_server_url}/v1", api_key="x", max_retries=0, timeout=120)
    before = read_metrics(http)
    usages = [
        client.completions.create(
            model=MODEL, prompt=p, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True}
        ).usage
        for p in PROMPTS
    ]
    # the engine finishes its bookkeeping (request counters, gauges) just after
    # the last output reaches the client: wait for the counters to settle
    done = ("draftloop_requests_total", (("finish_reason", "length"),))
    deadline = time.monotonic() + 10
    while True:
        after = read_metrics(http)
        settled = after[done] - before.get(done, 0.0) >= len(PROMPTS)
        if (settled and value(after, "draftloop_num_requests_running") == 0) or time.monotonic() > deadline:
            return before, after, usages
        time.sleep(0.05)


def test_names_follow_the_design(traffic) -> None:
    _, after, _ = traffic
    names = {k[0] for k in after}
    for counter in (
        "spec_decode_drafts",
        "spec_decode_draft_tokens",
        "spec_decode_accepted_tokens",
        "spec_decode_accepted_tokens_per_position",
        "generation_tokens",
        "prompt_tokens",
        "requests",
        "block_records_written",
        "block_records_dropped",
        "drafter_reloads",
    ):
        assert f"draftloop_{counter}_total" in names, counter
    for histogram in (
        "spec_decode_acceptance_length",
        "request_latency_seconds",
        "time_to_first_token_seconds",
    ):
        assert f"draftloop_{histogram}_count" in names, histogram
    assert value(after, "draftloop_drafter_info", kind="ngram", version="0") == 1
    assert "draftloop_num_requests_running" in names


def test_known_requests_are_counted(traffic) -> None:
    before, after, usages = traffic

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)  # a labelled series appears with its first count

    assert delta("draftloop_generation_tokens_total") == sum(u.completion_tokens for u in usages)
    assert delta("draftloop_prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert delta("draftloop_requests_total", finish_reason="length") == len(PROMPTS)
    assert delta("draftloop_request_latency_seconds_count") == len(PROMPTS)
    assert delta("draftloop_time_to_first_token_seconds_count") == len(PROMPTS)
    assert delta("draftloop_spec_decode_drafts_total") > 0
    assert delta("draftloop_spec_decode_accepted_tokens_total") > 0  # the prompts repeat themselves
    assert value(after, "draftloop_num_requests_running") == 0


def test_spec_decode_counters_are_consistent(traffic) -> None:
    _, m, _ = traffic
    drafts = value(m, "draftloop_spec_decode_drafts_total")
    draft_tokens = value(m, "draftloop_spec_decode_draft_tokens_total")
    accepted = value(m, "draftloop_spec_decode_accepted_tokens_total")
    assert 0 <= accepted <= draft_tokens
    positions = per_position(m)
    assert all(a >= b for a, b in itertools.pairwise(positions)), positions  # non-increasing in position
    assert positions[0] <= drafts
    assert sum(positions) == accepted
    # one acceptance-length observation (accepted + 1) per verify step that drafted
    assert value(m, "draftloop_spec_decode_acceptance_length_count") == drafts
    assert value(m, "draftloop_spec_decode_acceptance_length_sum") == pytest.approx(drafts + accepted)


def test_tau_from_metrics_equals_engine_tau(traffic, http: httpx.Client) -> None:
    """1 + accepted / drafts from /metrics is the τ the engine reports in /health."""
    for _ in range(5):  # the server is idle here; retry only if a scrape raced a step
        engine = http.get("/health").json()["spec_decode"]
        m = read_metrics(http)
        if engine == http.get("/health").json()["spec_decode"]:
            break
    drafts = value(m, "draftloop_spec_decode_drafts_total")
    accepted = value(m, "draftloop_spec_decode_accepted_tokens_total")
    assert drafts == engine["num_drafts"] > 0
    assert accepted == engine["num_accepted_tokens"]
    assert value(m, "draftloop_spec_decode_draft_tokens_total") == engine["num_draft_tokens"]
    assert 1 + accepted / drafts == pytest.approx(engine["tau"], rel=1e-12)
    assert 1.0 <= engine["tau"] <= 1 + engine["num_speculative_tokens"]
