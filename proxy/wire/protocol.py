"""Request and response models mirroring the OpenAI spec. Unknown request fields are kept (engines have many vendor
extras); responses the proxy makes itself carry the `ttc` object as a vendor extra."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator

from ..errors import InvalidRequest


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow")


class ChatMessage(OpenAIModel):
    # What _content_required checks, for the published schema.
    model_config = ConfigDict(extra="allow", json_schema_extra={"anyOf": [
        {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
        {"properties": {"role": {"const": "assistant"}}, "anyOf": [
            {"required": ["tool_calls"], "properties": {"tool_calls": {"type": "array", "minItems": 1}}},
            {"required": ["function_call"], "properties": {"function_call": {"type": "object", "minProperties": 1}}},
        ]},
    ]})

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _content_required(self) -> "ChatMessage":
        has_calls = bool(getattr(self, "tool_calls", None) or getattr(self, "function_call", None))
        if self.content is None and not (self.role == "assistant" and has_calls):
            raise ValueError(f"a {self.role} message needs 'content'")
        return self


class StreamOptions(OpenAIModel):
    include_usage: bool | None = None


class ChatCompletionRequest(OpenAIModel):
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=128)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionRequest(OpenAIModel):
    model: str = Field(min_length=1)
    prompt: str | list[Any] = ""
    stream: bool | None = False
    n: int | None = Field(default=None, ge=1, le=128)
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0, le=2)


# ---------------------------------------------------------------- model-routed utilities (vLLM's shapes)


class TokenizeRequest(OpenAIModel):
    """`{model, prompt}` or `{model, messages, add_generation_prompt}`: the messages are rendered with the backend's
    chat template first. Special-token text in the prompt is parsed; no BOS is added."""

    model: str = Field(min_length=1)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give 'prompt' (a string) or 'messages' (a non-empty list), exactly one of them")
        return self


class TokenizeResponse(OpenAIModel):
    tokens: list[int]
    count: int


class DetokenizeRequest(OpenAIModel):
    model: str = Field(min_length=1)
    tokens: list[Annotated[StrictInt, Field(ge=0)]]


class DetokenizeResponse(OpenAIModel):
    prompt: str


# ---------------------------------------------------------------- responses the proxy makes (strategy runs)


class TopLogprob(OpenAIModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(OpenAIModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class CompletionTokensDetails(OpenAIModel):
    reasoning_tokens: int = 0


class PromptTokensDetails(OpenAIModel):
    cached_tokens: int = 0  # served from the engine's prefix cache, summed over a strategy's calls


class UsageInfo(OpenAIModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None


class ResponseMessage(OpenAIModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    reasoning_content: str | None = None  # the strategy's progress, as llama-server and vLLM name thinking


class Choice(OpenAIModel):
    index: int
    message: ResponseMessage
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter", "function_call"]
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(OpenAIModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: UsageInfo


class Delta(OpenAIModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None


class ChunkChoice(OpenAIModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter", "function_call"] | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(OpenAIModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: UsageInfo | None = None


def validate_request(model: type[OpenAIModel], payload: Any) -> Any:
    """Validate a parsed body; the first problem becomes a 400 naming the field."""
    if not isinstance(payload, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_body")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        extra = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        raise InvalidRequest(message + extra, param=param, code="invalid_value") from exc


def choice_index(choice: Mapping[str, Any], default: int = 0) -> int:
    """A backend choice's `index`, or `default` where the engine sent none or not an integer."""
    index = choice.get("index")
    return index if isinstance(index, int) and not isinstance(index, bool) else default
