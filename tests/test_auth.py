"""API keys (service/api/auth.py): the parsing and matching rules, then real
servers started with DRAFTLOOP_API_KEYS and called with the official `openai`
client and plain HTTP -- missing, wrong and right keys, streaming, open
/health and /metrics, the admin token kept apart, and no key in the log."""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from pydantic import SecretStr

from service.api.auth import (
    APIKeyConfigError,
    KeySet,
    bearer_token,
    is_key_file,
    load_api_keys,
    needs_key,
    parse_keys,
)

from .conftest import ROOT, LiveServer, server_env, start_server, stop_process

MODEL = "smollm2-135m-instruct"


# --- the rules, as pure functions -------------------------------------------------


def test_comma_list_and_file_are_told_apart_by_a_path_prefix(tmp_path: Path) -> None:
    assert not is_key_file("sk-a,sk-b") and not is_key_file("sk-a")
    assert all(is_key_file(v) for v in ("/run/secrets/keys", "./keys.txt", "../keys", "~/keys"))
    assert load_api_keys(SecretStr(" sk-a , sk-b,, ")) == ["sk-a", "sk-b"]
    keys = tmp_path / "keys.txt"
    keys.write_text("# team A\nsk-a\n\n  sk-b  \n# sk-old\n")
    assert load_api_keys(SecretStr(str(keys))) == ["sk-a", "sk-b"]
    assert load_api_keys(None) == [] and load_api_keys(SecretStr("  ")) == []


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("/nonexistent/keys.txt", "cannot read the key file /nonexistent/keys.txt"),
        (",,", "the comma list holds no key"),
        ("sk-good,sk bad secret", "entry 2 is not a usable key"),
    ],
)
def test_unusable_settings_say_why_without_a_key(value: str, message: str) -> None:
    with pytest.raises(APIKeyConfigError, match=message) as err:
        load_api_keys(SecretStr(value))
    assert "secret" not in str(err.value) and "sk-good" not in str(err.value)


def test_a_key_file_with_only_comments_is_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# nobody yet\n\n")
    with pytest.raises(APIKeyConfigError, match="holds no key"):
        load_api_keys(SecretStr(str(keys)))
    with pytest.raises(APIKeyConfigError, match="line 2 is not a usable key"):
        parse_keys("sk-a\nsk-b,sk-c\n", "\n")  # a comma: the same key would not work as a comma list


def test_key_set_matches_every_key_and_nothing_else() -> None:
    keys = KeySet(["sk-one", "sk-two"])
    assert keys.matches(b"sk-one") and keys.matches(b"sk-two")
    for other in (b"", b"sk-on", b"sk-one ", b"sk-onex", b"SK-ONE", b"sk-three"):
        assert not keys.matches(other), other


def test_bearer_token() -> None:
    assert bearer_token([(b"authorization", b"Bearer sk-1")]) == b"sk-1"
    assert bearer_token([(b"Authorization", b"bearer  sk-1 ")]) == b"sk-1"
    assert bearer_token([(b"authorization", b"Basic c2stMQ==")]) is None
    assert bearer_token([(b"authorization", b"Bearer ")]) is None
    assert bearer_token([(b"x-api-key", b"sk-1")]) is None


@pytest.mark.parametrize(
    ("path", "metrics_open", "needed"),
    [
        ("/v1/completions", True, True),
        ("/v1/models", True, True),
        ("/v1/routes-added-later", True, True),
        ("/unknown", True, True),
        ("/health", True, False),
        ("/health", False, False),
        ("/metrics", True, False),
        ("/metrics", False, True),
        ("/admin/drafter", False, False),  # its own token
        ("/administrator", True, True),
        ("/openapi.json", True, False),
    ],
)
def test_which_paths_need_a_key(path: str, metrics_open: bool, needed: bool) -> None:
    assert needs_key(path, metrics_open) is needed


def test_serve_refuses_to_start_with_an_unusable_key_setting(tmp_path: Path) -> None:
    env = server_env(Path("/nonexistent-cache"), tmp_path, DRAFTLOOP_API_KEYS="sk-fine,not a key")
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--port", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "DRAFTLOOP_API_KEYS: entry 2 is not a usable key" in result.stderr
    assert "sk-fine" not in result.stderr and "not a key" not in result.stderr


# --- a real server with keys -----------------------------------------------------


KEYS = [f"sk-test-{secrets.token_urlsafe(16)}" for _ in range(2)]
WRONG = f"sk-wrong-{secrets.token_urlsafe(16)}"


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory, settings) -> Iterator[LiveServer]:
    """A server whose keys come from a file (one per line), /metrics open (the default)."""
    workdir = tmp_path_factory.mktemp("keyed_server")
    key_file = workdir / "api-keys"
    key_file.write_text("# test keys\n" + "\n".join(KEYS) + "\n")
    env = server_env(settings.cache_dir, workdir, DRAFTLOOP_API_KEYS=str(key_file))
    server = start_server(env, workdir)
    try:
        yield server
    finally:
        stop_process(server.process)


def client(server: LiveServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


def assert_unauthorized(response: httpx.Response) -> None:
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}
    for key in (*KEYS, WRONG):
        assert key not in response.text


def test_missing_and_wrong_keys_get_401_in_the_openai_format(keyed_server: LiveServer) -> None:
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4}
    with httpx.Client(base_url=keyed_server.url, timeout=60) as http:
        missing = http.post("/v1/completions", json=body)
        assert_unauthorized(missing)
        assert "didn't provide an API key" in missing.json()["error"]["message"]
        wrong = http.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {WRONG}"})
        assert_unauthorized(wrong)
        assert "Incorrect API key" in wrong.json()["error"]["message"]
        # another scheme, a key one character short, every /v1 route, unknown routes too
        basic = {"Authorization": f"Basic {KEYS[0]}"}
        assert_unauthorized(http.post("/v1/completions", json=body, headers=basic))
        assert_unauthorized(http.get("/v1/models", headers={"Authorization": f"Bearer {KEYS[0][:-1]}"}))
        assert_unauthorized(http.get(f"/v1/models/{MODEL}"))
        assert_unauthorized(http.get("/v1/not-a-route"))
        assert http.get("/v1/not-a-route", headers={"Authorization": f"Bearer {KEYS[0]}"}).status_code == 404
    with pytest.raises(openai.AuthenticationError) as err:
        client(keyed_server, WRONG).completions.create(model=MODEL, prompt="Hello", max_tokens=4)
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"


def test_every_configured_key_is_served(keyed_server: LiveServer) -> None:
    for key in KEYS:
        api = client(keyed_server, key)
        assert [m.id for m in api.models.list().data] == [MODEL]
        r = api.completions.create(model=MODEL, prompt="The capital of", max_tokens=8, temperature=0)
        assert r.choices[0].text and r.usage.completion_tokens == 8


def test_streaming_with_a_key(keyed_server: LiveServer) -> None:
    stream = client(keyed_server, KEYS[1]).completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True
    )
    text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert text
    with pytest.raises(openai.AuthenticationError):
        client(keyed_server, WRONG).completions.create(model=MODEL, prompt="Hi", max_tokens=4, stream=True)


def test_health_metrics_and_admin_do_not_take_the_api_key(keyed_server: LiveServer) -> None:
    with httpx.Client(base_url=keyed_server.url, timeout=30) as http:
        assert http.get("/health").json()["status"] == "ok"
        # DRAFTLOOP_METRICS_AUTH=open (the default)
        assert "draftloop_spec_decode_drafts_total" in http.get("/metrics").text
        # the admin routes answer to DRAFTLOOP_ADMIN_TOKEN alone: unset here, so off even with a valid API key
        admin = http.get("/admin/drafter", headers={"Authorization": f"Bearer {KEYS[0]}"})
        assert admin.status_code == 403 and admin.json()["error"]["code"] == "admin_disabled"


def test_no_key_appears_in_the_server_log(keyed_server: LiveServer) -> None:
    # a right, a wrong and a missing key here (and whatever the tests above sent)
    with httpx.Client(base_url=keyed_server.url, timeout=30) as http:
        for key in (*KEYS, WRONG):
            http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        http.get("/v1/models")
    log_text = keyed_server.log_path.read_text(errors="replace")
    assert "wrong API key" in log_text and "missing API key" in log_text  # refusals are logged...
    assert "2 configured" in log_text
    for key in (*KEYS, WRONG):
        assert key not in log_text  # ...but never a key


def test_metrics_behind_the_key(tmp_path: Path, settings) -> None:
    """DRAFTLOOP_METRICS_AUTH=key, keys as a comma list: /metrics needs a key, /health still does not."""
    env = server_env(
        settings.cache_dir, tmp_path, DRAFTLOOP_API_KEYS=",".join(KEYS), DRAFTLOOP_METRICS_AUTH="key"
    )
    server = start_server(env, tmp_path)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert_unauthorized(http.get("/metrics"))
            metrics = http.get("/metrics", headers={"Authorization": f"Bearer {KEYS[1]}"})
            assert metrics.status_code == 200 and "draftloop_" in metrics.text
            assert http.get("/health").status_code == 200
    finally:
        stop_process(server.process)
