"""Types shared by the web-facing ModelService (inference_app.service) and the engine loop (engine_loop.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # An llguidance grammar the reply must follow (structured outputs, tool calls); None: free text.
    grammar: str | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    presence_penalty: float = 0.0  # subtracted from the logit of each token the reply already has
    frequency_penalty: float = 0.0  # subtracted from the logit of each token once per time the reply has it
    top_logprobs: int | None = None  # None: no log probabilities; else the sampled token's and this many others'

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be 0 (greedy) or more")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top_k must be at least 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class TokenLogprobs:
    """A sampled token's log probability and the most likely tokens' (token id, log probability), best first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class TokenLogprob:
    """TokenLogprobs with the tokens as text, as the API shows them."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class GenerationChunk:
    text: str  # new text since the previous chunk (stop sequences never included)
    finish_reason: Literal["stop", "length"] | None  # None while running
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens since the previous chunk, when the request asked
