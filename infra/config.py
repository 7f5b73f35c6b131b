"""Typed configuration of the program: Pulumi config (project namespace, camelCase keys) over the legacy parameters
file over defaults, validated before any cloud call."""

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast, get_args

import pulumi

from infra.errors import ConfigError
from infra.gpu import GpuConfig, read_gpu_config
from infra.naming import NameOverrides, validate_name
from infra.parameters_file import DEFAULT_PATH as PARAMETERS_FILE
from infra.parameters_file import read_parameters_file

StorageAccessMode = Literal["ReadWrite", "ReadOnly"]
ExistingResourcesMode = Literal["adopt", "reference"]

@dataclass(frozen=True)
class InfraConfig:
    resource_group_name: str
    location: str | None  # None: the resource group's location, else azure-native:location
    gpu: GpuConfig  # GPU profile, container sizing and scaling (infra/gpu.py)
    names: NameOverrides = NameOverrides()
    default_commands: tuple[str, ...] | None = None  # only for a prebuilt `image` (see infra/image.py)
    storage_access_mode: StorageAccessMode = "ReadWrite"
    existing_resources: ExistingResourcesMode = "adopt"


# Config keys (camelCase, as the parameters file) -> NameOverrides fields.
NAME_KEYS = {
    "storageAccountName": "storage_account",
    "fileShareName": "file_share",
    "acaEnvironmentName": "environment",
    "acaEnvironmentStorageName": "environment_storage",
    "acaAppName": "container_app",
    "acaLogAnalyticsName": "log_analytics",
}

_RESOURCE_GROUP_NAME = re.compile(r"[-\w.()]{0,89}[-\w()]")


class _Source:
    """One value lookup: Pulumi config first, then the parameters file, then the caller's default."""

    def __init__(self, config: pulumi.Config, parameters: dict[str, Any]) -> None:
        self._config = config
        self._parameters = parameters

    def raw(self, key: str) -> Any:
        text = self._config.get(key)
        if text is not None:
            return text
        return self._parameters.get(key)

    def string(self, key: str) -> str | None:
        value = self.raw(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{key}: must be a non-empty string")
        return value.strip()

    def string_list(self, key: str) -> tuple[str, ...] | None:
        value = self.raw(key)
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = None
        if not isinstance(value, list) or not value or not all(isinstance(item, str) for item in value):
            raise ConfigError(
                f"{key}: must be a non-empty list of strings, e.g. pulumi config set --path '{key}[0]' 'cd /mount'"
            )
        return tuple(value)

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.raw(key)
        if value is None:
            return default
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(choices)}, got {value!r}")
        return str(value)


def read_config(config: pulumi.Config, parameters_file: Path = PARAMETERS_FILE) -> InfraConfig:
    """Read and validate every key; raises ConfigError naming the key and the rule."""
    parameters = read_parameters_file(parameters_file)
    source = _Source(config, parameters)

    resource_group_name = source.string("resourceGroupName")
    if resource_group_name is None:
        raise ConfigError("resourceGroupName: required; set it with `pulumi config set resourceGroupName <name>`")
    if not _RESOURCE_GROUP_NAME.fullmatch(resource_group_name):
        raise ConfigError(
            f"resourceGroupName: {resource_group_name!r} is not a valid name: 1-90 characters, letters, digits, "
            "'_', '-', '.', '(' and ')', not ending with '.'"
        )

    names = NameOverrides(
        **{
            field: validate_name(key, value) if (value := source.string(key)) is not None else None
            for key, field in NAME_KEYS.items()
        }
    )

    return InfraConfig(
        resource_group_name=resource_group_name,
        location=source.string("location"),
        gpu=read_gpu_config(config, parameters=parameters),
        names=names,
        default_commands=source.string_list("defaultCommands"),
        storage_access_mode=cast(
            StorageAccessMode,
            source.choice("storageAccessMode", get_args(StorageAccessMode), InfraConfig.storage_access_mode),
        ),
        existing_resources=cast(
            ExistingResourcesMode,
            source.choice("existingResources", get_args(ExistingResourcesMode), InfraConfig.existing_resources),
        ),
    )
