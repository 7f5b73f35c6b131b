"""The batching engine's parts: greedy parity with `model.generate`, slots and buckets, batched sampling on the
device, and the eager fallback when CUDA graphs cannot be used."""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from inference_app.engine import kv_cache, model_runner
from inference_app.engine.block_manager import BlockManager
from inference_app.engine.cache_plan import BLOCK_TOKENS, CachePlan, CacheShape, plan_cache
from inference_app.engine.cuda_graphs import (
    BATCH_BUCKETS,
    EagerDecoder,
    GraphDecoder,
    batch_buckets,
    bucket_for,
    length_buckets,
)
from inference_app.engine.engine_loop import BatchingEngine, EngineOptions
from inference_app.engine.kv_cache import KVCache
from inference_app.engine.model_loading import LoadedModel, load_model
from inference_app.engine.model_runner import DecodeBatch
from inference_app.engine.sampler import BatchSampler, uniform_noise
from inference_app.engine.types import GenerationChunk, SamplingParams
from inference_app.service import ModelService
from inference_app.settings import Settings, parse_settings
from tests.model_factory import SIZES, build_tokenizer, generation_config, phi3_config
from tests.server_process import wait_for

# Different lengths, so rows sit at different positions.
PROMPTS = (
    "x",
    "What is the capital of France?",
    "Hello, world! Tell me a story. " * 6,
    "Write a haiku about the sea.",
    "one two three four five six seven eight nine ten " * 3,
    "Stop here.",
)
NEW_TOKENS = 20
TIMEOUT_S = 60
# The tiny model's context is 512 tokens: 1024 tokens hold fewer whole sequences than the tests' 3..8 slots, so the
# cache is paged; without the option every slot's sequence fits (rows).
LAYOUTS = {"rows": {}, "paged": {"kv_cache_tokens": 1024}}


@pytest.fixture(scope="module")
def loaded(tiny_settings: Settings) -> LoadedModel:
    return load_model(tiny_settings)


@pytest.fixture
def start_engine(loaded: LoadedModel) -> Iterator[Callable[..., BatchingEngine]]:
    engines: list[BatchingEngine] = []

    def start(started: bool = True, **options: Any) -> BatchingEngine:
        engine = BatchingEngine(loaded, EngineOptions(**options))
        engines.append(engine)
        if started:
            engine.start()
        return engine

    yield start
    for engine in engines:
        engine.stop()


def prompt_ids(loaded: LoadedModel, text: str) -> list[int]:
    encoded = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


def generate_text(loaded: LoadedModel, ids: list[int], max_new_tokens: int = NEW_TOKENS) -> tuple[str, int]:
    """`model.generate`'s greedy reply and its token count (up to the end-of-reply token)."""
    with torch.inference_mode():
        output = loaded.model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
    new = output[0, len(ids) :].tolist()
    stops = set(loaded.model.generation_config.eos_token_id)
    count = next((index for index, token in enumerate(new) if token in stops), len(new))
    return loaded.tokenizer.decode(new[:count], skip_special_tokens=True), count


class Reply:
    """Collects one request's chunks (delivered on the engine's text thread)."""

    def __init__(self, on_chunk: Callable[[GenerationChunk], None] | None = None) -> None:
        self.chunks: list[GenerationChunk] = []
        self.error: BaseException | None = None
        self.finished = threading.Event()
        self._on_chunk = on_chunk

    def deliver(self, item: GenerationChunk | BaseException) -> None:
        if isinstance(item, BaseException):
            self.error = item
            self.finished.set()
            return
        self.chunks.append(item)
        if self._on_chunk is not None:
            self._on_chunk(item)
        if item.finish_reason is not None:
            self.finished.set()

    def result(self) -> tuple[str, int]:
        assert self.finished.wait(TIMEOUT_S), "the reply did not finish in time"
        assert self.error is None, self.error
        return "".join(chunk.text for chunk in self.chunks), self.chunks[-1].completion_tokens


def greedy(max_new_tokens: int = NEW_TOKENS) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0)


# ---- greedy parity with model.generate ----


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
    windowed = LoadedModel(model, tokenizer, ("windowed",), 0, None, "cpu", "float32", SIZES["tiny"].context_length, {})
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


def test_a_set_kv_cache_too_big_for_the_paged_reads_is_warned_about(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, start_engine: Callable[..., BatchingEngine]
) -> None:
    monkeypatch.setattr(kv_cache, "cache_budget", lambda device: 2**20)
    with caplog.at_level(logging.WARNING, logger="inference_app.engine.kv_cache"):
        start_engine(max_batch_size=8, **LAYOUTS["paged"])
    assert "--kv-cache-tokens / INFERENCE_KV_CACHE_TOKENS 1024: with the paged read's copy" in caplog.text
    assert "large batches may run out of memory; lower it or unset it" in caplog.text


# ---- slots, batch width, buckets ----


def test_the_block_manager_hands_out_the_lowest_free_slot() -> None:
    blocks = BlockManager(CachePlan(slots=3, slot_tokens=32, tokens=96))  # rows: no blocks to hand out
    assert [blocks.allocate(32), blocks.allocate(32), blocks.allocate(32)] == [(0, []), (1, []), (2, [])]
    assert blocks.free_slots == 0
    with pytest.raises(RuntimeError, match="no free KV-cache slot"):
        blocks.allocate(32)
    blocks.free(2)
    blocks.free(0)
    assert (blocks.free_slots, blocks.allocate(32)[0], blocks.allocate(32)[0]) == (2, 0, 2)


TINY_SHAPE = CacheShape(layers=2, kv_heads=4, head_dim=16, dtype=torch.float32, sliding_window=None)
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


def test_while_graphs_are_captured_a_paged_cache_spreads_free_slots_over_distinct_blocks() -> None:
    cache = KVCache(TINY_SHAPE, CachePlan(slots=2, slot_tokens=48, tokens=80), torch.device("cpu"))  # 5 blocks
    with cache.spread_for_capture():
        assert cache.block_table.tolist() == [[0, 1, 2], [3, 4, 0]]  # as far as the pool has blocks
    assert (cache.block_table == 5).all()  # scratch again


def test_decode_batch_covers_rows_up_to_the_highest_slot_in_use() -> None:
    batch = DecodeBatch(slots=4, device=torch.device("cpu"))
    batch.add([0, 1, 2], torch.tensor([7, 8, 9]), [5, 30, 12], sampled=[False, True, False])
    assert batch.any_sampled
    assert (batch.width, batch.length) == (3, 31)
    batch.remove([2])  # the top row leaves: the batch narrows
    assert (batch.width, batch.length, len(batch)) == (2, 31, 2)
    batch.remove([1])  # the only sampled row leaves: the step may skip the sampling kernels
    assert not batch.any_sampled
    batch.add([1], torch.tensor([8]), [30], sampled=[False])
    batch.remove([0])  # a hole below: the row still computes, harmlessly, at position 0 of a free slot
    assert (batch.width, len(batch)) == (2, 1)
    assert batch.tokens.tolist() == [0, 8, 0, 0] and batch.positions.tolist() == [0, 30, 0, 0]
    batch.advance(torch.tensor([4, 6]), width=2)
    assert batch.tokens.tolist() == [0, 6, 0, 0] and batch.positions.tolist() == [0, 31, 0, 0]
    assert batch.length == 32


def test_bucket_padding() -> None:
    assert BATCH_BUCKETS == (1, 2, 4, 8, 16, 32, 64)
    assert [bucket_for(needed, BATCH_BUCKETS) for needed in (1, 3, 8, 9, 33, 64, 65)] == [1, 4, 8, 16, 64, 64, None]
    assert batch_buckets(40) == (1, 2, 4, 8, 16, 32, 40)  # the slot count is a bucket: no row beyond the cache
    assert batch_buckets(64) == BATCH_BUCKETS and batch_buckets(100) == BATCH_BUCKETS
    assert length_buckets(4096) == (256, 512, 1024, 2048, 4096)
    assert length_buckets(3000) == (256, 512, 1024, 2048, 3000)
    assert length_buckets(100) == (100,)


class _FakeGraph:
    def __init__(self) -> None:
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1


def test_graph_decoder_pads_the_batch_and_length_up_to_the_next_bucket() -> None:
    eager_calls: list[tuple[int, int]] = []

    def eager(batch: int, length: int) -> torch.Tensor:
        eager_calls.append((batch, length))
        return torch.zeros(batch, 5)

    graphs = {
        (batch, length): (_FakeGraph(), torch.full((batch, 5), float(batch * 1000 + length)))
        for batch in (1, 2, 4)
        for length in (256, 512)
    }
    decoder = GraphDecoder(eager, graphs, (1, 2, 4), (256, 512), seconds=0.5)  # type: ignore[arg-type]
    assert decoder.run(3, 100)[0, 0] == 4 * 1000 + 256
    assert graphs[4, 256][0].replays == 1
    assert decoder.run(1, 300)[0, 0] == 1 * 1000 + 512
    assert eager_calls == []
    assert decoder.run(5, 100).shape == (5, 5)  # beyond the largest bucket: eager
    assert eager_calls == [(5, 100)]
    assert decoder.description == "CUDA graphs (6 captured in 0.5 s)"


class _OpRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.add(str(func))
        indices = args[1] if str(func).startswith(("aten.index.", "aten.index_put")) else ()
        if any(isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in indices):
            self.ops.add("indexing with a boolean mask")  # its size depends on the mask's values: a sync
        return func(*args, **(kwargs or {}))


# Operations a CUDA graph cannot hold: they wait for the device (a value read back on the host) or copy host data in.
_CAPTURE_BREAKERS = {
    "aten.item.default",
    "aten._local_scalar_dense.default",
    "aten.nonzero.default",
    "aten.lift_fresh.default",
    "aten.is_nonzero.default",
    "aten.equal.default",
    "aten.masked_select.default",
    "indexing with a boolean mask",
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_decode_step_has_nothing_a_cuda_graph_cannot_hold(
    start_engine: Callable[..., BatchingEngine], layout: str
) -> None:
    engine = start_engine(max_batch_size=4, **LAYOUTS[layout])
    with torch.inference_mode(), _OpRecorder() as recorder:
        engine._runner.forward_decode(4, 256)  # what GraphDecoder.capture records
    assert "aten.scaled_dot_product_attention.default" in recorder.ops  # the recorder saw the model run
    assert recorder.ops & _CAPTURE_BREAKERS == set()


# ---- the eager fallback ----


@pytest.fixture
def graphs_wanted(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine believes it runs on CUDA (so it tries to capture), on this CPU-only machine."""
    monkeypatch.setattr(model_runner, "cuda_graphs_supported", lambda device: True)


def _failing_capture(*args: Any) -> GraphDecoder:
    raise RuntimeError("forced capture failure\nsecond line")


@pytest.mark.usefixtures("graphs_wanted")
def test_capture_failure_logs_one_line_and_the_service_runs_eager(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    start_service: Callable[..., ModelService],
    reply: Callable[..., list[GenerationChunk]],
    loaded: LoadedModel,
) -> None:
    monkeypatch.setattr(GraphDecoder, "capture", staticmethod(_failing_capture))
    with caplog.at_level(logging.WARNING, logger="inference_app.engine.cuda_graphs"):
        service = start_service()
    warnings = [record.getMessage() for record in caplog.records if record.name == "inference_app.engine.cuda_graphs"]
    assert warnings == ["CUDA graph capture failed, decoding runs eager (slower): RuntimeError: forced capture failure"]
    chunks = reply(service, PROMPTS[1], max_new_tokens=NEW_TOKENS)
    text = "".join(chunk.text for chunk in chunks)
    assert (text, chunks[-1].completion_tokens) == generate_text(loaded, prompt_ids(loaded, PROMPTS[1]))


@pytest.mark.usefixtures("graphs_wanted")
def test_graphs_that_disagree_with_the_eager_step_are_not_used(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, start_engine: Callable[..., BatchingEngine]
) -> None:
    def wrong_graphs(step: Any, max_batch: int, slot_tokens: int) -> GraphDecoder:
        logits = torch.zeros(max_batch, 600)
        logits[:, 0] = 1.0  # always token 0, whatever the model says
        batches, lengths = batch_buckets(max_batch), length_buckets(slot_tokens)
        graphs = {(batch, length): (_FakeGraph(), logits[:batch]) for batch in batches for length in lengths}
        return GraphDecoder(step, graphs, batches, lengths, 0.1)  # type: ignore[arg-type]

    monkeypatch.setattr(GraphDecoder, "capture", staticmethod(wrong_graphs))
    with caplog.at_level(logging.WARNING, logger="inference_app.engine.cuda_graphs"):
        engine = start_engine(max_batch_size=4)
    assert engine.describe()["decode"] == "eager"
    assert "CUDA graph replay disagreed with the eager decode step" in caplog.text


class _EagerAsGraph:
    """Stands in for a captured CUDA graph on the CPU: a replay runs the step at the graph's bucket sizes and writes
    its logits into the graph's output tensor, as a real replay does."""

    def __init__(self, step: Callable[[int, int], torch.Tensor], batch: int, length: int, logits: torch.Tensor) -> None:
        self._step, self._batch, self._length, self._logits = step, batch, length, logits

    def replay(self) -> None:
        self._logits.copy_(self._step(self._batch, self._length))


def _capture_on_cpu(step: Callable[[int, int], torch.Tensor], max_batch: int, slot_tokens: int) -> GraphDecoder:
    batches, lengths = batch_buckets(max_batch), length_buckets(slot_tokens)
    graphs = {}
    for batch in batches:
        for length in lengths:
            logits = step(batch, length).clone()
            graphs[batch, length] = (_EagerAsGraph(step, batch, length, logits), logits)
    return GraphDecoder(step, graphs, batches, lengths, 0.0)  # type: ignore[arg-type]


@pytest.mark.usefixtures("graphs_wanted")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_steps_padded_to_the_graph_buckets_match_generate(
    monkeypatch: pytest.MonkeyPatch, loaded: LoadedModel, start_engine: Callable[..., BatchingEngine], layout: str
) -> None:
    """Padding rows (free slots) and attention length up to the buckets changes no request's tokens."""
    monkeypatch.setattr(GraphDecoder, "capture", staticmethod(_capture_on_cpu))
    engine = start_engine(started=False, max_batch_size=8, **LAYOUTS[layout])
    prompts = [prompt_ids(loaded, text) for text in PROMPTS[:5]]
    budgets = [NEW_TOKENS, 6, NEW_TOKENS, 3, 12]  # rows leave at different steps: holes below the batch's width
    replies = [Reply() for _ in prompts]
    for ids, budget, reply in zip(prompts, budgets, replies, strict=True):
        engine.submit(ids, greedy(budget), budget, reply.deliver)
    engine.start()
    assert engine.describe()["decode"].startswith("CUDA graphs")
    expected = [generate_text(loaded, ids, budget) for ids, budget in zip(prompts, budgets, strict=True)]
    assert [reply.result() for reply in replies] == expected


def test_the_cpu_runs_eager_and_sizes_the_cache_from_its_budget(start_engine: Callable[..., BatchingEngine]) -> None:
    engine = start_engine()
    facts = engine.describe()
    assert facts["decode"] == "eager"
    # The tiny model's full-context rows are small: the CPU budget holds the largest batch bucket.
    assert (facts["slots"], facts["slot_tokens"]) == (BATCH_BUCKETS[-1], 512)


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
    settings: dict[str, int],
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


def test_cuda_graphs_switch() -> None:
    assert parse_settings([], environ={}).cuda_graphs is True
    assert parse_settings(["--no-cuda-graphs"], environ={}).cuda_graphs is False
    assert parse_settings([], environ={"INFERENCE_CUDA_GRAPHS": "false"}).cuda_graphs is False
    assert parse_settings(["--cuda-graphs"], environ={"INFERENCE_CUDA_GRAPHS": "false"}).cuda_graphs is True


@pytest.mark.usefixtures("graphs_wanted")
def test_cuda_graphs_switched_off_are_never_captured(
    monkeypatch: pytest.MonkeyPatch, start_engine: Callable[..., BatchingEngine]
) -> None:
    monkeypatch.setattr(GraphDecoder, "capture", staticmethod(_failing_capture))
    engine = start_engine(max_batch_size=2, cuda_graphs=False)
    assert engine.describe()["decode"] == EagerDecoder.description


# ---- batched sampling ----


def test_noise_is_uniform_and_a_function_of_seed_position_and_token() -> None:
    tokens = torch.arange(20000)
    noise = uniform_noise(torch.tensor([7, 7, 8]), torch.tensor([3, 4, 3]), tokens)
    assert bool(((noise > 0) & (noise < 1)).all())
    assert abs(float(noise.mean()) - 0.5) < 0.01 and abs(float(noise.var()) - 1 / 12) < 0.005
    assert torch.equal(noise[0], uniform_noise(torch.tensor([7]), torch.tensor([3]), tokens)[0])
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])


def _sampler(rows: list[dict[str, Any]], vocab: int) -> BatchSampler:
    sampler = BatchSampler(len(rows), vocab, torch.device("cpu"))
    sampler.set_rows(
        list(range(len(rows))),
        [row.get("temperature", 1.0) for row in rows],
        [row.get("top_k") for row in rows],
        [row.get("top_p", 1.0) for row in rows],
        [row.get("seed", 0) for row in rows],
    )
    return sampler


def test_each_row_samples_with_its_own_settings() -> None:
    probabilities = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probabilities.log()
    rows = [
        {"temperature": 0.0},  # greedy
        {"top_k": 1},
        {"top_p": 0.4},  # only the most likely token holds 0.4
        {"top_k": 2},
        {},  # plain sampling
    ]
    sampler = _sampler(rows, vocab=4)
    draws = 4000  # per row: one batch holds every row at positions 0..draws-1
    slots = torch.arange(len(rows)).repeat_interleave(draws)
    positions = torch.arange(draws).repeat(len(rows))
    tokens = sampler.sample(logits.expand(len(slots), 4), slots, positions, True).view(len(rows), draws)
    frequencies = torch.stack([torch.bincount(row, minlength=4) for row in tokens]) / draws
    assert frequencies[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert frequencies[1].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert frequencies[2].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert frequencies[3, 2:].tolist() == [0.0, 0.0]
    assert abs(float(frequencies[3, 0]) - 0.5 / 0.8) < 0.03
    assert torch.allclose(frequencies[4], probabilities, atol=0.03)


def test_a_seeded_row_draws_the_same_whatever_else_is_in_the_batch() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    seeded = {"seed": 1234, "temperature": 1.2}
    alone = _sampler([seeded], 50)
    crowded = _sampler([{"temperature": 0.0}, {"seed": 9}, {"seed": 5, "top_k": 3}, seeded], 50)
    for position in range(30):
        positions = torch.full((4,), position)
        first = alone.sample(logits[3:4], torch.tensor([0]), positions[:1], True)
        among_others = crowded.sample(logits[:4], torch.arange(4), positions, True)
        assert int(first[0]) == int(among_others[3])
