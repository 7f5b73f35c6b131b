"""Container Apps managed environment (with its workload profiles) and its Azure Files storage."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pulumi
from pulumi_azure_native import app

from infra.adoption import Adoption, Ledger, declare_or_reference, mirror_inputs
from infra.config import StorageAccessMode
from infra.errors import ConfigError


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


def _profile_type(profiles: Sequence[Any], name: str) -> str:
    return next(str(p.workload_profile_type) for p in profiles if p.name == name)


def _of_type(profiles: Sequence[Any], profile_type: str) -> str | None:
    """The name of a profile of this type (ARM compares types case-insensitively), if there is one."""
    return next((str(p.name) for p in profiles if str(p.workload_profile_type).lower() == profile_type.lower()), None)


def _describe(profiles: Sequence[Any]) -> str:
    return ", ".join(f"{p.name} ({p.workload_profile_type})" for p in profiles) or "none"


def merge_workload_profiles(
    environment_name: str, existing: Any, desired: Sequence[app.WorkloadProfileArgs], gpu_profile_name: str
) -> tuple[list[app.WorkloadProfileArgs], str]:
    """Existing profiles are kept as they are; desired ones are added when missing. An existing profile of the GPU
    profile's type (config `gpu`, any name) is reused instead of adding ours. Returns the profiles and the name of
    the GPU profile the app runs on."""
    profiles = _existing_profiles(existing)
    gpu_type = _profile_type(desired, gpu_profile_name)
    reused = _of_type(profiles, gpu_type)
    names = {p.name for p in profiles}
    for profile in desired:
        if profile.name == gpu_profile_name and reused is not None:
            continue
        if profile.name in names:
            if profile.name == gpu_profile_name:  # taken by a profile of another type
                raise ConfigError(
                    f"gpu: Container Apps environment {environment_name!r} has a workload profile named "
                    f"{gpu_profile_name!r} of type {_profile_type(profiles, gpu_profile_name)}, so the {gpu_type} "
                    f"profile cannot be added under that name; choose the `gpu` of one of its profiles "
                    f"({_describe(profiles)}) or another `acaEnvironmentName`"
                )
            continue
        profiles.append(profile)
    return profiles, reused or gpu_profile_name


@dataclass(frozen=True)
class EnvironmentArgs:
    resource_group_name: pulumi.Input[str]
    location: str
    environment: Adoption
    environment_storage: Adoption
    workload_profiles: Sequence[app.WorkloadProfileArgs]  # those of a new environment, GPU profile included
    gpu_profile_name: str  # the GPU profile among them (infra/gpu.py)
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


def _environment_args(args: EnvironmentArgs) -> tuple[dict[str, Any], str]:
    """The environment's inputs and the name of the GPU workload profile the app runs on."""
    existing = args.environment.existing
    logs = _logs(args.logs_customer_id, args.logs_shared_key)
    if existing is None:
        return (
            dict(
                location=args.location,
                app_logs_configuration=logs,
                workload_profiles=list(args.workload_profiles),
                zone_redundant=False,
                peer_authentication=app.ManagedEnvironmentPeerAuthenticationArgs(mtls=app.MtlsArgs(enabled=False)),
            ),
            args.gpu_profile_name,
        )
    # Existing environment: everything stays as Azure has it (region, zone redundancy, mTLS, network, profiles)
    # except the logs, which go to this program's workspace (the shared key cannot be read back, so it is always
    # declared), and the GPU profile, added when there is none (also on the run that imports it).
    kept = mirror_inputs(existing, app.ManagedEnvironmentArgs) | dict(app_logs_configuration=logs)
    profiles, gpu_name = merge_workload_profiles(
        args.environment.name, existing, args.workload_profiles, args.gpu_profile_name
    )
    return kept | dict(workload_profiles=profiles), gpu_name


def _storage_properties(args: EnvironmentArgs) -> app.ManagedEnvironmentStoragePropertiesArgs:
    existing = args.environment_storage.existing
    if existing is not None:
        # An existing environment storage keeps its share and access mode (fine-tuning writes through it); only the
        # account key, which Azure never returns, is declared.
        azure_file = existing.properties.azure_file
        return app.ManagedEnvironmentStoragePropertiesArgs(
            azure_file=app.AzureFilePropertiesArgs(
                account_name=azure_file.account_name,
                account_key=args.storage_account_key,
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


def _referenced_gpu_profile(args: EnvironmentArgs) -> str:
    """The GPU profile of an environment this stack only reads: it must have one of the configured type."""
    profiles = args.environment.existing.workload_profiles or []
    gpu_type = _profile_type(args.workload_profiles, args.gpu_profile_name)
    name = _of_type(profiles, gpu_type)
    if name is None:
        raise ConfigError(
            f"Container Apps environment {args.environment.name!r} has no GPU workload profile of type "
            f"{gpu_type} (config `gpu`), and existingResources is 'reference' so it cannot be added; its "
            f"profiles: {_describe(profiles)}. Choose the `gpu` of one of them, add one in Azure, or use "
            "`pulumi config set existingResources adopt`"
        )
    return name


class Environment(pulumi.ComponentResource):
    environment_id: pulumi.Output[str]
    storage_name: pulumi.Output[str]
    gpu_profile_name: str  # the workload profile the app runs on

    def __init__(self, name: str, args: EnvironmentArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("inference:infra:Environment", name, None, opts)
        if args.environment.declared:
            environment_args, self.gpu_profile_name = _environment_args(args)
        else:
            self.gpu_profile_name = _referenced_gpu_profile(args)
        environment = declare_or_reference(
            args.environment,
            args.ledger,
            lambda options: app.ManagedEnvironment(
                "environment",
                environment_name=args.environment.name,
                resource_group_name=args.resource_group_name,
                **environment_args,
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
