"""Chat completions (the logic behind POST /v1/chat/completions): parse and validate the request, map it to
sampling settings, run it on the ModelService, and answer with one chat.completion or a stream of
chat.completion.chunk events.

The request is fully validated, and the first chunk of the reply awaited, before any status is sent, so that a
prompt too long for the context or a full server still gets its own status, even when streaming. However the
response ends (finished, failed, the client gone, the server shutting down), the generations are closed and their
slots freed. A reply still running when the server must stop ends with an error the client can read: an error event
in a stream, a 503 otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import AsyncGenerator, Iterable
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
    ChoiceFinishReason,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    ErrorBody,
    ErrorDetail,
    TokenLogprobEntry,
    ToolCallDelta,
    TopLogprob,
    Usage,
    new_completion_id,
    now,
)
from inference_app.api.structured_outputs import reply_grammar
from inference_app.api.tool_calls import parse_tool_call, prompt_messages
from inference_app.client_limit import PerClientLimit
from inference_app.service import GenerationChunk, ModelService, SamplingParams, TokenLogprob
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
        model = service.resolve_model(completion_request.model)
        messages = prompt_messages(completion_request)
        grammar = await asyncio.to_thread(reply_grammar, completion_request)
        params = _sampling_params(completion_request, self._settings, grammar, service.vocab_size())
        client = client_address(request)
        # The n choices start together, so their prompts are prefilled in one forward pass; each counts against the
        # client's limit.
        choices = [
            self._client_limit.limited(
                client, service.stream_chat(messages, _choice_params(params, index), wait=False, model=model)
            )
            for index in range(completion_request.n)
        ]
        firsts = await _first_chunks(choices)  # ModelService and the per-client limit refuse a request here
        if completion_request.stream:
            events = _stream_events(completion_request, model, firsts, choices, self._stopping)
            return _ClosingStreamingResponse(events, choices)
        return await _complete(request, completion_request, model, firsts, choices, self._stopping)


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


async def _first_chunks(choices: list[AsyncGenerator[GenerationChunk, None]]) -> list[GenerationChunk]:
    """Each choice's first chunk; the first error any of them raised (then every choice is closed: slots freed)."""
    firsts = await asyncio.gather(*(anext(choice) for choice in choices), return_exceptions=True)
    for first in firsts:
        if isinstance(first, BaseException):
            await _close_all(choices)
            raise first
    return [first for first in firsts if isinstance(first, GenerationChunk)]


async def _close_all(choices: list[AsyncGenerator[GenerationChunk, None]]) -> None:
    for choice in choices:
        await choice.aclose()  # frees its generation slot


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


def _sampling_params(
    request: ChatCompletionRequest, settings: Settings, grammar: str | None, vocab_size: int
) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=request.requested_max_tokens or settings.max_new_tokens_cap,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        stop=request.stop_sequences,
        seed=request.seed,
        grammar=grammar,
        logit_bias=_logit_bias(request, vocab_size),
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        top_logprobs=(request.top_logprobs or 0) if request.logprobs else None,
    )


def _logit_bias(request: ChatCompletionRequest, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """(token id, bias) pairs; a token id outside the vocabulary is a 400 naming it."""
    bias = tuple((int(token), value) for token, value in (request.logit_bias or {}).items())
    for token, _ in bias:
        if token >= vocab_size:
            message = f"invalid 'logit_bias': token {token} is not in the vocabulary (ids 0 to {vocab_size - 1})"
            raise ApiError(400, message, param="logit_bias", code="invalid_value")
    return bias


def _choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice `index`'s settings: its own seed stream (seed + index when a seed is given, else random)."""
    if index == 0 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=params.seed + index)


@dataclasses.dataclass
class _Reply:
    """One choice's whole reply."""

    text: str
    last: GenerationChunk
    logprobs: list[TokenLogprob]


async def _complete(
    request: Request,
    completion_request: ChatCompletionRequest,
    model: str,
    firsts: list[GenerationChunk],
    choices: list[AsyncGenerator[GenerationChunk, None]],
    stopping: asyncio.Event,
) -> Response:
    """The whole reply as one chat.completion; a client that hangs up stops the generations, and so does the server
    stopping (503)."""
    collecting: asyncio.Future[list[_Reply]] = asyncio.ensure_future(
        asyncio.gather(*(_collect(first, choice) for first, choice in zip(firsts, choices, strict=True)))
    )
    disconnected = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    stopped = asyncio.ensure_future(stopping.wait())
    finished = False
    try:
        waiting: set[asyncio.Future[Any]] = {collecting, disconnected, stopped}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finished = collecting.done()
    finally:
        disconnected.cancel()
        stopped.cancel()
        if not finished:
            collecting.cancel()  # closes the generations: their slots are freed
        await asyncio.gather(collecting, disconnected, stopped, return_exceptions=True)
    # Not by collecting.cancelled(): a gather cancelled this way ends with a CancelledError as its exception.
    if not finished:
        await _close_all(choices)
        if stopping.is_set():
            return _shutting_down().response()
        return Response(status_code=499)  # nobody is listening any more (nginx's "client closed request")
    try:
        replies = collecting.result()
    except Exception as error:
        logger.exception("generation failed")
        return ApiError(500, f"generation failed: {error}", type="server_error").response()
    finally:
        await _close_all(choices)
    completion = ChatCompletion(
        id=new_completion_id(),
        created=now(),
        model=model,
        choices=[_choice(completion_request, index, reply) for index, reply in enumerate(replies)],
        usage=_usage([reply.last for reply in replies]),
    )
    return JSONResponse(completion.model_dump())


def _choice(request: ChatCompletionRequest, index: int, reply: _Reply) -> Choice:
    logprobs = ChoiceLogprobs(content=_logprob_entries(reply.logprobs)) if request.logprobs else None
    call = parse_tool_call(request, reply.text)
    if call is not None:
        message = AssistantMessage(content=None, tool_calls=[call])
        return Choice(index=index, message=message, finish_reason="tool_calls", logprobs=logprobs)
    message = AssistantMessage(content=reply.text)
    return Choice(index=index, message=message, finish_reason=_finish_reason(reply.last), logprobs=logprobs)


def _usage(lasts: list[GenerationChunk]) -> Usage:
    """The prompt once, the tokens of every choice."""
    return Usage.of(lasts[0].prompt_tokens, sum(last.completion_tokens for last in lasts))


def _logprob_entries(logprobs: Iterable[TokenLogprob]) -> list[TokenLogprobEntry]:
    return [
        TokenLogprobEntry(
            token=entry.token,
            logprob=entry.logprob,
            bytes=list(entry.token.encode()),
            top_logprobs=[
                TopLogprob(token=token, logprob=value, bytes=list(token.encode())) for token, value in entry.top
            ],
        )
        for entry in logprobs
    ]


async def _collect(first: GenerationChunk, chunks: AsyncGenerator[GenerationChunk, None]) -> _Reply:
    texts, logprobs, last = [first.text], list(first.logprobs), first
    async with contextlib.aclosing(chunks):
        async for last in chunks:
            texts.append(last.text)
            logprobs.extend(last.logprobs)
    return _Reply("".join(texts), last, logprobs)


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


class _StreamedChoice:
    """One choice's chunk choices in a stream. A reply that may be a tool call and starts as one ("{") is held back
    and sent whole as a tool_calls delta when it ends (its arguments must be complete JSON to be a call at all)."""

    def __init__(self, request: ChatCompletionRequest, index: int) -> None:
        self._request = request
        self._index = index
        self._held: _Reply | None = None
        self.last: GenerationChunk | None = None

    def start(self) -> ChunkChoice:
        return ChunkChoice(index=self._index, delta=Delta(role="assistant", content=""))

    def push(self, chunk: GenerationChunk) -> list[ChunkChoice]:
        self.last = chunk
        if self._held is None and self._request.calls_tools and chunk.text.startswith("{"):
            self._held = _Reply("", chunk, [])
        if self._held is not None:
            self._held.text += chunk.text
            self._held.logprobs.extend(chunk.logprobs)
            self._held.last = chunk
            return self._finish_held() if chunk.finish_reason is not None else []
        events = []
        if chunk.text or chunk.logprobs:
            events.append(
                ChunkChoice(index=self._index, delta=Delta(content=chunk.text), logprobs=self._logprobs(chunk.logprobs))
            )
        if chunk.finish_reason is not None:
            events.append(ChunkChoice(index=self._index, delta=Delta(), finish_reason=_finish_reason(chunk)))
        return events

    def _finish_held(self) -> list[ChunkChoice]:
        held = self._held
        assert held is not None
        choice = _choice(self._request, self._index, held)
        logprobs = self._logprobs(held.logprobs)
        if choice.message.tool_calls:
            calls = [ToolCallDelta(index=0, **call.model_dump()) for call in choice.message.tool_calls]
            delta = Delta(tool_calls=calls)
        else:
            delta = Delta(content=held.text)
        return [
            ChunkChoice(index=self._index, delta=delta, logprobs=logprobs),
            ChunkChoice(index=self._index, delta=Delta(), finish_reason=choice.finish_reason),
        ]

    def _logprobs(self, logprobs: Iterable[TokenLogprob]) -> ChoiceLogprobs | None:
        return ChoiceLogprobs(content=_logprob_entries(logprobs)) if self._request.logprobs else None


async def _stream_events(
    request: ChatCompletionRequest,
    model: str,
    firsts: list[GenerationChunk],
    choices: list[AsyncGenerator[GenerationChunk, None]],
    stopping: asyncio.Event,
) -> AsyncGenerator[str, None]:
    completion_id, created = new_completion_id(), now()

    def event(choice: ChunkChoice) -> str:
        chunk = ChatCompletionChunk(id=completion_id, created=created, model=model, choices=[choice])
        return _sse(chunk.model_dump())

    streamed = [_StreamedChoice(request, index) for index in range(len(choices))]
    for streamed_choice in streamed:
        yield event(streamed_choice.start())
    # Each choice's chunks, as they come, through one queue (None: that choice ended).
    arrivals: asyncio.Queue[tuple[int, GenerationChunk | BaseException | None]] = asyncio.Queue()
    pumps = [
        asyncio.ensure_future(_pump(index, first, _until_stopping(chunks, stopping), arrivals))
        for index, (first, chunks) in enumerate(zip(firsts, choices, strict=True))
    ]
    try:
        running = len(choices)
        while running:
            index, item = await arrivals.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                for choice in streamed[index].push(item):
                    yield event(choice)
    except ApiError as error:  # the server is shutting down
        yield _sse(ErrorBody(error=error.detail).model_dump())
        return
    except Exception as error:  # the status is already sent: report in the stream, as OpenAI does
        logger.exception("generation failed while streaming")
        yield _sse(
            ErrorBody(error=ErrorDetail(message=f"generation failed: {error}", type="server_error")).model_dump()
        )
        return
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
    if request.include_usage_in_stream:
        lasts = [choice.last for choice in streamed if choice.last is not None]
        usage_chunk = ChatCompletionChunk(
            id=completion_id, created=created, model=model, choices=[], usage=_usage(lasts)
        )
        yield _sse(usage_chunk.model_dump())
    yield "data: [DONE]\n\n"


async def _pump(
    index: int,
    first: GenerationChunk,
    chunks: AsyncGenerator[GenerationChunk, None],
    arrivals: asyncio.Queue[tuple[int, GenerationChunk | BaseException | None]],
) -> None:
    try:
        arrivals.put_nowait((index, first))
        if first.finish_reason is None:
            async for chunk in chunks:
                arrivals.put_nowait((index, chunk))
        arrivals.put_nowait((index, None))
    except Exception as error:
        arrivals.put_nowait((index, error))


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _finish_reason(last: GenerationChunk) -> ChoiceFinishReason:
    return last.finish_reason or "stop"


class _ClosingStreamingResponse(StreamingResponse):
    """Server-sent events that close the generations however the response ends: finished, failed, or the client
    gone (Starlette then cancels the stream, and an event generator that never started runs no cleanup)."""

    def __init__(self, events: AsyncGenerator[str, None], choices: list[AsyncGenerator[GenerationChunk, None]]) -> None:
        # X-Accel-Buffering: no keeps nginx-style proxies from holding back the events.
        super().__init__(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self._events, self._choices = events, choices

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()  # stops the choices' pumps
            await _close_all(self._choices)
