"""POST /v1/chat/completions behind the route: the messages go through the
model's own chat template (with the generation prompt), then, as for
completions (`service.api.generation`), one engine sequence per choice
(choice j uses seed + j), answered as one ChatCompletionResponse or as SSE
chunks (the role first, then content deltas, then the finish reason)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Annotated

import jinja2
from fastapi import Depends

from .chat_protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    ChatResponseMessage,
    ChatTokenLogprob,
    ChatTopLogprob,
)
from .deps import StateDep
from .detokenize import token_bytes
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


@dataclass
class ChatPrompt:
    prompt: PromptInput
    max_tokens: int  # the request's, or what the context leaves


def _new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class ChatService(GenerationService):
    # ---- checks before generating ---------------------------------------------
    async def prepare(self, req: ChatCompletionRequest) -> ChatPrompt:
        """Apply the chat template and check the request against the model; raise APIError."""
        self.check_request(req)
        prompt = await asyncio.to_thread(self._render, req.messages)
        limit = self.state.settings.max_model_len
        max_tokens = req.max_new_tokens or max(limit - len(prompt.ids), 1)
        max_param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        self.check_prompt(prompt, max_tokens, param="messages", max_param=max_param)
        self.check_capacity(req.n or 1)
        return ChatPrompt(prompt, max_tokens)

    def _render(self, messages: list[ChatMessage]) -> PromptInput:
        """Token ids of the conversation through the tokenizer's chat template."""
        conversation = [{"role": m.role, "content": m.text} for m in messages]
        try:
            ids = self.tokenizer.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except (ValueError, jinja2.TemplateError) as exc:  # no template, or the template refuses the messages
            raise APIError(
                400, f"The chat template cannot render these messages: {exc}", param="messages"
            ) from exc
        return PromptInput(list(ids), "")

    # ---- generation -------------------------------------------------------------
    async def create(self, req: ChatCompletionRequest, chat: ChatPrompt) -> ChatCompletionResponse:
        request_id, created = _new_id(), int(time.time())
        num_choices = req.n or 1
        texts: list[list[str]] = [[] for _ in range(num_choices)]
        tokens: list[list[ChatTokenLogprob]] = [[] for _ in range(num_choices)]
        finish: list[str | None] = [None] * num_choices
        completion_tokens = 0
        async with aclosing(self.deltas(self._jobs(req, chat, request_id))) as deltas:
            async for delta in deltas:
                texts[delta.index].append(delta.text)
                tokens[delta.index] += self._logprobs(delta.logprobs or [], req.top_logprobs or 0)
                finish[delta.index] = delta.finish_reason or finish[delta.index]
                completion_tokens += delta.num_tokens
        choices = [
            ChatChoice(
                index=i,
                message=ChatResponseMessage(content="".join(texts[i])),
                logprobs=ChatLogprobs(content=tokens[i]) if req.logprobs else None,
                finish_reason=finish[i],
            )
            for i in range(num_choices)
        ]
        return ChatCompletionResponse(
            **self._head(request_id, created),
            choices=choices,
            usage=usage(len(chat.prompt.ids), completion_tokens),
        )

    def stream(self, req: ChatCompletionRequest, chat: ChatPrompt) -> AsyncIterator[str]:
        request_id = _new_id()
        return sse_stream(self._chunks(req, chat, request_id), request_id)

    async def _chunks(
        self, req: ChatCompletionRequest, chat: ChatPrompt, request_id: str
    ) -> AsyncIterator[str]:
        head = self._head(request_id, int(time.time()))

        def chunk(index: int, delta: ChatDelta, **fields) -> str:
            choice = ChatChunkChoice(index=index, delta=delta, **fields)
            return ChatCompletionChunk(**head, choices=[choice]).model_dump_json()

        for index in range(req.n or 1):
            yield chunk(index, ChatDelta(role="assistant", content=""))
        completion_tokens = 0
        async with aclosing(self.deltas(self._jobs(req, chat, request_id))) as deltas:
            async for delta in deltas:
                completion_tokens += delta.num_tokens
                if delta.text or delta.logprobs:
                    yield chunk(
                        delta.index, ChatDelta(content=delta.text), logprobs=self._chunk_logprobs(req, delta)
                    )
                if delta.finish_reason is not None:
                    yield chunk(delta.index, ChatDelta(), finish_reason=delta.finish_reason)
        if req.include_usage:
            total = usage(len(chat.prompt.ids), completion_tokens)
            yield ChatCompletionChunk(**head, choices=[], usage=total).model_dump_json()

    def _jobs(self, req: ChatCompletionRequest, chat: ChatPrompt, request_id: str) -> list[ChoiceJob]:
        jobs = []
        for index in range(req.n or 1):
            choice = ChoiceText(index, chat.prompt, self.tokenizer, req.stop_strings, bool(req.logprobs))
            params = sampling_params(req, index, chat.max_tokens, req.num_logprobs)
            jobs.append(ChoiceJob(choice, chat.prompt.ids, params, f"{request_id}-{index}"))
        return jobs

    def _head(self, request_id: str, created: int) -> dict:
        return {
            "id": request_id,
            "created": created,
            "model": self.state.target.name,
            "system_fingerprint": self.state.system_fingerprint,
        }

    def _chunk_logprobs(self, req: ChatCompletionRequest, delta: ChoiceDelta) -> ChatLogprobs | None:
        if not req.logprobs:
            return None
        return ChatLogprobs(content=self._logprobs(delta.logprobs or [], req.top_logprobs or 0))

    def _logprobs(self, tokens: list[TokenLogprob], top_n: int) -> list[ChatTokenLogprob]:
        """The chat format: per token its text, log-prob, bytes and the top_n alternatives."""
        out = []
        for t in tokens:
            top = list((t.top or {}).items())[:top_n]  # the engine's order: most likely first
            out.append(
                ChatTokenLogprob(
                    **self._entry(t.token_id, t.logprob or 0.0).model_dump(),
                    top_logprobs=[self._entry(i, v) for i, v in top],
                )
            )
        return out

    def _entry(self, token_id: int, logprob: float) -> ChatTopLogprob:
        return ChatTopLogprob(
            token=self.tokenizer.decode([token_id]),
            logprob=logprob,
            bytes=token_bytes(self.tokenizer, token_id),
        )


def get_chat_service(state: StateDep) -> ChatService:
    return ChatService(state)


ChatServiceDep = Annotated[ChatService, Depends(get_chat_service)]
