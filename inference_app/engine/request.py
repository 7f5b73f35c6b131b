"""One generation as the engine sees it: the prompt's tokens, its sampling settings, where its chunks go, the slot and
KV-cache blocks it holds while it runs, and how far it got."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from inference_app.engine.detokenizer import IncrementalDetokenizer, StopMatcher
from inference_app.engine.types import GenerationChunk, SamplingParams

FinishReason = Literal["stop", "length"]


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
    model: int = 0  # the served model it runs (LoadedModel.model_ids' index)
    generated: int = 0  # tokens the engine sampled, end-of-reply token excluded (engine thread)
    completion_tokens: int = 0  # tokens turned into text (text thread)
    # Held while it runs (set by the scheduler when it joins, None before and after): its KV-cache slot, and in a
    # paged cache the blocks that slot's table points at.
    slot: int | None = None
    blocks: list[int] = field(default_factory=list)
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
