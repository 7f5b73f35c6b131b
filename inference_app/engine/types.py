"""Types shared by the web-facing ModelService (inference_app.service) and the engine loop (engine_loop.py), and the
bounds of every sampling setting: checked here, when the settings are made, so the API, the UI and any other caller
refuse the same values (ModelService adds the bound only the loaded model knows: top_k at most its vocabulary)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length"]

MAX_TEMPERATURE = 2.0  # as OpenAI
# Below this a temperature is served as greedy. The device divides float32 logits by it: below ~1e-38 the value is
# subnormal or 0 there and the draw turns into noise; well before that the softmax is one-hot but for exact ties.
# vLLM treats temperatures below the same threshold as greedy.
GREEDY_BELOW_TEMPERATURE = 1e-5
MIN_SEED, MAX_SEED = -(2**63), 2**63 - 1  # as OpenAI's API: a signed 64-bit integer


class InvalidRequestError(ValueError):
    """A request the service refuses; `param` names the field at fault (messages, temperature, top_k, ...)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings. Greedy ones (temperature 0 or below GREEDY_BELOW_TEMPERATURE, or top_p 0,
    which keeps only the likeliest token) are stored as temperature 0 and top_p 1, the one form the engine knows."""

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
        # Written so that NaN, which fails every comparison, is refused too.
        _require(self.max_new_tokens >= 1, "max_new_tokens", "must be at least 1")
        _require(
            0 <= self.temperature <= MAX_TEMPERATURE, "temperature", f"must be from 0 (greedy) to {MAX_TEMPERATURE}"
        )
        _require(0 <= self.top_p <= 1, "top_p", "must be from 0 (greedy) to 1")
        _require(self.top_k is None or self.top_k >= 1, "top_k", "must be at least 1")
        _require(self.seed is None or MIN_SEED <= self.seed <= MAX_SEED, "seed", "must be a signed 64-bit integer")
        if self.temperature < GREEDY_BELOW_TEMPERATURE or self.top_p == 0:
            object.__setattr__(self, "temperature", 0.0)
            object.__setattr__(self, "top_p", 1.0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _require(condition: bool, param: str, requirement: str) -> None:
    if not condition:
        raise InvalidRequestError(f"invalid '{param}': {requirement}", param)


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
    finish_reason: FinishReason | None  # None while running
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens since the previous chunk, when the request asked
