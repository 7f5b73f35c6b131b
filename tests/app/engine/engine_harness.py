"""What the engine tests share: prompts of different lengths, `model.generate` as the reference, a reply collector."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from inference_app.engine.cache_plan import CacheShape
from inference_app.engine.model_loading import LoadedModel
from inference_app.engine.types import GenerationChunk, SamplingParams

# Different lengths, so rows sit at different positions.
PROMPTS = (
    "x",
    "What is the capital of France?",
    "Hello, world! Tell me a story. " * 6,
    "Write a haiku about the sea.",
    "one two three four five six seven eight nine ten " * 3,
    "Stop here.",
)
NEW_TOKENS = 20
TIMEOUT_S = 60
# The tiny model's context is 512 tokens: 1024 tokens hold fewer whole sequences than the tests' 3..8 slots, so the
# cache is paged; without the option every slot's sequence fits (rows).
LAYOUTS: dict[str, dict[str, Any]] = {"rows": {}, "paged": {"kv_cache_tokens": 1024}}


def prompt_ids(loaded: LoadedModel, text: str) -> list[int]:
    encoded: Any = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


def generate_text(loaded: LoadedModel, ids: list[int], max_new_tokens: int = NEW_TOKENS) -> tuple[str, int]:
    """`model.generate`'s greedy reply and its token count (up to the end-of-reply token)."""
    with torch.inference_mode():
        output = loaded.model.generate(
            torch.tensor([ids], device=loaded.model.device), max_new_tokens=max_new_tokens, do_sample=False
        )
    new = output[0, len(ids) :].tolist()
    stops = set(loaded.model.generation_config.eos_token_id)
    count = next((index for index, token in enumerate(new) if token in stops), len(new))
    return str(loaded.tokenizer.decode(new[:count], skip_special_tokens=True)), count


class Reply:
    """Collects one request's chunks (delivered on the engine's text thread)."""

    def __init__(self, on_chunk: Callable[[GenerationChunk], None] | None = None) -> None:
        self.chunks: list[GenerationChunk] = []
        self.error: BaseException | None = None
        self.finished = threading.Event()
        self._on_chunk = on_chunk

    def deliver(self, item: GenerationChunk | BaseException) -> None:
        if isinstance(item, BaseException):
            self.error = item
            self.finished.set()
            return
        self.chunks.append(item)
        if self._on_chunk is not None:
            self._on_chunk(item)
        if item.finish_reason is not None:
            self.finished.set()

    def result(self) -> tuple[str, int]:
        assert self.finished.wait(TIMEOUT_S), "the reply did not finish in time"
        assert self.error is None, self.error
        return "".join(chunk.text for chunk in self.chunks), self.chunks[-1].completion_tokens


def greedy(max_new_tokens: int = NEW_TOKENS) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0)


TINY_SHAPE = CacheShape(layers=2, kv_heads=4, head_dim=16, dtype=torch.float32, sliding_window=None)
