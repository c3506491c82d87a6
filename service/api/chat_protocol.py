"""Request and response models of POST /v1/chat/completions (OpenAI chat
format). The sampling fields are `protocol.SamplingRequest`'s, shared with
completions; the messages are text only: image, audio and file parts, tool
messages and tool calls are refused with a 400 that says so."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_serializer,
)

from .protocol import SamplingRequest, Text, Usage

MAX_TOP_LOGPROBS = 20
ROLES = ("system", "user", "assistant")
TOOL_ROLES = ("tool", "function")
MEDIA_PARTS = ("image_url", "input_audio", "file", "image", "audio")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # the schema names the roles (clients and fuzzers read it); the validator words the refusal
    role: Text = Field(json_schema_extra={"enum": list(ROLES)})
    content: Text | list[TextPart]
    name: Text | None = None  # accepted as OpenAI does; the chat template does not read it
    tool_calls: list[Any] | None = None

    @field_validator("role")
    @classmethod
    def _role(cls, value: str) -> str:
        if value in TOOL_ROLES:
            raise ValueError(f"role '{value}' is not supported: draftloop serves no tools")
        if value not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got '{value}'")
        return value

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> Any:
        """Name the unsupported part kinds before the type check does, vaguely."""
        if value is None:
            raise ValueError("must be a string or a list of text parts")
        if isinstance(value, list):
            for part in value:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in MEDIA_PARTS:
                    raise ValueError(f"'{kind}' content parts are not supported: the model reads text only")
        return value

    @field_validator("tool_calls")
    @classmethod
    def _no_tool_calls(cls, value: list[Any] | None) -> None:
        if value:
            raise ValueError("tool calls are not supported: draftloop serves no tools")

    @property
    def text(self) -> str:
        """The content as one string (text parts joined, as OpenAI reads them)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(json_schema_extra={"minItems": 1})
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = Field(None, description="deprecated by OpenAI")
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool | None = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    @field_validator("messages")
    @classmethod
    def _messages(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not value:
            raise ValueError("must not be empty (send at least one message)")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("only allowed when 'logprobs' is true")
        return value

    @property
    def max_new_tokens(self) -> int | None:
        """max_completion_tokens, else max_tokens; None: up to the context length."""
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        """Top alternatives per token for the engine; None: no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class _ChatBody(BaseModel):
    id: str
    created: int
    model: str
    system_fingerprint: str


class ChatCompletionResponse(_ChatBody):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    """The role in a choice's first chunk, then content; the last chunk's delta is empty."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(_ChatBody):
    """One SSE event of a streamed chat completion; with
    stream_options.include_usage the last one carries `usage` and no choices."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
