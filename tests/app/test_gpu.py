"""What only a GPU can show (marked `gpu`, skipped without CUDA): CUDA-graph replays against the eager step, a
sliding-window model's rows past Phi-3-mini's 2,047-token window against `generate`, and float16 where the GPU has no
bfloat16. `python -m bench.gpu_suite` runs them with the GPU benchmarks (bench/README.md)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from inference_app.engine.engine_loop import BatchingEngine, EngineOptions
from inference_app.engine.model_loading import LoadedModel, load_model
from inference_app.settings import Settings
from tests.app.engine.engine_harness import (
    LAYOUTS,
    PROMPTS,
    Reply,
    generate_text,
    greedy,
    prompt_ids,
    sliding_window_model,
)

pytestmark = pytest.mark.gpu

PHI3_MINI_WINDOW = 2047


def replies(loaded: LoadedModel, prompts: list[list[int]], budgets: list[int], **options: Any) -> list[Any]:
    """The engine's greedy replies to prompts submitted together, and its description."""
    engine = BatchingEngine(loaded, EngineOptions(**{"max_batch_size": 8, **options}))
    results = [Reply() for _ in prompts]
    for ids, budget, reply in zip(prompts, budgets, results, strict=True):
        engine.submit(ids, greedy(budget), budget, reply.deliver)
    engine.start()
    try:
        return [[reply.result() for reply in results], engine.describe()]
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def gpu_loaded(tiny_settings: Settings) -> LoadedModel:
    """float32, so that graph and eager steps can be compared token for token."""
    loaded = load_model(dataclasses.replace(tiny_settings, dtype="float32"))
    assert loaded.device == "cuda"
    return loaded


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_graph_replays_give_the_eager_steps_tokens(gpu_loaded: LoadedModel, layout: str) -> None:
    prompts = [prompt_ids(gpu_loaded, text) for text in PROMPTS]
    budgets = [40, 6, 40, 3, 25, 12]  # rows leave at different steps: holes below the batch's width
    graphed, facts = replies(gpu_loaded, prompts, budgets, cuda_graphs=True, **LAYOUTS[layout])
    assert facts["decode"].startswith("CUDA graphs"), facts["decode"]
    eager, facts = replies(gpu_loaded, prompts, budgets, cuda_graphs=False, **LAYOUTS[layout])
    assert facts["decode"] == "eager"
    assert graphed == eager


@pytest.mark.parametrize("layout", [{}, {"kv_cache_tokens": 4096}])  # rows; paged (two rings of 2048 for 4 slots)
def test_sliding_window_rows_past_2047_tokens_match_generate(tmp_path: Path, layout: dict[str, int]) -> None:
    windowed = sliding_window_model(tmp_path, PHI3_MINI_WINDOW, context=4096, device="cuda")
    filler = prompt_ids(windowed, "one two three four five six seven eight nine ten " * 400)
    prompts = [filler[:2100], filler[:1990], prompt_ids(windowed, PROMPTS[1])]
    budgets = [40, 100, 20]  # the second crosses the window while it decodes
    assert len(prompts[0]) == 2100 and len(prompts[1]) + budgets[1] > PHI3_MINI_WINDOW + 1
    results, _ = replies(windowed, prompts, budgets, max_batch_size=4, **layout)
    assert results == [generate_text(windowed, ids, budget) for ids, budget in zip(prompts, budgets, strict=True)]


def test_float16_is_auto_below_compute_capability_8_and_matches_generate(tiny_settings: Settings) -> None:
    if torch.cuda.get_device_capability()[0] >= 8:
        pytest.skip("this GPU has bfloat16 hardware: auto is bfloat16 (a T4 or V100 runs this test)")
    loaded = load_model(tiny_settings)
    assert loaded.dtype == "float16"
    prompts = [prompt_ids(loaded, text) for text in PROMPTS[:4]]
    results, _ = replies(loaded, prompts, [20] * 4)
    assert results == [generate_text(loaded, ids) for ids in prompts]
