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
import logging
from collections.abc import Iterator
from typing import Any, Literal

import torch

from inference_app.engine.cache_plan import BLOCK_TOKENS, CachePlan, CacheShape, cache_budget, plan_cache
from inference_app.engine.model_loading import ModelLoadError
from inference_app.settings import option_name

logger = logging.getLogger(__name__)

MAX_BATCH_SIZE_OPTION = option_name("max_batch_size")
MAX_SEQUENCE_TOKENS_OPTION = option_name("max_sequence_tokens")
KV_CACHE_TOKENS_OPTION = option_name("kv_cache_tokens")


class KVCache:
    """Keys and values written by prefill (positions 0..T-1 of some slots) and decode (one position per row, the
    first `batch` slots)."""

    def __init__(self, shape: CacheShape, plan: CachePlan, device: torch.device) -> None:
        self.shape = shape
        self.plan = plan
        row_tokens = plan.blocks_per_slot * BLOCK_TOKENS
        blocks = self.blocks = plan.blocks
        self._scratch_block = blocks  # where free slots and padding beyond a request's blocks write
        size = ((blocks + 1) * BLOCK_TOKENS, shape.kv_heads, shape.head_dim)
        # Zeros, not empty: masked positions still enter attention's product with the values (0 * NaN is NaN).
        self.keys = [torch.zeros(size, dtype=shape.dtype, device=device) for _ in range(shape.layers)]
        self.values = [torch.zeros(size, dtype=shape.dtype, device=device) for _ in range(shape.layers)]
        slot_blocks = torch.arange(plan.slots * plan.blocks_per_slot, device=device).view(plan.slots, -1)
        # Block table [slots, blocks per slot]: rows own their blocks; paged slots point at scratch until given some.
        self.block_table = torch.full_like(slot_blocks, blocks) if plan.paged else slot_blocks
        self._row_tokens = row_tokens
        self._places = torch.arange(row_tokens, device=device)  # a row's places, in order
        # What the next forward pass does, set by prepare_prefill / prepare_decode.
        self._mode: Literal["prefill", "chunk", "decode"] = "decode"
        self._write_index = self._places[:0]
        self._read_index: torch.Tensor | None = None
        self._rows = slice(0, 0)  # the slots attention reads
        self._length = 0

    @property
    def tokens(self) -> int:
        return self.blocks * BLOCK_TOKENS

    @property
    def bytes(self) -> int:
        return self.tokens * self.shape.bytes_per_token()

    def describe(self) -> str:
        plan = self.plan
        size = f"{self.bytes / 2**30:.2f} GiB"
        window = self.shape.sliding_window
        ring = "" if window is None or window > plan.slot_tokens else f", rings of the last (sliding window {window})"
        if not plan.paged:
            return f"KV cache {plan.slots} sequences x {plan.slot_tokens} tokens{ring} ({size})"
        return (
            f"KV cache paged: {self.tokens} tokens in blocks of {BLOCK_TOKENS} ({size}, "
            f"{self.tokens / plan.slot_tokens:.1f} whole sequences) for up to {plan.slots} "
            f"sequences of up to {plan.slot_tokens} tokens"
        )

    def set_blocks(self, slot: int, blocks: list[int]) -> None:
        """Points `slot`'s table at the blocks the block manager gave it (paged; rows own theirs for good)."""
        if blocks:
            self.block_table[slot, : len(blocks)] = torch.tensor(blocks, device=self.block_table.device)

    def clear_blocks(self, slot: int) -> None:
        """A freed paged slot points at scratch again: its row, still computed below the batch's width, then writes
        nowhere that matters."""
        if self.plan.paged:
            self.block_table[slot] = self._scratch_block

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

    def prepare_prefill(self, slots: torch.Tensor, prompt_lengths: torch.Tensor, length: int) -> torch.Tensor | None:
        """For a forward pass over right-padded prompts [len(slots), length] written to `slots` from position 0.
        Padding, and in a ring the positions older than its last row_tokens, go to scratch. Returns the attention
        mask [rows, 1, length, length] (causal, padding hidden), or None when plain causal attention is the same for
        every real token: the padding comes after them, and the prompts fit the sliding window. SDPA then runs with
        is_causal and no mask, which FlashAttention accepts on a GPU (PyTorch refuses it any explicit mask)."""
        self._mode = "prefill"
        positions = torch.arange(length, device=self._places.device)
        kept = (positions < prompt_lengths[:, None]) & (positions >= prompt_lengths[:, None] - self._row_tokens)
        self._write_index = self._where_kept(self.block_table[slots], positions, kept).flatten()
        window = self.shape.sliding_window
        if window is None or length < window:
            return None
        queries, keys = positions[:, None], positions[None, :]
        mask = self._visible(queries, keys)[None] & (keys < prompt_lengths[:, None, None])
        return mask[:, None]

    def prepare_chunk(self, slot: int, start: int, length: int) -> torch.Tensor:
        """For a forward pass over one slot's prompt positions start..start+length-1: they attend to the positions
        before them that they can see (from the cache, read before the chunk is written) and to each other; returns
        the attention mask [1, 1, length, visible earlier positions + length]."""
        end = start + length
        window = self.shape.sliding_window
        first_seen = 0 if window is None else max(0, start - window + 1)
        self._mode = "chunk"
        table = self.block_table[slot : slot + 1]
        keys = torch.arange(first_seen, end, device=self._places.device)
        positions = keys[start - first_seen :]
        self._read_index = self._token_index(table, keys[: start - first_seen]).flatten()
        self._write_index = self._where_kept(table, positions, positions >= end - self._row_tokens).flatten()
        return self._visible(positions[:, None], keys[None, :])[None, None]

    def prepare_decode(self, positions: torch.Tensor, active: torch.Tensor, batch: int, length: int) -> torch.Tensor:
        """For a decode step over slots 0..batch-1, each active row writing at positions[row] and attending to its
        positions up to that one (an inactive row writes to scratch: its slot may be free, or hold a prompt being
        prefilled in chunks). Attention reads the first `length` (<= row_tokens) places of each row: a ring buffer's
        place j holds the latest position that is j modulo row_tokens. Returns the attention mask
        [batch, 1, 1, length]."""
        self._mode = "decode"
        self._rows, self._length = slice(0, batch), length
        table = self.block_table[:batch]
        row_positions = positions[:batch, None]
        write = self._token_index(table, row_positions)[:, 0]
        self._write_index = torch.where(active[:batch], write, self._scratch_block * BLOCK_TOKENS)
        places = self._places[None, :length]
        self._read_index = self._token_index(table, places.expand(batch, -1)).flatten() if self.plan.paged else None
        held = row_positions - (row_positions - places) % self._row_tokens  # the position each place holds
        mask = self._visible(row_positions, held) & (held >= 0)
        return mask[:, None, None]

    def _token_index(self, table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Where positions [rows, n] (or [n], the same for each row) of each table row live in the token dimension:
        position p in place p modulo row_tokens of the row."""
        places = positions % self._row_tokens
        rows = torch.arange(table.shape[0], device=table.device)[:, None]
        return table[rows, places // BLOCK_TOKENS] * BLOCK_TOKENS + places % BLOCK_TOKENS

    def _where_kept(self, table: torch.Tensor, positions: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """The token index of each kept position; scratch for the others."""
        return torch.where(kept, self._token_index(table, positions), self._scratch_block * BLOCK_TOKENS)

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
        if self._mode == "chunk":  # the earlier positions, before this chunk overwrites any of them (a ring)
            earlier_keys, earlier_values = self._gather(keys), self._gather(values)
        self._write(keys, key_states)
        self._write(values, value_states)
        if self._mode == "prefill":
            return key_states, value_states  # a prompt attends only to itself
        if self._mode == "chunk":
            return torch.cat([earlier_keys, key_states], dim=2), torch.cat([earlier_values, value_states], dim=2)
        return self._read(keys), self._read(values)

    def _write(self, cache: torch.Tensor, states: torch.Tensor) -> None:
        # Token-major, as the cache holds them: [rows x new tokens, heads, head dim].
        cache.index_copy_(0, self._write_index, states.transpose(1, 2).flatten(0, 1))

    def _gather(self, cache: torch.Tensor) -> torch.Tensor:
        """The positions of the read index, as attention reads them: [1, heads, positions, head dim]."""
        assert self._read_index is not None
        return cache.index_select(0, self._read_index)[None].transpose(1, 2)

    def _read(self, cache: torch.Tensor) -> torch.Tensor:
        length = self._length
        if self._read_index is None:  # rows: a view, read in place
            rows = cache[: self.blocks * BLOCK_TOKENS].view(self.plan.slots, self._row_tokens, *cache.shape[1:])
            return rows[self._rows, :length].transpose(1, 2)
        return cache.index_select(0, self._read_index).view(-1, length, *cache.shape[1:]).transpose(1, 2)

    # Asked by transformers' mask builders when a forward pass gets no mask (a prefill: the prompt attends to itself).
    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are per row and always passed explicitly (position_ids)


def allocate_kv_cache(
    model: Any, device: torch.device, sequence_tokens: int, max_batch_size: int | None, kv_cache_tokens: int | None
) -> KVCache:
    """The KV cache as plan_cache sizes it; a ModelLoadError naming the option to change when it can't be made."""
    shape = CacheShape.of(model)
    budget = cache_budget(device)
    row_tokens = shape.kept_tokens(sequence_tokens)
    plan = plan_cache(shape, row_tokens, budget, max_batch_size, kv_cache_tokens)
    memory = device.type.upper()
    if not plan.holds_a_sequence:
        sequence = f"one sequence of {sequence_tokens} tokens"
        if kv_cache_tokens is not None:
            raise ModelLoadError(
                f"{KV_CACHE_TOKENS_OPTION} {kv_cache_tokens} holds less than {sequence}: set it "
                f"to at least {row_tokens}, or lower {MAX_SEQUENCE_TOKENS_OPTION}"
            )
        raise ModelLoadError(
            f"the {memory}'s free memory after loading ({max(0, budget) / 2**30:.1f} GiB for the KV cache) holds "
            f"less than {sequence}: lower {MAX_SEQUENCE_TOKENS_OPTION} or {MAX_BATCH_SIZE_OPTION}"
        )
    with_gather = plan.tokens * shape.bytes_per_token() + shape.gather_bytes(plan.slots, plan.slot_tokens)
    if plan.paged and kv_cache_tokens is not None and with_gather > budget:
        logger.warning(
            "%s %d: with the paged read's copy for a full batch the KV cache needs %.1f GiB, "
            "more than the %.1f GiB the %s's free memory leaves it: large batches may run out of memory; "
            "lower it or unset it",
            KV_CACHE_TOKENS_OPTION,
            kv_cache_tokens,
            with_gather / 2**30,
            max(0, budget) / 2**30,
            memory,
        )
    try:
        return KVCache(shape, plan, device)
    except torch.OutOfMemoryError:
        size = plan.tokens * shape.bytes_per_token() / 2**30
        raise ModelLoadError(
            f"the KV cache of {plan.tokens} tokens ({size:.1f} GiB) does not fit in the {memory}'s free memory: "
            f"lower {KV_CACHE_TOKENS_OPTION} or {MAX_BATCH_SIZE_OPTION}, or unset them (the defaults size the "
            f"cache from the free memory)"
        ) from None
