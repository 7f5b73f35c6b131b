"""Fixtures for the Pulumi program's tests (the harness that runs it lives in azure_mocks.py)."""

from pathlib import Path

import pytest


@pytest.fixture
def in_scratch_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The program reads infra/provision/inference.parameters.json and writes infra/inference.config.json relative
    to the working directory: keep both out of the repository."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
