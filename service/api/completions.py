"""POST /v1/completions behind the route: a CompletionRequest becomes one
engine sequence per choice (prompt i, sample j -> choice i * n + j), and
their outputs come back as one CompletionResponse or as SSE chunks. The
checks, the engine fan-out, detokenization and stop strings are shared with
chat completions (`service.api.generation`)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Annotated

from fastapi import Depends

from .deps import StateDep
from .errors import APIError
from .generation import (
    ChoiceDelta,
    ChoiceJob,
    ChoiceText,
    GenerationService,
    PromptInput,
    TokenLogprob,
    sampling_params,
    sse_stream,
    usage,
)
from .protocol import CompletionChoice, CompletionChunk, CompletionRequest, CompletionResponse, Logprobs

DEFAULT_MAX_TOKENS = 16


def _new_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


class CompletionService(GenerationService):
    # ---- checks before generating ---------------------------------------------
    async def prepare(self, req: CompletionRequest) -> list[PromptInput]:
        """Tokenize and check the request against the model; raise APIError."""
        self.check_request(req)
        prompts = await asyncio.to_thread(self._tokenize, req.prompts)
        max_tokens = req.max_tokens or DEFAULT_MAX_TOKENS
        for prompt in prompts:
            self.check_prompt(prompt, max_tokens)
        self.check_capacity(len(prompts) * (req.n or 1))
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

    # ---- generation -------------------------------------------------------------
    async def create(self, req: CompletionRequest, prompts: list[PromptInput]) -> CompletionResponse:
        request_id, created = _new_id(), int(time.time())
        num_choices = len(prompts) * (req.n or 1)
        texts: list[list[str]] = [[] for _ in range(num_choices)]
        logprobs = [Logprobs() if req.logprobs is not None else None for _ in range(num_choices)]
        finish: list[str | None] = [None] * num_choices
        completion_tokens = 0
        async with aclosing(self.deltas(self._jobs(req, prompts, request_id))) as deltas:
            async for delta in deltas:
                texts[delta.index].append(delta.text)
                if delta.logprobs is not None:
                    _extend(logprobs[delta.index], self._logprobs(delta.logprobs))
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
            system_fingerprint=self.state.system_fingerprint,
            choices=choices,
            usage=usage(_prompt_tokens(prompts), completion_tokens),
        )

    def stream(self, req: CompletionRequest, prompts: list[PromptInput]) -> AsyncIterator[str]:
        """SSE events: one chunk per engine step and choice, an optional usage
        chunk, then `data: [DONE]`."""
        request_id = _new_id()
        return sse_stream(self._chunks(req, prompts, request_id), request_id)

    async def _chunks(
        self, req: CompletionRequest, prompts: list[PromptInput], request_id: str
    ) -> AsyncIterator[str]:
        head = {
            "id": request_id,
            "created": int(time.time()),
            "model": self.state.target.name,
            "system_fingerprint": self.state.system_fingerprint,
        }
        completion_tokens = 0
        async with aclosing(self.deltas(self._jobs(req, prompts, request_id))) as deltas:
            async for delta in deltas:
                completion_tokens += delta.num_tokens
                if not delta.text and delta.finish_reason is None and not delta.logprobs:
                    continue  # nothing to tell yet (text held back)
                yield CompletionChunk(**head, choices=[self._choice(delta)]).model_dump_json()
        if req.include_usage:
            total = usage(_prompt_tokens(prompts), completion_tokens)
            yield CompletionChunk(**head, choices=[], usage=total).model_dump_json()

    def _jobs(self, req: CompletionRequest, prompts: list[PromptInput], request_id: str) -> list[ChoiceJob]:
        samples, max_tokens = req.n or 1, req.max_tokens or DEFAULT_MAX_TOKENS
        jobs = []
        for i, prompt in enumerate(prompts):
            for sample in range(samples):
                index = i * samples + sample
                choice = ChoiceText(
                    index, prompt, self.tokenizer, req.stop_strings, req.logprobs is not None, bool(req.echo)
                )
                params = sampling_params(req, sample, max_tokens, req.logprobs, bool(req.echo))
                jobs.append(ChoiceJob(choice, prompt.ids, params, f"{request_id}-{index}"))
        return jobs

    def _choice(self, delta: ChoiceDelta) -> CompletionChoice:
        logprobs = self._logprobs(delta.logprobs) if delta.logprobs is not None else None
        return CompletionChoice(
            index=delta.index, text=delta.text, logprobs=logprobs, finish_reason=delta.finish_reason
        )

    def _logprobs(self, tokens: list[TokenLogprob]) -> Logprobs:
        """The legacy format: parallel lists keyed by token text."""
        out = Logprobs()
        for t in tokens:
            out.tokens.append(self._token_str(t.token_id))
            out.token_logprobs.append(t.logprob)
            out.top_logprobs.append(
                None if t.top is None else {self._token_str(i): v for i, v in t.top.items()}
            )
            out.text_offset.append(t.offset)
        return out

    def _token_str(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


def _extend(into: Logprobs, part: Logprobs) -> None:
    into.tokens += part.tokens
    into.token_logprobs += part.token_logprobs
    into.top_logprobs += part.top_logprobs
    into.text_offset += part.text_offset


def _prompt_tokens(prompts: list[PromptInput]) -> int:
    return sum(len(p.ids) for p in prompts)  # each prompt once, whatever n


def get_completion_service(state: StateDep) -> CompletionService:
    return CompletionService(state)


CompletionServiceDep = Annotated[CompletionService, Depends(get_completion_service)]
