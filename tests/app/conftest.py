"""Shared fixtures for the inference app tests: one tiny model + adapter on disk for the whole session."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from inference_app.service import GenerationChunk, ModelService, SamplingParams
from inference_app.settings import AdapterOption, Settings
from tests.app.browser_harness import browser, page  # noqa: F401 (fixtures for every test module)
from tests.app.service_harness import collect_chunks
from tests.model_factory import ModelFolders, build_model_folders

LOAD_TIMEOUT_S = 60
DECODE_STEP_S = 0.02


@pytest.fixture(scope="session")
def model_folders(tmp_path_factory: pytest.TempPathFactory) -> ModelFolders:
    """A tiny random-weight Phi-3-family model, its tokenizer and a LoRA adapter, in the AI Toolkit's layout."""
    return build_model_folders(tmp_path_factory.mktemp("share"), size="tiny")


@pytest.fixture(scope="session")
def tiny_settings(model_folders: ModelFolders) -> Settings:
    """Settings that serve the tiny model and adapter on 127.0.0.1 (tests choose the port)."""
    return Settings(
        model_path=model_folders.model_path,
        adapters=(AdapterOption(None, model_folders.adapter_path),),
        host="127.0.0.1",
    )


@pytest.fixture
def start_service(tiny_settings: Settings) -> Iterator[Callable[..., ModelService]]:
    """Starts a ModelService for the tiny model (Settings fields as keyword overrides), waits until it is ready,
    and stops it after the test."""
    services: list[ModelService] = []

    def start(**overrides: Any) -> ModelService:
        service = ModelService(dataclasses.replace(tiny_settings, **overrides))
        services.append(service)
        service.start_loading()
        status = service.wait_until_loaded(LOAD_TIMEOUT_S)
        assert status == "ready", service.failure_reason
        return service

    yield start
    for service in services:
        service.close()


@pytest.fixture
def reply() -> Callable[..., list[GenerationChunk]]:
    """reply(service, text_or_messages, **sampling) -> every chunk of the streamed reply (greedy unless told)."""

    def run(service: ModelService, prompt: str | list[dict[str, str]], **sampling: Any) -> list[GenerationChunk]:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        sampling = {"max_new_tokens": 20, "temperature": 0.0, **sampling}
        return collect_chunks(service, messages, SamplingParams(**sampling))

    return run


@pytest.fixture
def paced_decoding() -> Iterator[None]:
    """Each forward pass of the model takes at least DECODE_STEP_S, so that a long reply lasts seconds: tests that
    act while a reply runs (Stop, disconnect, a full slot) then do not race the tiny model, which writes hundreds of
    tokens in well under a second on an idle machine."""

    def pace(module: torch.nn.Module, inputs: Any) -> None:
        if type(module).__name__ == "Phi3ForCausalLM":
            time.sleep(DECODE_STEP_S)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(pace)
    yield
    handle.remove()
