"""Typed configuration of the program: Pulumi config (project namespace, camelCase keys) over the legacy parameters
file over defaults, validated before any cloud call."""

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast, get_args

import pulumi

from infra.errors import ConfigError
from infra.naming import NameOverrides, validate_name
from infra.parameters_file import DEFAULT_PATH as PARAMETERS_FILE
from infra.parameters_file import read_parameters_file

StorageAccessMode = Literal["ReadWrite", "ReadOnly"]
ExistingResourcesMode = Literal["adopt", "reference"]

# The stock image and command of the toolkit's bicep, until the image issue replaces them with the built image.
DEFAULT_IMAGE = "docker.io/pytorch/pytorch:2.4.0-cuda12.4-cudnn9-runtime"
DEFAULT_COMMANDS = (
    "cd /mount/inference",
    "pip install -r requirements.txt",
    "python -m inference_app --host 0.0.0.0 --port 7860",
)


@dataclass(frozen=True)
class InfraConfig:
    resource_group_name: str
    location: str | None  # None: the resource group's location, else azure-native:location
    maximum_instance_count: int = 2
    names: NameOverrides = NameOverrides()
    default_commands: tuple[str, ...] = DEFAULT_COMMANDS
    image: str = DEFAULT_IMAGE
    container_cpu: float = 24.0
    container_memory: str = "220Gi"
    min_replicas: int = 1
    max_replicas: int = 1
    storage_access_mode: StorageAccessMode = "ReadWrite"
    existing_resources: ExistingResourcesMode = "adopt"

    @property
    def container_command(self) -> list[str]:
        """bicep: ['/bin/bash', '-c', join(defaultCommands, '; ')]."""
        return ["/bin/bash", "-c", "; ".join(self.default_commands)]


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
_MEMORY = re.compile(r"\d+(\.\d+)?Gi")


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

    def integer(self, key: str, default: int, minimum: int) -> int:
        value = self.raw(key)
        if value is None:
            return default
        try:
            number = int(value) if not isinstance(value, bool) else None
        except ValueError:
            number = None
        if number is None or str(number) != str(value).strip() or number < minimum:
            raise ConfigError(f"{key}: must be an integer >= {minimum}, got {value!r}")
        return number

    def number(self, key: str, default: float) -> float:
        value = self.raw(key)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{key}: must be a positive number of vCPUs, got {value!r}") from None
        if number <= 0:
            raise ConfigError(f"{key}: must be a positive number of vCPUs, got {value!r}")
        return number

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
    source = _Source(config, read_parameters_file(parameters_file))

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

    memory = source.string("containerMemory") or InfraConfig.container_memory
    if not _MEMORY.fullmatch(memory):
        raise ConfigError(f"containerMemory: must be a size in Gi such as '220Gi', got {memory!r}")

    min_replicas = source.integer("minReplicas", InfraConfig.min_replicas, minimum=0)
    max_replicas = source.integer("maxReplicas", InfraConfig.max_replicas, minimum=1)
    if min_replicas > max_replicas:
        raise ConfigError(f"minReplicas: must not exceed maxReplicas ({min_replicas} > {max_replicas})")

    return InfraConfig(
        resource_group_name=resource_group_name,
        location=source.string("location"),
        maximum_instance_count=source.integer("maximumInstanceCount", InfraConfig.maximum_instance_count, minimum=1),
        names=names,
        default_commands=source.string_list("defaultCommands") or DEFAULT_COMMANDS,
        image=source.string("image") or DEFAULT_IMAGE,
        container_cpu=source.number("containerCpu", InfraConfig.container_cpu),
        container_memory=memory,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        storage_access_mode=cast(
            StorageAccessMode,
            source.choice("storageAccessMode", get_args(StorageAccessMode), InfraConfig.storage_access_mode),
        ),
        existing_resources=cast(
            ExistingResourcesMode,
            source.choice("existingResources", get_args(ExistingResourcesMode), InfraConfig.existing_resources),
        ),
    )
