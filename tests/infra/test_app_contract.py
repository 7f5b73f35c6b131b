"""The program and the app agree: the variables the program sets are the ones the app reads, and the program refuses
a setting exactly when the app would refuse it at start (the rules live in inference_app/settings.py)."""

import argparse
from typing import Any, cast

import pulumi
import pytest

from inference_app.settings import environment_variables, parse_auth_username
from infra.access import PASSWORD_ENV, USERNAME_ENV, read_access_config
from infra.config_source import ConfigSource
from infra.errors import ConfigError


class _NoStackConfig:
    """A stack config with no keys set: every value comes from the parameters given to ConfigSource."""

    def get(self, key: str) -> Any:
        return None


def _source(**values: Any) -> ConfigSource:
    return ConfigSource(cast(pulumi.Config, _NoStackConfig()), values)


def test_the_access_variables_are_ones_the_app_reads() -> None:
    read_by_app = set(environment_variables().values())
    assert {USERNAME_ENV, PASSWORD_ENV} <= read_by_app


@pytest.mark.parametrize(
    "username", ["admin", "alice@example.com", "zoë", "ops+1", "x" * 100, "ad:min", "two words", "tab\tname"]
)
def test_the_program_accepts_exactly_the_usernames_the_app_accepts(username: str) -> None:
    try:
        parse_auth_username(username)
        app_accepts = True
    except argparse.ArgumentTypeError:
        app_accepts = False
    try:
        program_accepts = read_access_config(_source(accessUsername=username)).username == username
    except ConfigError as error:
        assert str(error).startswith("accessUsername: must be non-empty, without ':' or whitespace")
        program_accepts = False
    assert program_accepts == app_accepts
