"""Turning a request's tokens into streamed text, on a thread of its own so the decode step never waits for it.

The engine thread hands each step's new tokens over in one queue item; this thread detokenizes them, holds back
text that may be the start of a stop string, and delivers chunks. A stop string found here marks the request
stopped; the engine drops its row at the next step boundary (a token or two it generated meanwhile are dropped).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from inference_app.engine.types import FinishReason, GenerationChunk, SamplingParams

logger = logging.getLogger(__name__)


class IncrementalDetokenizer:
    """Turns tokens into text one at a time, decoding only a short window (never the whole reply).

    The window starts one token before the new ones, so tokenizers that drop a leading space at the start of
    a decode still produce the right text; text ending in an incomplete UTF-8 sequence waits for more tokens.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._decode_ids = _fast_decode(tokenizer)
        self._ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens before this index have been emitted

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        emitted = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if text.endswith("\ufffd") or len(text) < len(emitted):
            return ""  # an incomplete character: wait for the tokens that complete it
        # Move the window on even when the token has no text (a skipped special token), so it stays short.
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(emitted) :]

    def flush(self) -> str:
        """Whatever is left (possibly an incomplete character) at the end of the reply."""
        emitted = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(emitted) :]

    def _decode(self, ids: list[int]) -> str:
        return self._decode_ids(ids) if ids else ""


def _fast_decode(tokenizer: Any) -> Callable[[list[int]], str]:
    """`tokenizer.decode(ids, skip_special_tokens=True)`, through the Rust tokenizer directly when that is all
    transformers' decode does (no clean-up of spaces, as for Phi-3's tokenizer): it skips a Python wrapper that
    costs 4x the decode itself, for every row at every step."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return lambda ids: str(backend.decode(ids, skip_special_tokens=True))
    return lambda ids: str(tokenizer.decode(ids, skip_special_tokens=True))


class StopMatcher:
    """Holds back text that might be the start of a stop string, so a stop string is never emitted."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(stop for stop in stops if stop)
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was reached)."""
        if not self._stops:
            return text, False
        buffer = self._held + text
        found = [buffer.find(stop) for stop in self._stops if stop in buffer]
        if found:
            self._held = ""
            return buffer[: min(found)], True
        keep = self._partial_stop_length(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _partial_stop_length(self, buffer: str) -> int:
        longest = min(len(buffer), max(len(stop) for stop in self._stops) - 1)
        for length in range(longest, 0, -1):
            if any(stop.startswith(buffer[-length:]) for stop in self._stops):
                return length
        return 0


@dataclass(eq=False)
class EngineRequest:
    """One generation: what the engine needs to schedule it and what the text thread needs to stream it."""

    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    deliver: Callable[[GenerationChunk | BaseException], None]
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopMatcher
    seed: int  # the sampling noise's seed (random when the caller gave none)
    generated: int = 0  # tokens the engine sampled, end-of-reply token excluded (engine thread)
    completion_tokens: int = 0  # tokens turned into text (text thread)
    # Set by the caller (cancel) or by the text thread (stop string, delivered error): the engine drops the row.
    done: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.done.set()

    @property
    def tokens_in_flight(self) -> int:
        return len(self.prompt_ids) + self.max_new_tokens

    def chunk(self, text: str, finish_reason: FinishReason | None) -> GenerationChunk:
        return GenerationChunk(text, finish_reason, len(self.prompt_ids), self.completion_tokens)


# One step's news for one request: a new token (None: none, the reply ended on an end-of-reply token) and the
# finish reason when the engine ended the reply; or an error.
TokenEvent = tuple[EngineRequest, int | None, FinishReason | None]
ErrorEvent = tuple[EngineRequest, BaseException]


class TextStreamer:
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

    def _advance(self, request: EngineRequest, token: int | None, finish_reason: FinishReason | None) -> None:
        if request.done.is_set():  # cancelled, or stopped on a stop string: later tokens are dropped
            return
        text = ""
        if token is not None:
            request.completion_tokens += 1
            text, stopped = request.stop_matcher.push(request.detokenizer.push(token))
            if stopped:
                self._finish(request, text, "stop")
                return
        if finish_reason == "stop":  # an end-of-reply token
            self._finish(request, text + request.stop_matcher.flush() + request.detokenizer.flush(), "stop")
        elif finish_reason == "length":
            tail, _ = request.stop_matcher.push(request.detokenizer.flush())
            self._finish(request, text + tail + request.stop_matcher.flush(), "length")
        elif text:
            request.deliver(request.chunk(text, None))

    def _finish(self, request: EngineRequest, text: str, finish_reason: FinishReason) -> None:
        request.done.set()
        request.deliver(request.chunk(text, finish_reason))
