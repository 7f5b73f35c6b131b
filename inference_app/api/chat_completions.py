"""Chat completions (the logic behind POST /v1/chat/completions): parse and validate the request, map it to
sampling settings, run it on the ModelService, and answer with one chat.completion or a stream of
chat.completion.chunk events.

The request is fully validated, and the first chunk of the reply awaited, before any status is sent, so that a
prompt too long for the context or a full server still gets its own status, even when streaming. However the
response ends (finished, failed, the client gone), the generation is closed and its slot freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Iterator
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from inference_app.api.errors import ApiError, validation_error
from inference_app.api.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ErrorBody,
    ErrorDetail,
    FinishReason,
    Usage,
    new_completion_id,
    now,
)
from inference_app.prompt_limits import refuse_overlong_prompt
from inference_app.service import (
    CapacityExceededError,
    GenerationChunk,
    ModelNotReadyError,
    ModelService,
    PromptTooLongError,
    SamplingParams,
    UnknownModelError,
)
from inference_app.settings import Settings

logger = logging.getLogger(__name__)

# Seconds a client should wait before retrying: a slot frees when any running reply ends; loading takes longer.
RETRY_AFTER_BUSY_S = 1
RETRY_AFTER_LOADING_S = 10


class ChatCompletionServing:
    """Serves chat completion requests on one ModelService."""

    def __init__(self, settings: Settings, service: ModelService) -> None:
        self._settings = settings
        self._service = service

    async def create(self, request: Request) -> Response:
        """The answer to one POST /v1/chat/completions: a chat.completion, an event stream, or an error."""
        service = self._service
        try:
            # Parsed on a worker thread: a large body does not hold up the event loop.
            completion_request = await asyncio.to_thread(_parse_request, await request.body())
            model = resolve_model(service, completion_request.model)
            _require_ready(service)
            messages = [message.as_prompt_message() for message in completion_request.messages]
            with _engine_errors_as_api_errors():
                refuse_overlong_prompt(service, messages)
                params = _sampling_params(completion_request, self._settings)
                chunks = service.stream_chat(messages, params, wait=False, model=model)
                first = await anext(chunks)  # ModelService raises its request errors here, before generating
        except ApiError as error:
            return error.response()
        if completion_request.stream:
            events = _stream_events(completion_request, model, first, chunks)
            return _ClosingStreamingResponse(events, chunks)
        return await _complete(request, model, first, chunks)


def resolve_model(service: ModelService, model_id: str | None) -> str:
    """The served model a request runs; 404 model_not_found (as OpenAI answers) listing the served ones."""
    try:
        return service.resolve_model(model_id)
    except UnknownModelError as error:
        raise ApiError(404, str(error), param="model", code="model_not_found") from error


def _parse_request(body: bytes) -> ChatCompletionRequest:
    try:
        payload = json.loads(body)
    except ValueError as error:  # also UnicodeDecodeError
        raise ApiError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from error
    except RecursionError as error:
        raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from error
    if not isinstance(payload, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return ChatCompletionRequest.model_validate(payload)
    except ValidationError as error:
        raise validation_error(error) from error
    except RecursionError as error:
        raise ApiError(400, "the request body is nested too deeply", code="invalid_value") from error


def _require_ready(service: ModelService) -> None:
    if service.status == "loading":
        raise ApiError(
            503,
            "the model is still loading; retry shortly (GET /ready turns 200 when it is served)",
            type="service_unavailable",
            code="model_loading",
            headers={"Retry-After": str(RETRY_AFTER_LOADING_S)},
        )
    if service.status == "failed":
        raise ApiError(
            503, f"the model failed to load: {service.failure_reason}", type="service_unavailable", code="model_failed"
        )


def _sampling_params(request: ChatCompletionRequest, settings: Settings) -> SamplingParams:
    # top_p 0 keeps only the likeliest token: greedy, like temperature 0.
    greedy = request.temperature == 0 or request.top_p == 0
    return SamplingParams(
        max_new_tokens=request.requested_max_tokens or settings.max_new_tokens_cap,
        temperature=0.0 if greedy else request.temperature,
        top_p=1.0 if greedy else request.top_p,
        top_k=request.top_k,
        stop=request.stop_sequences,
        seed=request.seed,
    )


@contextlib.contextmanager
def _engine_errors_as_api_errors() -> Iterator[None]:
    """ModelService's request errors as the API answers them."""
    try:
        yield
    except PromptTooLongError as error:
        raise ApiError(400, str(error), param="messages", code="context_length_exceeded") from error
    except CapacityExceededError as error:
        raise ApiError(
            429,
            str(error),
            type="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(RETRY_AFTER_BUSY_S)},
        ) from error
    except ModelNotReadyError as error:
        raise ApiError(503, str(error), type="service_unavailable", code="model_loading") from error
    except ValueError as error:
        raise ApiError(400, str(error), param="messages", code="invalid_value") from error


async def _complete(
    request: Request, model: str, first: GenerationChunk, chunks: AsyncGenerator[GenerationChunk, None]
) -> Response:
    """The whole reply as one chat.completion; a client that hangs up stops the generation."""
    collecting = asyncio.ensure_future(_collect(first, chunks))
    disconnected = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({collecting, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnected.cancel()
        if not collecting.done():
            collecting.cancel()  # closes the generation: its slot is freed
        await asyncio.gather(collecting, disconnected, return_exceptions=True)
    if collecting.cancelled():
        return Response(status_code=499)  # nobody is listening any more (nginx's "client closed request")
    try:
        text, last = collecting.result()
    except Exception as error:
        logger.exception("generation failed")
        return ApiError(500, f"generation failed: {error}", type="server_error").response()
    completion = ChatCompletion(
        id=new_completion_id(),
        created=now(),
        model=model,
        choices=[Choice(message=AssistantMessage(content=text), finish_reason=_finish_reason(last))],
        usage=Usage.of(last.prompt_tokens, last.completion_tokens),
    )
    return JSONResponse(completion.model_dump())


async def _collect(
    first: GenerationChunk, chunks: AsyncGenerator[GenerationChunk, None]
) -> tuple[str, GenerationChunk]:
    texts, last = [first.text], first
    async with contextlib.aclosing(chunks):
        async for last in chunks:
            texts.append(last.text)
    return "".join(texts), last


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _stream_events(
    request: ChatCompletionRequest, model: str, first: GenerationChunk, chunks: AsyncGenerator[GenerationChunk, None]
) -> AsyncGenerator[str, None]:
    completion_id, created = new_completion_id(), now()

    def event(delta: Delta, finish_reason: FinishReason | None = None) -> str:
        chunk = ChatCompletionChunk(
            id=completion_id,
            created=created,
            model=model,
            choices=[ChunkChoice(delta=delta, finish_reason=finish_reason)],
        )
        return _sse(chunk.model_dump())

    yield event(Delta(role="assistant", content=""))
    last = first
    try:
        if first.text:
            yield event(Delta(content=first.text))
        if first.finish_reason is None:
            async for last in chunks:
                if last.text:
                    yield event(Delta(content=last.text))
    except Exception as error:  # the status is already sent: report in the stream, as OpenAI does
        logger.exception("generation failed while streaming")
        yield _sse(
            ErrorBody(error=ErrorDetail(message=f"generation failed: {error}", type="server_error")).model_dump()
        )
        return
    yield event(Delta(), _finish_reason(last))
    if request.include_usage_in_stream:
        usage_chunk = ChatCompletionChunk(
            id=completion_id,
            created=created,
            model=model,
            choices=[],
            usage=Usage.of(last.prompt_tokens, last.completion_tokens),
        )
        yield _sse(usage_chunk.model_dump())
    yield "data: [DONE]\n\n"


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _finish_reason(last: GenerationChunk) -> FinishReason:
    return last.finish_reason or "stop"


class _ClosingStreamingResponse(StreamingResponse):
    """Server-sent events that close the generation however the response ends: finished, failed, or the client
    gone (Starlette then cancels the stream, and an event generator that never started runs no cleanup)."""

    def __init__(self, events: AsyncGenerator[str, None], chunks: AsyncGenerator[GenerationChunk, None]) -> None:
        # X-Accel-Buffering: no keeps nginx-style proxies from holding back the events.
        super().__init__(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self._events, self._chunks = events, chunks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()
            await self._chunks.aclose()  # frees the generation slot
