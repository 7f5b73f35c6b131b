"""The whole program (`__main__.py`) under mocks declares the bicep's resources with its properties, names
and outputs; configuration comes from Pulumi config over the legacy parameters file; bad config fails early."""

import json
import re
from pathlib import Path
from typing import Any

import pulumi
import pytest
import yaml

from infra.config import read_config
from tests.infra.azure_mocks import (
    REPO_ROOT,
    STORAGE_KEY,
    SUBSCRIPTION_ID,
    WORKSPACE_KEY,
    FakeAzure,
    environment_id,
    is_secret,
    run_program,
)
from tests.infra.stacks import default_suffix, write_parameters

GROUP = "rg-phi3-finetune"
BASE_CONFIG = {"resourceGroupName": GROUP, "location": "westus3"}


@pytest.fixture
def fresh(in_scratch_dir: Path) -> tuple[FakeAzure, Any]:
    """Nothing exists in Azure; run with the base config."""
    azure = FakeAzure()
    return azure, run_program(azure, BASE_CONFIG)


def test_storage_account_properties(fresh: tuple[FakeAzure, Any]) -> None:
    azure, _ = fresh
    account = azure.one("azure-native:storage:StorageAccount").inputs
    assert account["sku"] == {"name": "Standard_LRS"}
    assert account["kind"] == "StorageV2"
    assert account["largeFileSharesState"] == "Enabled"
    assert account["location"] == "westus3"
    assert account["resourceGroupName"] == GROUP
    assert account["minimumTlsVersion"] == "TLS1_2"
    assert account["allowBlobPublicAccess"] is False
    assert account["enableHttpsTrafficOnly"] is True


def test_file_service_and_share_properties(fresh: tuple[FakeAzure, Any]) -> None:
    azure, _ = fresh
    service = azure.one("azure-native:storage:FileServiceProperties").inputs
    assert service["fileServicesName"] == "default"
    assert service["protocolSettings"] == {"smb": {}}
    assert service["cors"] == {"corsRules": []}
    assert service["shareDeleteRetentionPolicy"] == {"enabled": True, "days": 7}
    share = azure.one("azure-native:storage:FileShare").inputs
    assert share["shareQuota"] == 1024
    assert share["accountName"] == f"aistorage{default_suffix()}"


def test_workspace_properties(fresh: tuple[FakeAzure, Any]) -> None:
    azure, _ = fresh
    workspace = azure.one("azure-native:operationalinsights:Workspace").inputs
    assert workspace["sku"] == {"name": "PerGB2018"}
    assert workspace["location"] == "westus3"


def test_environment_properties(fresh: tuple[FakeAzure, Any]) -> None:
    azure, _ = fresh
    declared = azure.one("azure-native:app:ManagedEnvironment")
    environment = declared.inputs
    logs = environment["appLogsConfiguration"]
    assert logs["destination"] == "log-analytics"
    assert logs["logAnalyticsConfiguration"]["customerId"] == "5b2c7d4e-0f1a-4b3c-8d9e-a1b2c3d4e5f6"
    assert logs["logAnalyticsConfiguration"]["sharedKey"] == WORKSPACE_KEY
    assert is_secret(declared.raw_inputs["appLogsConfiguration"])
    assert environment["workloadProfiles"] == [
        {"name": "Consumption", "workloadProfileType": "Consumption", "enableFips": False},
        {"name": "GPU", "workloadProfileType": "NC24-A100", "minimumCount": 0, "maximumCount": 2, "enableFips": False},
    ]
    assert environment["zoneRedundant"] is False
    assert environment["peerAuthentication"] == {"mtls": {"enabled": False}}
    assert environment["location"] == "westus3"


def test_environment_storage_properties(fresh: tuple[FakeAzure, Any]) -> None:
    azure, _ = fresh
    declared = azure.one("azure-native:app:ManagedEnvironmentsStorage")
    assert declared.inputs["environmentName"] == f"aienv{default_suffix()}"
    assert declared.inputs["properties"] == {
        "azureFile": {
            "accountName": f"aistorage{default_suffix()}",
            "accountKey": STORAGE_KEY,
            "shareName": f"aifileshare{default_suffix()}",
            "accessMode": "ReadWrite",
        }
    }
    assert is_secret(declared.raw_inputs["properties"])


def test_container_app_properties(fresh: tuple[FakeAzure, Any]) -> None:
    azure, _ = fresh
    app = azure.one("azure-native:app:ContainerApp").inputs
    suffix = default_suffix()
    assert app["workloadProfileName"] == "GPU"
    assert app["managedEnvironmentId"] == environment_id(GROUP, f"aienv{suffix}")
    # identity, registry entry and image: tests/infra/test_program_image.py
    configuration = app["configuration"]
    assert configuration["activeRevisionsMode"] == "Single"
    assert configuration["ingress"] == {
        "external": True,
        "targetPort": 7860,
        "transport": "auto",
        "allowInsecure": False,
        "traffic": [{"latestRevision": True, "weight": 100}],
    }
    (container,) = app["template"]["containers"]
    assert container["name"] == f"aiacaapp{suffix}"
    assert "command" not in container  # the built image's own
    assert container["resources"] == {"cpu": 24, "memory": "220Gi"}
    assert container["volumeMounts"] == [{"volumeName": f"aifileshare{suffix}volume", "mountPath": "/mount"}]
    probes = {probe["type"]: probe["httpGet"] for probe in container["probes"]}  # timings: tests/infra/test_gpu.py
    assert probes == {
        "Startup": {"path": "/health", "port": 7860, "scheme": "HTTP"},
        "Readiness": {"path": "/ready", "port": 7860, "scheme": "HTTP"},
        "Liveness": {"path": "/health", "port": 7860, "scheme": "HTTP"},
    }
    assert app["template"]["volumes"] == [
        {"name": f"aifileshare{suffix}volume", "storageType": "AzureFile", "storageName": f"aienvstorage{suffix}"}
    ]
    assert app["template"]["scale"] == {
        "minReplicas": 1,
        "maxReplicas": 1,
        "rules": [{"name": "http-concurrency", "http": {"metadata": {"concurrentRequests": "10"}}}],
    }


def test_resource_group_is_created_when_missing(fresh: tuple[FakeAzure, Any]) -> None:
    azure, _ = fresh
    assert azure.one("azure-native:resources:ResourceGroup").inputs == {
        "resourceGroupName": GROUP,
        "location": "westus3",
        "tags": {"pulumi-project": "aitk-inference", "pulumi-stack": "dev"},  # the stack's own (issue 18, 2)
    }


def test_default_names_follow_the_bicep(fresh: tuple[FakeAzure, Any]) -> None:
    azure, _ = fresh
    suffix = default_suffix()
    assert len(suffix) == 5
    assert azure.one("azure-native:storage:StorageAccount").inputs["accountName"] == f"aistorage{suffix}"
    assert azure.one("azure-native:storage:FileShare").inputs["shareName"] == f"aifileshare{suffix}"
    assert azure.one("azure-native:app:ManagedEnvironment").inputs["environmentName"] == f"aienv{suffix}"
    assert azure.one("azure-native:app:ManagedEnvironmentsStorage").inputs["storageName"] == f"aienvstorage{suffix}"
    assert azure.one("azure-native:app:ContainerApp").inputs["containerAppName"] == f"aiacaapp{suffix}"
    assert azure.one("azure-native:operationalinsights:Workspace").inputs["workspaceName"] == f"ailog{suffix}"


def test_default_names_for_a_published_subscription_and_group(in_scratch_dir: Path) -> None:
    """uniqueString('/subscriptions/3c7f956b-55ee-4686-9d30-da1eb631dc59/resourceGroups/rg-devopsshieldek010dev')
    is 'fd63l2gacbtca' as printed by real ARM deployments (see tests/infra/test_unique_string.py)."""
    azure = FakeAzure(subscription_id="3c7f956b-55ee-4686-9d30-da1eb631dc59")
    run = run_program(azure, {"resourceGroupName": "rg-devopsshieldek010dev", "location": "westus3"})
    assert azure.one("azure-native:storage:StorageAccount").inputs["accountName"] == "aistoragefd63l"
    assert azure.one("azure-native:storage:FileShare").inputs["shareName"] == "aifilesharefd63l"
    assert azure.one("azure-native:app:ManagedEnvironment").inputs["environmentName"] == "aienvfd63l"
    assert azure.one("azure-native:app:ManagedEnvironmentsStorage").inputs["storageName"] == "aienvstoragefd63l"
    assert azure.one("azure-native:app:ContainerApp").inputs["containerAppName"] == "aiacaappfd63l"
    assert azure.one("azure-native:operationalinsights:Workspace").inputs["workspaceName"] == "ailogfd63l"
    assert run.outputs["SUBSCRIPTION_ID"] == "3c7f956b-55ee-4686-9d30-da1eb631dc59"


def test_default_names_use_the_group_id_casing_azure_returns(in_scratch_dir: Path) -> None:
    """uniqueString is case-sensitive while ARM group names are not: the existing group's id, as Azure returns it,
    decides the suffix, not the casing typed in the config."""
    azure = FakeAzure()
    azure.add(f"/subscriptions/{SUBSCRIPTION_ID}/resourceGroups/RG-Phi3-Finetune", {"location": "westus3"})
    run_program(azure, {"resourceGroupName": "rg-phi3-finetune"})
    account = azure.one("azure-native:storage:StorageAccount").inputs
    assert account["accountName"] == f"aistorage{default_suffix('RG-Phi3-Finetune')}"
    assert default_suffix("RG-Phi3-Finetune") != default_suffix("rg-phi3-finetune")
    assert account["location"] == "westus3"  # location defaults to the group's


def test_location_falls_back_to_azure_native_location(in_scratch_dir: Path) -> None:
    azure = FakeAzure()
    run_program(azure, {"resourceGroupName": GROUP, "azure-native:location": "northeurope"})
    assert azure.one("azure-native:resources:ResourceGroup").inputs["location"] == "northeurope"


EXPLICIT_NAMES = {
    "storageAccountName": "mystorage01",
    "fileShareName": "models-share",
    "acaEnvironmentName": "gpu-env",
    "acaEnvironmentStorageName": "models-storage",
    "acaAppName": "phi3-chat",
    "acaLogAnalyticsName": "logs-phi3",
}


def assert_names(azure: FakeAzure, names: dict[str, str]) -> None:
    assert azure.one("azure-native:storage:StorageAccount").inputs["accountName"] == names["storageAccountName"]
    assert azure.one("azure-native:storage:FileShare").inputs["shareName"] == names["fileShareName"]
    assert azure.one("azure-native:app:ManagedEnvironment").inputs["environmentName"] == names["acaEnvironmentName"]
    env_storage = azure.one("azure-native:app:ManagedEnvironmentsStorage").inputs
    assert env_storage["storageName"] == names["acaEnvironmentStorageName"]
    assert azure.one("azure-native:app:ContainerApp").inputs["containerAppName"] == names["acaAppName"]
    workspace = azure.one("azure-native:operationalinsights:Workspace").inputs
    assert workspace["workspaceName"] == names["acaLogAnalyticsName"]


def test_explicit_names_replace_defaults(in_scratch_dir: Path) -> None:
    azure = FakeAzure()
    run = run_program(azure, BASE_CONFIG | EXPLICIT_NAMES)
    assert_names(azure, EXPLICIT_NAMES)
    assert run.outputs["STORAGE_ACCOUNT_NAME"] == "mystorage01"
    assert run.outputs["FILE_SHARE_NAME"] == "models-share"


def test_parameters_file_values_are_defaults_and_config_wins(in_scratch_dir: Path) -> None:
    write_parameters(
        in_scratch_dir,
        {
            "location": "northeurope",
            "maximumInstanceCount": 4,
            "defaultCommands": ["cd /mount", "python serve.py"],
            "storageAccountName": "fromfile01",
            "fileShareName": "file-share",
            "acaEnvironmentName": None,  # null: use the default
            "acaEnvironmentStorageName": None,
            "acaAppName": "file-app",
            "acaLogAnalyticsName": None,
        },
    )
    azure = FakeAzure()
    run_program(azure, {"resourceGroupName": GROUP, "acaAppName": "config-app", "maximumInstanceCount": 3})
    suffix = default_suffix()
    assert azure.one("azure-native:storage:StorageAccount").inputs["accountName"] == "fromfile01"
    assert azure.one("azure-native:storage:StorageAccount").inputs["location"] == "northeurope"
    assert azure.one("azure-native:storage:FileShare").inputs["shareName"] == "file-share"
    assert azure.one("azure-native:app:ContainerApp").inputs["containerAppName"] == "config-app"  # config wins
    environment = azure.one("azure-native:app:ManagedEnvironment").inputs
    assert environment["environmentName"] == f"aienv{suffix}"  # null in the file: the default
    assert environment["workloadProfiles"][1]["maximumCount"] == 3  # config wins over the file's 4
    (container,) = azure.one("azure-native:app:ContainerApp").inputs["template"]["containers"]
    assert "command" not in container  # the file's defaultCommands apply only to a prebuilt `image`...
    run_program(
        azure := FakeAzure(),
        {"resourceGroupName": GROUP, "image": "docker.io/pytorch/pytorch:2.4.0", "access": "public"},
    )
    (container,) = azure.one("azure-native:app:ContainerApp").inputs["template"]["containers"]
    assert container["command"] == ["/bin/bash", "-c", "cd /mount; python serve.py"]  # ...such as this one


def test_sizing_scale_image_and_access_mode_come_from_config(in_scratch_dir: Path) -> None:
    azure = FakeAzure()
    config = BASE_CONFIG | {
        "containerCpu": "8",
        "containerMemory": "64Gi",
        "minReplicas": 0,
        "maxReplicas": 3,
        "maximumInstanceCount": 3,  # one NC24-A100 node per replica
        "image": "myregistry.azurecr.io/inference:1",
        "storageAccessMode": "ReadOnly",
    }
    run_program(azure, config)
    app = azure.one("azure-native:app:ContainerApp").inputs
    (container,) = app["template"]["containers"]
    assert container["resources"] == {"cpu": 8, "memory": "64Gi"}
    assert container["image"] == "myregistry.azurecr.io/inference:1"
    assert app["template"]["scale"] == {
        "minReplicas": 0,
        "maxReplicas": 3,
        "rules": [{"name": "http-concurrency", "http": {"metadata": {"concurrentRequests": "10"}}}],
    }
    assert app["configuration"]["ingress"]["stickySessions"] == {"affinity": "sticky"}  # Gradio's queue state
    env_storage = azure.one("azure-native:app:ManagedEnvironmentsStorage").inputs
    assert env_storage["properties"]["azureFile"]["accessMode"] == "ReadOnly"


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"resourceGroupName": None}, "resourceGroupName: required"),
        ({"resourceGroupName": "bad/group"}, "resourceGroupName: 'bad/group' is not a valid name"),
        ({"storageAccountName": "My_Storage"}, "storageAccountName: 'My_Storage' is not a valid name: 3-24"),
        ({"storageAccountName": "ab"}, "storageAccountName: 'ab' is not a valid name: 3-24"),
        ({"fileShareName": "share--models"}, "fileShareName: 'share--models' is not a valid name: 3-63"),
        ({"fileShareName": "-share"}, "fileShareName: '-share' is not a valid name"),
        ({"acaAppName": "1app"}, "acaAppName: '1app' is not a valid name: 2-32"),
        ({"acaAppName": "app-"}, "acaAppName: 'app-' is not a valid name"),
        ({"acaAppName": "my--app"}, "acaAppName: 'my--app' is not a valid name"),
        ({"acaAppName": "a" * 33}, "acaAppName: '" + "a" * 33 + "' is not a valid name"),
        ({"acaEnvironmentName": "Env_1"}, "acaEnvironmentName: 'Env_1' is not a valid name: 2-60"),
        ({"acaEnvironmentStorageName": "st"[:1]}, "acaEnvironmentStorageName: 's' is not a valid name: 2-32"),
        ({"acaLogAnalyticsName": "abc"}, "acaLogAnalyticsName: 'abc' is not a valid name: 4-63"),
        ({"maximumInstanceCount": 0}, "maximumInstanceCount: must be an integer >= 1"),
        ({"maximumInstanceCount": "two"}, "maximumInstanceCount: must be an integer >= 1"),
        ({"containerMemory": "220GB"}, "containerMemory: must be a size in Gi"),
        ({"containerCpu": "-1"}, "containerCpu: must be a number of vCPUs above 0 and at most 24"),
        ({"minReplicas": 2, "maxReplicas": 1}, "minReplicas: must not exceed maxReplicas"),
        ({"storageAccessMode": "Write"}, "storageAccessMode: must be one of ReadWrite, ReadOnly"),
        ({"existingResources": "import"}, "existingResources: must be one of adopt, reference"),
        ({"defaultCommands": "cd /mount"}, "defaultCommands: must be a non-empty list of strings"),
        ({"resourceSuffix": "Ab-1"}, "resourceSuffix: 'Ab-1' is not a valid suffix: 1-15 lowercase letters and dig"),
        ({"resourceSuffix": "a" * 16}, "resourceSuffix: '" + "a" * 16 + "' is not a valid suffix"),
    ],
)
def test_invalid_config_fails_before_any_cloud_call(
    in_scratch_dir: Path, config: dict[str, Any], expected: str
) -> None:
    azure = FakeAzure()
    merged = {key: value for key, value in (BASE_CONFIG | config).items() if value is not None}
    with pytest.raises(Exception, match=expected.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        run_program(azure, merged)
    assert azure.lookups == [] and azure.declared == []


def test_resource_suffix_from_the_parameters_file_replaces_the_default_suffix(in_scratch_dir: Path) -> None:
    """The bicep's `resourceSuffix` parameter: names a migrating user's resources got from it are found again."""
    write_parameters(in_scratch_dir, {"resourceSuffix": "team7", "acaAppName": "phi3-chat"})
    azure = FakeAzure()
    run = run_program(azure, BASE_CONFIG)
    assert_names(
        azure,
        {
            "storageAccountName": "aistorageteam7",
            "fileShareName": "aifileshareteam7",
            "acaEnvironmentName": "aienvteam7",
            "acaEnvironmentStorageName": "aienvstorageteam7",
            "acaAppName": "phi3-chat",  # an explicit name still wins
            "acaLogAnalyticsName": "ailogteam7",
        },
    )
    assert azure.one("azure-native:containerregistry:Registry").inputs["registryName"] == "aiacrteam7"
    assert run.outputs["STORAGE_ACCOUNT_NAME"] == "aistorageteam7"
    run_program(azure := FakeAzure(), BASE_CONFIG | {"resourceSuffix": "cfg01"})  # config wins over the file
    assert azure.one("azure-native:storage:StorageAccount").inputs["accountName"] == "aistoragecfg01"


def test_unknown_parameter_in_parameters_file_is_reported(in_scratch_dir: Path) -> None:
    write_parameters(in_scratch_dir, {"storageAccountName": "fromfile01", "acaJobName": "x"})
    azure = FakeAzure()
    with pytest.raises(Exception, match=r"unknown parameter\(s\) acaJobName"):
        run_program(azure, BASE_CONFIG)
    assert azure.declared == []


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "not valid JSON"),
        ('{"storageAccountName": "x"}', "expected an ARM parameters file"),
        ('{"parameters": {"acaAppName": "phi3-chat"}}', 'parameter acaAppName must be an object {"value": ...}'),
    ],
)
def test_malformed_parameters_file_is_reported(in_scratch_dir: Path, content: str, expected: str) -> None:
    path = in_scratch_dir / "infra" / "provision" / "inference.parameters.json"
    path.parent.mkdir(parents=True)
    path.write_text(content, encoding="utf-8")
    azure = FakeAzure()
    with pytest.raises(Exception, match=re.escape(expected)):
        run_program(azure, BASE_CONFIG)
    assert azure.lookups == [] and azure.declared == []


def test_invalid_name_in_parameters_file_names_the_key(in_scratch_dir: Path) -> None:
    write_parameters(in_scratch_dir, {"acaAppName": "Bad_App"})
    with pytest.raises(Exception, match="acaAppName: 'Bad_App' is not a valid name"):
        run_program(FakeAzure(), BASE_CONFIG)


def test_missing_location_for_a_new_group_is_reported(in_scratch_dir: Path) -> None:
    azure = FakeAzure()
    with pytest.raises(Exception, match="location: required because resource group"):
        run_program(azure, {"resourceGroupName": GROUP})
    assert azure.declared == []


def test_outputs(fresh: tuple[FakeAzure, Any]) -> None:
    _, run = fresh
    suffix = default_suffix()
    fqdn = f"aiacaapp{suffix}.bluesky-1a2b3c4d.eastus.azurecontainerapps.io"
    assert run.outputs["endpoint"] == f"https://{fqdn}"
    assert {key: run.outputs[key] for key in toolkit_keys()} == {
        "SUBSCRIPTION_ID": SUBSCRIPTION_ID,
        "RESOURCE_GROUP_NAME": GROUP,
        "STORAGE_ACCOUNT_NAME": f"aistorage{suffix}",
        "FILE_SHARE_NAME": f"aifileshare{suffix}",
        "ACA_APP_NAME": f"aiacaapp{suffix}",
        "ACA_APP_ENDPOINT": fqdn,
    }
    assert run.secret_outputs == {"accessPassword"}  # access: password, the default


def toolkit_keys() -> list[str]:
    return [
        "SUBSCRIPTION_ID",
        "RESOURCE_GROUP_NAME",
        "STORAGE_ACCOUNT_NAME",
        "FILE_SHARE_NAME",
        "ACA_APP_NAME",
        "ACA_APP_ENDPOINT",
    ]


def test_toolkit_config_file_is_written_after_a_deployment(fresh: tuple[FakeAzure, Any], in_scratch_dir: Path) -> None:
    _, run = fresh
    written = json.loads((in_scratch_dir / "infra" / "inference.config.json").read_text(encoding="utf-8"))
    assert written == {key: run.outputs[key] for key in toolkit_keys()}


def test_toolkit_config_file_is_not_written_in_preview(in_scratch_dir: Path) -> None:
    run_program(FakeAzure(), BASE_CONFIG, preview=True)
    assert not (in_scratch_dir / "infra" / "inference.config.json").exists()


def test_secrets_stay_secret(fresh: tuple[FakeAzure, Any]) -> None:
    azure, run = fresh
    assert is_secret(azure.one("azure-native:app:ManagedEnvironmentsStorage").raw_inputs["properties"])
    assert is_secret(azure.one("azure-native:app:ManagedEnvironment").raw_inputs["appLogsConfiguration"])
    assert STORAGE_KEY not in json.dumps(run.outputs) and WORKSPACE_KEY not in json.dumps(run.outputs)


def default_config(tmp_path: Path) -> Any:
    """The program's config when only the required key is set and there is no parameters file."""
    pulumi.runtime.set_all_config({"aitk-inference:resourceGroupName": GROUP})
    try:
        return read_config(pulumi.Config("aitk-inference"), parameters_file=tmp_path / "none.json")
    finally:
        pulumi.runtime.set_all_config({})


def test_pulumi_yaml_declares_every_key_with_the_programs_defaults(tmp_path: Path) -> None:
    project = yaml.safe_load((REPO_ROOT / "Pulumi.yaml").read_text(encoding="utf-8"))
    assert project["runtime"] == {"name": "python", "options": {"toolchain": "pip", "virtualenv": ".venv"}}
    # Adoption imports and updates in one run, which the engine does since 3.174 (pulumi/pulumi#19339).
    assert project["requiredPulumiVersion"] == ">=3.174.0"
    declared = project["config"]
    assert set(declared) == {
        "resourceGroupName",
        "location",
        "resourceSuffix",
        "maximumInstanceCount",
        "defaultCommands",
        *EXPLICIT_NAMES,
        "image",
        "buildPlatform",
        "registryName",
        "registrySku",
        "modelPath",
        "adapterPath",
        "adapters",
        "baseOnly",
        "quantize4bit",
        "dtype",
        "maxConcurrentGenerations",
        "maxGenerationsPerClient",
        "maxRequestBytes",
        "allowedOrigins",
        "modelRevision",
        "gpu",
        "minimumInstanceCount",
        "scaleConcurrentRequests",
        "skipGpuRegionCheck",
        "containerCpu",
        "containerMemory",
        "minReplicas",
        "maxReplicas",
        "access",
        "accessUsername",
        "accessPassword",
        "entraClientId",
        "entraTenantId",
        "entraClientSecret",
        "entraAllowedAudiences",
        "allowedIpRanges",
        "storageAccessMode",
        "existingResources",
    }
    assert all(entry.get("type") and entry.get("description") for entry in declared.values())
    defaults = default_config(tmp_path)
    assert declared["buildPlatform"]["default"] == defaults.image.build_platform
    assert declared["registrySku"]["default"] == defaults.registry_sku
    # No default: unset means "build" (image), "aiacr<s>" (registryName), the app's own default (settings), none,
    # the gpu profile's size (containerCpu/containerMemory), admin or a generated password, not that mode.
    no_default: tuple[str, ...] = ("image", "registryName", "modelPath", "adapterPath", "baseOnly", "quantize4bit")
    no_default += ("dtype",)
    no_default += ("maxConcurrentGenerations", "maxGenerationsPerClient", "maxRequestBytes", "allowedOrigins")
    no_default += ("modelRevision",)
    no_default += ("containerCpu", "containerMemory")
    no_default += ("minimumInstanceCount", "accessUsername", "accessPassword", "allowedIpRanges")
    no_default += ("entraClientId", "entraTenantId", "entraClientSecret", "entraAllowedAudiences")
    for key in no_default:
        assert "default" not in declared[key], key
    assert declared["gpu"]["default"] == defaults.gpu.gpu
    assert declared["scaleConcurrentRequests"]["default"] == defaults.gpu.concurrent_requests
    assert declared["skipGpuRegionCheck"]["default"] is defaults.gpu.skip_region_check
    assert declared["minReplicas"]["default"] == defaults.gpu.min_replicas
    assert declared["maxReplicas"]["default"] == defaults.gpu.max_replicas
    assert declared["access"]["default"] == defaults.access.mode
    assert declared["accessPassword"]["secret"] is True and declared["entraClientSecret"]["secret"] is True
    assert declared["storageAccessMode"]["default"] == defaults.storage_access_mode
    assert declared["existingResources"]["default"] == defaults.existing_resources
    # Keys the parameters file can set must not have a Pulumi.yaml default, or the file could never apply.
    for key in ("location", "resourceSuffix", "maximumInstanceCount", "defaultCommands", *EXPLICIT_NAMES):
        assert "default" not in declared[key], key


def test_example_stack_runs(in_scratch_dir: Path) -> None:
    stack = yaml.safe_load((REPO_ROOT / "Pulumi.dev.yaml").read_text(encoding="utf-8"))["config"]
    azure = FakeAzure()
    run = run_program(azure, {key: str(value) for key, value in stack.items()})
    assert run.outputs["RESOURCE_GROUP_NAME"] == stack["aitk-inference:resourceGroupName"]
    assert azure.one("azure-native:app:ManagedEnvironment").inputs["workloadProfiles"][1]["maximumCount"] == int(
        stack["aitk-inference:maximumInstanceCount"]
    )
