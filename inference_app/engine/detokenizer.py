"""Turning a request's tokens into text one at a time (IncrementalDetokenizer), and holding back text that may be the
start of a stop string (StopMatcher). Both run on the output thread (inference_app.engine.output_processor)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


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

    def token_text(self, token_id: int) -> str:
        """One token's own text (log probabilities name tokens by it)."""
        return self._decode([token_id])

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
