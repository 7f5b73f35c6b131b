"""The KV cache's tensors and block table, and its allocation: the errors and warnings that name the option to
change."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import pytest
import torch

from inference_app.engine import kv_cache
from inference_app.engine.block_manager import BlockManager
from inference_app.engine.cache_plan import CachePlan
from inference_app.engine.engine_loop import BatchingEngine
from inference_app.engine.kv_cache import KVCache
from inference_app.service import ModelService
from inference_app.settings import Settings
from tests.app.engine.engine_harness import LAYOUTS, TIMEOUT_S, TINY_SHAPE

SCRATCH = 6  # the scratch block of a 6-block cache: where unassigned table entries point


def test_a_paged_cache_hands_out_blocks_and_takes_them_back() -> None:
    plan = CachePlan(slots=4, slot_tokens=64, tokens=96)
    blocks, cache = BlockManager(plan), KVCache(TINY_SHAPE, plan, torch.device("cpu"))
    assert (cache.plan.paged, cache.blocks, blocks.free_blocks, blocks.blocks_for(33)) == (True, 6, 6, 3)
    assert (cache.block_table == SCRATCH).all()
    slot, taken = blocks.allocate(33)
    cache.set_blocks(slot, taken)
    assert slot == 0 and cache.block_table[0, :3].tolist() == taken
    assert len(set(taken)) == 3 and set(taken) <= set(range(6)) and blocks.free_blocks == 3
    assert (cache.block_table[0, 3:] == SCRATCH).all() and (cache.block_table[1:] == SCRATCH).all()
    with pytest.raises(RuntimeError, match="4 KV-cache blocks wanted, 3 free"):
        blocks.allocate(64)
    blocks.free(slot)
    cache.clear_blocks(slot)
    assert blocks.free_blocks == 6 and blocks.free_slots == 4 and (cache.block_table == SCRATCH).all()


def test_a_rows_cache_gives_each_slot_its_own_row_for_good() -> None:
    plan = CachePlan(slots=2, slot_tokens=40, tokens=80)
    blocks, cache = BlockManager(plan), KVCache(TINY_SHAPE, plan, torch.device("cpu"))
    assert not cache.plan.paged
    assert cache.block_table.tolist() == [[0, 1, 2], [3, 4, 5]]  # 40 tokens: 3 blocks of 16
    assert (blocks.blocks_for(40), blocks.free_blocks) == (0, 0)
    slot, taken = blocks.allocate(40)
    cache.set_blocks(slot, taken)
    blocks.free(slot)
    cache.clear_blocks(slot)
    assert cache.block_table.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_while_graphs_are_captured_a_paged_cache_spreads_free_slots_over_distinct_blocks() -> None:
    cache = KVCache(TINY_SHAPE, CachePlan(slots=2, slot_tokens=48, tokens=80), torch.device("cpu"))  # 5 blocks
    with cache.spread_for_capture():
        assert cache.block_table.tolist() == [[0, 1, 2], [3, 4, 0]]  # as far as the pool has blocks
    assert (cache.block_table == 5).all()  # scratch again


def test_a_set_kv_cache_too_big_for_the_paged_reads_is_warned_about(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, start_engine: Callable[..., BatchingEngine]
) -> None:
    monkeypatch.setattr(kv_cache, "cache_budget", lambda device: 2**20)
    with caplog.at_level(logging.WARNING, logger="inference_app.engine.kv_cache"):
        start_engine(max_batch_size=8, **LAYOUTS["paged"])
    assert "--kv-cache-tokens / INFERENCE_KV_CACHE_TOKENS 1024: with the paged read's copy" in caplog.text
    assert "large batches may run out of memory; lower it or unset it" in caplog.text


@pytest.mark.parametrize(
    ("settings", "out_of_memory", "reason"),
    [
        (
            {"max_batch_size": 300},
            True,
            "the KV cache of 153600 tokens (0.1 GiB) does not fit in the CPU's free memory: lower "
            "--kv-cache-tokens / INFERENCE_KV_CACHE_TOKENS or --max-batch-size / INFERENCE_MAX_BATCH_SIZE, or unset "
            "them (the defaults size the cache from the free memory)",
        ),
        (
            {"kv_cache_tokens": 100},
            False,
            "--kv-cache-tokens / INFERENCE_KV_CACHE_TOKENS 100 holds less than one sequence of 512 tokens: set it to "
            "at least 512, or lower --max-sequence-tokens / INFERENCE_MAX_SEQUENCE_TOKENS",
        ),
    ],
)
def test_a_kv_cache_that_cannot_be_made_fails_loading_with_the_fix(
    monkeypatch: pytest.MonkeyPatch,
    tiny_settings: Settings,
    settings: dict[str, Any],
    out_of_memory: bool,
    reason: str,
) -> None:
    def no_memory(*args: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 96.00 GiB")

    if out_of_memory:
        monkeypatch.setattr(kv_cache, "KVCache", no_memory)
    service = ModelService(dataclasses.replace(tiny_settings, **settings))
    service.start_loading()
    assert service.wait_until_loaded(TIMEOUT_S) == "failed"
    assert service.failure_reason == reason


def test_too_little_memory_for_one_sequence_fails_loading_with_the_fix(
    monkeypatch: pytest.MonkeyPatch, tiny_settings: Settings
) -> None:
    monkeypatch.setattr(kv_cache, "cache_budget", lambda device: 50_000)
    service = ModelService(tiny_settings)
    service.start_loading()
    assert service.wait_until_loaded(TIMEOUT_S) == "failed"
    assert service.failure_reason == (
        "the CPU's free memory after loading (0.0 GiB for the KV cache) holds less than one sequence of 512 tokens: "
        "lower --max-sequence-tokens / INFERENCE_MAX_SEQUENCE_TOKENS or --max-batch-size / INFERENCE_MAX_BATCH_SIZE"
    )
