"""Container Apps managed environment (with its workload profiles) and its Azure Files storage."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pulumi
from pulumi_azure_native import app

from infra.adoption import Adoption, Ledger, declare_or_reference, mirror_inputs
from infra.config import StorageAccessMode
from infra.errors import ConfigError
from infra.gpu import GpuConfig, normalize_region, require_nodes_for_replicas, workload_profiles
from infra.storage import account_key


def _existing_profiles(existing: Any) -> list[app.WorkloadProfileArgs]:
    return [
        app.WorkloadProfileArgs(
            name=profile.name,
            workload_profile_type=profile.workload_profile_type,
            minimum_count=profile.minimum_count,
            maximum_count=profile.maximum_count,
            enable_fips=profile.enable_fips,
        )
        for profile in existing.workload_profiles or []
    ]


def _of_type(profiles: Sequence[Any], profile_type: str) -> Any:
    """The profile of this type (ARM compares types case-insensitively), if there is one."""
    return next((p for p in profiles if str(p.workload_profile_type).lower() == profile_type.lower()), None)


def _describe(profiles: Sequence[Any]) -> str:
    return ", ".join(f"{p.name} ({p.workload_profile_type})" for p in profiles) or "none"


_RAISE_MAXIMUM = "raise maximumInstanceCount or lower maxReplicas"


@dataclass(frozen=True)
class WorkloadProfiles:
    profiles: list[app.WorkloadProfileArgs]  # what the environment declares (unused when it is only referenced)
    gpu_profile_name: str  # the one the app runs on


def plan_workload_profiles(environment: Adoption, gpu: GpuConfig) -> WorkloadProfiles:
    """The environment's workload profiles and the GPU profile the app runs on, decided before anything is declared.
    An existing environment keeps its profiles; an existing profile of the configured GPU type (any name) is
    reused, with the configured instance counts when this stack manages the environment; a missing GPU profile is
    added where Azure allows it. What Azure would refuse stops the program naming the key to change."""
    desired = workload_profiles(gpu)
    existing = environment.existing
    if existing is None:
        require_nodes_for_replicas(gpu, gpu.maximum_instance_count, "maximumInstanceCount is", _RAISE_MAXIMUM)
        return WorkloadProfiles(desired, gpu.profile.profile_name)
    live = _existing_profiles(existing)
    name = environment.name
    if not live:
        raise ConfigError(
            f"acaEnvironmentName: Container Apps environment {name!r} is a Consumption-only environment (no workload "
            "profiles), which cannot get a GPU workload profile; choose a new environment name with "
            "`pulumi config set acaEnvironmentName <name>` (it is created with the GPU profile)"
        )
    gpu_type = gpu.profile.profile_type
    reused = _of_type(live, gpu_type)
    if reused is not None:
        return WorkloadProfiles(_with_counts(environment, live, reused, gpu), str(reused.name))
    if environment.status == "referenced":
        raise ConfigError(
            f"Container Apps environment {name!r} has no GPU workload profile of type {gpu_type} (config `gpu`), "
            f"and existingResources is 'reference' so it cannot be added; its profiles: {_describe(live)}. Choose "
            "the `gpu` of one of them, add one in Azure, or use `pulumi config set existingResources adopt`"
        )
    if not gpu.profile.serverless:
        # Microsoft's workload profiles overview: "GPU-enabled Dedicated profiles must be configured when creating
        # an environment."
        raise ConfigError(
            f"gpu: {gpu.gpu} needs an {gpu_type} workload profile, which Azure only adds when an environment is "
            f"created, and Container Apps environment {name!r} has none (its profiles: {_describe(live)}). Use a "
            "serverless GPU, which can be added to it (`pulumi config set gpu serverless-A100`), or a new "
            "environment (`pulumi config set acaEnvironmentName <new name>`)"
        )
    if gpu.gpu == "serverless-T4" and normalize_region(str(existing.location)) == "westeurope":
        # Serverless GPU overview: in West Europe, T4 needs an environment created after it became available there.
        raise ConfigError(
            f"gpu: serverless-T4 cannot be added to the existing environment {name!r} in West Europe (Azure offers "
            "it there only to environments created with it); use a new environment "
            "(`pulumi config set acaEnvironmentName <new name>`)"
        )
    taken = next((p for p in live if p.name == gpu.profile.profile_name), None)
    if taken is not None:
        raise ConfigError(
            f"gpu: Container Apps environment {name!r} has a workload profile named {taken.name!r} of type "
            f"{taken.workload_profile_type}, so the {gpu_type} profile cannot be added under that name; choose the "
            f"`gpu` of one of its profiles ({_describe(live)}) or another `acaEnvironmentName`"
        )
    names = {p.name for p in live}
    return WorkloadProfiles(live + [p for p in desired if p.name not in names], gpu.profile.profile_name)


def _with_counts(
    environment: Adoption, live: list[app.WorkloadProfileArgs], reused: Any, gpu: GpuConfig
) -> list[app.WorkloadProfileArgs]:
    """The live profiles, the reused GPU profile with the instance counts this stack applies: all of them on an
    environment it created, those set in config on one it adopted (the live counts are kept otherwise), none on
    one it only references. `maxReplicas` is then checked against the maximum the profile will have."""
    if gpu.profile.serverless:
        return live
    applied = {
        "minimumInstanceCount": gpu.minimum_instance_count,
        "maximumInstanceCount": gpu.maximum_instance_count,
    }
    if environment.status == "adopted":
        applied = {key: value for key, value in applied.items() if key in gpu.configured_counts}
    elif environment.status == "referenced":
        if gpu.configured_counts:
            pulumi.log.warn(
                f"{', '.join(sorted(gpu.configured_counts))}: not applied, existingResources is 'reference'; the GPU "
                f"profile {reused.name!r} of environment {environment.name!r} keeps its instance counts "
                f"({reused.minimum_count}-{reused.maximum_count})"
            )
        applied = {}
    minimum = applied.get("minimumInstanceCount", reused.minimum_count)
    maximum = applied.get("maximumInstanceCount", reused.maximum_count)
    require_nodes_for_replicas(
        gpu,
        maximum,
        f"the GPU profile {reused.name!r} of environment {environment.name!r} has a maximum of",
        "lower maxReplicas" if environment.status == "referenced" else _RAISE_MAXIMUM,
    )
    return [
        app.WorkloadProfileArgs(
            name=p.name,
            workload_profile_type=p.workload_profile_type,
            minimum_count=minimum,
            maximum_count=maximum,
            enable_fips=p.enable_fips,
        )
        if p.name == reused.name
        else p
        for p in live
    ]


@dataclass(frozen=True)
class EnvironmentArgs:
    resource_group_name: pulumi.Input[str]
    location: str
    environment: Adoption
    environment_storage: Adoption
    workload_profiles: WorkloadProfiles  # plan_workload_profiles()
    logs_customer_id: pulumi.Input[str]
    logs_shared_key: pulumi.Input[str]
    storage_account_name: pulumi.Input[str]
    storage_account_key: pulumi.Input[str]
    share_name: pulumi.Input[str]
    storage_access_mode: StorageAccessMode
    ledger: Ledger


def _logs(customer_id: pulumi.Input[str], shared_key: pulumi.Input[str]) -> app.AppLogsConfigurationArgs:
    return app.AppLogsConfigurationArgs(
        destination="log-analytics",
        log_analytics_configuration=app.LogAnalyticsConfigurationArgs(customer_id=customer_id, shared_key=shared_key),
    )


def _environment_args(args: EnvironmentArgs) -> dict[str, Any]:
    existing = args.environment.existing
    logs = _logs(args.logs_customer_id, args.logs_shared_key)
    profiles = dict(workload_profiles=args.workload_profiles.profiles)
    if existing is None:
        return dict(
            location=args.location,
            app_logs_configuration=logs,
            zone_redundant=False,
            peer_authentication=app.ManagedEnvironmentPeerAuthenticationArgs(mtls=app.MtlsArgs(enabled=False)),
            **profiles,
        )
    # Existing environment: everything stays as Azure has it (region, zone redundancy, mTLS, network) except the
    # logs, which go to this program's workspace (the shared key cannot be read back, so it is always declared),
    # and the workload profiles (the GPU profile added, or its instance counts applied).
    return mirror_inputs(existing, app.ManagedEnvironmentArgs) | dict(app_logs_configuration=logs, **profiles)


def _storage_properties(args: EnvironmentArgs) -> app.ManagedEnvironmentStoragePropertiesArgs:
    existing = args.environment_storage.existing
    if existing is not None:
        # An existing environment storage keeps its account, share and access mode (fine-tuning writes through it);
        # only the account key, which Azure never returns, is declared: that of the account it points to, which
        # need not be storageAccountName (looked up in the stack's resource group).
        azure_file = existing.properties.azure_file
        key = pulumi.Output.from_input(args.storage_account_name).apply(
            lambda ours: (
                args.storage_account_key
                if ours.lower() == str(azure_file.account_name).lower()
                else account_key(azure_file.account_name, args.resource_group_name)
            )
        )
        return app.ManagedEnvironmentStoragePropertiesArgs(
            azure_file=app.AzureFilePropertiesArgs(
                account_name=azure_file.account_name,
                account_key=pulumi.Output.secret(key),
                share_name=azure_file.share_name,
                access_mode=azure_file.access_mode,
            )
        )
    return app.ManagedEnvironmentStoragePropertiesArgs(
        azure_file=app.AzureFilePropertiesArgs(
            account_name=args.storage_account_name,
            account_key=args.storage_account_key,
            share_name=args.share_name,
            access_mode=args.storage_access_mode,
        )
    )


class Environment(pulumi.ComponentResource):
    environment_id: pulumi.Output[str]
    storage_name: pulumi.Output[str]
    gpu_profile_name: str  # the workload profile the app runs on

    def __init__(self, name: str, args: EnvironmentArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("inference:infra:Environment", name, None, opts)
        self.gpu_profile_name = args.workload_profiles.gpu_profile_name
        environment = declare_or_reference(
            args.environment,
            args.ledger,
            lambda options: app.ManagedEnvironment(
                "environment",
                environment_name=args.environment.name,
                resource_group_name=args.resource_group_name,
                **_environment_args(args),
                opts=options,
            ),
            parent=self,
        )
        self.environment_id = environment.output("id")
        environment_storage = declare_or_reference(
            args.environment_storage,
            args.ledger,
            lambda options: app.ManagedEnvironmentsStorage(
                "environment-storage",
                environment_name=environment.output("name"),
                resource_group_name=args.resource_group_name,
                storage_name=args.environment_storage.name,
                properties=_storage_properties(args),
                opts=options,
            ),
            parent=self,
        )
        self.storage_name = environment_storage.output("name")
        self.register_outputs({"environmentId": self.environment_id, "storageName": self.storage_name})
