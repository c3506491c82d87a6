"""What /v1/completions and /v1/chat/completions share behind their routes:
the checks that need the model, one engine sequence per choice, incremental
detokenization with stop strings, and SSE framing with errors.

Choices are numbered by the endpoint; with a `seed`, sample j of a prompt
uses seed + j. Per choice, text is detokenized incrementally; generation stops
as soon as a stop string is complete, the text returned ends before it, and
the sequence is cancelled so the engine frees its slot. Checks that need the
model (name, context length, vocabulary, logit_bias ids) and the queue limit
run before anything is generated, so they answer with a status code even for
streams."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from ..async_engine import EngineOverloaded
from ..engine import StepOutput
from ..penalties import Penalties
from ..runtime import ServerState
from ..sampling import SamplingParams
from .detokenize import IncrementalDetokenizer, StopStringText
from .errors import APIError, error_body
from .protocol import MIN_SAMPLING_TEMPERATURE, SamplingRequest, Usage

log = logging.getLogger(__name__)


@dataclass
class PromptInput:
    ids: list[int]
    text: str  # what `echo` returns: the prompt string as sent, or the decoded token ids


@dataclass
class TokenLogprob:
    """One token of a choice with its target log-prob, in ids; each endpoint
    formats these its own way."""

    token_id: int
    logprob: float | None  # None: the first prompt token (echo), which nothing predicts
    top: dict[int, float] | None  # alternatives (the chosen token among them)
    offset: int  # characters of the choice's text before this token


@dataclass
class ChoiceDelta:
    index: int
    text: str
    logprobs: list[TokenLogprob] | None  # None: not requested
    finish_reason: str | None
    num_tokens: int  # generated tokens this delta accounts for (usage)


@dataclass
class ChoiceJob:
    """One engine sequence: what it generates from and how its outputs become text."""

    choice: ChoiceText
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str


class ChoiceText:
    """One choice's text, stop strings and token log-probs, fed engine
    outputs in order. `echo`: the prompt is returned first (completions)."""

    def __init__(
        self,
        index: int,
        prompt: PromptInput,
        tokenizer: Any,
        stop: list[str],
        want_logprobs: bool,
        echo: bool = False,
    ):
        self.index = index
        self.prompt = prompt
        self.tokenizer = tokenizer
        self.want_logprobs = want_logprobs
        self.echo = echo
        self.detok = IncrementalDetokenizer(tokenizer, prompt.ids)
        self.text = StopStringText(stop)
        self.base_offset = len(prompt.text) if echo else 0  # text offset of the generated text
        self.started = False

    def consume(self, out: StepOutput) -> ChoiceDelta:
        logprobs: list[TokenLogprob] | None = [] if self.want_logprobs else None
        prefix = ""
        if not self.started:
            self.started = True
            if self.echo:
                prefix = self.prompt.text
                if logprobs is not None:
                    logprobs += self._prompt_logprobs(out)
        finish, used = None, 0
        for i, token in enumerate(out.token_ids):
            used += 1
            if logprobs is not None:
                value = out.logprobs[i] if out.logprobs else None
                top = out.top_logprobs[i] if out.top_logprobs else None
                logprobs.append(TokenLogprob(token, value, top, self.base_offset + len(self.text.text)))
            if self.text.add(self.detok.add(token)):
                finish = "stop"
                break
        if finish is None and out.finish_reason is not None:
            finish = "stop" if self.text.add(self.detok.flush()) else out.finish_reason
        text = prefix + self.text.take(final=finish is not None)
        return ChoiceDelta(self.index, text, logprobs, finish, used)

    def _prompt_logprobs(self, out: StepOutput) -> list[TokenLogprob]:
        ids = self.prompt.ids
        values = out.prompt_logprobs or [None] * len(ids)
        tops = out.prompt_top_logprobs or [None] * len(ids)
        entries, offset = [], 0
        for token, value, top in zip(ids, values, tops):
            entries.append(TokenLogprob(token, value, top, offset))
            offset += len(self.tokenizer.decode([token]))
        return entries


def sampling_params(
    req: SamplingRequest, sample: int, max_tokens: int, logprobs: int | None, echo: bool = False
) -> SamplingParams:
    """The engine's parameters for sample `sample` of a prompt."""
    temperature = 1.0 if req.temperature is None else req.temperature
    return SamplingParams(
        temperature=0.0 if temperature < MIN_SAMPLING_TEMPERATURE else temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(req.top_k or 0, 0),
        max_tokens=max_tokens,
        seed=None if req.seed is None else req.seed + sample,
        logprobs=logprobs,
        echo=echo,
        ignore_eos=req.ignore_eos,
        penalties=Penalties.build(req.presence_penalty, req.frequency_penalty, req.bias),
    )


class GenerationService:
    """Checks against the model, and the engine fan-out both endpoints use."""

    def __init__(self, state: ServerState):
        self.state = state
        self.tokenizer = state.target.tokenizer

    # ---- checks before generating ---------------------------------------------
    def check_request(self, req: SamplingRequest) -> None:
        """The model name and the logit_bias ids; raise APIError."""
        if req.model is not None and req.model not in self.state.model_names:
            raise APIError(
                404,
                f"The model `{req.model}` does not exist. This server serves `{self.state.target.name}`.",
                param="model",
                code="model_not_found",
            )
        vocab = self.state.target.model.cfg.vocab_size
        bad = [t for t in req.bias if t >= vocab]
        if bad:
            raise APIError(
                400,
                f"Invalid value for 'logit_bias': token id {bad[0]} is not in the vocabulary [0, {vocab}).",
                param="logit_bias",
                code="invalid_value",
            )

    def check_prompt(
        self, prompt: PromptInput, max_tokens: int, param: str = "prompt", max_param: str = "max_tokens"
    ) -> None:
        """`param` names the prompt field, `max_param` the length field, in errors."""
        if not prompt.ids:
            raise APIError(400, f"'{param}' must not be empty (it encodes to no tokens).", param=param)
        limit = self.state.settings.max_model_len
        if len(prompt.ids) + max_tokens > limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(prompt.ids) + max_tokens} tokens ({len(prompt.ids)} in your prompt; "
                f"{max_tokens} for the completion). Please reduce your prompt or completion length.",
                param=param if len(prompt.ids) >= limit else max_param,
                code="context_length_exceeded",
            )

    def check_capacity(self, num_seqs: int) -> None:
        self.state.async_engine.check_capacity(num_seqs)

    # ---- generation -------------------------------------------------------------
    async def deltas(self, jobs: list[ChoiceJob]) -> AsyncIterator[ChoiceDelta]:
        """All choices run concurrently in the engine, one task each; their
        deltas arrive here in the order they are produced. Closing this
        generator cancels every unfinished choice."""
        queue: asyncio.Queue[ChoiceDelta | asyncio.Task] = asyncio.Queue()
        tasks: list[asyncio.Task] = []
        for job in jobs:
            outputs = self.state.async_engine.generate(job.prompt_ids, job.params, job.request_id)
            task = asyncio.create_task(_run_choice(job.choice, outputs, queue))
            task.add_done_callback(queue.put_nowait)  # the task itself marks its end
            tasks.append(task)
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if isinstance(item, asyncio.Task):
                    remaining -= 1
                    if not item.cancelled() and item.exception() is not None:
                        raise item.exception()  # type: ignore[misc]
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def _run_choice(choice: ChoiceText, outputs: AsyncIterator[StepOutput], queue: asyncio.Queue) -> None:
    async with aclosing(outputs):  # leaving early (stop string, cancel) cancels the sequence
        async for out in outputs:
            delta = choice.consume(out)
            queue.put_nowait(delta)
            if delta.finish_reason is not None:
                return


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


async def sse_stream(events: AsyncIterator[str], request_id: str) -> AsyncIterator[str]:
    """`events` (JSON payloads) as SSE, then `data: [DONE]`. An error after
    the stream started is sent as an OpenAI error event (the status code is
    already 200)."""
    try:
        async with aclosing(events) as payloads:
            async for payload in payloads:
                yield sse(payload)
    except EngineOverloaded as exc:
        yield sse(json.dumps(error_body(str(exc), "server_error", code="server_overloaded")))
    except Exception:
        log.exception("stream %s failed", request_id)
        message = "The server had an error while processing your request."
        yield sse(json.dumps(error_body(message, "server_error", code="internal_error")))
    yield sse("[DONE]")
