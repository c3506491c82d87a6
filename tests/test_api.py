"""The HTTP API against a real `draftloop serve` process, through the official
`openai` client (and httpx where the raw bytes matter): prompts of every
shape, sampling parameters, stop strings, logprobs / echo, streaming, errors
in the OpenAI format, concurrency and disconnects."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from .conftest import metric

PROMPT = "The three primary colors are"
COUNTING = "1, 2, 3, 4, 5,"
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def client(live_server_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server_url}/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(live_server_url: str):
    with httpx.Client(base_url=live_server_url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from tokenizers import Tokenizer  # the model's own tokenizer.json, without importing transformers

    return Tokenizer.from_file(str(default_model_dir / "tokenizer.json"))


def greedy(client: openai.OpenAI, prompt, max_tokens: int = 8, **kw):
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)


# ---- basics ----------------------------------------------------------------------


def test_models_and_health(client: openai.OpenAI, http: httpx.Client) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = http.get("/health")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok" and body["model"] == MODEL
    assert body["drafter"]["kind"] == "ngram"
    assert {"tau", "num_drafts", "num_accepted_tokens"} <= set(body["spec_decode"])


def test_string_prompt_greedy_is_deterministic(client: openai.OpenAI) -> None:
    a = greedy(client, PROMPT)
    b = greedy(client, PROMPT)
    assert a.object == "text_completion" and a.id.startswith("cmpl-") and a.model == MODEL
    assert a.system_fingerprint == "draftloop-ngram-0"
    assert a.choices[0].text == b.choices[0].text and a.choices[0].text
    assert a.choices[0].finish_reason in ("length", "stop")
    assert a.usage.completion_tokens <= 8
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens


def test_max_tokens_and_length(client: openai.OpenAI) -> None:
    r = greedy(client, PROMPT, max_tokens=3, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3
    assert r.choices[0].finish_reason == "length"


def test_list_of_strings_prompt(client: openai.OpenAI) -> None:
    both = greedy(client, [PROMPT, COUNTING], max_tokens=6)
    assert [c.index for c in both.choices] == [0, 1]
    for choice, single in zip(both.choices, (PROMPT, COUNTING)):
        assert choice.text == greedy(client, single, max_tokens=6).choices[0].text


def test_token_id_prompts(client: openai.OpenAI, tokenizer) -> None:
    ids = tokenizer.encode(COUNTING).ids
    text = greedy(client, COUNTING, max_tokens=6).choices[0].text
    one = greedy(client, ids, max_tokens=6)
    assert one.choices[0].text == text
    assert one.usage.prompt_tokens == len(ids)
    many = greedy(client, [ids, ids], max_tokens=6)
    assert [c.text for c in many.choices] == [text, text]


def test_seed_reproducible_at_temperature_1(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=seed)
        return r.choices[0].text

    assert sample(1234) == sample(1234)
    assert len({sample(s) for s in (1, 2, 3)}) > 1  # the seed matters


def test_top_p_and_top_k_accepted(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0.8, top_p=0.9, seed=7, extra_body={"top_k": 20}
    )
    assert r.choices[0].text
    # top_k=1 is greedy whatever the temperature
    k1 = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=3, extra_body={"top_k": 1}
    )
    assert k1.choices[0].text == greedy(client, PROMPT, max_tokens=6).choices[0].text


def test_n_choices_use_seed_plus_index(client: openai.OpenAI) -> None:
    kw = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": 1.0}
    two = client.completions.create(n=2, seed=40, **kw)
    assert [c.index for c in two.choices] == [0, 1]
    singles = [client.completions.create(seed=s, **kw) for s in (40, 41)]
    assert [c.text for c in two.choices] == [r.choices[0].text for r in singles]
    assert two.usage.completion_tokens == sum(r.usage.completion_tokens for r in singles)
    assert two.usage.prompt_tokens == singles[0].usage.prompt_tokens  # the prompt counts once


# ---- stop strings ----------------------------------------------------------------------


def test_stop_string_cuts_text_and_finishes_with_stop(client: openai.OpenAI, http: httpx.Client) -> None:
    full = greedy(client, COUNTING, max_tokens=16, extra_body={"ignore_eos": True}).choices[0].text
    cut = full.index(",", 3)  # a stop string in the middle of the output
    stop = full[cut : cut + 2]
    expected = full[: full.index(stop)]
    r = greedy(client, COUNTING, max_tokens=16, stop=[stop, "never appears"])
    assert r.choices[0].text == expected
    assert stop not in r.choices[0].text
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 16  # generation stopped early
    # streaming: same text, stop text never sent
    events = sse_events(http, {"prompt": COUNTING, "max_tokens": 16, "temperature": 0, "stop": stop})
    chunks = [e for e in events if e != "[DONE]"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


# ---- logprobs and echo ----------------------------------------------------------------------


@pytest.mark.parametrize("n_top", [0, 2, 5])
def test_logprobs(client: openai.OpenAI, n_top: int) -> None:
    r = greedy(client, PROMPT, max_tokens=5, logprobs=n_top, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(v <= 0 for v in lp.token_logprobs)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert max(n_top, 1) <= len(top) <= n_top + 1
        assert top[tok] == pytest.approx(value)
        assert value == pytest.approx(max(top.values()))  # greedy: the chosen token is the most likely


def test_echo_with_logprobs(client: openai.OpenAI) -> None:
    r = greedy(client, PROMPT, max_tokens=3, echo=True, logprobs=1, extra_body={"ignore_eos": True})
    text, lp = r.choices[0].text, r.choices[0].logprobs
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)
    assert len(lp.tokens) == r.usage.prompt_tokens + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == text
    echo_only = greedy(client, PROMPT, max_tokens=3, echo=True)
    assert echo_only.choices[0].text == text and echo_only.choices[0].logprobs is None
    # a one-token prompt has no prompt logprob to score
    one_token = greedy(client, "Hello", max_tokens=2, echo=True, logprobs=2, n=2)
    assert all(c.logprobs.token_logprobs[0] is None and c.text.startswith("Hello") for c in one_token.choices)


# ---- streaming ----------------------------------------------------------------------


def sse_events(http: httpx.Client, body: dict) -> list:
    """The decoded `data:` payloads of a streamed completion ("[DONE]" kept as is)."""
    events = []
    with http.stream("POST", "/v1/completions", json={"model": MODEL, "stream": True, **body}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    for block in raw.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_stream_raw_sse_with_usage(client: openai.OpenAI, http: httpx.Client) -> None:
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream_options": {"include_usage": True}}
    events = sse_events(http, body)
    assert events[-1] == "[DONE]"
    usage_chunk, chunks = events[-2], events[:-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] > 0
    assert all(c["usage"] is None and c["object"] == "text_completion" for c in chunks)
    assert len({c["id"] for c in events[:-1]}) == 1
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == greedy(client, PROMPT, max_tokens=8).choices[0].text
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_stream_with_openai_client(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model=MODEL,
        prompt=COUNTING,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == greedy(client, COUNTING, max_tokens=8).choices[0].text
    assert (
        chunks[-1].usage.completion_tokens == greedy(client, COUNTING, max_tokens=8).usage.completion_tokens
    )


def test_stream_does_not_split_utf8(client: openai.OpenAI, http: httpx.Client) -> None:
    """An emoji is 4 byte-level tokens: chunks hold the text back until the
    character is complete, so none carries U+FFFD."""
    prompt = "Emoji party: \U0001f389\U0001f389"
    events = sse_events(http, {"prompt": prompt, "max_tokens": 12, "temperature": 0})
    texts = [e["choices"][0]["text"] for e in events if e != "[DONE]"]
    assert "\U0001f389" in "".join(texts)  # the model continues with emoji (greedy, deterministic)
    assert all("\ufffd" not in t for t in texts[:-1])  # the last may end mid-character at max_tokens
    assert "".join(texts) == greedy(client, prompt, max_tokens=12).choices[0].text


# ---- errors ----------------------------------------------------------------------

BAD_REQUESTS = [
    ({"prompt": 123}, 400, "prompt"),
    ({"prompt": ["a", 1]}, 400, "prompt"),
    ({"prompt": "a", "max_tokens": "5"}, 400, "max_tokens"),
    ({"prompt": "a", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "a", "stream": "yes"}, 400, "stream"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [[]]}, 400, "prompt"),
    ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "a", "max_tokens": -3}, 400, "max_tokens"),
    ({"prompt": "a", "max_tokens": 5000}, 400, "max_tokens"),
    ({"prompt": "word " * 3000, "max_tokens": 4}, 400, "prompt"),
    ({"prompt": [1, 2, 10**9]}, 400, "prompt"),
    ({"prompt": "a", "temperature": -0.5}, 400, "temperature"),
    ({"prompt": "a", "top_p": 0}, 400, "top_p"),
    ({"prompt": "a", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "a", "logprobs": 6}, 400, "logprobs"),
    ({"prompt": "a", "n": 0}, 400, "n"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "a", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"prompt": "a", "frequency_penalty": -3}, 400, "frequency_penalty"),
    ({"prompt": "a", "logit_bias": {"49152": 1}}, 400, "logit_bias"),
    ({"prompt": "a", "logit_bias": {"-1": 1}}, 400, "logit_bias"),
    ({"prompt": "a", "no_such_param": 1}, 400, "no_such_param"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": "a", "model": "gpt-4o"}, 404, "model"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD_REQUESTS)
def test_bad_request_gets_openai_error(http: httpx.Client, body: dict, status: int, param: str) -> None:
    r = http.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("content", "param"),
    [
        (b'{"prompt": "\\ud800 lone surrogate"}', "prompt"),
        (b'{"prompt": "a", "stop": "\\udc00"}', "stop"),
        (b'{"prompt": "a", "model": "\\ud800"}', "model"),
        (b'{"prompt": "a", "temperature": NaN}', "temperature"),
        (b'{"prompt": "a", "top_p": Infinity}', "top_p"),
    ],
)
def test_json_the_tokenizer_cannot_take_is_400(http: httpx.Client, content: bytes, param: str) -> None:
    r = http.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_tiny_temperature_is_greedy(client: openai.OpenAI) -> None:
    tiny = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1e-300, top_p=1e-300
    )
    assert tiny.choices[0].text == greedy(client, PROMPT, max_tokens=6).choices[0].text


def test_unknown_model_is_404_model_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=1)
    assert exc.value.status_code == 404
    assert exc.value.body["code"] == "model_not_found" and exc.value.body["param"] == "model"


def test_client_sees_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=1, logprobs=6)
    assert exc.value.body["param"] == "logprobs"


@pytest.mark.parametrize(
    "content",
    [b"this is not json", b'{"prompt": "a",', b"[1, 2]", b"", "\udcff".encode("utf-8", "surrogatepass")],
)
def test_body_not_json_is_400(http: httpx.Client, content: bytes) -> None:
    r = http.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_body_too_large_is_413(http: httpx.Client) -> None:
    big = json.dumps({"prompt": "a" * 1_100_000}).encode()
    r = http.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: caught while reading
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    r = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_unknown_route_and_method(http: httpx.Client) -> None:
    r = http.get("/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    r = http.get("/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


# ---- concurrency ----------------------------------------------------------------------


def test_concurrent_requests_are_served_unmixed(client: openai.OpenAI) -> None:
    prompts = [
        "The capital of France is",
        "def fibonacci(n):",
        COUNTING,
        "Once upon a time",
        "Water boils at",
        "My favourite fruit is",
    ]
    sequential = [greedy(client, p, max_tokens=8).choices[0].text for p in prompts]
    assert len(set(sequential)) == len(prompts)  # distinct, so a mix-up would show
    with ThreadPoolExecutor(len(prompts)) as pool:
        concurrent = list(pool.map(lambda p: greedy(client, p, max_tokens=8).choices[0].text, prompts))
    assert concurrent == sequential


def test_disconnect_mid_stream_frees_the_slot(
    client: openai.OpenAI, live_server_url: str, http: httpx.Client
) -> None:
    aborted_before = metric(http, "draftloop_requests_total", finish_reason="abort")
    tokens_before = metric(http, "draftloop_generation_tokens_total")
    body = {
        "model": MODEL,
        "prompt": "Tell me a long story.",
        "max_tokens": 500,
        "stream": True,
        "ignore_eos": True,
    }
    with (
        httpx.Client(base_url=live_server_url, timeout=60) as own,
        own.stream("POST", "/v1/completions", json=body) as r,
    ):
        lines = r.iter_lines()
        first = [next(lines) for _ in range(3)]  # a few events in: the sequence is running
        assert first[0].startswith("data: ")
        assert metric(http, "draftloop_num_requests_running") == 1
    # the connection is closed: the engine must drop the sequence
    deadline = time.monotonic() + 15
    while metric(http, "draftloop_num_requests_running") != 0:
        assert time.monotonic() < deadline, "the disconnected sequence still holds its slot"
        time.sleep(0.1)
    assert metric(http, "draftloop_requests_total", finish_reason="abort") == aborted_before + 1
    assert metric(http, "draftloop_generation_tokens_total") - tokens_before < 500
    assert greedy(client, PROMPT, max_tokens=2).choices[0].text  # still serving


# ---- admission control (in-process app: max_queue 0 refuses everything) ----------------


def test_queue_full_is_503_with_retry_after(settings, target) -> None:
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.runtime import ServerState
    from service.async_engine import AsyncEngine
    from service.drafters.ngram import NgramDrafter
    from service.engine import Engine
    from service.metrics import Metrics

    metrics = Metrics()
    engine = Engine(target.model, NgramDrafter(), target.eos_token_ids, 4, metrics)
    state = ServerState(
        settings.model_copy(update={"max_queue": 0}),
        target,
        metrics,
        engine,
        AsyncEngine(engine, max_queue=0),
    )
    try:
        with TestClient(create_app(runtime=state)) as tc:
            r = tc.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
            assert r.status_code == 503
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"] == {
                "message": r.json()["error"]["message"],
                "type": "server_error",
                "param": None,
                "code": "server_overloaded",
            }
            r = tc.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, "stream": True})
            assert r.status_code == 503 and r.headers["retry-after"]
            chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
            r = tc.post("/v1/chat/completions", json=chat)
            assert r.status_code == 503 and r.headers["retry-after"]
    finally:
        engine.stop_loop()
