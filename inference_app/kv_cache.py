"""The static KV cache: preallocated once, one row (slot) per request in flight, each as long as the context.

Keys and values of layer i live in tensors [slots, kv heads, slot tokens, head dim] that never move, so a decode
step can be captured in a CUDA graph. Each row writes its new key at its own position (per-row positions, no
left padding); attention reads the first `length` positions of the first `batch` rows, with a mask that hides
each row's positions beyond its own (and, for sliding-window models, those out of the window).

The object is handed to the transformers model as `past_key_values`: the model calls `update` once per layer.
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

# GPU memory left free after the KV cache: activations of a prefill, logits, CUDA graphs, the allocator's slack.
GPU_HEADROOM_FRACTION = 0.10
GPU_HEADROOM_MIN_BYTES = 2 * 2**30
# On the CPU the cache takes at most this much memory by default (the machine's RAM is shared with everything).
CPU_CACHE_BYTES = 2 * 2**30
# Slots made by default at most: the largest batch a CUDA graph is captured for.
DEFAULT_MAX_SLOTS = 64


@dataclass(frozen=True)
class CacheShape:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    sliding_window: int | None

    @classmethod
    def of(cls, model: Any) -> CacheShape:
        config = model.config
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
        return cls(
            layers=int(config.num_hidden_layers),
            kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
            dtype=next(model.parameters()).dtype,
            sliding_window=getattr(config, "sliding_window", None),
        )

    def bytes_per_token(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.layers * self.kv_heads * self.head_dim * element  # keys and values

    def bytes_for(self, slots: int, slot_tokens: int) -> int:
        return slots * slot_tokens * self.bytes_per_token()


def default_slot_count(shape: CacheShape, slot_tokens: int, device: torch.device) -> int:
    """How many full-context sequences fit: in the GPU's free memory less headroom, or in CPU_CACHE_BYTES."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = free - max(GPU_HEADROOM_MIN_BYTES, int(GPU_HEADROOM_FRACTION * total))
    else:
        budget = CPU_CACHE_BYTES
    return max(1, min(DEFAULT_MAX_SLOTS, budget // shape.bytes_for(1, slot_tokens)))


class SlotAllocator:
    """Hands out the lowest free slot, so the rows in use stay packed at the front (smaller decode batches)."""

    def __init__(self, slots: int) -> None:
        self._free = list(range(slots))  # a heap

    @property
    def free(self) -> int:
        return len(self._free)

    def take(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV-cache slot")
        return heapq.heappop(self._free)

    def give_back(self, slot: int) -> None:
        heapq.heappush(self._free, slot)


class SlotKVCache:
    """Static per-slot keys and values, written by prefill (positions 0..T-1 of some slots) and decode (one
    position per row, the first `batch` slots)."""

    def __init__(self, shape: CacheShape, slots: int, slot_tokens: int, device: torch.device) -> None:
        self.shape = shape
        self.slots = slots
        self.slot_tokens = slot_tokens
        size = (slots, shape.kv_heads, slot_tokens, shape.head_dim)
        # Zeros, not empty: masked positions still enter attention's product with the values (0 * NaN is NaN).
        self.keys = [torch.zeros(size, dtype=shape.dtype, device=device) for _ in range(shape.layers)]
        self.values = [torch.zeros(size, dtype=shape.dtype, device=device) for _ in range(shape.layers)]
        self._rows = torch.arange(slots, device=device)
        self._key_positions = torch.arange(slot_tokens, device=device)
        # What the next forward pass does, set by prepare_prefill / prepare_decode.
        self._prefill_slots: torch.Tensor | None = None
        self._prefill_length = 0
        self._decode_positions: torch.Tensor | None = None
        self._batch = 0
        self._length = 0

    @property
    def bytes(self) -> int:
        return self.shape.bytes_for(self.slots, self.slot_tokens)

    def prepare_prefill(self, slots: torch.Tensor, prompt_lengths: torch.Tensor, length: int) -> torch.Tensor:
        """For a forward pass over right-padded prompts [len(slots), length] written to `slots` from position 0;
        returns its attention mask [rows, 1, length, length] (causal, padding hidden)."""
        self._prefill_slots, self._prefill_length = slots, length
        queries = self._key_positions[:length, None]
        keys = self._key_positions[None, :length]
        mask = self._visible(queries, keys)[None] & (keys < prompt_lengths[:, None, None])
        return mask[:, None]

    def prepare_decode(self, positions: torch.Tensor, batch: int, length: int) -> torch.Tensor:
        """For a decode step over slots 0..batch-1, each row writing at positions[row] (< length) and attending to
        its positions up to that one; returns the attention mask [batch, 1, 1, length]."""
        self._prefill_slots = None
        self._decode_positions, self._batch, self._length = positions[:batch], batch, length
        mask = self._visible(positions[:batch, None], self._key_positions[None, :length])
        return mask[:, None, None]

    def _visible(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Which key positions a query position attends to: causal, within the sliding window if the model has one
        (as transformers' masks do)."""
        visible = keys <= queries
        if self.shape.sliding_window is not None:
            visible = visible & (keys > queries - self.shape.sliding_window)
        return visible

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Called by each attention layer with its new keys and values [rows, heads, new tokens, head dim];
        returns the keys and values attention reads."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self._prefill_slots is not None:
            keys[self._prefill_slots, :, : self._prefill_length] = key_states
            values[self._prefill_slots, :, : self._prefill_length] = value_states
            return key_states, value_states
        assert self._decode_positions is not None, "prepare_decode or prepare_prefill first"
        rows = self._rows[: self._batch]
        keys[rows, :, self._decode_positions] = key_states[:, :, 0]
        values[rows, :, self._decode_positions] = value_states[:, :, 0]
        return keys[: self._batch, :, : self._length], values[: self._batch, :, : self._length]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are per row and always passed explicitly (position_ids)
