"""CUDA graphs: bucket padding, replays, and the eager fallback when capture fails, disagrees or is switched off."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import torch

from inference_app.engine import model_runner
from inference_app.engine.cuda_graphs import (
    BATCH_BUCKETS,
    EagerDecoder,
    GraphDecoder,
    batch_buckets,
    bucket_for,
    length_buckets,
)
from inference_app.engine.engine_loop import BatchingEngine
from inference_app.engine.model_loading import LoadedModel
from inference_app.engine.types import GenerationChunk
from inference_app.service import ModelService
from inference_app.settings import parse_settings
from tests.app.engine.engine_harness import LAYOUTS, NEW_TOKENS, PROMPTS, Reply, generate_text, greedy, prompt_ids


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


def _assert_replies_through_graphs_match_generate(loaded: LoadedModel, engine: BatchingEngine) -> None:
    """Five requests whose rows leave at different steps (holes below the batch's width), decoded through graphs."""
    prompts = [prompt_ids(loaded, text) for text in PROMPTS[:5]]
    budgets = [NEW_TOKENS, 6, NEW_TOKENS, 3, 12]
    replies = [Reply() for _ in prompts]
    for ids, budget, reply in zip(prompts, budgets, replies, strict=True):
        engine.submit(ids, greedy(budget), budget, reply.deliver)
    engine.start()
    assert engine.describe()["decode"].startswith("CUDA graphs")
    expected = [generate_text(loaded, ids, budget) for ids, budget in zip(prompts, budgets, strict=True)]
    assert [reply.result() for reply in replies] == expected


@pytest.mark.usefixtures("graphs_wanted")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_steps_padded_to_the_graph_buckets_match_generate(
    monkeypatch: pytest.MonkeyPatch, loaded: LoadedModel, start_engine: Callable[..., BatchingEngine], layout: str
) -> None:
    """Padding rows (free slots) and attention length up to the buckets changes no request's tokens."""
    monkeypatch.setattr(GraphDecoder, "capture", staticmethod(_capture_on_cpu))
    engine = start_engine(started=False, max_batch_size=8, **LAYOUTS[layout])
    _assert_replies_through_graphs_match_generate(loaded, engine)


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


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_on_cuda_the_decode_step_replays_captured_graphs_and_matches_generate(
    loaded: LoadedModel, start_engine: Callable[..., BatchingEngine], layout: str
) -> None:
    """Real capture and replay (the CPU tests stand in for the graphs): rows leave at different steps."""
    assert loaded.device.startswith("cuda")
    engine = start_engine(started=False, max_batch_size=8, **LAYOUTS[layout])
    _assert_replies_through_graphs_match_generate(loaded, engine)
