"""Steady traffic for the soak: client threads that send completions through
the official `openai` client with an API key, alternating streaming and
non-streaming, and a helper for clients that disconnect mid-stream. Every
request is recorded with the phase it started in, its latency and, when it
failed, why."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import openai

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    phase: str
    stream: bool
    ok: bool
    latency_s: float
    reason: str = ""  # why it failed (exception type, HTTP status), "" when ok
    fingerprint: str = ""  # system_fingerprint: the drafter that served it


def quantile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3)


@dataclass
class Traffic:
    """`clients` threads, each sending one request after another until stopped."""

    url: str
    api_key: str
    model: str
    prompts: list[list[int]]  # token ids, sent as the prompt
    clients: int = 2
    max_tokens: int = 16
    phase: str = "baseline"  # set by the scheduler; each request records the phase it started in
    outcomes: list[Outcome] = field(default_factory=list)
    aborted: int = 0  # requests the soak itself cut off mid-stream

    def __post_init__(self) -> None:
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.clients)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._halt.set()
        for t in self._threads:
            t.join(300)

    def _run(self, client_no: int) -> None:
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key, max_retries=0, timeout=300)
        i = client_no
        while not self._halt.is_set():
            self._record(self._one(client, self.prompts[i % len(self.prompts)], stream=i % 2 == 1))
            i += 1

    def _one(self, client: openai.OpenAI, prompt: list[int], stream: bool) -> Outcome:
        phase, t0 = self.phase, time.perf_counter()
        args = {"model": self.model, "prompt": prompt, "max_tokens": self.max_tokens, "temperature": 0}
        try:
            if stream:
                fingerprint, text = "", ""
                for chunk in client.completions.create(stream=True, **args):
                    fingerprint = chunk.system_fingerprint or fingerprint
                    text += "".join(c.text for c in chunk.choices)
            else:
                r = client.completions.create(**args)
                fingerprint, text = r.system_fingerprint or "", r.choices[0].text
            if not text:
                return Outcome(phase, stream, False, time.perf_counter() - t0, "empty completion")
            return Outcome(phase, stream, True, time.perf_counter() - t0, fingerprint=fingerprint)
        except openai.APIStatusError as exc:
            reason = f"HTTP {exc.status_code}"
        except openai.APIError as exc:
            reason = type(exc).__name__
        return Outcome(phase, stream, False, time.perf_counter() - t0, reason)

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)
        if not outcome.ok:
            log.warning("request failed in phase %s: %s", outcome.phase, outcome.reason)

    def disconnect(self, prompt: list[int]) -> bool:
        """A streaming request closed after its first event; whether it got one."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": 64, "temperature": 0, "stream": True}
        headers = {"Authorization": f"Bearer {self.api_key}"}
        got = False
        with httpx.Client(base_url=self.url, timeout=120) as c:
            with c.stream("POST", "/v1/completions", json=body, headers=headers) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        got = True
                        break  # leaving the block closes the connection mid-stream
        with self._lock:
            self.aborted += 1
        return got

    def summary(self) -> dict:
        with self._lock:
            outs = list(self.outcomes)
        failed = [o for o in outs if not o.ok]
        phases: dict[str, dict] = {}
        for name in dict.fromkeys(o.phase for o in outs):
            lat = [o.latency_s for o in outs if o.phase == name and o.ok]
            n = sum(o.phase == name for o in outs)
            phases[name] = {"requests": n, "ok": len(lat), "p50_s": quantile(lat, 0.5), "p99_s": quantile(lat, 0.99)}
        return {
            "sent": len(outs) + self.aborted,
            "ok": len(outs) - len(failed),
            "failed": len(failed),
            "aborted_by_the_soak": self.aborted,
            "streaming": sum(o.stream for o in outs),
            "failures_by_reason": dict(Counter(o.reason for o in failed)),
            "served_by": dict(Counter(o.fingerprint for o in outs if o.ok)),
            "phases": phases,
        }
