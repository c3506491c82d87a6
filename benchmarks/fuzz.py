"""Schema fuzzing of the API with a key set: no request body may get a 5xx.

    python -m benchmarks.fuzz --requests N --out results/fuzz.json [--seconds S]

Starts a `draftloop serve` (ngram drafter, block log off, DRAFTLOOP_API_KEYS
set), reads its /openapi.json and, with hypothesis-jsonschema, generates
request bodies for every POST route under /v1 from the route's own request
schema (completions and chat). Each example is sent in one of three shapes, in
turn: as generated (schema-valid; `max_tokens` / `max_completion_tokens`
clamped to 1..4, `n` to 1..2, prompt lists to 2 entries and chat messages to
4, so valid requests stay cheap), with one field replaced by a value
of another JSON type, or as bytes that are not the JSON of an object. Every
request carries the key. The report counts responses by status and shape
and keeps the first bodies that got a 5xx. `--seconds` stops early (the
report says how many were sent); each route gets an equal share of it."""

from __future__ import annotations

import argparse
import json
import logging
import random
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from benchmarks.soak_stack import Child, start_serve
from service.config import Settings

log = logging.getLogger("fuzz")

API_KEY = "sk-fuzz-key"
WRONG_TYPES: list[Any] = [None, True, -1, 3.5, "x", [], {}, [1, "a"], {"a": None}, 2**70, "\ud800"]
KEEP_5XX = 20


def request_schemas(openapi: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """POST path under /v1 -> its JSON request schema, with the components it refers to."""
    out = {}
    for path, ops in openapi["paths"].items():
        body = ops.get("post", {}).get("requestBody", {})
        schema = body.get("content", {}).get("application/json", {}).get("schema")
        if path.startswith("/v1/") and schema is not None:
            out[path] = {**schema, "components": openapi.get("components", {})}
    return out


def clamp(body: Any, rng: random.Random) -> Any:
    """Keep a valid request cheap: few tokens, few choices, at most two prompts."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    body["max_tokens"] = rng.randint(1, 4)
    if "max_completion_tokens" in body:  # chat's newer name for the same cap
        body["max_completion_tokens"] = rng.randint(1, 4)
    if isinstance(body.get("n"), int):
        body["n"] = min(body["n"], 2)
    body.pop("best_of", None)
    if isinstance(body.get("prompt"), list) and body["prompt"] and isinstance(body["prompt"][0], (list, str)):
        body["prompt"] = body["prompt"][:2]
    if isinstance(body.get("messages"), list):
        body["messages"] = body["messages"][:4]
    return body


def mutate(body: Any, rng: random.Random) -> Any:
    """One field (or a new one) set to a value of some other JSON type."""
    if not isinstance(body, dict):
        return rng.choice(WRONG_TYPES)
    body = dict(body)
    key = rng.choice([*body, "prompt", "messages", "max_tokens", "temperature", "stop", "logprobs", "unknown_field"])
    body[key] = rng.choice(WRONG_TYPES)
    return body


def garbage(rng: random.Random) -> bytes:
    return rng.choice([b"", b"{", b"[]", b"null", b'"text"', b"\xff\xfe{}", b'{"prompt": "a",}', rng.randbytes(64)])


class Fuzzer:
    def __init__(self, url: str, requests: int, seconds: float, seed: int = 0):
        self.url = url
        self.requests = requests
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.sent_by_route: Counter[str] = Counter()
        self.rng = random.Random(seed)
        self.statuses: Counter[str] = Counter()
        self.server_errors: list[dict[str, Any]] = []
        self.transport_errors: Counter[str] = Counter()
        self.sent = 0
        self.http = httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {API_KEY}"})

    def send(self, path: str, body: Any) -> None:
        shape = ("valid", "mutated", "garbage")[self.sent % 3]
        if shape == "garbage":
            content = garbage(self.rng)
        else:
            payload = clamp(body, self.rng) if shape == "valid" else mutate(clamp(body, self.rng), self.rng)
            content = json.dumps(payload, ensure_ascii=self.rng.random() < 0.5).encode("utf-8", "surrogatepass")
        self.sent += 1
        self.sent_by_route[path] += 1
        try:
            r = self.http.post(path, content=content, headers={"Content-Type": "application/json"})
        except httpx.HTTPError as exc:
            self.transport_errors[type(exc).__name__] += 1
            return
        self.statuses[f"{path} {shape} {r.status_code}"] += 1
        if r.status_code >= 500 and len(self.server_errors) < KEEP_5XX:
            self.server_errors.append({"path": path, "body": content[:2000].decode("utf-8", "replace"), "status": r.status_code, "response": r.text[:500]})

    def run(self, schemas: dict[str, dict[str, Any]]) -> None:
        per_route = max(1, self.requests // len(schemas))
        for path, schema in schemas.items():
            self.deadline = time.monotonic() + self.seconds / len(schemas)  # each route its share of the time
            self._route(path, schema, per_route)

    def _route(self, path: str, schema: dict[str, Any], examples: int) -> None:
        @settings(max_examples=examples, phases=[Phase.generate], database=None, deadline=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(from_schema(schema) | st.dictionaries(st.text(max_size=12), st.from_type(type(None)) | st.integers() | st.text()))
        def one(body: Any) -> None:
            if time.monotonic() < self.deadline:
                self.send(path, body)

        one()

    def report(self, wall_s: float) -> dict[str, Any]:
        total_5xx = sum(n for k, n in self.statuses.items() if k.split()[2].startswith("5"))
        return {
            "sent": self.sent, "sent_by_route": dict(self.sent_by_route), "wall_s": round(wall_s, 1), "api_key_set": True,
            "by_status": dict(sorted(self.statuses.items())), "server_errors": total_5xx,
            "transport_errors": dict(self.transport_errors), "first_5xx": self.server_errors,
        }  # fmt: skip


def start_server(workdir: Path, cache_dir: Path) -> tuple[Child, str]:
    env = {
        "DRAFTLOOP_API_KEYS": API_KEY, "DRAFTLOOP_DRAFTER": "ngram", "DRAFTLOOP_BLOCK_LOG": "false",
        "DRAFTLOOP_DTYPE": "float32",
    }  # fmt: skip
    return start_serve(workdir, cache_dir, env)


def fuzz(requests: int, seconds: float, out: Path | None, cache_dir: Path | None = None) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="draftloop-fuzz-"))
    server, url = start_server(workdir, Path(cache_dir or Settings().cache_dir))
    try:
        schemas = request_schemas(httpx.get(f"{url}/openapi.json", timeout=10).json())
        fuzzer = Fuzzer(url, requests, seconds)
        t0 = time.monotonic()
        fuzzer.run(schemas)
        report = {"routes": sorted(schemas), **fuzzer.report(time.monotonic() - t0)}
        report["server_alive_at_end"] = server.alive
    finally:
        server.stop()
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--seconds", type=float, default=3600.0, help="stop sending after this long")
    ap.add_argument("--out", type=Path, default=Path("results/fuzz.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    report = fuzz(args.requests, args.seconds, args.out)
    print(json.dumps({k: v for k, v in report.items() if k != "first_5xx"}, indent=2))


if __name__ == "__main__":
    main()
