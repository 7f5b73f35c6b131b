"""Admission: requests wait for KV-cache blocks and are served in turn; leaked blocks fail a request instead of
hanging the engine."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

from inference_app.engine.block_manager import BlockManager
from inference_app.engine.cache_plan import BLOCK_TOKENS, CachePlan
from inference_app.engine.detokenizer import IncrementalDetokenizer, StopMatcher
from inference_app.engine.engine_loop import BatchingEngine
from inference_app.engine.model_loading import LoadedModel
from inference_app.engine.request import EngineRequest
from inference_app.engine.scheduler import PREFILL_TOKENS, Scheduler, prefill_groups
from inference_app.engine.types import SamplingParams
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
from tests.server_process import wait_for


def test_a_paged_cache_makes_requests_wait_for_blocks_and_serves_them_in_turn(
    loaded: LoadedModel, start_engine: Callable[..., BatchingEngine]
) -> None:
    ids = prompt_ids(loaded, PROMPTS[1])
    expected = generate_text(loaded, ids)
    assert expected[1] > 1  # the reply outlives the prefill: requests share decode steps
    tokens = 2 * math.ceil((len(ids) + NEW_TOKENS) / BLOCK_TOKENS) * BLOCK_TOKENS  # two such requests at a time
    engine = start_engine(started=False, max_batch_size=8, max_sequence_tokens=tokens, kv_cache_tokens=tokens)
    replies = [Reply() for _ in range(5)]
    for reply in replies:
        engine.submit(ids, greedy(), NEW_TOKENS, reply.deliver)
    engine.start()
    assert [reply.result() for reply in replies] == [expected] * len(replies)
    stats = engine.stats()
    assert stats["largest_batch"] == 2  # 8 slots, blocks for 2
    wait_for(lambda: engine.stats()["running"] == 0, TIMEOUT_S, "the engine to release the last requests")
    assert engine.stats()["free_kv_blocks"] == tokens // BLOCK_TOKENS  # every block came back


def test_leaked_blocks_fail_the_next_request_instead_of_hanging_the_engine(
    loaded: LoadedModel, start_engine: Callable[..., BatchingEngine]
) -> None:
    engine = start_engine(max_batch_size=4, **LAYOUTS["paged"])
    for _ in range(2):  # a leak, as a bug would make it: every block held, no generation running
        engine._scheduler.block_manager.allocate(512)
    reply = Reply()
    engine.submit(prompt_ids(loaded, PROMPTS[1]), greedy(), NEW_TOKENS, reply.deliver)
    assert reply.finished.wait(TIMEOUT_S)
    assert str(reply.error).startswith("engine error: the KV cache has 2 free slots and 0 free blocks")
    assert engine.stats()["waiting"] == 0


def _request(prompt_tokens: int, max_new_tokens: int = 4) -> EngineRequest:
    return EngineRequest(
        prompt_ids=[1] * prompt_tokens,
        params=SamplingParams(max_new_tokens=max_new_tokens),
        max_new_tokens=max_new_tokens,
        deliver=lambda item: None,
        detokenizer=cast(IncrementalDetokenizer, None),  # the scheduler never reads text
        stop_matcher=StopMatcher(()),
        seed=0,
    )


def _joining(scheduler: Scheduler) -> list[EngineRequest]:
    step = scheduler.schedule()
    assert step is not None and step.refused == []
    return [request for group in step.prefill_groups for request in group]


def test_prefill_groups_hold_at_most_prefill_tokens_padding_included() -> None:
    requests = [_request(length) for length in (4000, 4000, 100, 9000, 10)]
    groups = prefill_groups(requests)
    assert [[requests.index(request) for request in group] for group in groups] == [[0, 1], [2], [3], [4]]
    assert PREFILL_TOKENS == 8192  # two prompts of 4000 fit, a third (padded to 4000) does not


def test_the_token_cap_holds_requests_back_unless_the_batch_is_empty() -> None:
    scheduler = Scheduler(BlockManager(CachePlan(slots=4, slot_tokens=128, tokens=512)), max_batch_tokens=50)
    first, second, large = _request(40), _request(40), _request(90)
    for request in (first, second):
        scheduler.add(request)
    assert _joining(scheduler) == [first]  # 44 + 44 tokens would exceed the cap of 50
    assert scheduler.finish([first]) == [0] and first.slot is None
    scheduler.add(large)
    assert _joining(scheduler) == [second]
    scheduler.finish([second])
    assert _joining(scheduler) == [large]  # alone, a request may exceed the cap (it fits the cache)


def test_a_request_short_of_blocks_makes_later_ones_wait_too() -> None:
    blocks = BlockManager(CachePlan(slots=4, slot_tokens=64, tokens=64))  # paged: 4 blocks of 16
    scheduler = Scheduler(blocks, max_batch_tokens=None)
    first, second, third = _request(44), _request(28), _request(12)  # 3, 2 and 1 blocks
    for request in (first, second, third):
        scheduler.add(request)
    assert _joining(scheduler) == [first] and (first.slot, len(first.blocks)) == (0, 3)
    assert (scheduler.waiting, blocks.free_blocks) == (2, 1)  # the third would fit, but the second came first
    scheduler.finish([first])
    assert _joining(scheduler) == [second, third]


def test_cancelled_requests_never_join() -> None:
    scheduler = Scheduler(BlockManager(CachePlan(slots=2, slot_tokens=64, tokens=128)), max_batch_tokens=None)
    cancelled, waiting = _request(10), _request(10)
    cancelled.cancel()
    scheduler.add(cancelled)
    scheduler.add(waiting)
    assert _joining(scheduler) == [waiting] and cancelled.slot is None
    waiting.cancel()
    assert scheduler.cancelled() == [waiting]
