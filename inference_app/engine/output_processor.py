"""Turning the engine's tokens into streamed text, on a thread of its own so the decode step never waits for it.

The engine thread hands each step's new tokens over in one queue item; this thread detokenizes them, holds back
text that may be the start of a stop string, and delivers chunks. A stop string found here marks the request
stopped; the engine drops its row at the next step boundary (a token or two it generated meanwhile are dropped).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence

from inference_app.engine.request import EngineRequest, ErrorEvent, TokenEvent
from inference_app.engine.types import FinishReason, TokenLogprob, TokenLogprobs

logger = logging.getLogger(__name__)


class OutputProcessor:
    """The thread that turns the engine's tokens into chunks and delivers them, in order, per request."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Sequence[TokenEvent | ErrorEvent] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="generation-text", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def put(self, events: Sequence[TokenEvent | ErrorEvent]) -> None:
        """Hands over one step's events (one queue operation per step, whatever the batch size)."""
        if events:
            self._queue.put(events)

    def _run(self) -> None:
        while (events := self._queue.get()) is not None:
            for event in events:
                try:
                    if isinstance(event[1], BaseException):
                        self._fail(event[0], event[1])
                    else:
                        self._advance(*event)
                except Exception:  # a failing callback must not stop the streaming of the others
                    logger.exception("delivering generated text failed")
                    event[0].cancel()

    def _fail(self, request: EngineRequest, error: BaseException) -> None:
        if not request.done.is_set():
            request.done.set()
            request.deliver(error)

    def _advance(
        self,
        request: EngineRequest,
        token: int | None,
        finish_reason: FinishReason | None,
        logprobs: TokenLogprobs | None,
    ) -> None:
        if request.done.is_set():  # cancelled, or stopped on a stop string: later tokens are dropped
            return
        text = ""
        if logprobs is not None:
            request.logprobs_held.append(_as_text(request, logprobs))
        if token is not None:
            request.completion_tokens += 1
            text, stopped = request.stop_matcher.push(request.detokenizer.push(token))
            if stopped:
                self._finish(request, text, "stop")
                return
        if finish_reason == "stop":  # an end-of-reply token, or the end of the request's grammar
            self._finish(request, text + request.stop_matcher.flush() + request.detokenizer.flush(), "stop")
        elif finish_reason == "length":
            tail, _ = request.stop_matcher.push(request.detokenizer.flush())
            self._finish(request, text + tail + request.stop_matcher.flush(), "length")
        elif text:
            request.deliver(request.chunk(text, None))

    def _finish(self, request: EngineRequest, text: str, finish_reason: FinishReason) -> None:
        request.done.set()
        request.deliver(request.chunk(text, finish_reason))


def _as_text(request: EngineRequest, logprobs: TokenLogprobs) -> TokenLogprob:
    text = request.detokenizer.token_text
    return TokenLogprob(
        text(logprobs.token), logprobs.logprob, tuple((text(token), logprob) for token, logprob in logprobs.top)
    )
