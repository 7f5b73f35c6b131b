"""How big the KV cache is: the model's cache shape, the memory the cache may take, and the plan (slots, tokens per
slot, tokens in all) that decides between its two layouts (inference_app.engine.kv_cache). Host-side arithmetic only:
the tensors are made by KVCache."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

# GPU memory left free after the KV cache: activations of a prefill, logits, CUDA graphs, the allocator's slack.
GPU_HEADROOM_FRACTION = 0.10
GPU_HEADROOM_MIN_BYTES = 2 * 2**30
# On the CPU the cache takes at most this much memory by default (the machine's RAM is shared with everything).
CPU_CACHE_BYTES = 2 * 2**30
# Slots made by default at most: the largest batch a CUDA graph is captured for.
DEFAULT_MAX_SLOTS = 64
# Tokens per block: the unit a paged cache hands out (small: little waste per request; the table stays small too).
BLOCK_TOKENS = 16
# A paged cache's gather makes one layer's keys and values for the whole batch; by default the slots are as many as
# keep that copy within this share of the cache's memory (small GPUs then get fewer slots, not a tiny pool).
GATHER_SHARE = 1 / 8


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

    def kept_tokens(self, sequence_tokens: int) -> int:
        """Positions a slot keeps of a sequence: all of them; with a sliding window only the window's, rounded up to
        whole blocks (older keys are never read again, so the slot's row is a ring buffer: Phi-3-mini keeps 2048 of
        4096, as transformers' sliding-window cache layer does)."""
        if self.sliding_window is None:
            return sequence_tokens
        return min(sequence_tokens, blocks_holding(self.sliding_window) * BLOCK_TOKENS)

    def gather_bytes(self, slots: int, slot_tokens: int) -> int:
        """One layer's keys and values for `slots` sequences of `slot_tokens`: what a paged cache's read copies."""
        return slots * slot_tokens * self.bytes_per_token() // self.layers


@dataclass(frozen=True)
class CachePlan:
    """How big the cache is: `slots` requests at once, each up to `slot_tokens` long, `tokens` in all."""

    slots: int
    slot_tokens: int
    tokens: int  # a whole number of blocks when paged

    @property
    def paged(self) -> bool:
        return self.tokens < self.slots * self.slot_tokens

    @property
    def holds_a_sequence(self) -> bool:
        return not self.paged or self.tokens >= blocks_holding(self.slot_tokens) * BLOCK_TOKENS

    @property
    def blocks_per_slot(self) -> int:
        return blocks_holding(self.slot_tokens)

    @property
    def blocks(self) -> int:
        """Blocks of the cache: each slot's row of them, or (paged) the shared pool."""
        return self.tokens // BLOCK_TOKENS if self.paged else self.slots * self.blocks_per_slot


def cache_budget(device: torch.device) -> int:
    """Bytes the cache may take: the GPU's free memory less headroom, or CPU_CACHE_BYTES."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return free - max(GPU_HEADROOM_MIN_BYTES, int(GPU_HEADROOM_FRACTION * total))
    return CPU_CACHE_BYTES


def plan_cache(
    shape: CacheShape, slot_tokens: int, budget: int, slots: int | None = None, tokens: int | None = None
) -> CachePlan:
    """The cache for sequences of `slot_tokens` in `budget` bytes; `slots` and `tokens` as set by the user, if set.

    Rows when the slots' whole sequences fit; else paged, with the memory left after the gather's copy. Without a
    set slot count: DEFAULT_MAX_SLOTS, fewer on a GPU too small for that many gathers (never fewer than fit as rows).
    """
    per_token = shape.bytes_per_token()
    if slots is None:
        whole_sequences = budget // (slot_tokens * per_token)
        by_gather = int(GATHER_SHARE * budget) // shape.gather_bytes(1, slot_tokens)
        slots = max(1, min(DEFAULT_MAX_SLOTS, max(whole_sequences, by_gather)))
    if tokens is not None:  # as set, in whole blocks
        tokens = blocks_holding(tokens) * BLOCK_TOKENS
    elif slots * slot_tokens * per_token <= budget:
        tokens = slots * slot_tokens
    else:  # what the memory holds, in whole blocks
        tokens = max(0, budget - shape.gather_bytes(slots, slot_tokens)) // per_token // BLOCK_TOKENS * BLOCK_TOKENS
    return CachePlan(slots, slot_tokens, min(tokens, slots * slot_tokens))


def blocks_holding(tokens: int) -> int:
    """Whole blocks for `tokens`."""
    return math.ceil(tokens / BLOCK_TOKENS)
