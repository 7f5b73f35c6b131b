"""`gpu` choices, sizing, replica range, scaling (infra/gpu.py) and probes (infra/app.py), checked on what the whole
program (`__main__.py`, under the Azure mocks) gives Azure."""

from pathlib import Path
from typing import Any

import pytest

from inference_app.settings import CONTAINER_TERMINATION_GRACE_S
from infra.app import STARTUP_FAILURE_THRESHOLD, STARTUP_INITIAL_DELAY_S, STARTUP_PERIOD_S
from infra.gpu import PROFILES
from tests.infra.azure_mocks import FakeAzure, run_program
from tests.infra.stacks import GROUP, write_parameters

ENVIRONMENT = "azure-native:app:ManagedEnvironment"
CONTAINER_APP = "azure-native:app:ContainerApp"


@pytest.fixture(autouse=True)
def _scratch(in_scratch_dir: Path) -> None:
    """Every test runs the program in a scratch directory (where a parameters file may be written)."""


def deploy(location: str = "westus3", **values: Any) -> dict[str, dict[str, Any]]:
    """The program in `location` with this stack config: the environment's and the app's inputs, by type."""
    azure = FakeAzure()
    run_program(azure, {"resourceGroupName": GROUP, "location": location} | values)
    return {typ: azure.one(typ).inputs for typ in (ENVIRONMENT, CONTAINER_APP)}


def gpu_profile(resources: dict[str, dict[str, Any]]) -> dict[str, Any]:
    consumption, gpu = resources[ENVIRONMENT]["workloadProfiles"]
    assert consumption == {"name": "Consumption", "workloadProfileType": "Consumption", "enableFips": False}
    return gpu


def container(resources: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (only,) = resources[CONTAINER_APP]["template"]["containers"]
    return only


def scale(resources: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return resources[CONTAINER_APP]["template"]["scale"]


@pytest.mark.parametrize(
    ("choice", "expected_profile", "cpu", "memory"),
    [
        (
            "dedicated-A100",
            {
                "name": "GPU",
                "workloadProfileType": "NC24-A100",
                "minimumCount": 0,
                "maximumCount": 2,
                "enableFips": False,
            },
            24.0,
            "220Gi",
        ),
        (
            "serverless-T4",
            {"name": "GPU-T4", "workloadProfileType": "Consumption-GPU-NC8as-T4", "enableFips": False},
            8.0,
            "56Gi",
        ),
        (
            "serverless-A100",
            {"name": "GPU-A100", "workloadProfileType": "Consumption-GPU-NC24-A100", "enableFips": False},
            24.0,
            "220Gi",
        ),
    ],
)
def test_each_gpu_choice_gives_its_workload_profile_and_sizing(
    choice: str, expected_profile: dict[str, Any], cpu: float, memory: str
) -> None:
    resources = deploy(gpu=choice)

    assert gpu_profile(resources) == expected_profile  # serverless profiles carry no counts at all
    assert resources[CONTAINER_APP]["workloadProfileName"] == expected_profile["name"]
    assert container(resources)["resources"] == {"cpu": cpu, "memory": memory}
    assert (scale(resources)["minReplicas"], scale(resources)["maxReplicas"]) == (1, 1)


def test_default_is_the_bicep_dedicated_a100_with_one_replica() -> None:
    resources = deploy()
    assert gpu_profile(resources) == {
        "name": "GPU",
        "workloadProfileType": "NC24-A100",
        "minimumCount": 0,
        "maximumCount": 2,
        "enableFips": False,
    }
    assert (scale(resources)["minReplicas"], scale(resources)["maxReplicas"]) == (1, 1)
    assert container(resources)["resources"] == {"cpu": 24.0, "memory": "220Gi"}


def test_dedicated_counts_come_from_config_then_the_parameters_file(in_scratch_dir: Path) -> None:
    write_parameters(in_scratch_dir, {"maximumInstanceCount": 5})
    assert gpu_profile(deploy())["maximumCount"] == 5
    assert gpu_profile(deploy(maximumInstanceCount=3, minimumInstanceCount=1)) == {
        "name": "GPU",
        "workloadProfileType": "NC24-A100",
        "minimumCount": 1,
        "maximumCount": 3,
        "enableFips": False,  # the SDK's default
    }


def test_sizing_is_overridable_within_the_profile() -> None:
    resources = deploy(gpu="serverless-T4", containerCpu="4", containerMemory="28Gi")
    assert container(resources)["resources"] == {"cpu": 4.0, "memory": "28Gi"}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"gpu": "serverless-T4", "containerCpu": "24"},
            "containerCpu: must be a number of vCPUs above 0 and at most 8",
        ),
        (
            {"gpu": "serverless-T4", "containerMemory": "220Gi"},
            "containerMemory: must be a size in Gi above 0 and at most 56Gi",
        ),
        ({"containerCpu": "many"}, "containerCpu: must be a number of vCPUs above 0 and at most 24"),
        ({"containerMemory": "220GB"}, "containerMemory: must be a size in Gi"),
    ],
)
def test_sizing_beyond_the_profile_fails(values: dict[str, str], message: str) -> None:
    with pytest.raises(Exception, match=message):
        deploy(**values)


def test_scale_to_zero_is_allowed_on_serverless() -> None:
    resources = deploy("swedencentral", gpu="serverless-A100", minReplicas="0", maxReplicas="3")
    assert (scale(resources)["minReplicas"], scale(resources)["maxReplicas"]) == (0, 3)


def test_scale_to_zero_on_dedicated_with_the_default_minimum_count_of_zero() -> None:
    resources = deploy(minReplicas="0")
    assert (scale(resources)["minReplicas"], gpu_profile(resources)["minimumCount"]) == (0, 0)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"gpu": "dedicated-H100"},
            "gpu: must be one of dedicated-A100, serverless-T4, serverless-A100, got 'dedicated-H100'",
        ),
        (
            {"gpu": "serverless-T4", "maximumInstanceCount": "2"},
            "maximumInstanceCount: serverless GPU profiles .* have no instance counts"
            ".*pulumi config rm maximumInstanceCount",
        ),
        (
            {"gpu": "serverless-A100", "minimumInstanceCount": "0"},
            "minimumInstanceCount: serverless GPU profiles .* have no instance counts",
        ),
        (
            {"minReplicas": "0", "minimumInstanceCount": "1"},
            "minReplicas: 0 on dedicated-A100 needs minimumInstanceCount 0",
        ),
        (
            {"maxReplicas": "3", "maximumInstanceCount": "2"},
            "maxReplicas: 3 replicas need 3 NC24-A100 nodes .* maximumInstanceCount is 2",
        ),
        (
            {"minimumInstanceCount": "3", "maximumInstanceCount": "2"},
            "minimumInstanceCount: must not exceed maximumInstanceCount",
        ),
        ({"minReplicas": "2", "maxReplicas": "1"}, r"minReplicas: must not exceed maxReplicas \(2 > 1\)"),
        ({"minReplicas": "-1"}, "minReplicas: must be an integer >= 0, got '-1'"),
        ({"maxReplicas": "0"}, "maxReplicas: must be an integer >= 1, got '0'"),
        ({"maxReplicas": "two"}, "maxReplicas: must be an integer >= 1, got 'two'"),
        ({"scaleConcurrentRequests": "0"}, "scaleConcurrentRequests: must be an integer >= 1"),
        ({"skipGpuRegionCheck": "yes"}, "skipGpuRegionCheck: must be true or false"),
    ],
)
def test_invalid_combinations_fail_naming_the_key_and_the_rule(values: dict[str, str], message: str) -> None:
    azure = FakeAzure()
    with pytest.raises(Exception, match=message):
        run_program(azure, {"resourceGroupName": GROUP, "location": "westus3"} | values)
    assert azure.lookups == [] and azure.declared == []  # before any cloud call


def test_the_parameters_files_instance_count_is_not_an_error_on_serverless(in_scratch_dir: Path) -> None:
    """The toolkit's parameters file always carries maximumInstanceCount for its dedicated profile."""
    write_parameters(in_scratch_dir, {"maximumInstanceCount": 2})
    profile = gpu_profile(deploy(gpu="serverless-T4"))
    assert "minimumCount" not in profile and "maximumCount" not in profile


@pytest.mark.parametrize(
    ("choice", "location", "offered_in", "hint"),
    [
        (
            "serverless-A100",
            "westeurope",
            "australiaeast, brazilsouth, canadacentral, eastus, italynorth, swedencentral, uksouth, westus, westus3",
            "westeurope offers gpu serverless-T4",
        ),
        ("dedicated-A100", "eastus", "northeurope, westus3", "eastus offers gpu serverless-T4 and serverless-A100"),
        ("serverless-T4", "koreacentral", "australiaeast, brazilsouth, canadacentral, centralindia", None),
    ],
)
def test_a_region_without_the_gpu_fails_naming_the_regions_that_offer_it(
    choice: str, location: str, offered_in: str, hint: str | None
) -> None:
    with pytest.raises(Exception) as error:
        deploy(location, gpu=choice)
    message = str(error.value)
    assert f"gpu: {choice} (" in message
    assert f"is not offered in '{location}'" in message
    assert f"Azure offers it in {offered_in}" in message
    assert "skipGpuRegionCheck" in message
    if hint is not None:
        assert hint in message
    else:
        assert "offers gpu" not in message


def test_region_display_names_are_accepted_and_the_check_can_be_skipped() -> None:
    assert gpu_profile(deploy("West US 3", gpu="serverless-A100"))["name"] == "GPU-A100"
    assert gpu_profile(deploy("koreacentral", gpu="serverless-A100", skipGpuRegionCheck="true"))["name"] == "GPU-A100"


def test_http_concurrency_scale_rule() -> None:
    assert scale(deploy())["rules"] == [
        {"name": "http-concurrency", "http": {"metadata": {"concurrentRequests": "10"}}}
    ]
    rules = scale(deploy("eastus", gpu="serverless-T4", scaleConcurrentRequests="4", maxReplicas="4"))["rules"]
    assert rules == [{"name": "http-concurrency", "http": {"metadata": {"concurrentRequests": "4"}}}]


def test_probes_give_a_cold_start_time_to_serve_and_keep_traffic_away_until_the_model_is_loaded() -> None:
    probes = container(deploy(gpu="serverless-T4", minReplicas="0"))["probes"]
    by_type = {probe["type"]: probe for probe in probes}
    assert set(by_type) == {"Startup", "Readiness", "Liveness"}

    startup = by_type["Startup"]
    assert startup["httpGet"] == {"path": "/health", "port": 7860, "scheme": "HTTP"}
    budget = startup["initialDelaySeconds"] + startup["periodSeconds"] * startup["failureThreshold"]
    assert budget == STARTUP_INITIAL_DELAY_S + STARTUP_PERIOD_S * STARTUP_FAILURE_THRESHOLD >= 300
    # Within what ACA accepts (initial delay <= 60 s, period <= 240 s, failure threshold <= 10).
    assert startup["initialDelaySeconds"] <= 60 and startup["periodSeconds"] <= 240
    assert startup["failureThreshold"] <= 10

    assert by_type["Readiness"]["httpGet"]["path"] == "/ready"  # 503 until the model is loaded
    assert by_type["Liveness"]["httpGet"]["path"] == "/health"


def test_the_container_gets_the_termination_grace_the_app_ends_its_streams_within() -> None:
    """After SIGTERM the platform kills the container at this; the app ends its replies before (see server.py)."""
    template = deploy()[CONTAINER_APP]["template"]
    assert template["terminationGracePeriodSeconds"] == CONTAINER_TERMINATION_GRACE_S


def test_region_tables_hold_what_microsofts_tables_say() -> None:
    """The facts cited in infra/gpu.py: dedicated A100 in West US 3 and North Europe only; serverless GPUs in at
    least the regions every published version of the serverless page lists; T4, not A100, in West Europe."""
    assert PROFILES["dedicated-A100"].regions == {"westus3", "northeurope"}
    for choice in ("serverless-T4", "serverless-A100"):
        assert {"westus3", "australiaeast", "swedencentral"} <= PROFILES[choice].regions
    assert "westeurope" in PROFILES["serverless-T4"].regions and "westeurope" not in PROFILES["serverless-A100"].regions
