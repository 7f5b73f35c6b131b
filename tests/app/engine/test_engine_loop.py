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
from inference_app.engine.types import GenerationChunk, SamplingParams
from tests.app.engine.engine_harness import (
    LAYOUTS,
    NEW_TOKENS,
    PROMPTS,
    TIMEOUT_S,
    Reply,
    generate_text,
    greedy,
    prompt_ids,
    sliding_window_model,
)
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


@pytest.mark.parametrize(("window", "ring"), [(8, 16), (32, 32)])  # the ring: the window in whole blocks of 16
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sliding_window_models_keep_only_the_window_and_match_generate(
    tmp_path: Path, layout: str, window: int, ring: int
) -> None:
    """Phi-3-mini-4k attends to the last 2047 positions only, so a slot keeps 2048 places, a ring buffer; here
    windows of 8 and 32, prompts and replies well past them (positions wrap around the ring several times)."""
    windowed = sliding_window_model(tmp_path, window)
    engine = BatchingEngine(windowed, EngineOptions(max_batch_size=4, **LAYOUTS[layout]))
    prompts = [prompt_ids(windowed, text) for text in PROMPTS[:4]]
    assert max(len(ids) for ids in prompts) > ring
    replies = [Reply() for _ in prompts]
    for ids, reply in zip(prompts, replies, strict=True):
        engine.submit(ids, greedy(3 * ring), 3 * ring, reply.deliver)
    engine.start()
    try:
        assert engine.describe()["slot_tokens"] == ring
        expected = [generate_text(windowed, ids, 3 * ring) for ids in prompts]
        assert [reply.result() for reply in replies] == expected
        assert max(len(ids) + tokens for ids, (_, tokens) in zip(prompts, expected, strict=True)) > 3 * ring
    finally:
        engine.stop()


@pytest.mark.usefixtures("paced_decoding")  # the long reply outlasts the chunked prefills beside it
@pytest.mark.parametrize("window", [None, 8])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_prompts_prefilled_in_chunks_beside_running_replies_match_generate(
    loaded: LoadedModel, tmp_path: Path, layout: str, window: int | None
) -> None:
    """Long prompts join while a reply streams: each is prefilled a chunk of 8 tokens per step, attending to its
    earlier chunks in the cache. The first one takes slot 0, below the streaming row, which the decode step covers:
    that row must not write into the slot while its prompt is half there."""
    model = loaded if window is None else sliding_window_model(tmp_path, window)
    engine = BatchingEngine(model, EngineOptions(max_batch_size=4, prefill_chunk_tokens=8, **LAYOUTS[layout]))
    short, streaming, *long_prompts = [prompt_ids(model, text) for text in (PROMPTS[0], PROMPTS[1], *PROMPTS[2::2])]
    budgets = [2, 60, NEW_TOKENS, NEW_TOKENS]
    replies: list[Reply] = []

    def join_when_the_short_reply_ends(chunk: GenerationChunk) -> None:
        if chunk.finish_reason is not None:  # its slot 0 is free again
            for ids, budget in zip(long_prompts, budgets[2:], strict=True):
                replies.append(Reply())
                engine.submit(ids, greedy(budget), budget, replies[-1].deliver)

    first = [Reply(join_when_the_short_reply_ends), Reply()]
    for ids, budget, reply in zip((short, streaming), budgets[:2], first, strict=True):
        engine.submit(ids, greedy(budget), budget, reply.deliver)
    engine.start()
    try:
        results = [reply.result() for reply in first]
        assert len(replies) == len(long_prompts), "the long prompts were not submitted"
        results += [reply.result() for reply in replies]
        prompts = [short, streaming, *long_prompts]
        assert min(len(ids) for ids in long_prompts) > 3 * 8  # several chunks each
        assert results == [generate_text(model, ids, budget) for ids, budget in zip(prompts, budgets, strict=True)]
        assert engine.stats()["prefill_chunks"] >= 2 * 3
    finally:
        engine.stop()


@pytest.mark.parametrize(("window", "masked"), [(None, False), (8, True), (2047, False)])
def test_prompts_within_the_window_are_prefilled_causal_without_a_mask(
    monkeypatch: pytest.MonkeyPatch,
    loaded: LoadedModel,
    tmp_path: Path,
    window: int | None,
    masked: bool,
) -> None:
    """PyTorch runs FlashAttention only without an explicit mask: right-padded prompts within the window need none.
    A prompt longer than the window (8 here) needs its mask."""
    model = loaded if window is None else sliding_window_model(tmp_path, window)
    prefills: list[tuple[bool, bool]] = []  # (a mask was passed, is_causal), for forward passes of several tokens
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(query: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if query.shape[2] > 1:
            prefills.append((kwargs.get("attn_mask") is not None, bool(kwargs.get("is_causal"))))
        return sdpa(query, *args, **kwargs)

    prompts = [prompt_ids(model, text) for text in PROMPTS[:3]]  # different lengths: right padding
    expected = [generate_text(model, ids) for ids in prompts]
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    engine = BatchingEngine(model, EngineOptions(max_batch_size=4))
    replies = [Reply() for _ in prompts]
    for ids, reply in zip(prompts, replies, strict=True):
        engine.submit(ids, greedy(), NEW_TOKENS, reply.deliver)
    engine.start()
    try:
        assert [reply.result() for reply in replies] == expected
    finally:
        engine.stop()
    assert prefills
    assert set(prefills) == ({(True, False)} if masked else {(False, True)})


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


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_request_that_fails_the_prefill_fails_alone_and_the_others_go_on(
    loaded: LoadedModel, start_engine: Callable[..., BatchingEngine], layout: str
) -> None:
    """A top_k of 2**63 (which ModelService refuses; here it reaches the engine) overflows the sampler's tensor: it
    failed the whole prefill group, all seven requests."""
    engine = start_engine(started=False, max_batch_size=8, **LAYOUTS[layout])
    all_blocks = engine.stats()["free_kv_blocks"]
    prompts = [prompt_ids(loaded, text) for text in PROMPTS]
    replies = [Reply() for _ in prompts]
    for ids, reply in zip(prompts, replies, strict=True):
        engine.submit(ids, greedy(), NEW_TOKENS, reply.deliver)
    at_fault = Reply()
    engine.submit(prompts[0], SamplingParams(max_new_tokens=NEW_TOKENS, top_k=2**63), NEW_TOKENS, at_fault.deliver)
    engine.start()  # all requests are waiting: they are prefilled together
    assert [reply.result() for reply in replies] == [generate_text(loaded, ids) for ids in prompts]
    assert at_fault.finished.wait(TIMEOUT_S) and "Overflow" in str(at_fault.error)
    wait_for(lambda: engine.stats()["free_kv_blocks"] == all_blocks, TIMEOUT_S, "the blocks to come back")


def test_the_cpu_runs_eager_and_sizes_the_cache_from_its_budget(start_engine: Callable[..., BatchingEngine]) -> None:
    engine = start_engine()
    facts = engine.describe()
    assert facts["decode"] == "eager"
    # The tiny model's full-context rows are small: the CPU budget holds the largest batch bucket.
    assert (facts["slots"], facts["slot_tokens"]) == (BATCH_BUCKETS[-1], 512)
