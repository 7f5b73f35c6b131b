"""The Pulumi program type-checks against the azure-native SDK's types (mypy, configured in pyproject.toml)."""

import pytest
from mypy import api

from tests.infra.azure_mocks import REPO_ROOT


@pytest.mark.slow  # a cold mypy run takes a minute or more
def test_program_and_infra_type_check() -> None:
    stdout, stderr, status = api.run(
        ["--config-file", str(REPO_ROOT / "pyproject.toml"), str(REPO_ROOT / "__main__.py"), str(REPO_ROOT / "infra")]
    )
    assert status == 0, stdout + stderr
