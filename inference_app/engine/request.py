"""One generation as the engine sees it: the prompt's tokens, its sampling settings, where its chunks go, the slot and
KV-cache blocks it holds while it runs, and how far it got."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from inference_app.engine.detokenizer import IncrementalDetokenizer, StopMatcher
from inference_app.engine.grammar import GrammarMatcher
from inference_app.engine.types import FinishReason, GenerationChunk, SamplingParams, TokenLogprob, TokenLogprobs


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
    grammar: GrammarMatcher | None = None  # where the reply is in params.grammar (engine thread)
    model: int = 0  # the served model it runs (LoadedModel.model_ids' index)
    generated: int = 0  # tokens the engine sampled, end-of-reply token excluded (engine thread)
    completion_tokens: int = 0  # tokens turned into text (text thread)
    logprobs_held: list[TokenLogprob] = field(default_factory=list)  # of tokens whose text is not delivered yet
    # Held while it runs (set by the scheduler when it joins, None before and after): its KV-cache slot, and in a
    # paged cache the blocks that slot's table points at.
    slot: int | None = None
    blocks: list[int] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens scheduled into its slot (the scheduler; all of them: it decodes)
    # Set by the caller (cancel) or by the text thread (stop string, delivered error): the engine drops the row.
    done: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.done.set()

    @property
    def tokens_in_flight(self) -> int:
        return len(self.prompt_ids) + self.max_new_tokens

    def chunk(self, text: str, finish_reason: FinishReason | None) -> GenerationChunk:
        """The next chunk, with the log probabilities of the tokens held since the previous one."""
        logprobs, self.logprobs_held = tuple(self.logprobs_held), []
        return GenerationChunk(text, finish_reason, len(self.prompt_ids), self.completion_tokens, logprobs)


# One step's news for one request: a new token (None: none, the reply ended on an end-of-reply token), the finish
# reason when the engine ended the reply and the token's log probabilities when the request asked; or an error.
TokenEvent = tuple[EngineRequest, int | None, FinishReason | None, TokenLogprobs | None]
ErrorEvent = tuple[EngineRequest, BaseException]
