"""The KV cache: preallocated once, with one slot per request in flight, in blocks of BLOCK_TOKENS tokens.

Keys and values of layer i live in one tensor [blocks x BLOCK_TOKENS (+ one scratch block), kv heads, head dim] that
never moves, so a decode step can be captured in a CUDA graph. A slot's block table says which blocks hold its
positions; each row writes its new key at its own position (per-row positions, no left padding), and attention
reads the first `length` positions of the first `batch` slots, with a mask that hides each row's positions beyond
its own (and, for sliding-window models, those out of the window).

The cache has one of two layouts, chosen from the memory it gets:
- **rows**, when every slot can hold a whole sequence: slot s owns blocks s*k..s*k+k-1 for good, so its keys are
  a plain view of the tensor and attention reads them in place (the fastest step);
- **paged**, when memory holds fewer whole sequences than slots (Phi-3-mini has no grouped-query attention: a 4k
  sequence is 1.5 GiB, so an 80 GB A100 holds about 40): a request gets the blocks for its prompt and token budget
  when it joins, and waits while too few are free; attention reads its blocks through one gather per layer, as
  transformers' own paged cache does for SDPA. Most requests are far shorter than the context, so the slots fill.

The object is handed to the transformers model as `past_key_values`: the model calls `update` once per layer.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import math
from collections.abc import Iterator
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
        return not self.paged or self.tokens >= _blocks_holding(self.slot_tokens) * BLOCK_TOKENS


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
        tokens = _blocks_holding(tokens) * BLOCK_TOKENS
    elif slots * slot_tokens * per_token <= budget:
        tokens = slots * slot_tokens
    else:  # what the memory holds, in whole blocks
        tokens = max(0, budget - shape.gather_bytes(slots, slot_tokens)) // per_token // BLOCK_TOKENS * BLOCK_TOKENS
    return CachePlan(slots, slot_tokens, min(tokens, slots * slot_tokens))


def _blocks_holding(tokens: int) -> int:
    return math.ceil(tokens / BLOCK_TOKENS)


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


class KVCache:
    """Keys and values written by prefill (positions 0..T-1 of some slots) and decode (one position per row, the
    first `batch` slots)."""

    def __init__(self, shape: CacheShape, plan: CachePlan, device: torch.device) -> None:
        self.shape = shape
        self.plan = plan
        self._blocks_per_slot = _blocks_holding(plan.slot_tokens)
        row_tokens = self._blocks_per_slot * BLOCK_TOKENS
        blocks = plan.slots * self._blocks_per_slot if not plan.paged else plan.tokens // BLOCK_TOKENS
        self.blocks = blocks
        self._scratch_block = blocks  # where free slots and padding beyond a request's blocks write
        size = ((blocks + 1) * BLOCK_TOKENS, shape.kv_heads, shape.head_dim)
        # Zeros, not empty: masked positions still enter attention's product with the values (0 * NaN is NaN).
        self.keys = [torch.zeros(size, dtype=shape.dtype, device=device) for _ in range(shape.layers)]
        self.values = [torch.zeros(size, dtype=shape.dtype, device=device) for _ in range(shape.layers)]
        slot_blocks = torch.arange(plan.slots * self._blocks_per_slot, device=device).view(plan.slots, -1)
        # Block table [slots, blocks per slot]: rows own their blocks; paged slots point at scratch until assigned.
        self.block_table = torch.full_like(slot_blocks, blocks) if plan.paged else slot_blocks
        self._free_blocks = list(range(blocks)) if plan.paged else []
        self._assigned: dict[int, list[int]] = {}
        self._row_tokens = row_tokens
        self._slot_index = torch.arange(plan.slots, device=device)
        positions = torch.arange(row_tokens, device=device)
        self._key_positions = positions
        self._block_of_position = positions // BLOCK_TOKENS
        self._offset_in_block = positions % BLOCK_TOKENS
        # What the next forward pass does, set by prepare_prefill / prepare_decode.
        self._prefill = False
        self._write_index = self._key_positions[:0]
        self._read_index: torch.Tensor | None = None
        self._batch = 0
        self._length = 0

    @property
    def tokens(self) -> int:
        return self.blocks * BLOCK_TOKENS

    @property
    def bytes(self) -> int:
        return self.tokens * self.shape.bytes_per_token()

    @property
    def free_blocks(self) -> int:
        """Blocks a joining request may take (paged); 0 for rows, where a slot always holds a whole sequence."""
        return len(self._free_blocks)

    def blocks_for(self, tokens: int) -> int:
        """Blocks a request of `tokens` (prompt + token budget) takes when it joins: none for rows."""
        return _blocks_holding(tokens) if self.plan.paged else 0

    def describe(self) -> str:
        plan = self.plan
        size = f"{self.bytes / 2**30:.2f} GiB"
        if not plan.paged:
            return f"KV cache {plan.slots} sequences x {plan.slot_tokens} tokens ({size})"
        return (
            f"KV cache paged: {self.tokens} tokens in blocks of {BLOCK_TOKENS} ({size}, "
            f"{self.tokens / plan.slot_tokens:.1f} whole sequences) for up to {plan.slots} "
            f"sequences of up to {plan.slot_tokens} tokens"
        )

    def assign(self, slot: int, tokens: int) -> None:
        """Gives `slot` the blocks for a sequence of `tokens` (paged; rows already own theirs)."""
        count = self.blocks_for(tokens)
        if count > len(self._free_blocks):
            raise RuntimeError(f"{count} KV-cache blocks wanted, {len(self._free_blocks)} free")
        taken = [self._free_blocks.pop() for _ in range(count)]  # a stack: blocks come back in any order anyway
        self._assigned[slot] = taken
        if taken:
            self.block_table[slot, :count] = torch.tensor(taken, device=self.block_table.device)

    @contextlib.contextmanager
    def spread_for_capture(self) -> Iterator[None]:
        """Paged, before any request: while the decode step is captured and checked, the free slots' tables point at
        distinct blocks (as far as the pool has them). Otherwise the pattern rows would all write one scratch block,
        and which duplicate write wins may differ between the eager check and the replay."""
        if not self.plan.paged:
            yield
            return
        table = self.block_table
        table.copy_(torch.arange(table.numel(), device=table.device).view_as(table) % self.blocks)
        try:
            yield
        finally:
            table.fill_(self._scratch_block)

    def release(self, slot: int) -> None:
        taken = self._assigned.pop(slot, [])
        if taken:
            self._free_blocks.extend(taken)
            self.block_table[slot, : len(taken)] = self._scratch_block

    def prepare_prefill(self, slots: torch.Tensor, prompt_lengths: torch.Tensor, length: int) -> torch.Tensor:
        """For a forward pass over right-padded prompts [len(slots), length] written to `slots` from position 0;
        returns its attention mask [rows, 1, length, length] (causal, padding hidden)."""
        self._prefill = True
        self._write_index = self._token_index(self.block_table[slots], length).flatten()
        queries = self._key_positions[:length, None]
        keys = self._key_positions[None, :length]
        mask = self._visible(queries, keys)[None] & (keys < prompt_lengths[:, None, None])
        return mask[:, None]

    def prepare_decode(self, positions: torch.Tensor, batch: int, length: int) -> torch.Tensor:
        """For a decode step over slots 0..batch-1, each row writing at positions[row] (< length) and attending to
        its positions up to that one; returns the attention mask [batch, 1, 1, length]."""
        self._prefill = False
        self._batch, self._length = batch, length
        table = self.block_table[:batch]
        row_positions = positions[:batch]
        blocks = table[self._slot_index[:batch], self._block_of_position[row_positions]]
        self._write_index = blocks * BLOCK_TOKENS + self._offset_in_block[row_positions]
        self._read_index = self._token_index(table, length).flatten() if self.plan.paged else None
        mask = self._visible(row_positions[:, None], self._key_positions[None, :length])
        return mask[:, None, None]

    def _token_index(self, table: torch.Tensor, length: int) -> torch.Tensor:
        """[rows, length]: where positions 0..length-1 of each table row live in the token dimension."""
        return table[:, self._block_of_position[:length]] * BLOCK_TOKENS + self._offset_in_block[:length]

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
        returns the keys and values attention reads [rows, heads, positions, head dim]."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        # Token-major, as the cache holds them: [rows x new tokens, heads, head dim].
        keys.index_copy_(0, self._write_index, key_states.transpose(1, 2).flatten(0, 1))
        values.index_copy_(0, self._write_index, value_states.transpose(1, 2).flatten(0, 1))
        if self._prefill:
            return key_states, value_states  # a prompt attends only to itself
        return self._read(keys), self._read(values)

    def _read(self, cache: torch.Tensor) -> torch.Tensor:
        batch, length = self._batch, self._length
        if self._read_index is None:  # rows: a view, read in place
            rows = cache[: self.blocks * BLOCK_TOKENS].view(self.plan.slots, self._row_tokens, *cache.shape[1:])
            return rows[:batch, :length].transpose(1, 2)
        return cache.index_select(0, self._read_index).view(batch, length, *cache.shape[1:]).transpose(1, 2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are per row and always passed explicitly (position_ids)
