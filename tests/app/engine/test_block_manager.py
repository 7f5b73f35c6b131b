"""The block manager hands out the lowest free slot and, paged, blocks; both come back."""

from __future__ import annotations

import pytest

from inference_app.engine.block_manager import BlockManager
from inference_app.engine.cache_plan import CachePlan


def test_the_block_manager_hands_out_the_lowest_free_slot() -> None:
    blocks = BlockManager(CachePlan(slots=3, slot_tokens=32, tokens=96))  # rows: no blocks to hand out
    assert [blocks.allocate(32), blocks.allocate(32), blocks.allocate(32)] == [(0, []), (1, []), (2, [])]
    assert blocks.free_slots == 0
    with pytest.raises(RuntimeError, match="no free KV-cache slot"):
        blocks.allocate(32)
    blocks.free(2)
    blocks.free(0)
    assert (blocks.free_slots, blocks.allocate(32)[0], blocks.allocate(32)[0]) == (2, 0, 2)
