"""The one way the program reads a configuration value: the stack's config (project namespace, camelCase keys) first,
then the AI Toolkit's legacy parameters file (infra/parameters_file.py, which only knows the bicep's parameters), then
the caller's default. Every reader validates and raises ConfigError naming the key, the rule and the fix."""

import json
import re
from collections.abc import Mapping
from typing import Any, TypeVar

import pulumi

from infra.errors import ConfigError

D = TypeVar("D")

_INTEGER = re.compile(r"-?\d+")


class ConfigSource:
    def __init__(self, config: pulumi.Config, parameters: Mapping[str, Any] | None = None) -> None:
        self._config = config
        self._parameters = parameters or {}

    def in_stack_config(self, key: str) -> bool:
        """Whether the stack's config sets the key (the parameters file aside)."""
        return self._config.get(key) is not None

    def raw(self, key: str) -> Any:
        text = self._config.get(key)
        return text if text is not None else self._parameters.get(key)

    def string(self, key: str) -> str | None:
        value = self.raw(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{key}: must be a non-empty string; remove it with `pulumi config rm {key}`")
        return value.strip()

    def integer(self, key: str, default: D, minimum: int) -> int | D:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not _INTEGER.fullmatch(str(value).strip()) or int(value) < minimum:
            raise ConfigError(f"{key}: must be an integer >= {minimum}, got {value!r}")
        return int(value)

    def boolean(self, key: str, default: D) -> bool | D:
        value = self.raw(key)
        if value is None:
            return default
        if str(value).lower() not in ("true", "false"):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
        return str(value).lower() == "true"

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.raw(key)
        if value is None:
            return default
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(choices)}, got {value!r}")
        return str(value)

    def string_list(self, key: str, example: str, *, non_empty: bool = False) -> tuple[str, ...] | None:
        """A list set with `pulumi config set --path 'key[0]' ...` (JSON in the stack config) or in the file."""
        value = raw = self.raw(key)
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = None
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value) or (non_empty and not value):
            raise ConfigError(
                f"{key}: must be a {'non-empty ' if non_empty else ''}list of strings, e.g. "
                f"`pulumi config set --path '{key}[0]' {example}`, got {raw!r}"
            )
        return tuple(value)

    def secret(self, key: str) -> pulumi.Output[str] | None:
        """A value that must be stored encrypted (`pulumi config set --secret`); never read from the file."""
        if self._config.get(key) is None:
            return None
        if not pulumi.runtime.is_config_secret(self._config.full_key(key)):
            raise ConfigError(
                f"{key}: is stored in plain text in the stack file; store it encrypted with "
                f"`pulumi config set --secret {key} <value>`"
            )
        return self._config.get_secret(key)
