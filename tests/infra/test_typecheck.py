"""The Pulumi program type-checks against the azure-native SDK's types, and the app against transformers, FastAPI and
Gradio (mypy, configured in pyproject.toml)."""

import subprocess
import sys

import pytest

from tests.infra.azure_mocks import REPO_ROOT


@pytest.mark.slow  # a cold mypy run takes a minute or more
def test_program_and_app_type_check() -> None:
    # In a child process: a cold in-process run leaves millions of objects behind, whose collection at pytest's exit
    # took three minutes more than the check itself.
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(REPO_ROOT / "pyproject.toml")]
        + [str(REPO_ROOT / path) for path in ("__main__.py", "infra", "inference_app")],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
