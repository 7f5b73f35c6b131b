"""Default resource names and Azure's naming rules.

The default names reproduce the AI Toolkit's bicep bit for bit (`aistorage<s>` ... with `<s>` the first 5 characters
of ARM's `uniqueString(resourceGroup().id)`), which is how inference finds the fine-tuning step's share and
environment. The registry, which the bicep does not have, is `aiacr<s>`.
"""

import re
from dataclasses import dataclass

from infra.errors import ConfigError
from infra.unique_string import unique_string


@dataclass(frozen=True)
class ResourceNames:
    storage_account: str
    file_share: str
    environment: str
    environment_storage: str
    container_app: str
    log_analytics: str
    container_registry: str

    @property
    def pull_identity(self) -> str:
        """The user-assigned identity the app pulls from the registry as."""
        return f"{self.container_registry}-pull"


@dataclass(frozen=True)
class NameOverrides:
    """Names given explicitly (config or parameters file); None keeps the bicep's default."""

    storage_account: str | None = None
    file_share: str | None = None
    environment: str | None = None
    environment_storage: str | None = None
    container_app: str | None = None
    log_analytics: str | None = None
    container_registry: str | None = None


def resource_group_id(subscription_id: str, resource_group_name: str) -> str:
    return f"/subscriptions/{subscription_id}/resourceGroups/{resource_group_name}"


def resource_suffix(group_id: str) -> str:
    """bicep: substring(uniqueString(resourceGroup().id), 0, 5). Case-sensitive: pass the id as Azure returns it."""
    return unique_string(group_id)[:5]


def resource_names(overrides: NameOverrides, suffix: str) -> ResourceNames:
    def pick(explicit: str | None, default: str) -> str:
        return explicit if explicit is not None else default

    return ResourceNames(
        storage_account=pick(overrides.storage_account, f"aistorage{suffix}"),
        file_share=pick(overrides.file_share, f"aifileshare{suffix}"),
        environment=pick(overrides.environment, f"aienv{suffix}"),
        environment_storage=pick(overrides.environment_storage, f"aienvstorage{suffix}"),
        container_app=pick(overrides.container_app, f"aiacaapp{suffix}"),
        log_analytics=pick(overrides.log_analytics, f"ailog{suffix}"),
        # Not a bicep resource: `aiacr<s>` follows the toolkit's scheme.
        container_registry=pick(overrides.container_registry, f"aiacr{suffix}"),
    )


@dataclass(frozen=True)
class NameRule:
    pattern: re.Pattern[str]
    description: str


# Azure's rules per resource type (learn.microsoft.com "Naming rules and restrictions for Azure resources", and the
# Container Apps API's own validation messages for environments and environment storages).
NAME_RULES: dict[str, NameRule] = {
    "storageAccountName": NameRule(
        re.compile(r"[a-z0-9]{3,24}"), "3-24 characters, lowercase letters and digits only (globally unique)"
    ),
    "fileShareName": NameRule(
        re.compile(r"(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]"),
        "3-63 characters, lowercase letters, digits and single hyphens, starting and ending with a letter or digit",
    ),
    "acaAppName": NameRule(
        re.compile(r"(?!.*--)[a-z][a-z0-9-]{0,30}[a-z0-9]"),
        "2-32 characters, lowercase letters, digits and hyphens, starting with a letter, ending with a letter or "
        "digit, no '--'",
    ),
    "acaEnvironmentName": NameRule(
        re.compile(r"(?!.*--)[a-z][a-z0-9-]{0,58}[a-z0-9]"),
        "2-60 characters, lowercase letters, digits and hyphens, starting with a letter, ending with a letter or "
        "digit, no '--'",
    ),
    "acaEnvironmentStorageName": NameRule(
        re.compile(r"(?!.*--)[a-z0-9][a-z0-9-]{0,30}[a-z0-9]"),
        "2-32 characters, lowercase letters, digits and hyphens, starting and ending with a letter or digit, no '--'",
    ),
    "acaLogAnalyticsName": NameRule(
        re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{2,61}[A-Za-z0-9]"),
        "4-63 characters, letters, digits and hyphens, starting and ending with a letter or digit",
    ),
    "registryName": NameRule(
        re.compile(r"[a-zA-Z0-9]{5,50}"),
        "5-50 letters and digits, globally unique (the login server is <name>.azurecr.io)",
    ),
}


def validate_name(key: str, value: str) -> str:
    rule = NAME_RULES[key]
    if not rule.pattern.fullmatch(value):
        raise ConfigError(f"{key}: {value!r} is not a valid name: {rule.description}")
    return value
