"""POST /v1/chat/completions against a real `draftloop serve` process through
the official `openai` client: the model's chat template, stream and
non-stream, n, seed, stop, logprobs, max_completion_tokens, include_usage,
penalties and logit_bias on both endpoints, and 4xx errors in the OpenAI format."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

MODEL = "smollm2-135m-instruct"
USER = [{"role": "user", "content": "Name three primary colors."}]
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


@pytest.fixture(scope="module")
def client(live_server_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server_url}/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(live_server_url: str):
    with httpx.Client(base_url=live_server_url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def hf_tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def chat(client: openai.OpenAI, messages=USER, max_tokens: int = 8, **kw):
    return client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=max_tokens, temperature=0, **kw
    )


def test_chat_uses_the_models_chat_template(client: openai.OpenAI, hf_tokenizer) -> None:
    r = chat(client)
    ids = hf_tokenizer.apply_chat_template(USER, add_generation_prompt=True, tokenize=True, return_dict=False)
    # the same greedy text as a completion of the templated prompt's token ids
    raw = client.completions.create(model=MODEL, prompt=list(ids), max_tokens=8, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    assert choice.message.role == "assistant" and choice.message.content == raw.choices[0].text
    assert choice.message.content and choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(ids) == raw.usage.prompt_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Name three "}, {"type": "text", "text": "primary colors."}],
        }
    ]
    assert chat(client, parts).choices[0].message.content == choice.message.content
    system = [{"role": "system", "content": "Answer in French."}, *USER]
    # a system message replaces the template's default system turn
    assert chat(client, system).usage.prompt_tokens != r.usage.prompt_tokens


def test_multi_turn_and_max_tokens(client: openai.OpenAI) -> None:
    turns = [
        *USER,
        {"role": "assistant", "content": "Red, blue and yellow."},
        {"role": "user", "content": "And secondary?"},
    ]
    r = chat(client, turns, max_tokens=5, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    legacy = client.chat.completions.create(
        model=MODEL, messages=turns, max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert legacy.choices[0].message.content == r.choices[0].message.content


def test_n_with_seed(client: openai.OpenAI) -> None:
    two = client.chat.completions.create(model=MODEL, messages=USER, max_completion_tokens=6, n=2, seed=11)
    assert [c.index for c in two.choices] == [0, 1]
    second = client.chat.completions.create(model=MODEL, messages=USER, max_completion_tokens=6, seed=12)
    assert two.choices[1].message.content == second.choices[0].message.content  # choice j uses seed + j
    assert two.usage.prompt_tokens == second.usage.prompt_tokens  # the prompt counts once


def test_stop(client: openai.OpenAI) -> None:
    full = chat(client, max_tokens=12, extra_body={"ignore_eos": True}).choices[0].message.content
    stop = full[3:5]
    r = chat(client, max_tokens=12, stop=[stop])
    assert r.choices[0].message.content == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_logprobs(client: openai.OpenAI) -> None:
    r = chat(client, max_tokens=4, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob)  # greedy: the most likely
        assert bytes(t.bytes).decode("utf-8", errors="replace") == t.token
    plain = chat(client, max_tokens=2, logprobs=True)
    assert all(t.top_logprobs == [] for t in plain.choices[0].logprobs.content)
    assert chat(client, max_tokens=2).choices[0].logprobs is None


def test_stream_with_usage(client: openai.OpenAI) -> None:
    want = chat(client, max_tokens=8)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        max_completion_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [want.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == want.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_raw_sse_n2(http: httpx.Client) -> None:
    body = {"model": MODEL, "messages": USER, "max_tokens": 4, "n": 2, "seed": 1, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        blocks = [b for b in r.read().decode().split("\n\n") if b.strip()]
    assert all(b.startswith("data: ") for b in blocks) and blocks[-1] == "data: [DONE]"
    events = [json.loads(b[len("data: ") :]) for b in blocks[:-1]]
    roles = [e["choices"][0]["index"] for e in events if e["choices"][0]["delta"].get("role")]
    assert sorted(roles) == [0, 1]
    done = [e["choices"][0] for e in events if e["choices"][0]["finish_reason"]]
    assert sorted(c["index"] for c in done) == [0, 1] and all(c["delta"] == {} for c in done)


# ---- penalties and logit_bias, both endpoints ------------------------------------------


def test_logit_bias_forces_a_token_on_both_endpoints(client: openai.OpenAI, hf_tokenizer) -> None:
    token = hf_tokenizer.encode(" blue", add_special_tokens=False)[0]
    bias = {str(token): 100}
    r = chat(client, max_tokens=4, logit_bias=bias, extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == hf_tokenizer.decode([token] * 4)
    sampled = client.completions.create(
        model=MODEL, prompt="Sky:", max_tokens=4, temperature=1.0, seed=0, logit_bias=bias
    )
    assert sampled.choices[0].text == hf_tokenizer.decode([token] * 4)


def test_penalties_change_greedy_output(client: openai.OpenAI) -> None:
    prompt = [{"role": "user", "content": "Echo this: 7 7 7 7 7 7 7 7 7 7 7 7"}]
    plain = chat(client, prompt, max_tokens=12).choices[0].message.content
    penalised = chat(client, prompt, max_tokens=12, presence_penalty=2.0, frequency_penalty=2.0)
    assert penalised.choices[0].message.content != plain
    assert penalised.choices[0].message.content.count("7") < plain.count("7")
    sevens = {"model": MODEL, "prompt": "7 7 7 7 7 7 7", "max_tokens": 8, "temperature": 0}
    both = client.completions.create(**sevens, frequency_penalty=2.0, presence_penalty=-0.5)
    assert both.choices[0].text != client.completions.create(**sevens).choices[0].text


# ---- errors ---------------------------------------------------------------------------

BAD_CHATS = [
    ({"messages": []}, "messages"),
    ({}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "tool", "content": "hi", "tool_call_id": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [IMAGE]}]}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"messages": USER, "logit_bias": {"99999999": 5}}, "logit_bias"),
    ({"messages": USER, "logit_bias": {"abc": 5}}, "logit_bias"),
    ({"messages": USER, "logit_bias": {"5": 101}}, "logit_bias"),
    ({"messages": USER, "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ({"messages": USER, "presence_penalty": 2.5}, "presence_penalty"),
    ({"messages": USER, "frequency_penalty": -3}, "frequency_penalty"),
    ({"messages": USER, "top_logprobs": 3}, "top_logprobs"),
    ({"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": USER, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": USER, "max_completion_tokens": 5000}, "max_completion_tokens"),
    ({"messages": USER, "max_tokens": 5000}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "word " * 3000}]}, "messages"),
    ({"messages": USER, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
]


@pytest.mark.parametrize(("body", "param"), BAD_CHATS)
def test_bad_chat_request_is_400(http: httpx.Client, body: dict, param: str) -> None:
    r = http.post("/v1/chat/completions", json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="gpt-4o", messages=USER, max_completion_tokens=2)
    assert exc.value.body["code"] == "model_not_found"


def test_image_part_refused_through_the_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [IMAGE]}])
    assert "image_url" in exc.value.body["message"]
