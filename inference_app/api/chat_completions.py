"""Chat completions (the logic behind POST /v1/chat/completions): parse and validate the request, map it to
sampling settings, run it on the ModelService, and answer with one chat.completion or a stream of
chat.completion.chunk events.

The request is fully validated, and the first chunk of the reply awaited, before any status is sent, so that a
prompt too long for the context or a full server still gets its own status, even when streaming. However the
response ends (finished, failed, the client gone, the server shutting down), the generation is closed and its slot
freed. A reply still running when the server must stop ends with an error the client can read: an error event in a
stream, a 503 otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from inference_app.api.errors import RETRY_AFTER_LOADING_S, ApiError, validation_error
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
    Usage,
    new_completion_id,
    now,
)
from inference_app.client_limit import PerClientLimit
from inference_app.service import FinishReason, GenerationChunk, ModelService, SamplingParams
from inference_app.settings import Settings
from inference_app.web.auth import client_address

logger = logging.getLogger(__name__)

SHUTTING_DOWN_MESSAGE = (
    "the server is shutting down and cut this reply short: retry (another replica, or this one once restarted)"
)


class ChatCompletionServing:
    """Serves chat completion requests on one ModelService."""

    def __init__(
        self, settings: Settings, service: ModelService, client_limit: PerClientLimit, stopping: asyncio.Event
    ) -> None:
        self._settings = settings
        self._service = service
        self._client_limit = client_limit
        self._stopping = stopping  # set when the server must stop: running replies end with an error

    async def create(self, request: Request) -> Response:
        """The answer to one POST /v1/chat/completions: a chat.completion, an event stream, or an error (an ApiError,
        or a refusal of the service that inference_app.api.errors answers)."""
        service = self._service
        _require_json_body(request)
        # Parsed on a worker thread: a large body does not hold up the event loop.
        completion_request = await asyncio.to_thread(_parse_request, await request.body())
        messages = [message.as_prompt_message() for message in completion_request.messages]
        chunks = self._client_limit.limited(
            client_address(request),
            service.stream_chat(messages, _sampling_params(completion_request, self._settings), wait=False),
        )
        first = await anext(chunks)  # ModelService and the per-client limit refuse a request here, before generating
        if completion_request.stream:
            events = _stream_events(completion_request, service.served_model_id(), first, chunks, self._stopping)
            return _ClosingStreamingResponse(events, chunks)
        return await _complete(request, service.served_model_id(), first, chunks, self._stopping)


def _require_json_body(request: Request) -> None:
    """Refuses a body not declared as JSON: a page on another site can send text/plain or a form without a CORS
    preflight, and in no-password mode would otherwise start generations on a local server."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(
            415,
            f"the request body must be JSON sent with 'Content-Type: application/json', got {media_type or 'none'!r}",
            code="unsupported_media_type",
        )


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


def _sampling_params(request: ChatCompletionRequest, settings: Settings) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=request.requested_max_tokens or settings.max_new_tokens_cap,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        stop=request.stop_sequences,
        seed=request.seed,
    )


async def _complete(
    request: Request,
    model: str,
    first: GenerationChunk,
    chunks: AsyncGenerator[GenerationChunk, None],
    stopping: asyncio.Event,
) -> Response:
    """The whole reply as one chat.completion; a client that hangs up stops the generation, and so does the server
    stopping (503)."""
    collecting = asyncio.ensure_future(_collect(first, chunks))
    disconnected = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    stopped = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({collecting, disconnected, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnected.cancel()
        stopped.cancel()
        if not collecting.done():
            collecting.cancel()  # closes the generation: its slot is freed
        await asyncio.gather(collecting, disconnected, stopped, return_exceptions=True)
    if collecting.cancelled() and stopping.is_set():
        return _shutting_down().response()
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


def _shutting_down() -> ApiError:
    return ApiError(
        503,
        SHUTTING_DOWN_MESSAGE,
        type="service_unavailable",
        code="server_shutting_down",
        headers={"Retry-After": str(RETRY_AFTER_LOADING_S)},
    )


async def _until_stopping(
    chunks: AsyncGenerator[GenerationChunk, None], stopping: asyncio.Event
) -> AsyncGenerator[GenerationChunk, None]:
    """The chunks, until `stopping` is set: then the wait for the next one is cancelled (which closes the
    generation) and the server's shutdown error is raised."""
    stopped = asyncio.ensure_future(stopping.wait())
    next_chunk: asyncio.Future[GenerationChunk] | None = None
    try:
        while True:
            next_chunk = asyncio.ensure_future(anext(chunks))
            await asyncio.wait({next_chunk, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not next_chunk.done():
                raise _shutting_down()
            try:
                chunk = next_chunk.result()
            except StopAsyncIteration:
                return
            yield chunk
    finally:
        stopped.cancel()
        if next_chunk is not None and not next_chunk.done():  # stopping, or the client gone
            next_chunk.cancel()  # closes the generation
            await asyncio.gather(next_chunk, return_exceptions=True)


async def _stream_events(
    request: ChatCompletionRequest,
    model: str,
    first: GenerationChunk,
    chunks: AsyncGenerator[GenerationChunk, None],
    stopping: asyncio.Event,
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
            async for last in _until_stopping(chunks, stopping):
                if last.text:
                    yield event(Delta(content=last.text))
    except ApiError as error:  # the server is shutting down
        yield _sse(ErrorBody(error=error.detail).model_dump())
        return
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
