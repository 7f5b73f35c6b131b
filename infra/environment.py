"""Container Apps managed environment (with its workload profiles) and its Azure Files storage."""

from dataclasses import dataclass
from typing import Any

import pulumi
from pulumi_azure_native import app

from infra.adoption import Adoption, Ledger, declare_or_reference, mirror_inputs, stack_tags
from infra.config import StorageAccessMode
from infra.storage import account_key
from infra.workload_profiles import WorkloadProfiles


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
    existing = args.environment.foreign
    logs = _logs(args.logs_customer_id, args.logs_shared_key)
    profiles = dict(workload_profiles=args.workload_profiles.profiles)
    if existing is None:
        return dict(
            location=args.location,
            app_logs_configuration=logs,
            zone_redundant=False,
            peer_authentication=app.ManagedEnvironmentPeerAuthenticationArgs(mtls=app.MtlsArgs(enabled=False)),
            tags=stack_tags(),
            **profiles,
        )
    # Existing environment: everything stays as Azure has it (region, zone redundancy, mTLS, network) except the
    # logs, which go to this program's workspace (the shared key cannot be read back, so it is always declared),
    # and the workload profiles (the GPU profile added, or its instance counts applied).
    return mirror_inputs(existing, app.ManagedEnvironmentArgs) | dict(app_logs_configuration=logs, **profiles)


def _storage_properties(args: EnvironmentArgs) -> app.ManagedEnvironmentStoragePropertiesArgs:
    existing = args.environment_storage.foreign
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
