"""The OpenAI chat completions wire format: request, response, stream chunk, model list and error body.

Only what this server honours is modelled. Types are strict, as OpenAI's are ("10" is not a number, true is not
1). Unknown fields are ignored, as OpenAI ignores fields a model does not use; fields that would change the answer
in a way we cannot honour (several choices, tools, JSON mode, log probabilities, logit bias, penalties) are
accepted only with values that change nothing, and otherwise rejected with a 400 naming the field.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, field_validator, model_serializer

MAX_STOP_SEQUENCES = 4  # as OpenAI
# The range torch's generator seeds take (as OpenAI's API, any 64-bit integer).
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1


def _valid_text(text: str) -> str:
    """`text`, refused if it cannot be encoded as UTF-8 (a lone surrogate such as "\\ud800" in the JSON)."""
    try:
        text.encode()
    except UnicodeEncodeError as error:
        raise ValueError(f"contains an unpaired surrogate at position {error.start}: not valid Unicode text") from error
    return text


def flatten_text_content(content: object) -> str:
    """The text of a message's content: a string, or a list of text blocks joined by newlines.

    A block is a string or {"type": "text", "text": ...} (OpenAI's content parts; Gradio 6's chatbot history
    uses the same shape). Chat templates such as Phi-3's only accept a string.
    """
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError("content must be a string or a list of text parts")  # noqa: TRY004 (pydantic reports ValueError)
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:  # named by its type, never echoed (it may be huge, or deeply nested)
            kind = repr(part.get("type")) if isinstance(part, dict) else f"a JSON {_json_type(part)}"
            raise ValueError(f"only text content is supported, got {kind} content")
    return "\n".join(texts)


def _json_type(value: object) -> str:
    return {list: "array", dict: "object", bool: "boolean", int: "number", float: "number"}.get(type(value), "null")


class ChatMessage(BaseModel):
    # "developer" is OpenAI's newer name for the system role; it is served as a system message.
    role: Literal["system", "developer", "user", "assistant"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _flatten(cls, content: object) -> str:
        return _valid_text(flatten_text_content(content))

    def as_prompt_message(self) -> dict[str, str]:
        """The {"role", "content"} dict ModelService templates."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


class ResponseFormat(BaseModel):
    type: str

    @field_validator("type")
    @classmethod
    def _text_only(cls, type: str) -> str:
        if type != "text":
            raise ValueError("only text responses are supported by this server (no JSON mode or structured outputs)")
        return type


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    # One of GET /v1/models' ids; None: the default model (the first adapter). The reply names the model that ran.
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name; wins over max_tokens
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1)  # not in OpenAI's API; vLLM and others accept it
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=MIN_SEED, le=MAX_SEED)
    # Accepted only with values that change nothing, so that clients sending their defaults still work.
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported: send one request per choice")
        return n

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        for sequence in [stop] if isinstance(stop, str) else stop or []:
            _valid_text(sequence)
        return stop

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, logprobs: bool | None) -> bool | None:
        if logprobs:
            raise ValueError("log probabilities are not supported by this server")
        return logprobs

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, top_logprobs: int | None) -> int | None:
        if top_logprobs:
            raise ValueError("log probabilities are not supported by this server")
        return top_logprobs

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, tools: list[Any] | None) -> list[Any] | None:
        if tools:
            raise ValueError("tools (function calling) are not supported by this server")
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, tool_choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if tool_choice not in (None, "none", "auto"):
            raise ValueError("tools (function calling) are not supported by this server: use 'none' or 'auto'")
        return tool_choice

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, logit_bias: dict[str, float] | None) -> dict[str, float] | None:
        if logit_bias:
            raise ValueError("logit bias is not supported by this server")
        return logit_bias

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, penalty: float | None) -> float | None:
        if penalty:
            raise ValueError("presence and frequency penalties are not supported by this server: use 0")
        return penalty

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage_in_stream(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _omit_empty_fields(self, serialize: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # As OpenAI: the first delta has the role, the next ones the content, the last one nothing.
        return {name: value for name, value in serialize(self).items() if value is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None  # only on the extra last chunk when stream_options.include_usage is set


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "inference_app"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
