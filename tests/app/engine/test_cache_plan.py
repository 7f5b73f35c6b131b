"""Sizing the KV cache: slots, tokens and layout from the memory and the options set."""

from __future__ import annotations

import pytest
import torch

from inference_app.engine.cache_plan import CachePlan, CacheShape, plan_cache
from tests.app.engine.engine_harness import TINY_SHAPE

PHI3_MINI = CacheShape(layers=32, kv_heads=32, head_dim=96, dtype=torch.bfloat16, sliding_window=2047)


def phi3_mini_budget(gpu_gib: float) -> int:
    """What cache_budget finds on a GPU of `gpu_gib` after loading Phi-3-mini (7.6 GB of bf16 weights, ~0.5 GiB of
    CUDA context): the free memory less 10% of the GPU (at least 2 GiB)."""
    total = gpu_gib * 2**30
    free = total - 7.6e9 - 0.5 * 2**30
    return int(free - max(2 * 2**30, 0.1 * total))


@pytest.mark.parametrize(
    ("gpu_gib", "slots", "paged", "whole_sequences"),
    [
        (80, 64, True, 40),  # A100 / H100 80 GB: 64 slots of 4k, memory for ~40 whole sequences shared in blocks
        (139, 64, False, 64),  # H200: 64 full rows fit
        (15, 14, True, 3),  # T4 16 GB: fewer slots, so the gather's copy leaves room for the pool
    ],
)
def test_default_cache_plans_for_phi3_mini_at_4k_context(
    gpu_gib: float, slots: int, paged: bool, whole_sequences: int
) -> None:
    budget = phi3_mini_budget(gpu_gib)
    plan = plan_cache(PHI3_MINI, 4096, budget)
    assert (plan.slots, plan.paged, plan.tokens // 4096) == (slots, paged, whole_sequences)
    gather = PHI3_MINI.gather_bytes(plan.slots, 4096) if plan.paged else 0
    assert plan.tokens * PHI3_MINI.bytes_per_token() + gather <= budget


def test_cache_plans_honour_the_slots_and_tokens_set() -> None:
    plenty = 2**30
    assert plan_cache(TINY_SHAPE, 512, plenty) == CachePlan(64, 512, 64 * 512)
    assert plan_cache(TINY_SHAPE, 512, plenty, slots=8) == CachePlan(8, 512, 8 * 512)
    assert plan_cache(TINY_SHAPE, 512, plenty, slots=8, tokens=1000) == CachePlan(8, 512, 1008)  # whole blocks
    assert plan_cache(TINY_SHAPE, 512, plenty, slots=8, tokens=10**6) == CachePlan(8, 512, 8 * 512)
    assert plan_cache(TINY_SHAPE, 512, plenty, slots=8, tokens=500).holds_a_sequence  # 512 in whole blocks
    assert not plan_cache(TINY_SHAPE, 512, plenty, slots=8, tokens=496).holds_a_sequence
    assert not plan_cache(TINY_SHAPE, 512, budget=10_000).holds_a_sequence
    # Sequences of a length that is no whole number of blocks: rows round up, paged takes whole blocks.
    assert plan_cache(TINY_SHAPE, 100, plenty, slots=1).holds_a_sequence
    assert plan_cache(TINY_SHAPE, 100, plenty, tokens=100) == CachePlan(64, 100, 112)
    assert plan_cache(TINY_SHAPE, 100, plenty, tokens=100).holds_a_sequence
