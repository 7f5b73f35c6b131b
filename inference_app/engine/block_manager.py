"""The KV cache's host-side bookkeeping: which slots are free and, in a paged cache, which blocks each slot holds.

The scheduler asks it whether a request fits and takes a slot and blocks for it; the model runner writes the blocks
into the cache's block table on the device (inference_app.engine.kv_cache). No tensors here.
"""

from __future__ import annotations

import heapq

from inference_app.engine.cache_plan import CachePlan, blocks_holding


class BlockManager:
    """Hands out the lowest free slot (so the rows in use stay packed at the front: smaller decode batches) and, when
    the cache is paged, the blocks for a request's prompt and token budget; rows own their blocks for good."""

    def __init__(self, plan: CachePlan) -> None:
        self.paged = plan.paged
        self._slot_tokens = plan.slot_tokens  # what a slot keeps (a sliding window's ring: less than a sequence)
        self._free_slots = list(range(plan.slots))  # a heap
        self._free_blocks = list(range(plan.blocks)) if plan.paged else []
        self._held: dict[int, list[int]] = {}  # slot -> its blocks (paged)

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def free_blocks(self) -> int:
        """Blocks a joining request may take (paged); 0 for rows, where a slot always holds a whole sequence."""
        return len(self._free_blocks)

    def blocks_for(self, tokens: int) -> int:
        """Blocks a request of `tokens` (prompt + token budget) takes when it joins: none for rows."""
        return blocks_holding(min(tokens, self._slot_tokens)) if self.paged else 0

    def allocate(self, tokens: int) -> tuple[int, list[int]]:
        """Takes the lowest free slot and the blocks for a sequence of `tokens`: (slot, blocks)."""
        count = self.blocks_for(tokens)
        if not self._free_slots:
            raise RuntimeError("no free KV-cache slot")
        if count > len(self._free_blocks):
            raise RuntimeError(f"{count} KV-cache blocks wanted, {len(self._free_blocks)} free")
        slot = heapq.heappop(self._free_slots)
        blocks = [self._free_blocks.pop() for _ in range(count)]  # a stack: blocks come back in any order anyway
        self._held[slot] = blocks
        return slot, blocks

    def free(self, slot: int) -> None:
        self._free_blocks.extend(self._held.pop(slot))
        heapq.heappush(self._free_slots, slot)
