"""The tiny model loaded once per test module, and engines stopped after each test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from inference_app.engine.engine_loop import BatchingEngine, EngineOptions
from inference_app.engine.model_loading import LoadedModel, load_model
from inference_app.settings import Settings


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
