"""The Pulumi program type-checks against the azure-native SDK's types, and the app against transformers, FastAPI and
Gradio (mypy, configured in pyproject.toml)."""

import pytest
from mypy import api

from tests.infra.azure_mocks import REPO_ROOT


@pytest.mark.slow  # a cold mypy run takes a minute or more
def test_program_and_app_type_check() -> None:
    stdout, stderr, status = api.run(
        ["--config-file", str(REPO_ROOT / "pyproject.toml")]
        + [str(REPO_ROOT / path) for path in ("__main__.py", "infra", "inference_app")]
    )
    assert status == 0, stdout + stderr
