"""The engine loop: greedy replies identical to `model.generate` however requests share the batch, and requests that
fail or cannot fit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from inference_app.engine.cuda_graphs import (
    BATCH_BUCKETS,
)
from inference_app.engine.engine_loop import BatchingEngine, EngineOptions
from inference_app.engine.model_loading import LoadedModel
from inference_app.engine.types import GenerationChunk
from tests.app.engine.engine_harness import (
    LAYOUTS,
    NEW_TOKENS,
    PROMPTS,
    TIMEOUT_S,
    Reply,
    generate_text,
    greedy,
    prompt_ids,
)
from tests.model_factory import SIZES, build_tokenizer, generation_config, phi3_config
from tests.server_process import wait_for


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("concurrent", range(1, len(PROMPTS) + 1))
def test_concurrent_greedy_replies_match_generate(
    loaded: LoadedModel, start_engine: Callable[..., BatchingEngine], concurrent: int, layout: str
) -> None:
    engine = start_engine(started=False, max_batch_size=8, **LAYOUTS[layout])
    prompts = [prompt_ids(loaded, text) for text in PROMPTS[:concurrent]]
    replies = [Reply() for _ in prompts]
    for ids, reply in zip(prompts, replies, strict=True):
        engine.submit(ids, greedy(), NEW_TOKENS, reply.deliver)
    engine.start()  # all requests are waiting: they are prefilled together
    assert engine.describe()["paged"] is (layout == "paged")
    expected = [generate_text(loaded, ids) for ids in prompts]
    assert [reply.result() for reply in replies] == expected
    # All join the batch, but for a reply whose first token ends it (PROMPTS[4]'s: it finishes at the prefill).
    assert engine.stats()["largest_batch"] == sum(tokens > 0 for _, tokens in expected)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sliding_window_models_match_generate(tmp_path: Path, layout: str) -> None:
    """Phi-3-mini-4k attends to the last 2047 positions only; here a window of 8, shorter than every prompt."""
    from transformers import Phi3ForCausalLM

    tokenizer = build_tokenizer(tmp_path)
    config = phi3_config(SIZES["tiny"], tokenizer, torch.float32)
    config.sliding_window = 8
    torch.manual_seed(0)
    model = Phi3ForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    model.generation_config = generation_config(tokenizer, config)
    windowed = LoadedModel(model, tokenizer, "windowed", None, "cpu", "float32", SIZES["tiny"].context_length, {})
    engine = BatchingEngine(windowed, EngineOptions(max_batch_size=4, **LAYOUTS[layout]))
    prompts = [prompt_ids(windowed, text) for text in PROMPTS[:4]]
    replies = [Reply() for _ in prompts]
    for ids, reply in zip(prompts, replies, strict=True):
        engine.submit(ids, greedy(), NEW_TOKENS, reply.deliver)
    engine.start()
    try:
        assert [reply.result() for reply in replies] == [generate_text(windowed, ids) for ids in prompts]
    finally:
        engine.stop()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_requests_joining_and_leaving_mid_batch_match_generate(
    loaded: LoadedModel, start_engine: Callable[..., BatchingEngine], layout: str
) -> None:
    engine = start_engine(max_batch_size=3, **LAYOUTS[layout])
    prompts = [prompt_ids(loaded, text) for text in PROMPTS]
    budgets = [NEW_TOKENS, 8] * (len(PROMPTS) // 2)  # short replies leave while long ones go on
    replies: list[Reply] = []

    def submit(index: int) -> None:
        # Each request submits the next one once it has streamed 5 tokens (or ended): every request after the
        # first joins a running batch, at a step boundary the test controls.
        def on_chunk(chunk: GenerationChunk) -> None:
            if (chunk.completion_tokens >= 5 or chunk.finish_reason) and len(replies) == index + 1 < len(prompts):
                submit(index + 1)

        replies.append(Reply(on_chunk))
        engine.submit(prompts[index], greedy(budgets[index]), budgets[index], replies[index].deliver)

    submit(0)
    for index in range(len(prompts)):
        assert index < len(replies), "the chain of submissions stopped"
        replies[index].result()
    expected = [generate_text(loaded, ids, budget) for ids, budget in zip(prompts, budgets, strict=True)]
    assert [reply.result() for reply in replies] == expected
    assert engine.stats()["largest_batch"] >= 2


def test_a_request_longer_than_a_sequence_is_refused_not_queued(
    loaded: LoadedModel, start_engine: Callable[..., BatchingEngine]
) -> None:
    engine = start_engine(max_sequence_tokens=64, **LAYOUTS["paged"])
    with pytest.raises(ValueError, match=r"prompt \(60 tokens\) \+ max_new_tokens \(5\) exceeds the 64 tokens"):
        engine.submit([1] * 60, greedy(5), 5, Reply().deliver)
    assert engine.stats()["waiting"] == 0


def test_a_failure_after_the_prefill_frees_the_slots_and_blocks(
    monkeypatch: pytest.MonkeyPatch, loaded: LoadedModel, start_engine: Callable[..., BatchingEngine]
) -> None:
    engine = start_engine(max_batch_size=4, **LAYOUTS["paged"])
    all_blocks = engine.stats()["free_kv_blocks"]
    accept = engine._accept_token
    failures: list[bool] = []

    def fail_once(*args: Any) -> bool:
        if not failures:
            failures.append(True)
            raise RuntimeError("forced failure after the prefill")
        return accept(*args)

    monkeypatch.setattr(engine, "_accept_token", fail_once)
    ids = prompt_ids(loaded, PROMPTS[1])
    failed = Reply()
    engine.submit(ids, greedy(), NEW_TOKENS, failed.deliver)
    assert failed.finished.wait(TIMEOUT_S) and str(failed.error) == "forced failure after the prefill"
    wait_for(lambda: engine.stats()["free_kv_blocks"] == all_blocks, TIMEOUT_S, "the blocks to come back")
    served = [Reply() for _ in range(4)]  # every slot is free again
    for reply in served:
        engine.submit(ids, greedy(), NEW_TOKENS, reply.deliver)
    assert [reply.result() for reply in served] == [generate_text(loaded, ids)] * 4


def test_the_cpu_runs_eager_and_sizes_the_cache_from_its_budget(start_engine: Callable[..., BatchingEngine]) -> None:
    engine = start_engine()
    facts = engine.describe()
    assert facts["decode"] == "eager"
    # The tiny model's full-context rows are small: the CPU budget holds the largest batch bucket.
    assert (facts["slots"], facts["slot_tokens"]) == (BATCH_BUCKETS[-1], 512)
