"""The OpenAI chat completions wire format: request, response, stream chunk, model list and error body.

Only what this server honours is modelled. Types are strict, as OpenAI's are ("10" is not a number, true is not
1); the sampling settings' ranges are checked by the service (inference_app.engine.types.SamplingParams, and
ModelService for top_k), for the UI too. Unknown fields are ignored, as OpenAI ignores fields a model does not use;
fields that would change the answer in a way we cannot honour (legacy `functions`, content other than text) are
rejected with a 400 naming the field.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from inference_app.engine.types import FinishReason
from inference_app.service import MAX_MESSAGES

MAX_STOP_SEQUENCES = 4  # as OpenAI
MAX_CHOICES = 8  # n: each choice takes a generation slot of its own
MAX_TOP_LOGPROBS = 20  # as OpenAI
MAX_LOGIT_BIAS = 100.0  # as OpenAI: -100 bans a token, 100 all but forces it


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


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    # "developer" is OpenAI's newer name for the system role; it is served as a system message. Tool calls and tool
    # results are rendered into the prompt as text (inference_app.api.tool_calls).
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | None = Field(description="text; may be null only in an assistant message with tool_calls")
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # the call a tool message answers

    @field_validator("content", mode="before")
    @classmethod
    def _flatten(cls, content: object) -> str | None:
        return None if content is None else _valid_text(flatten_text_content(content))

    @model_validator(mode="after")
    def _content_unless_tool_calls(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content may be null only in an assistant message with tool_calls")
        return self


class JsonSchemaFormat(BaseModel):
    name: str
    description: str | None = None
    # "schema" would shadow BaseModel's attribute.
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # enforced either way: the reply always follows the schema


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_json_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("a response_format of type 'json_schema' needs its 'json_schema' object")
        return self


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")  # as OpenAI
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments; None: no arguments
    strict: bool | None = None  # enforced either way


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    # One of GET /v1/models' ids; None: the default model (the first adapter). The reply names the model that ran.
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name; wins over max_tokens
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None  # not in OpenAI's API; vLLM and others accept it
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    functions: list[Any] | None = None  # OpenAI's deprecated form of tools: refused, naming the fix
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None  # at most one call per reply either way
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        for sequence in [stop] if isinstance(stop, str) else stop or []:
            _valid_text(sequence)
        return stop

    @field_validator("functions")
    @classmethod
    def _no_functions(cls, functions: list[Any] | None) -> list[Any] | None:
        if functions:
            raise ValueError("the deprecated 'functions' are not supported: send them as 'tools'")
        return functions

    @field_validator("logit_bias")
    @classmethod
    def _token_ids_and_bounded_biases(cls, logit_bias: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (logit_bias or {}).items():
            if not key.isdigit():  # named, never echoed in full (it may be huge)
                raise ValueError(f"keys must be token ids (non-negative integers), got {key[:40]!r}")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"the bias of token {key} must be in [-100, 100], got {bias}")
        return logit_bias

    # Each check of one field against an earlier one runs as that field's validator, so the 400 names it.
    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, options: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed with stream: true")
        return options

    @field_validator("top_logprobs")
    @classmethod
    def _only_with_logprobs(cls, top_logprobs: int | None, info: ValidationInfo) -> int | None:
        if top_logprobs is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return top_logprobs

    @field_validator("tool_choice")
    @classmethod
    def _a_given_tool(cls, choice: ToolChoice | None, info: ValidationInfo) -> ToolChoice | None:
        tools: list[Tool] = info.data.get("tools") or []
        if isinstance(choice, NamedToolChoice) and choice.function.name not in [tool.function.name for tool in tools]:
            raise ValueError(f"the function {choice.function.name!r} is not in tools")
        if choice == "required" and not tools:
            raise ValueError("'required' needs tools")
        return choice

    @field_validator("response_format")
    @classmethod
    def _not_with_a_tool_call(cls, reply_format: ResponseFormat | None, info: ValidationInfo) -> ResponseFormat | None:
        calls_tools = bool(info.data.get("tools")) and info.data.get("tool_choice") != "none"
        if calls_tools and reply_format is not None and reply_format.type != "text":
            raise ValueError("a JSON response_format and tools (unless tool_choice is 'none') cannot both be used")
        return reply_format

    @property
    def calls_tools(self) -> bool:
        """Whether the reply may be a tool call (tools given and tool_choice not "none")."""
        return bool(self.tools) and self.tool_choice != "none"

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


# A choice also ends in a tool call (the engine's reasons are the text's).
ChoiceFinishReason = FinishReason | Literal["tool_calls"]


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
    content: str | None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _omit_no_tool_calls(self, serialize: SerializerFunctionWrapHandler) -> dict[str, Any]:
        message: dict[str, Any] = serialize(self)
        if message["tool_calls"] is None:
            del message["tool_calls"]
        return message


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobEntry]


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: ChoiceFinishReason
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ToolCallDelta(ToolCall):
    index: int = 0


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer(mode="wrap")
    def _omit_empty_fields(self, serialize: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # As OpenAI: the first delta has the role, the next ones the content, the last one nothing.
        return {name: value for name, value in serialize(self).items() if value is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: ChoiceFinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


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
