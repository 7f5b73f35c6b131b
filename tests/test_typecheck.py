"""Everything type-checks (mypy, configured in pyproject.toml, which lists what it checks): the Pulumi program against
the azure-native SDK's types, the app against transformers, FastAPI and Gradio, and the tests and benchmarks that
use them."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a cold mypy run takes minutes (the first run in a fresh clone has no cache)
@pytest.mark.timeout(900)  # as long as the run itself may take, beyond the suite's 300 s per test
def test_everything_type_checks() -> None:
    # In a child process: a cold in-process run leaves millions of objects behind, whose collection at pytest's exit
    # took three minutes more than the check itself.
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(REPO_ROOT / "pyproject.toml")],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
