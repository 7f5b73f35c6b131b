"""Decide, per resource, whether this run creates it, adopts (imports) it, or only references it.

How it works (the "why" is in the README section "Using existing Azure resources"):
- Every resource is looked up by name with the azure-native lookup invokes before anything is declared. Azure's
  "not found" answers mean "create"; any other error (403, throttling, bad credentials) stops the program.
- An existing resource that this stack does not manage yet is imported (`import_` with its Azure id) with inputs
  equal to what exists, so the import succeeds on every engine version; the properties this program owns are brought
  to their declared values on the next `pulumi up`.
- The engine treats `import_` with the id of a resource already in the state as an ordinary resource
  (pulumi/pulumi developer-docs/architecture/import.md, step_generator.go `isImport`), but a program cannot see its
  state. So each run exports `adoption` = {resource: {status, id}} and the next run reads it back from its own stack
  with the engine's builtin `pulumi:pulumi:readStackOutputs` invoke (the synchronous form of a StackReference).
"""

import inspect
import re
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import pulumi
from pulumi._types import is_output_type
from pulumi_azure_native import app, authorization, operationalinsights, resources, storage

from infra.config import InfraConfig
from infra.errors import ConfigError
from infra.naming import ResourceNames, resource_group_id, resource_names, resource_suffix

Status = Literal["created", "adopted", "referenced"]
Mode = Literal["adopt", "reference"]

ADOPTION_OUTPUT = "adoption"

# How Azure (and azure-native, old and new error formats) says "does not exist".
_NOT_FOUND = re.compile(
    r"ResourceNotFound|ResourceGroupNotFound|ParentResourceNotFound|RESPONSE 404|StatusCode=404|Status=404"
    r"|404 Not Found"
)

T = TypeVar("T")


class AzureLookupError(Exception):
    """A lookup failed for a reason other than "not found"; nothing is declared."""


def lookup(description: str, fetch: Callable[[], T]) -> T | None:
    """Run one lookup invoke: its result, None when Azure says it does not exist, or stop on any other error."""
    try:
        return fetch()
    except Exception as error:  # the SDK raises a plain Exception for provider errors
        if _NOT_FOUND.search(str(error)):
            return None
        raise AzureLookupError(
            f"Looking up {description} failed, so nothing was created or changed. Azure said: {error}"
        ) from error


@dataclass(frozen=True)
class PreviousRun:
    """What this stack managed after its previous update: resource key -> (status, Azure id)."""

    resources: Mapping[str, tuple[str, str]]

    @staticmethod
    def read() -> "PreviousRun":
        stack = f"{pulumi.get_organization()}/{pulumi.get_project()}/{pulumi.get_stack()}"
        try:
            result = pulumi.runtime.invoke("pulumi:pulumi:readStackOutputs", {"name": stack}).value or {}
        except Exception as error:
            # Safe to go on without it: existing resources are then imported with the inputs they have (a no-op for
            # any the state already holds) and retained on delete; nothing is replaced or deleted.
            pulumi.log.warn(
                f"Could not read stack {stack}'s previous outputs ({error}); existing resources are treated as not "
                "yet managed by this stack (they are imported as they are and never deleted)."
            )
            return PreviousRun({})
        recorded = (result.get("outputs") or {}).get(ADOPTION_OUTPUT) or {}
        return PreviousRun(
            {
                key: (entry["status"], entry["id"])
                for key, entry in recorded.items()
                if isinstance(entry, Mapping) and entry.get("status") and entry.get("id")
            }
        )

    def manages(self, key: str, azure_id: str) -> Status | None:
        """The status this stack recorded for that very resource (ids compare case-insensitively, as in ARM)."""
        status, recorded_id = self.resources.get(key, ("", ""))
        if recorded_id.lower() != azure_id.lower():
            return None
        if status == "created":
            return "created"
        if status == "adopted":
            return "adopted"
        return None


@dataclass(frozen=True)
class Adoption:
    """The decision for one resource."""

    key: str  # camelCase name used in outputs and logs, e.g. "storageAccount"
    name: str
    status: Status
    existing: Any = None  # the lookup result (typed invoke result) when the resource exists in Azure
    import_now: bool = False  # adopted and not yet in this stack: imported on this run

    @property
    def declared(self) -> bool:
        """Whether this program declares (manages) the resource; referenced ones are only read."""
        return self.status != "referenced"

    @property
    def azure_id(self) -> str | None:
        return getattr(self.existing, "id", None)

    def options(
        self, *, always_retain: bool = False, protect: bool = False, parent: pulumi.Resource | None = None
    ) -> pulumi.ResourceOptions:
        """Resource options: import on the adopting run; adopted resources are never deleted by `destroy`."""
        return pulumi.ResourceOptions(
            parent=parent,
            import_=self.azure_id if self.import_now else None,
            retain_on_delete=always_retain or self.status == "adopted",
            protect=protect,
        )

    def summary(self) -> str:
        if self.import_now:
            return (
                f"{self.key} {self.name}: adopted (imported as it is in Azure on this run; the properties this "
                "program sets are applied on the next `pulumi up`)"
            )
        return f"{self.key} {self.name}: {self.status}"


def decide(key: str, name: str, existing: Any, mode: Mode, previous: PreviousRun) -> Adoption:
    if existing is None:
        return Adoption(key, name, "created")
    managed_status = previous.manages(key, existing.id)
    if managed_status is not None:  # already in this stack: an ordinary update, never a second import
        return Adoption(key, name, managed_status, existing)
    if mode == "reference":
        return Adoption(key, name, "referenced", existing)
    return Adoption(key, name, "adopted", existing, import_now=True)


def _as_input(value: Any) -> Any:
    """A lookup result value as an input: output types (FooResponse, FooResponseBar) become FooArgs / FooBarArgs,
    keeping only the properties the input type accepts (read-only ones such as an ingress fqdn are dropped).
    None when there is no input type for it (a read-only structure)."""
    if isinstance(value, list):
        return [item for item in map(_as_input, value) if item is not None]
    if not is_output_type(type(value)):
        return value
    package = sys.modules[type(value).__module__.rsplit(".", 1)[0]]
    args_type = getattr(package, type(value).__name__.replace("Response", "") + "Args", None)
    return args_type(**mirror_inputs(value, args_type)) if args_type is not None else None


def mirror_inputs(existing: Any, args_type: type) -> dict[str, Any]:
    """Inputs equal to what exists in Azure: every non-empty property of `existing` that `args_type` accepts."""
    accepted = [name for name in inspect.signature(args_type).parameters if not name.startswith("_")]
    values = {name: _as_input(getattr(existing, name, None)) for name in accepted}
    return {name: value for name, value in values.items() if value is not None}


def global_name_is_taken(host: str, description: str) -> bool:
    """Global names are DNS labels (`<account>.blob.core.windows.net`, `<registry>.azurecr.io`): the host resolves
    iff some resource anywhere in Azure has the name."""
    try:
        socket.getaddrinfo(host, 443)
    except socket.gaierror as error:
        if error.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            return False
        pulumi.log.warn(f"Could not check whether {description} is free ({error}); continuing.")
        return False
    return True


def storage_account_name_is_taken(name: str) -> bool:
    return global_name_is_taken(f"{name}.blob.core.windows.net", f"storage account name {name!r}")


def require_free_storage_account_name(name: str, explicit: bool) -> None:
    if storage_account_name_is_taken(name):
        how = "the name you configured" if explicit else "the default name"
        raise ConfigError(
            f"storageAccountName: {name!r} ({how}) is taken by a storage account elsewhere in Azure (storage "
            "account names are global); choose another with "
            "`pulumi config set storageAccountName <3-24 lowercase letters and digits>`"
        )


@dataclass(frozen=True)
class AdoptionPlan:
    """Everything decided before the first resource is declared."""

    subscription_id: str
    resource_group_id: str  # as Azure returns it when the group exists (uniqueString is case-sensitive)
    location: str
    resource_group: Adoption
    storage_account: Adoption
    file_service: Adoption
    file_share: Adoption
    log_analytics: Adoption
    environment: Adoption
    environment_storage: Adoption
    container_app: Adoption

    @property
    def environment_location(self) -> str:
        """Where the app runs: apps live in their environment's region (an existing one's, else `location`)."""
        existing = self.environment.existing
        return str(existing.location) if existing is not None else self.location

    def all(self) -> list[Adoption]:
        return [
            self.resource_group,
            self.storage_account,
            self.file_service,
            self.file_share,
            self.log_analytics,
            self.environment,
            self.environment_storage,
            self.container_app,
        ]


def plan_resources(config: InfraConfig, previous: PreviousRun) -> tuple[AdoptionPlan, ResourceNames]:
    """Look every resource up by name and decide create / adopt / reference for each."""
    mode = config.existing_resources
    group_name = config.resource_group_name
    subscription_id = authorization.get_client_config().subscription_id
    group = lookup(
        f"resource group {group_name!r}", lambda: resources.get_resource_group(resource_group_name=group_name)
    )
    group_id = group.id if group is not None else resource_group_id(subscription_id, group_name)
    names = resource_names(config.names, resource_suffix(group_id))

    location = config.location or (group.location if group is not None else None)
    location = location or pulumi.Config("azure-native").get("location")
    if not location:
        raise ConfigError(
            f"location: required because resource group {group_name!r} does not exist yet; "
            "set it with `pulumi config set location <region>` (or `pulumi config set azure-native:location`)"
        )

    def in_group(description: str, fetch: Callable[[], T]) -> T | None:
        # Nothing can exist in a group that does not exist; skip the call rather than ask Azure.
        return lookup(description, fetch) if group is not None else None

    account = in_group(
        f"storage account {names.storage_account!r}",
        lambda: storage.get_storage_account(account_name=names.storage_account, resource_group_name=group_name),
    )
    if account is None:
        require_free_storage_account_name(names.storage_account, explicit=config.names.storage_account is not None)
    file_service = share = None
    if account is not None:
        file_service = lookup(
            f"file service of storage account {names.storage_account!r}",
            lambda: storage.get_file_service_properties(
                account_name=names.storage_account, resource_group_name=group_name, file_services_name="default"
            ),
        )
        share = lookup(
            f"file share {names.file_share!r}",
            lambda: storage.get_file_share(
                account_name=names.storage_account, resource_group_name=group_name, share_name=names.file_share
            ),
        )
    workspace = in_group(
        f"Log Analytics workspace {names.log_analytics!r}",
        lambda: operationalinsights.get_workspace(workspace_name=names.log_analytics, resource_group_name=group_name),
    )
    environment = in_group(
        f"Container Apps environment {names.environment!r}",
        lambda: app.get_managed_environment(environment_name=names.environment, resource_group_name=group_name),
    )
    environment_storage = None
    if environment is not None:
        environment_storage = lookup(
            f"environment storage {names.environment_storage!r}",
            lambda: app.get_managed_environments_storage(
                environment_name=names.environment,
                resource_group_name=group_name,
                storage_name=names.environment_storage,
            ),
        )
    container_app = in_group(
        f"container app {names.container_app!r}",
        lambda: app.get_container_app(container_app_name=names.container_app, resource_group_name=group_name),
    )

    plan = AdoptionPlan(
        subscription_id=subscription_id,
        resource_group_id=group_id,
        location=location,
        resource_group=decide("resourceGroup", group_name, group, mode, previous),
        storage_account=decide("storageAccount", names.storage_account, account, mode, previous),
        file_service=decide("fileService", "default", file_service, mode, previous),
        file_share=decide("fileShare", names.file_share, share, mode, previous),
        log_analytics=decide("logAnalyticsWorkspace", names.log_analytics, workspace, mode, previous),
        environment=decide("environment", names.environment, environment, mode, previous),
        environment_storage=decide(
            "environmentStorage", names.environment_storage, environment_storage, mode, previous
        ),
        container_app=decide("containerApp", names.container_app, container_app, mode, previous),
    )
    return plan, names
