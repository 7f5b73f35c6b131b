"""The plan: every resource looked up by name before anything is declared, and for each the decision to create,
adopt or reference it (infra/adoption.py). Azure's "not found" means "create"; any other error stops the program;
a free name that is taken elsewhere in Azure (storage accounts and registries have global names) is refused naming
the key to change."""

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pulumi
from pulumi_azure_native import (
    app,
    authorization,
    containerregistry,
    managedidentity,
    operationalinsights,
    resources,
    storage,
)

from infra.adoption import Adoption, PreviousRun, decide, lookup, made_by_this_stack
from infra.arm import REGISTRY_NAME, STORAGE_ACCOUNT_NAME, find_acr_pull, require_free_name
from infra.config import ProgramConfig
from infra.errors import ConfigError
from infra.gpu import normalize_region
from infra.naming import ResourceNames, resource_group_id, resource_names, resource_suffix
from infra.workload_profiles import WorkloadProfiles, plan_workload_profiles

T = TypeVar("T")


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
    container_registry: Adoption
    pull_identity: Adoption
    acr_pull: Adoption  # the pull identity's AcrPull role assignment on the registry
    workload_profiles: WorkloadProfiles  # the environment's, and the GPU profile the app runs on

    @property
    def environment_location(self) -> str:
        """Where the app runs: apps live in their environment's region (an existing one's, else `location`)."""
        existing = self.environment.existing
        # Container Apps answers with the display name ("West US 3"); ARM takes either, the program writes one form.
        return normalize_region(str(existing.location)) if existing is not None else self.location

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
            self.container_registry,
            self.pull_identity,
            self.acr_pull,
        ]


def require_no_replacement(plan: AdoptionPlan, names: ResourceNames) -> None:
    """Refuse, naming the config key, what would make the engine replace an adopted resource (and so refuse the
    import): the only such change this program declares is moving an existing container app to another
    environment (an app's environment is fixed when it is created)."""
    container_app = plan.container_app
    if container_app.status != "adopted":
        return
    current = str(container_app.existing.managed_environment_id or container_app.existing.environment_id or "")
    wanted = plan.environment.azure_id or f"{plan.resource_group_id}/providers/Microsoft.App/managedEnvironments/" + (
        names.environment
    )
    if current.lower() != wanted.lower():
        raise ConfigError(
            f"acaAppName: container app {names.container_app!r} already exists in environment "
            f"{current.rsplit('/', 1)[-1]!r}, not in {names.environment!r} (acaEnvironmentName); an app cannot move "
            "to another environment without being replaced, which would lose it. Set acaEnvironmentName to its "
            f"environment (`pulumi config set acaEnvironmentName {current.rsplit('/', 1)[-1]}`) or choose another "
            "acaAppName"
        )


def plan_resources(config: ProgramConfig) -> tuple[AdoptionPlan, ResourceNames]:
    """Look every resource up by name and decide create / adopt / reference for each; logs the decisions."""
    previous = PreviousRun.read()
    mode = config.existing_resources
    configured_group_name = config.resource_group_name
    subscription_id = authorization.get_client_config().subscription_id
    arm_token = functools.cache(lambda: str(authorization.get_client_token().token))  # for the name checks
    group = lookup(
        f"resource group {configured_group_name!r}",
        lambda: resources.get_resource_group(resource_group_name=configured_group_name),
    )
    # Group names are case-insensitive in ARM, but the name is part of every resource's path, which an import must
    # match exactly: once the group is found, its name is spelled as Azure has it everywhere.
    group_name = str(group.name) if group is not None else configured_group_name
    group_id = group.id if group is not None else resource_group_id(subscription_id, group_name)
    names = resource_names(config.names, config.resource_suffix or resource_suffix(group_id))

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
        require_free_name(
            STORAGE_ACCOUNT_NAME,
            names.storage_account,
            explicit=config.names.storage_account is not None,
            subscription_id=subscription_id,
            arm_token=arm_token,
        )
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
    registry = in_group(
        f"container registry {names.container_registry!r}",
        lambda: containerregistry.get_registry(registry_name=names.container_registry, resource_group_name=group_name),
    )
    if registry is None:
        require_free_name(
            REGISTRY_NAME,
            names.container_registry,
            explicit=config.names.container_registry is not None,
            subscription_id=subscription_id,
            arm_token=arm_token,
        )

    identity = in_group(
        f"pull identity {names.pull_identity!r}",
        lambda: managedidentity.get_user_assigned_identity(
            resource_name=names.pull_identity, resource_group_name=group_name
        ),
    )
    acr_pull = None
    if registry is not None and identity is not None:
        acr_pull = find_acr_pull(registry.id, identity.principal_id, arm_token)

    def decide_for(key: str, name: str, found: Any, declared_path: str, made_here: bool | None = None) -> Adoption:
        return decide(key, name, found, mode, previous, declared_id=f"{group_id}{declared_path}", made_here=made_here)

    def made_here(parent: Any) -> bool:
        """Resources without tags (the file service and share, the environment storage, the role assignment) are
        the stack's own when what they belong to is."""
        return parent is not None and made_by_this_stack(parent)

    account_path = f"/providers/Microsoft.Storage/storageAccounts/{names.storage_account}"
    environment_path = f"/providers/Microsoft.App/managedEnvironments/{names.environment}"
    registry_path = f"/providers/Microsoft.ContainerRegistry/registries/{names.container_registry}"
    environment_adoption = decide_for("environment", names.environment, environment, environment_path)
    plan = AdoptionPlan(
        subscription_id=subscription_id,
        resource_group_id=group_id,
        location=location,
        resource_group=decide_for("resourceGroup", group_name, group, ""),
        storage_account=decide_for("storageAccount", names.storage_account, account, account_path),
        file_service=decide_for(
            "fileService", "default", file_service, f"{account_path}/fileServices/default", made_here(account)
        ),
        file_share=decide_for(
            "fileShare",
            names.file_share,
            share,
            f"{account_path}/fileServices/default/shares/{names.file_share}",
            made_here(account),
        ),
        log_analytics=decide_for(
            "logAnalyticsWorkspace",
            names.log_analytics,
            workspace,
            f"/providers/Microsoft.OperationalInsights/workspaces/{names.log_analytics}",
        ),
        environment=environment_adoption,
        environment_storage=decide_for(
            "environmentStorage",
            names.environment_storage,
            environment_storage,
            f"{environment_path}/storages/{names.environment_storage}",
            made_here(environment),
        ),
        container_app=decide_for(
            "containerApp",
            names.container_app,
            container_app,
            f"/providers/Microsoft.App/containerApps/{names.container_app}",
        ),
        container_registry=decide_for("containerRegistry", names.container_registry, registry, registry_path),
        pull_identity=decide_for(
            "pullIdentity",
            names.pull_identity,
            identity,
            f"/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{names.pull_identity}",
        ),
        acr_pull=decide_for(
            "acrPullAssignment",
            "AcrPull",
            acr_pull,
            f"{registry_path}/providers/Microsoft.Authorization/roleAssignments/{getattr(acr_pull, 'name', '')}",
            made_here(registry) and made_here(identity),
        ),
        workload_profiles=plan_workload_profiles(environment_adoption, config.gpu),
    )
    require_no_replacement(plan, names)
    for adoption in plan.all():
        pulumi.log.info(adoption.summary())
    return plan, names
