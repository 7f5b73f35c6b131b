"""What the engine tests share: prompts of different lengths, `model.generate` as the reference, a reply collector."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from inference_app.engine.cache_plan import CacheShape
from inference_app.engine.model_loading import LoadedModel
from inference_app.engine.types import GenerationChunk, SamplingParams
from tests.model_factory import SIZES, build_tokenizer, generation_config, phi3_config

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


def sliding_window_model(folder: Path, window: int, context: int = 512, device: str = "cpu") -> LoadedModel:
    """The tiny model attending to the last `window` positions only (Phi-3-mini-4k: 2047)."""
    from transformers import Phi3ForCausalLM

    tokenizer = build_tokenizer(folder)
    size = dataclasses.replace(SIZES["tiny"], context_length=context)
    config = phi3_config(size, tokenizer, torch.float32)
    config.sliding_window = window
    torch.manual_seed(0)
    model = Phi3ForCausalLM._from_config(config, attn_implementation="sdpa").eval().to(device)
    model.generation_config = generation_config(tokenizer, config)
    return LoadedModel(model, tokenizer, ("windowed",), 0, None, device, "float32", context, {})


def greedy(max_new_tokens: int = NEW_TOKENS) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0)


TINY_SHAPE = CacheShape(layers=2, kv_heads=4, head_dim=16, dtype=torch.float32, sliding_window=None)


class OpRecorder(TorchDispatchMode):
    """Records the operations run under it (to find what a CUDA graph could not hold)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.add(str(func))
        indices = args[1] if str(func).startswith(("aten.index.", "aten.index_put")) else ()
        if any(isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in indices):
            self.ops.add("indexing with a boolean mask")  # its size depends on the mask's values: a sync
        return func(*args, **(kwargs or {}))


# Operations a CUDA graph cannot hold: they wait for the device (a value read back on the host) or copy host data in.
CAPTURE_BREAKERS = {
    "aten.item.default",
    "aten._local_scalar_dense.default",
    "aten.nonzero.default",
    "aten.lift_fresh.default",
    "aten.is_nonzero.default",
    "aten.equal.default",
    "aten.masked_select.default",
    "indexing with a boolean mask",
}
