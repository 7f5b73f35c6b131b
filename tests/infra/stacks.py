"""Shared stack layouts for the Pulumi program's tests: the names a stack on the test resource group gets, what the
AI Toolkit's fine-tuning step leaves in Azure, and the legacy parameters file."""

import json
from pathlib import Path
from typing import Any

from infra.unique_string import unique_string
from tests.infra.azure_mocks import (
    SUBSCRIPTION_ID,
    FakeAzure,
    container_app_id,
    environment_id,
    environment_storage_id,
    file_service_id,
    file_share_id,
    group_id,
    storage_account_id,
    workspace_id,
)

GROUP = "rg-phi3-finetune"
LOCATION = "westus3"
DISPLAY_NAMES = {"westus3": "West US 3", "northeurope": "North Europe", "westeurope": "West Europe"}


def default_suffix(group: str = GROUP) -> str:
    """The bicep's <s>: the first 5 characters of uniqueString(resource group id), the id as Azure spells it."""
    return unique_string(f"/subscriptions/{SUBSCRIPTION_ID}/resourceGroups/{group}")[:5]


SUFFIX = default_suffix()
ACCOUNT, SHARE, ENVIRONMENT = f"aistorage{SUFFIX}", f"aifileshare{SUFFIX}", f"aienv{SUFFIX}"
ENV_STORAGE, APP, WORKSPACE = f"aienvstorage{SUFFIX}", f"aiacaapp{SUFFIX}", f"ailog{SUFFIX}"
WORKSPACE_CUSTOMER_ID = "8e1f2a3b-4c5d-4e6f-8a9b-0c1d2e3f4a5b"

TYPES = {
    "resourceGroup": "azure-native:resources:ResourceGroup",
    "storageAccount": "azure-native:storage:StorageAccount",
    "fileService": "azure-native:storage:FileServiceProperties",
    "fileShare": "azure-native:storage:FileShare",
    "logAnalyticsWorkspace": "azure-native:operationalinsights:Workspace",
    "environment": "azure-native:app:ManagedEnvironment",
    "environmentStorage": "azure-native:app:ManagedEnvironmentsStorage",
    "containerApp": "azure-native:app:ContainerApp",
    "containerRegistry": "azure-native:containerregistry:Registry",
}
FINE_TUNING_IDS = {
    "resourceGroup": group_id(GROUP),
    "storageAccount": storage_account_id(GROUP, ACCOUNT),
    "fileService": file_service_id(GROUP, ACCOUNT),
    "fileShare": file_share_id(GROUP, ACCOUNT, SHARE),
    "logAnalyticsWorkspace": workspace_id(GROUP, WORKSPACE),
    "environment": environment_id(GROUP, ENVIRONMENT),
    "environmentStorage": environment_storage_id(GROUP, ENVIRONMENT, ENV_STORAGE),
}


def gpu_profiles() -> list[dict[str, Any]]:
    return [
        {"name": "Consumption", "workloadProfileType": "Consumption", "enableFips": False},
        {"name": "GPU", "workloadProfileType": "NC24-A100", "minimumCount": 0, "maximumCount": 1, "enableFips": False},
    ]


def add_fine_tuning_layout(
    azure: FakeAzure,
    *,
    group: str = GROUP,
    account: str = ACCOUNT,
    share: str = SHARE,
    environment: str = ENVIRONMENT,
    environment_storage: str = ENV_STORAGE,
    workspace: str = WORKSPACE,
    profiles: list[dict[str, Any]] | None = None,
    location: str = LOCATION,
) -> None:
    """What the AI Toolkit's fine-tuning bicep leaves behind, as Azure's GET answers describe it."""
    azure.add(
        group_id(group),
        {"location": location, "tags": {"owner": "ml-team"}, "properties": {"provisioningState": "Succeeded"}},
    )
    azure.add(
        storage_account_id(group, account),
        {
            "location": location,
            "kind": "StorageV2",
            "sku": {"name": "Standard_LRS", "tier": "Standard"},
            "largeFileSharesState": "Enabled",
            "minimumTlsVersion": "TLS1_0",
            "allowBlobPublicAccess": False,
            "enableHttpsTrafficOnly": True,
            "accessTier": "Hot",
            "encryption": {
                "keySource": "Microsoft.Storage",
                "services": {
                    "file": {"enabled": True, "keyType": "Account", "lastEnabledTime": "2026-11-01T10:00:00Z"}
                },
            },
            "primaryEndpoints": {"file": f"https://{account}.file.core.windows.net/"},
            "provisioningState": "Succeeded",
        },
    )
    azure.add(
        file_service_id(group, account),
        {
            "protocolSettings": {"smb": {}},
            "cors": {"corsRules": []},
            "shareDeleteRetentionPolicy": {"enabled": True, "days": 7},
            "sku": {"name": "Standard_LRS", "tier": "Standard"},
        },
    )
    azure.add(
        file_share_id(group, account, share),
        {
            "shareQuota": 1024,
            "accessTier": "TransactionOptimized",
            "enabledProtocols": "SMB",
            "shareUsageBytes": 7516192768,
        },
    )
    azure.add(
        workspace_id(group, workspace),
        {
            "location": location,
            "customerId": WORKSPACE_CUSTOMER_ID,
            "sku": {"name": "PerGB2018", "lastSkuUpdate": "2026-11-01T10:00:00Z"},
            "retentionInDays": 30,
            "provisioningState": "Succeeded",
        },
    )
    azure.add(
        environment_id(group, environment),
        {
            # Container Apps answers with the region's display name (ManagedEnvironments_Get.json: "East US").
            "location": DISPLAY_NAMES.get(location, location),
            "appLogsConfiguration": {
                "destination": "log-analytics",
                "logAnalyticsConfiguration": {"customerId": WORKSPACE_CUSTOMER_ID},
            },
            "workloadProfiles": gpu_profiles() if profiles is None else profiles,
            "zoneRedundant": False,
            "peerAuthentication": {"mtls": {"enabled": False}},
            "defaultDomain": "bluesky-1a2b3c4d.eastus.azurecontainerapps.io",
            "staticIp": "20.1.2.3",
            "provisioningState": "Succeeded",
        },
    )
    azure.add(
        environment_storage_id(group, environment, environment_storage),
        {"properties": {"azureFile": {"accountName": account, "shareName": share, "accessMode": "ReadWrite"}}},
    )


def add_toolkit_app(
    azure: FakeAzure, *, group: str = GROUP, app: str = APP, environment: str = ENVIRONMENT, share: str = SHARE
) -> None:
    """The container app the AI Toolkit's inference.bicep deployed, as Azure's GET answers it (shaped after
    azure-rest-api-specs, specification/app/resource-manager/Microsoft.App/stable/2025-01-01/examples/
    ContainerApps_Get.json: both environment ids, the region's display name, read-only properties)."""
    environment_resource_id = environment_id(group, environment)
    azure.add(
        container_app_id(group, app),
        {
            "type": "Microsoft.App/containerApps",
            "location": "West US 3",
            "identity": {"type": "None"},
            "provisioningState": "Succeeded",
            "runningStatus": "Running",
            "managedEnvironmentId": environment_resource_id,
            "environmentId": environment_resource_id,
            "workloadProfileName": "GPU",
            "latestRevisionName": f"{app}--x1y2z3a",
            "latestReadyRevisionName": f"{app}--x1y2z3a",
            "latestRevisionFqdn": f"{app}--x1y2z3a.bluesky-1a2b3c4d.westus3.azurecontainerapps.io",
            "customDomainVerificationId": "0FD5F3C0A6A8D1A9B3E5B2C4D6E8F0A2B4C6D8E0F2A4B6C8D0E2F4A6B8C0D2E4",
            "configuration": {
                "activeRevisionsMode": "Single",
                "maxInactiveRevisions": 100,
                "ingress": {
                    "fqdn": f"{app}.bluesky-1a2b3c4d.westus3.azurecontainerapps.io",
                    "external": True,
                    "targetPort": 7860,
                    "transport": "Auto",
                    "traffic": [{"weight": 100, "latestRevision": True}],
                    "allowInsecure": False,
                },
            },
            "template": {
                "containers": [
                    {
                        "name": app,
                        "image": "docker.io/pytorch/pytorch:2.4.0-cuda12.4-cudnn9-runtime",
                        "command": ["/bin/bash", "-c", "cd /mount/inference; ./startup.sh"],
                        "resources": {"cpu": 24, "memory": "220Gi", "ephemeralStorage": ""},
                        "probes": [
                            {
                                "type": "Startup",
                                "tcpSocket": {"port": 7860},
                                "initialDelaySeconds": 60,
                                "periodSeconds": 120,
                                "failureThreshold": 10,
                            }
                        ],
                        "volumeMounts": [{"volumeName": f"{share}volume", "mountPath": "/mount"}],
                    }
                ],
                "scale": {"minReplicas": 1, "maxReplicas": 1},
                "volumes": [{"name": f"{share}volume", "storageType": "AzureFile", "storageName": ENV_STORAGE}],
            },
            "outboundIpAddresses": ["20.1.2.4"],
            "eventStreamEndpoint": f"https://westus3.azurecontainerapps.dev/subscriptions/{SUBSCRIPTION_ID}/eventstream",
        },
    )


def write_parameters(directory: Path, parameters: dict[str, Any]) -> None:
    path = directory / "infra" / "provision" / "inference.parameters.json"
    path.parent.mkdir(parents=True)
    document = {
        "$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentParameters.json#",
        "contentVersion": "1.0.0.0",
        "parameters": {name: {"value": value} for name, value in parameters.items()},
    }
    path.write_text(json.dumps(document), encoding="utf-8")
