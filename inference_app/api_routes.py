"""HTTP routes: liveness, readiness, the OpenAI-compatible /v1 API and its docs (the latter behind the password in
password mode).

Every invalid request gets an OpenAI-style error body ({"error": {"message", "type", "param", "code"}}) with a
4xx status; the request is fully validated, and the first chunk of the reply awaited, before any status is sent,
so that a prompt too long for the context or a full server still gets its own status, even when streaming.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from inference_app.api_schema import (
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
    ModelCard,
    ModelList,
    Usage,
    new_completion_id,
    now,
)
from inference_app.auth import INVALID_CREDENTIALS_MESSAGE, WWW_AUTHENTICATE, PasswordCheck
from inference_app.generation import (
    CapacityExceededError,
    GenerationChunk,
    ModelNotReadyError,
    ModelService,
    PromptTooLongError,
    SamplingParams,
)
from inference_app.settings import Settings

logger = logging.getLogger(__name__)

# Seconds a client should wait before retrying: a slot frees when any running reply ends; loading takes longer.
RETRY_AFTER_BUSY_S = 1
RETRY_AFTER_LOADING_S = 10


class ApiError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(
        self,
        status_code: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)
        self.headers = headers

    def response(self) -> JSONResponse:
        body = ErrorBody(error=self.detail).model_dump()
        return JSONResponse(body, status_code=self.status_code, headers=self.headers)


def add_api_routes(app: FastAPI, settings: Settings, service: ModelService, check: PasswordCheck | None) -> None:
    """The health probes, open to all (the platform's probes carry no credentials); the OpenAI API and its docs,
    behind `check` in password mode. The app must be built without FastAPI's own docs routes, which take no
    dependencies (docs_url, redoc_url and openapi_url None)."""
    credentials = [] if check is None else [Depends(_credentials_dependency(check))]
    app.add_exception_handler(ApiError, _api_error_response)
    app.include_router(_health_router(service))
    app.include_router(_openai_router(settings, service), dependencies=credentials)
    app.include_router(_docs_router(app), dependencies=credentials)


def _credentials_dependency(check: PasswordCheck) -> Callable[[Request], Awaitable[None]]:
    async def require_credentials(request: Request) -> None:
        # The same answer whatever was wrong, and never an echo of what the client sent.
        if not check.accepts_authorization(request.headers.get("Authorization")):
            raise ApiError(
                401,
                INVALID_CREDENTIALS_MESSAGE,
                code="invalid_api_key",
                headers={"WWW-Authenticate": WWW_AUTHENTICATE},
            )

    return require_credentials


async def _api_error_response(request: Request, error: Exception) -> Response:
    assert isinstance(error, ApiError)  # registered for ApiError only
    return error.response()


def _health_router(service: ModelService) -> APIRouter:
    router = APIRouter()

    @router.get("/health", tags=["health"])
    def health() -> dict[str, str]:
        """Liveness: answers as soon as the process serves HTTP, whatever the model's state."""
        return {"status": "ok"}

    @router.get("/ready", tags=["health"])
    def ready() -> JSONResponse:
        """Readiness: 503 with the reason until the model and adapter are loaded, then 200 with what is served."""
        if service.status != "ready":
            reason = service.failure_reason if service.status == "failed" else "the model is still loading"
            return JSONResponse({"status": service.status, "reason": reason}, status_code=503)
        return JSONResponse({"status": "ready", **service.info()})

    return router


def _openai_router(settings: Settings, service: ModelService) -> APIRouter:
    router = APIRouter()
    started_at = now()

    @router.get("/v1/models", tags=["openai"])
    def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=service.served_model_id(), created=started_at)])

    @router.post(
        "/v1/chat/completions",
        tags=["openai"],
        response_model=ChatCompletion,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ChatCompletionRequest.model_json_schema()}},
            }
        },
    )
    async def chat_completions(request: Request) -> Response:
        """OpenAI chat completions; with "stream": true, server-sent chat.completion.chunk events ending with
        `data: [DONE]`."""
        try:
            completion_request = _parse_request(await request.body())
            _require_ready(service)
            chunks = service.stream_chat(
                [message.as_prompt_message() for message in completion_request.messages],
                _sampling_params(completion_request, settings),
                wait=False,
            )
            first = await _first_chunk(chunks)
        except ApiError as error:
            return error.response()
        if completion_request.stream:
            events = _stream_events(completion_request, service.served_model_id(), first, chunks)
            return _ClosingStreamingResponse(events, chunks)
        return await _complete(request, service.served_model_id(), first, chunks)

    @router.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    def unknown_api_url(request: Request) -> JSONResponse:
        # Without this, the Gradio app mounted at / would answer with its own 404 body.
        message = (
            f"Invalid URL ({request.method} {request.url.path}): this server has /v1/models and /v1/chat/completions"
        )
        return ApiError(404, message, code="unknown_url").response()

    return router


def _docs_router(app: FastAPI) -> APIRouter:
    """The OpenAPI schema and its Swagger UI page, as FastAPI serves them by default."""
    router = APIRouter(include_in_schema=False)

    @router.get("/openapi.json")
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @router.get("/docs")
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - Swagger UI")

    return router


def _parse_request(body: bytes) -> ChatCompletionRequest:
    try:
        payload = json.loads(body)
    except ValueError as error:  # also UnicodeDecodeError
        raise ApiError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from error
    if not isinstance(payload, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return ChatCompletionRequest.model_validate(payload)
    except ValidationError as error:
        raise _validation_error(error) from error


def _validation_error(error: ValidationError) -> ApiError:
    """The first problem, named by its parameter path as OpenAI does (e.g. messages[0].role)."""
    first = error.errors()[0]
    param = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"]).lstrip(".")
    reason = str(first["ctx"]["error"]) if first["type"] == "value_error" else first["msg"]
    if first["type"] == "missing":
        return ApiError(400, f"missing required parameter '{param}'", param=param, code="missing_required_parameter")
    return ApiError(400, f"invalid '{param}': {reason}", param=param, code="invalid_value")


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


async def _first_chunk(chunks: AsyncGenerator[GenerationChunk, None]) -> GenerationChunk:
    """The reply's first chunk; ModelService raises its request errors here, before generating."""
    try:
        return await anext(chunks)
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
