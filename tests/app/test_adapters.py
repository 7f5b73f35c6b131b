"""Several models on one engine: the base model and two adapters of it, each request running the one it names, rows
of different models sharing decode steps. Every greedy reply must equal `generate` of that model alone (the base as
loaded; the base with that adapter merged)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from inference_app.service import ModelService, SamplingParams, UnknownModelError, encode_prompt
from inference_app.settings import AdapterOption
from tests.app.engine.engine_harness import CAPTURE_BREAKERS, OpRecorder
from tests.model_factory import ModelFolders, build_adapter

BASE = "Phi-3-mini-4k-instruct"
NEW_TOKENS = 12
PROMPTS = ["Hello, world!", "Tell me a story about a cat.", "What is the capital of France?"]


@pytest.fixture(scope="module")
def second_adapter(model_folders: ModelFolders, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("run2") / "adapter"
    build_adapter(model_folders.model_path, path, seed=7)
    return path


def reference_reply(model_folders: ModelFolders, adapter: Path | None, prompt_ids: list[int], tokenizer: object) -> str:
    """`generate` of the base model alone, or of the base with `adapter` merged: what a single-model server says."""
    import torch

    model: Any = AutoModelForCausalLM.from_pretrained(model_folders.model_path)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    generated = model.generate(torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
    return tokenizer.decode(generated[0, len(prompt_ids) :], skip_special_tokens=True)  # type: ignore[attr-defined]


def replies_at_once(service: ModelService, requests: list[tuple[str, str | None]]) -> list[str]:
    """The greedy replies to (prompt, model) requests submitted together, so that they share decode steps."""

    async def one(prompt: str, model: str | None) -> str:
        params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0)
        messages = [{"role": "user", "content": prompt}]
        return "".join([chunk.text async for chunk in service.stream_chat(messages, params, wait=True, model=model)])

    async def run() -> list[str]:
        return list(await asyncio.gather(*(one(prompt, model) for prompt, model in requests)))

    return asyncio.run(run())


@pytest.mark.parametrize("merge_adapter", [True, False], ids=["default merged", "none merged"])
def test_base_and_adapters_in_one_batch_reply_as_each_model_alone(
    start_service: Callable[..., ModelService], model_folders: ModelFolders, second_adapter: Path, merge_adapter: bool
) -> None:
    service = start_service(
        adapters=(AdapterOption("ft", model_folders.adapter_path), AdapterOption("run2", second_adapter)),
        merge_adapter=merge_adapter,
        cuda_graphs=False,
    )
    assert service.model_ids() == (BASE, "ft", "run2") and service.served_model_id() == "ft"
    models: list[str | None] = [BASE, "ft", "run2", None]  # None: the default, "ft"
    requests = [(prompt, model) for prompt in PROMPTS for model in models]
    replies = replies_at_once(service, requests)
    assert service.generation_stats()["largest_batch"] > 3  # rows of different models shared decode steps

    tokenizer = service._require_loaded().tokenizer
    adapter_of = {
        BASE: None,
        "ft": model_folders.adapter_path,
        "run2": second_adapter,
        None: model_folders.adapter_path,
    }
    expected = {
        (prompt, model): reference_reply(
            model_folders,
            adapter_of[model],
            encode_prompt(tokenizer, [{"role": "user", "content": prompt}], None),
            tokenizer,
        )
        for prompt, model in requests
    }
    assert replies == [expected[request] for request in requests]
    assert len({expected[PROMPTS[0], model] for model in (BASE, "ft", "run2")}) == 3  # three different models


def test_a_request_for_a_model_not_served_names_the_served_ones(start_service: Callable[..., ModelService]) -> None:
    service = start_service()
    with pytest.raises(UnknownModelError, match=f"choose one of {BASE}, {BASE}-ft"):
        replies_at_once(service, [("Hello", "gpt-4o")])


def test_the_correcting_decode_step_has_nothing_a_cuda_graph_cannot_hold(
    start_service: Callable[..., ModelService],
) -> None:
    """The per-row corrections are captured with the decode step (static index tensors, no host reads)."""
    runner = start_service(max_batch_size=4)._require_engine()._runner
    assert runner._row_models is not None
    runner._row_models.correcting = True
    with torch.inference_mode(), OpRecorder() as recorder:
        runner.forward_decode(4, 256)
    assert "aten.matmul.default" in recorder.ops  # the corrections ran (the model itself uses linear and sdpa)
    assert recorder.ops & CAPTURE_BREAKERS == set()
