"""The whole program's configuration, read and validated before any cloud call: Pulumi config (project namespace,
camelCase keys) over the legacy parameters file over defaults (infra/config_source.py)."""

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast, get_args

import pulumi

from infra.access import AccessConfig, read_access_config
from infra.config_source import ConfigSource
from infra.errors import ConfigError
from infra.gpu import GpuConfig, read_gpu_config
from infra.image_config import ImageConfig, read_image_config
from infra.naming import NameOverrides, validate_name
from infra.parameters_file import DEFAULT_PATH as PARAMETERS_FILE
from infra.parameters_file import read_parameters_file

StorageAccessMode = Literal["ReadWrite", "ReadOnly"]
ExistingResourcesMode = Literal["adopt", "reference"]
RegistrySku = Literal["Basic", "Standard", "Premium"]


@dataclass(frozen=True)
class ProgramConfig:
    resource_group_name: str
    location: str | None  # None: the resource group's location, else azure-native:location
    gpu: GpuConfig  # GPU profile, container sizing and scaling (infra/gpu.py)
    names: NameOverrides = NameOverrides()
    resource_suffix: str | None = None  # None: from uniqueString(resource group id) (infra/naming.py)
    default_commands: tuple[str, ...] | None = None  # only for a prebuilt `image` (infra/image_config.py)
    storage_access_mode: StorageAccessMode = "ReadWrite"
    existing_resources: ExistingResourcesMode = "adopt"
    registry_sku: RegistrySku = "Basic"
    image: ImageConfig = field(default_factory=ImageConfig)  # what the app runs and its app settings
    access: AccessConfig = AccessConfig("password")  # who may reach the endpoint (infra/access.py)

    @property
    def runs_foreign_image(self) -> bool:
        """A prebuilt `image` started by `defaultCommands` (the bicep's mode): not inference_app/'s server."""
        return self.image.image is not None and bool(self.default_commands)


# Config keys (camelCase, as the parameters file) -> NameOverrides fields.
NAME_KEYS = {
    "storageAccountName": "storage_account",
    "fileShareName": "file_share",
    "acaEnvironmentName": "environment",
    "acaEnvironmentStorageName": "environment_storage",
    "acaAppName": "container_app",
    "acaLogAnalyticsName": "log_analytics",
    "registryName": "container_registry",
}

_RESOURCE_GROUP_NAME = re.compile(r"[-\w.()]{0,89}[-\w()]")
# `aistorage<s>` must stay a valid storage account name (3-24 lowercase letters and digits).
_RESOURCE_SUFFIX = re.compile(r"[a-z0-9]{1,15}")


def read_config(config: pulumi.Config | None = None, parameters_file: Path = PARAMETERS_FILE) -> ProgramConfig:
    """Read and validate every key; raises ConfigError naming the key and the rule."""
    source = ConfigSource(config or pulumi.Config(), read_parameters_file(parameters_file))

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

    resource_suffix = source.string("resourceSuffix")
    if resource_suffix is not None and not _RESOURCE_SUFFIX.fullmatch(resource_suffix):
        raise ConfigError(
            f"resourceSuffix: {resource_suffix!r} is not a valid suffix: 1-15 lowercase letters and digits (it ends "
            "every default name, e.g. aistorage<suffix>, a storage account name of at most 24 characters)"
        )

    program_config = ProgramConfig(
        resource_group_name=resource_group_name,
        resource_suffix=resource_suffix,
        location=source.string("location"),
        gpu=read_gpu_config(source),
        names=names,
        default_commands=source.string_list("defaultCommands", "'cd /mount'", non_empty=True),
        storage_access_mode=cast(
            StorageAccessMode,
            source.choice("storageAccessMode", get_args(StorageAccessMode), ProgramConfig.storage_access_mode),
        ),
        existing_resources=cast(
            ExistingResourcesMode,
            source.choice("existingResources", get_args(ExistingResourcesMode), ProgramConfig.existing_resources),
        ),
        registry_sku=cast(RegistrySku, source.choice("registrySku", get_args(RegistrySku), "Basic")),
        image=read_image_config(source),
        access=read_access_config(source),
    )
    if program_config.runs_foreign_image and program_config.access.mode == "password":
        raise ConfigError(
            "access: password is checked by inference_app/'s own server, and the prebuilt `image` started by "
            "`defaultCommands` runs something else, which would ignore it: the endpoint would be open while the stack "
            "exports a password. Choose who may reach it: `pulumi config set access entra` (Microsoft Entra ID "
            "sign-in in front of the app) or `pulumi config set access public` (anyone, as the bicep; narrow it "
            "with allowedIpRanges); or remove defaultCommands to run the image's own entrypoint"
        )
    return program_config
