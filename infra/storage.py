"""Storage account, its `default` file service and the file share that holds the base model and the adapters.

The share and the account hold user data: they are never deleted by this program (retain_on_delete), and the share
is protected so that no change can replace it.
"""

from dataclasses import dataclass
from typing import Any

import pulumi
from pulumi_azure_native import storage

from infra.adoption import Adoption, Ledger, declare_or_reference, mirror_inputs, stack_tags

SHARE_QUOTA_GIB = 1024
SHARE_SOFT_DELETE_DAYS = 7


@dataclass(frozen=True)
class StorageArgs:
    resource_group_name: pulumi.Input[str]
    location: str
    account: Adoption
    file_service: Adoption
    share: Adoption
    ledger: Ledger


def _account_args(args: StorageArgs) -> dict[str, Any]:
    existing = args.account.foreign
    owned = dict(
        large_file_shares_state=storage.LargeFileSharesState.ENABLED,
        minimum_tls_version=storage.MinimumTlsVersion.TLS1_2,
        allow_blob_public_access=False,
        enable_https_traffic_only=True,
    )
    if existing is not None:  # sku, kind, region and the rest stay as Azure has them
        return mirror_inputs(existing, storage.StorageAccountArgs) | owned
    return dict(
        sku=storage.SkuArgs(name=storage.SkuName.STANDARD_LRS),
        kind=storage.Kind.STORAGE_V2,
        location=args.location,
        tags=stack_tags(),
        **owned,
    )


def _file_service_args(adoption: Adoption) -> dict[str, Any]:
    existing = adoption.foreign
    if existing is not None:  # an existing file service (soft delete, CORS, protocols) is kept as it is
        return mirror_inputs(existing, storage.FileServicePropertiesArgs)
    return dict(
        protocol_settings=storage.ProtocolSettingsArgs(smb=storage.SmbSettingArgs()),
        cors=storage.CorsRulesArgs(cors_rules=[]),
        share_delete_retention_policy=storage.DeleteRetentionPolicyArgs(enabled=True, days=SHARE_SOFT_DELETE_DAYS),
    )


def _share_args(adoption: Adoption) -> dict[str, Any]:
    existing = adoption.foreign
    if existing is None:
        return dict(share_quota=SHARE_QUOTA_GIB)
    # Adoption adds, it does not shrink: a larger quota someone already set is kept.
    return mirror_inputs(existing, storage.FileShareArgs) | dict(
        share_quota=max(SHARE_QUOTA_GIB, existing.share_quota or 0)
    )


def account_key(
    account_name: pulumi.Input[str],
    resource_group_name: pulumi.Input[str],
    depends_on: list[pulumi.Resource] | None = None,
) -> pulumi.Output[str]:
    """The storage account's first key, as a secret."""
    keys = storage.list_storage_account_keys_output(
        account_name=account_name,
        resource_group_name=resource_group_name,
        opts=pulumi.InvokeOutputOptions(depends_on=depends_on or []),
    )
    return pulumi.Output.secret(keys.keys[0].value)


class Storage(pulumi.ComponentResource):
    account_name: pulumi.Output[str]
    share_name: pulumi.Output[str]
    account_key: pulumi.Output[str]  # secret

    def __init__(self, name: str, args: StorageArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("inference:infra:Storage", name, None, opts)
        account = declare_or_reference(
            args.account,
            args.ledger,
            lambda options: storage.StorageAccount(
                "account",
                account_name=args.account.name,
                resource_group_name=args.resource_group_name,
                **_account_args(args),
                opts=options,
            ),
            parent=self,
            always_retain=True,
        )
        self.account_name = account.output("name")
        file_service = declare_or_reference(
            args.file_service,
            args.ledger,
            lambda options: storage.FileServiceProperties(
                "file-service",
                account_name=self.account_name,
                resource_group_name=args.resource_group_name,
                file_services_name="default",
                **_file_service_args(args.file_service),
                opts=options,
            ),
            parent=self,
            always_retain=True,
        )
        depends_on = account.dependencies + file_service.dependencies
        share = declare_or_reference(
            args.share,
            args.ledger,
            lambda options: storage.FileShare(
                "share",
                account_name=self.account_name,
                resource_group_name=args.resource_group_name,
                share_name=args.share.name,
                **_share_args(args.share),
                opts=options,
            ),
            parent=self,
            always_retain=True,
            protect=True,
            depends_on=depends_on,
        )
        self.share_name = share.output("name")

        self.account_key = account_key(self.account_name, args.resource_group_name, depends_on)
        self.register_outputs({"accountName": self.account_name, "shareName": self.share_name})
