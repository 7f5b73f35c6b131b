"""Fixtures for the Pulumi program's tests (the harness that runs it lives in azure_mocks.py)."""

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def event_loop_for_pulumi() -> Iterator[None]:
    """Pulumi's mocks run the program on the thread's current event loop, and `asyncio.run` (the app's tests) leaves
    the main thread without one: give each test its own."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield
    asyncio.set_event_loop(None)
    loop.close()


@pytest.fixture
def in_scratch_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The program reads infra/provision/inference.parameters.json and writes infra/inference.config.json relative
    to the working directory: keep both out of the repository."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
