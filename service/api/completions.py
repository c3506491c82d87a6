"""POST /v1/completions behind the route: a CompletionRequest becomes one
engine sequence per choice (prompt i, sample j -> choice i * n + j; with a
`seed`, sample j uses seed + j), and their outputs come back as one
CompletionResponse or as SSE chunks.

Per choice, text is detokenized incrementally; generation stops as soon as a
stop string is complete, the text returned ends before it, and the sequence
is cancelled so the engine frees its slot. Checks that need the model
(name, context length, vocabulary) and the queue limit run before anything is
generated, so they answer with a status code even for streams."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends

from ..async_engine import EngineOverloaded
from ..engine import StepOutput
from ..runtime import ServerState
from ..sampling import SamplingParams
from .deps import StateDep
from .detokenize import IncrementalDetokenizer, StopStringText
from .errors import APIError, error_body
from .protocol import (
    MIN_SAMPLING_TEMPERATURE,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    Logprobs,
    Usage,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16


@dataclass
class PromptInput:
    ids: list[int]
    text: str  # what `echo` returns: the prompt string as sent, or the decoded token ids


@dataclass
class ChoiceDelta:
    index: int
    text: str
    logprobs: Logprobs | None
    finish_reason: str | None
    num_tokens: int  # generated tokens this delta accounts for (usage)


def sampling_params(req: CompletionRequest, sample: int) -> SamplingParams:
    temperature = 1.0 if req.temperature is None else req.temperature
    return SamplingParams(
        temperature=0.0 if temperature < MIN_SAMPLING_TEMPERATURE else temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(req.top_k or 0, 0),
        max_tokens=req.max_tokens or DEFAULT_MAX_TOKENS,
        seed=None if req.seed is None else req.seed + sample,
        logprobs=req.logprobs,
        echo=bool(req.echo),
        ignore_eos=req.ignore_eos,
    )


class Choice:
    """One choice's text, stop strings and logprobs, fed engine outputs in order."""

    def __init__(self, index: int, prompt: PromptInput, req: CompletionRequest, tokenizer: Any):
        self.index = index
        self.prompt = prompt
        self.tokenizer = tokenizer
        self.detok = IncrementalDetokenizer(tokenizer, prompt.ids)
        self.text = StopStringText(req.stop_strings)
        self.want_logprobs = req.logprobs is not None
        self.echo = bool(req.echo)
        self.base_offset = len(prompt.text) if self.echo else 0  # text_offset of generated text
        self.started = False

    def consume(self, out: StepOutput) -> ChoiceDelta:
        logprobs = Logprobs() if self.want_logprobs else None
        prefix = ""
        if not self.started:
            self.started = True
            if self.echo:
                prefix = self.prompt.text
                if logprobs is not None:
                    self._prompt_logprobs(logprobs, out)
        finish, used = None, 0
        for i, token in enumerate(out.token_ids):
            used += 1
            if logprobs is not None:
                logprobs.tokens.append(self._token_str(token))
                logprobs.token_logprobs.append(out.logprobs[i] if out.logprobs else None)
                logprobs.top_logprobs.append(self._top(out.top_logprobs[i]) if out.top_logprobs else None)
                logprobs.text_offset.append(self.base_offset + len(self.text.text))
            if self.text.add(self.detok.add(token)):
                finish = "stop"
                break
        if finish is None and out.finish_reason is not None:
            finish = "stop" if self.text.add(self.detok.flush()) else out.finish_reason
        text = prefix + self.text.take(final=finish is not None)
        return ChoiceDelta(self.index, text, logprobs, finish, used)

    def _prompt_logprobs(self, logprobs: Logprobs, out: StepOutput) -> None:
        ids = self.prompt.ids
        values = out.prompt_logprobs or [None] * len(ids)
        tops = out.prompt_top_logprobs or [None] * len(ids)
        offset = 0
        for token, value, top in zip(ids, values, tops):
            piece = self._token_str(token)
            logprobs.tokens.append(piece)
            logprobs.token_logprobs.append(value)
            logprobs.top_logprobs.append(self._top(top) if top is not None else None)
            logprobs.text_offset.append(offset)
            offset += len(piece)

    def _token_str(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _top(self, top: dict[int, float]) -> dict[str, float]:
        return {self._token_str(t): v for t, v in top.items()}


def _new_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


class CompletionService:
    def __init__(self, state: ServerState):
        self.state = state
        self.tokenizer = state.target.tokenizer

    # ---- checks before generating ---------------------------------------------
    async def prepare(self, req: CompletionRequest) -> list[PromptInput]:
        """Tokenize and check the request against the model; raise APIError."""
        if req.model is not None and req.model not in self.state.model_names:
            raise APIError(
                404,
                f"The model `{req.model}` does not exist. This server serves `{self.state.target.name}`.",
                param="model",
                code="model_not_found",
            )
        prompts = await asyncio.to_thread(self._tokenize, req.prompts)
        max_tokens = req.max_tokens or DEFAULT_MAX_TOKENS
        for prompt in prompts:
            self._check_prompt(prompt, max_tokens)
        self.state.async_engine.check_capacity(len(prompts) * (req.n or 1))
        return prompts

    def _tokenize(self, prompts: list[str] | list[list[int]]) -> list[PromptInput]:
        """Runs off the event loop: a large prompt takes a while."""
        if isinstance(prompts[0], str):
            ids = self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
            return [PromptInput(list(i), str(t)) for i, t in zip(ids, prompts)]
        vocab = self.state.target.model.cfg.vocab_size
        out = []
        for ids in prompts:
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise APIError(
                    400,
                    f"Invalid token id {bad[0]} in 'prompt': ids must be in [0, {vocab}).",
                    param="prompt",
                    code="invalid_token_id",
                )
            out.append(PromptInput(list(ids), self.tokenizer.decode(list(ids))))
        return out

    def _check_prompt(self, prompt: PromptInput, max_tokens: int) -> None:
        if not prompt.ids:
            raise APIError(400, "'prompt' must not be empty (it encodes to no tokens).", param="prompt")
        limit = self.state.settings.max_model_len
        if len(prompt.ids) + max_tokens > limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(prompt.ids) + max_tokens} tokens ({len(prompt.ids)} in your prompt; "
                f"{max_tokens} for the completion). Please reduce your prompt or completion length.",
                param="prompt" if len(prompt.ids) >= limit else "max_tokens",
                code="context_length_exceeded",
            )

    # ---- generation -------------------------------------------------------------
    async def create(self, req: CompletionRequest, prompts: list[PromptInput]) -> CompletionResponse:
        request_id, created = _new_id(), int(time.time())
        fingerprint = self.state.system_fingerprint
        num_choices = len(prompts) * (req.n or 1)
        texts: list[list[str]] = [[] for _ in range(num_choices)]
        logprobs = [Logprobs() if req.logprobs is not None else None for _ in range(num_choices)]
        finish: list[str | None] = [None] * num_choices
        completion_tokens = 0
        async with aclosing(self._deltas(req, prompts, request_id)) as deltas:
            async for delta in deltas:
                texts[delta.index].append(delta.text)
                if delta.logprobs is not None:
                    _extend(logprobs[delta.index], delta.logprobs)
                finish[delta.index] = delta.finish_reason or finish[delta.index]
                completion_tokens += delta.num_tokens
        choices = [
            CompletionChoice(index=i, text="".join(texts[i]), logprobs=logprobs[i], finish_reason=finish[i])
            for i in range(num_choices)
        ]
        return CompletionResponse(
            id=request_id,
            created=created,
            model=self.state.target.name,
            system_fingerprint=fingerprint,
            choices=choices,
            usage=_usage(prompts, completion_tokens),
        )

    async def stream(self, req: CompletionRequest, prompts: list[PromptInput]) -> AsyncIterator[str]:
        """SSE events: one chunk per engine step and choice, an optional usage
        chunk, then `data: [DONE]`. An error after the stream started is sent
        as an OpenAI error event (the status code is already 200)."""
        request_id, created = _new_id(), int(time.time())
        head = {
            "id": request_id,
            "created": created,
            "model": self.state.target.name,
            "system_fingerprint": self.state.system_fingerprint,
        }
        completion_tokens = 0
        try:
            async with aclosing(self._deltas(req, prompts, request_id)) as deltas:
                async for delta in deltas:
                    completion_tokens += delta.num_tokens
                    held_back = not (delta.logprobs and delta.logprobs.tokens)
                    if not delta.text and delta.finish_reason is None and held_back:
                        continue  # nothing to tell yet (text held back)
                    choice = CompletionChoice(
                        index=delta.index,
                        text=delta.text,
                        logprobs=delta.logprobs,
                        finish_reason=delta.finish_reason,
                    )
                    yield sse(CompletionChunk(**head, choices=[choice]).model_dump_json())
            if req.stream_options is not None and req.stream_options.include_usage:
                usage = _usage(prompts, completion_tokens)
                yield sse(CompletionChunk(**head, choices=[], usage=usage).model_dump_json())
        except EngineOverloaded as exc:
            yield sse(_json(error_body(str(exc), "rate_limit_error", code="server_overloaded")))
        except Exception:
            log.exception("stream %s failed", request_id)
            yield sse(
                _json(
                    error_body(
                        "The server had an error while processing your request.",
                        "server_error",
                        code="internal_error",
                    )
                )
            )
        yield sse("[DONE]")

    async def _deltas(
        self, req: CompletionRequest, prompts: list[PromptInput], request_id: str
    ) -> AsyncIterator[ChoiceDelta]:
        """All choices run concurrently in the engine, one task each; their
        deltas arrive here in the order they are produced. Closing this
        generator cancels every unfinished choice."""
        samples = req.n or 1
        queue: asyncio.Queue[ChoiceDelta | asyncio.Task] = asyncio.Queue()
        tasks: list[asyncio.Task] = []
        for i, prompt in enumerate(prompts):
            for sample in range(samples):
                choice = Choice(i * samples + sample, prompt, req, self.tokenizer)
                outputs = self.state.async_engine.generate(
                    prompt.ids, sampling_params(req, sample), f"{request_id}-{choice.index}"
                )
                task = asyncio.create_task(_run_choice(choice, outputs, queue))
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


async def _run_choice(choice: Choice, outputs: AsyncIterator[StepOutput], queue: asyncio.Queue) -> None:
    async with aclosing(outputs):  # leaving early (stop string, cancel) cancels the sequence
        async for out in outputs:
            delta = choice.consume(out)
            queue.put_nowait(delta)
            if delta.finish_reason is not None:
                return


def _extend(into: Logprobs, part: Logprobs) -> None:
    into.tokens += part.tokens
    into.token_logprobs += part.token_logprobs
    into.top_logprobs += part.top_logprobs
    into.text_offset += part.text_offset


def _usage(prompts: list[PromptInput], completion_tokens: int) -> Usage:
    prompt_tokens = sum(len(p.ids) for p in prompts)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def _json(body: dict) -> str:
    return json.dumps(body)


def get_completion_service(state: StateDep) -> CompletionService:
    return CompletionService(state)


CompletionServiceDep = Annotated[CompletionService, Depends(get_completion_service)]
