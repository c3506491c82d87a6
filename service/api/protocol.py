"""Request and response models of the HTTP API (the fields both generation
endpoints share, OpenAI legacy completions, models, errors) plus draftloop's
own /health body; chat completions' own models are in `chat_protocol`.

Types are strict (a string is not a number, `true` is not 1) so a malformed
request is refused with a 400 naming the field instead of being guessed at.
Limits that need the model (context length, vocabulary, model name) are
checked in `service.api.generation`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from ..penalties import MAX_BIAS, MAX_BIAS_ENTRIES, MAX_PENALTY

MAX_STOP_STRINGS = 4
MAX_LOGPROBS = 5
MAX_N = 128

# the server answers greedily below this temperature, as vLLM does (1/T overflows otherwise)
MIN_SAMPLING_TEMPERATURE = 1e-5


def _check_unicode(text: str) -> str:
    """JSON may carry lone surrogates ("\\ud800"), which no tokenizer or UTF-8 response can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it contains a lone surrogate)") from None
    return text


Text = Annotated[StrictStr, AfterValidator(_check_unicode)]
TokenIds = list[StrictInt]
Prompt = StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
Penalty = Annotated[StrictFloat, Field(ge=-MAX_PENALTY, le=MAX_PENALTY)]
PROMPT_TYPES = "a string, a list of strings, a list of token ids or a list of lists of token ids"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False


class SamplingRequest(BaseModel):
    """The fields completions and chat completions share. Unknown fields are
    refused (400), so a parameter draftloop does not implement never silently
    does nothing."""

    model_config = ConfigDict(extra="forbid")

    model: Text | None = Field(None, description="the served model name; omitted: the served model")
    temperature: Annotated[StrictFloat, Field(ge=0.0, le=2.0)] | None = 1.0
    top_p: Annotated[StrictFloat, Field(gt=0.0, le=1.0)] | None = 1.0
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = Field(None, description="vLLM extension; -1 or 0: off")
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] | None = 1
    stop: StrictStr | list[StrictStr] | None = None
    seed: Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty | None = 0.0
    frequency_penalty: Penalty | None = 0.0
    logit_bias: dict[str, StrictFloat] | None = Field(
        None, description="token id (as a string) -> bias in [-100, 100] added to its logit"
    )
    user: Text | None = None
    ignore_eos: StrictBool = Field(False, description="vLLM extension: keep generating past EOS")

    @field_validator("stop", mode="wrap")
    @classmethod
    def _stop(cls, value: Any, handler) -> list[str]:
        try:
            stop = handler(value)
        except ValidationError:
            raise ValueError("must be a string or a list of strings") from None
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return [_check_unicode(s) for s in stops]

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        """Keys are token ids as decimal strings; whether the id is in the
        vocabulary is checked against the model (service.api.generation)."""
        if not value:
            return value
        if len(value) > MAX_BIAS_ENTRIES:
            raise ValueError(f"at most {MAX_BIAS_ENTRIES} entries are allowed")
        for key, bias in value.items():
            if not key.isascii() or not key.isdigit():
                raise ValueError(f"keys must be token ids (non-negative integers as strings), got {key!r}")
            if not -MAX_BIAS <= bias <= MAX_BIAS:
                raise ValueError(f"biases must be in [-{MAX_BIAS:g}, {MAX_BIAS:g}], got {bias:g} for {key}")
        return value

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("only allowed when 'stream' is true")
        return value

    @property
    def stop_strings(self) -> list[str]:
        return self.stop or []  # type: ignore[return-value]  # normalised by _stop

    @property
    def bias(self) -> dict[int, float]:
        """logit_bias with integer token ids."""
        return {int(k): v for k, v in (self.logit_bias or {}).items()}

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    prompt: Prompt
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = 16
    best_of: StrictInt | None = None
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: StrictBool | None = False
    suffix: Text | None = None

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt(cls, value: Any, handler) -> Prompt:
        try:
            prompt = handler(value)
        except ValidationError:
            raise ValueError(f"must be {PROMPT_TYPES}") from None
        prompts = _as_list(prompt)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("must not be empty")
        for p in prompts:
            if isinstance(p, str):
                _check_unicode(p)
        return prompt

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != (info.data.get("n") or 1):
            raise ValueError("not supported by draftloop; omit it or set it equal to n")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> None:
        if value:
            raise ValueError("not supported by draftloop (no insertion)")

    # -- the values the server uses (None means the OpenAI default) --
    @property
    def prompts(self) -> list[str] | list[list[int]]:
        """The prompt as a list of prompts (strings or token-id lists)."""
        return _as_list(self.prompt)


def _as_list(prompt: Prompt) -> list:
    """A prompt as a list of prompts: "a" -> ["a"], [1, 2] -> [[1, 2]]."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)


class Logprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Logprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _CompletionBody(BaseModel):
    """The fields a completion and each of its stream events share."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]


class CompletionResponse(_CompletionBody):
    usage: Usage


class CompletionChunk(_CompletionBody):
    """One SSE event of a streamed completion; the optional last one carries
    `usage` and no choices (stream_options.include_usage)."""

    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "draftloop"
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class SpecDecodeStatus(BaseModel):
    """The engine's own acceptance statistics since start (the same
    observations that feed the Prometheus counters)."""

    num_speculative_tokens: int
    num_drafts: int
    num_draft_tokens: int
    num_accepted_tokens: int
    tau: float = Field(description="mean acceptance length: 1 + accepted / drafts (1.0 before any draft)")
    per_position_acceptance: list[float]


class DrafterStatus(BaseModel):
    kind: str
    version: str


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    drafter: DrafterStatus
    spec_decode: SpecDecodeStatus
    cost_model: dict[str, Any] = Field(
        default_factory=dict,
        description="this machine's measured verify cost (seconds for 1..K+1 rows), the dtype choice"
        " of DRAFTLOOP_DTYPE=auto, and the draft-length stop thresholds derived from them",
    )
