"""`gpu` choices, sizing, replica range, scaling and probes (infra/gpu.py), checked on what Azure would receive."""

import json
from collections.abc import Callable, Iterator
from typing import Any

import pulumi
import pytest
from pulumi_azure_native import app

from infra.errors import ConfigError
from infra.gpu import (
    STARTUP_FAILURE_THRESHOLD,
    STARTUP_INITIAL_DELAY_S,
    STARTUP_PERIOD_S,
    GpuConfig,
    probes,
    read_gpu_config,
    require_gpu_region,
    scale_rules,
    workload_profiles,
)

PROJECT = "aitk-inference"


@pytest.fixture(autouse=True)
def _clean_config() -> Iterator[None]:
    yield
    pulumi.runtime.set_all_config({})


def stack_config(**values: Any) -> pulumi.Config:
    pulumi.runtime.set_all_config(
        {f"{PROJECT}:{key}": value if isinstance(value, str) else json.dumps(value) for key, value in values.items()}
    )
    return pulumi.Config(PROJECT)


def read_for(config: pulumi.Config, location: str, *, parameters: dict[str, Any] | None = None) -> GpuConfig:
    """What the program does: read the keys, then check the environment's region."""
    gpu = read_gpu_config(config, parameters=parameters)
    require_gpu_region(gpu, location)
    return gpu


class RecordingMocks(pulumi.runtime.Mocks):
    def __init__(self) -> None:
        self.inputs: dict[str, dict[str, Any]] = {}  # by resource type token

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        self.inputs[args.typ] = args.inputs
        return f"{args.name}-id", dict(args.inputs)

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict[str, Any], list[tuple[str, str]] | None]:
        return {}, [("", f"no invoke expected, got {args.token}")]


def declared(program: Callable[[], None]) -> dict[str, dict[str, Any]]:
    """Run `program` under Pulumi mocks; the inputs each resource type was declared with, as the engine got them."""
    pulumi.runtime.settings.ROOT.set(None)
    mocks = RecordingMocks()
    pulumi.runtime.set_mocks(mocks, project=PROJECT, stack="dev", preview=False)

    @pulumi.runtime.test
    def run() -> None:
        program()

    run()
    return mocks.inputs


def declare_environment_and_app(gpu: GpuConfig) -> dict[str, dict[str, Any]]:
    """An environment and an app sized and scaled as the program does it."""

    def program() -> None:
        app.ManagedEnvironment("environment", resource_group_name="rg", workload_profiles=workload_profiles(gpu))
        app.ContainerApp(
            "app",
            resource_group_name="rg",
            workload_profile_name=gpu.profile.profile_name,
            template=app.TemplateArgs(
                containers=[
                    app.ContainerArgs(
                        name="inference",
                        image="image",
                        resources=app.ContainerResourcesArgs(cpu=gpu.container_cpu, memory=gpu.container_memory),
                        probes=probes(7860),
                    )
                ],
                scale=app.ScaleArgs(
                    min_replicas=gpu.min_replicas, max_replicas=gpu.max_replicas, rules=scale_rules(gpu)
                ),
            ),
        )

    return declared(program)


@pytest.mark.parametrize(
    ("choice", "gpu_profile", "cpu", "memory"),
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
    choice: str, gpu_profile: dict[str, Any], cpu: float, memory: str
) -> None:
    gpu = read_for(stack_config(gpu=choice), "westus3")
    resources = declare_environment_and_app(gpu)

    assert resources["azure-native:app:ManagedEnvironment"]["workloadProfiles"] == [
        {"name": "Consumption", "workloadProfileType": "Consumption", "enableFips": False},
        gpu_profile,  # serverless profiles carry no counts at all
    ]
    container_app = resources["azure-native:app:ContainerApp"]
    assert container_app["workloadProfileName"] == gpu_profile["name"]
    assert container_app["template"]["containers"][0]["resources"] == {"cpu": cpu, "memory": memory}
    assert container_app["template"]["scale"]["minReplicas"] == 1
    assert container_app["template"]["scale"]["maxReplicas"] == 1


def test_default_is_the_bicep_dedicated_a100_with_one_replica() -> None:
    gpu = read_for(stack_config(), "westus3")
    assert (gpu.gpu, gpu.profile.profile_type, gpu.profile.profile_name) == ("dedicated-A100", "NC24-A100", "GPU")
    assert (gpu.min_replicas, gpu.max_replicas) == (1, 1)
    assert (gpu.minimum_instance_count, gpu.maximum_instance_count) == (0, 2)
    assert (gpu.container_cpu, gpu.container_memory) == (24.0, "220Gi")


def test_dedicated_counts_come_from_config_then_the_parameters_file() -> None:
    from_file = read_for(stack_config(), "westus3", parameters={"maximumInstanceCount": 5})
    assert from_file.maximum_instance_count == 5
    from_config = read_for(
        stack_config(maximumInstanceCount=3, minimumInstanceCount=1), "westus3", parameters={"maximumInstanceCount": 5}
    )
    assert (from_config.minimum_instance_count, from_config.maximum_instance_count) == (1, 3)
    resources = declare_environment_and_app(from_config)
    assert resources["azure-native:app:ManagedEnvironment"]["workloadProfiles"][1] == {
        "name": "GPU",
        "workloadProfileType": "NC24-A100",
        "minimumCount": 1,
        "maximumCount": 3,
        "enableFips": False,  # the SDK's default
    }


def test_sizing_is_overridable_within_the_profile() -> None:
    gpu = read_for(stack_config(gpu="serverless-T4", containerCpu="4", containerMemory="28Gi"), "westus3")
    assert (gpu.container_cpu, gpu.container_memory) == (4.0, "28Gi")
    resources = declare_environment_and_app(gpu)
    assert resources["azure-native:app:ContainerApp"]["template"]["containers"][0]["resources"] == {
        "cpu": 4.0,
        "memory": "28Gi",
    }


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
    with pytest.raises(ConfigError, match=message):
        read_for(stack_config(**values), "westus3")


def test_scale_to_zero_is_allowed_on_serverless() -> None:
    gpu = read_for(stack_config(gpu="serverless-A100", minReplicas="0", maxReplicas="3"), "swedencentral")
    resources = declare_environment_and_app(gpu)
    assert resources["azure-native:app:ContainerApp"]["template"]["scale"]["minReplicas"] == 0
    assert resources["azure-native:app:ContainerApp"]["template"]["scale"]["maxReplicas"] == 3


def test_scale_to_zero_on_dedicated_with_the_default_minimum_count_of_zero() -> None:
    gpu = read_for(stack_config(minReplicas="0"), "westus3")
    assert (gpu.min_replicas, gpu.minimum_instance_count) == (0, 0)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"gpu": "dedicated-H100"},
            "gpu: must be one of dedicated-A100, serverless-T4, serverless-A100, got 'dedicated-H100'",
        ),
        (
            {"gpu": "serverless-T4", "maximumInstanceCount": "2"},
            "maximumInstanceCount: serverless GPU profiles .* have no instance counts.*pulumi config rm maximumInstanceCount",
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
    with pytest.raises(ConfigError, match=message):
        read_for(stack_config(**values), "westus3")


def test_the_parameters_files_instance_count_is_not_an_error_on_serverless() -> None:
    """The toolkit's parameters file always carries maximumInstanceCount for its dedicated profile."""
    gpu = read_for(stack_config(gpu="serverless-T4"), "westus3", parameters={"maximumInstanceCount": 2})
    assert (gpu.minimum_instance_count, gpu.maximum_instance_count) == (None, None)


@pytest.mark.parametrize(
    ("choice", "location", "offered_in", "hint"),
    [
        (
            "serverless-A100",
            "westeurope",
            "australiaeast, brazilsouth, canadacentral, eastus, italynorth, swedencentral, westus, westus3",
            "westeurope offers gpu serverless-T4",
        ),
        ("dedicated-A100", "eastus", "northeurope, westus3", "eastus offers gpu serverless-T4 and serverless-A100"),
        ("serverless-T4", "uksouth", "australiaeast, brazilsouth, canadacentral, centralindia", None),
    ],
)
def test_a_region_without_the_gpu_fails_naming_the_regions_that_offer_it(
    choice: str, location: str, offered_in: str, hint: str | None
) -> None:
    with pytest.raises(ConfigError) as error:
        read_for(stack_config(gpu=choice), location)
    message = str(error.value)
    assert message.startswith(f"gpu: {choice} (")
    assert f"is not offered in '{location}'" in message
    assert f"Azure offers it in {offered_in}" in message
    assert "skipGpuRegionCheck" in message
    if hint is not None:
        assert hint in message
    else:
        assert "offers gpu" not in message


def test_region_display_names_are_accepted_and_the_check_can_be_skipped() -> None:
    assert read_for(stack_config(gpu="serverless-A100"), "West US 3").gpu == "serverless-A100"
    assert read_for(stack_config(gpu="serverless-A100", skipGpuRegionCheck="true"), "uksouth").gpu == (
        "serverless-A100"
    )


def test_http_concurrency_scale_rule() -> None:
    default = declare_environment_and_app(read_for(stack_config(), "westus3"))
    assert default["azure-native:app:ContainerApp"]["template"]["scale"]["rules"] == [
        {"name": "http-concurrency", "http": {"metadata": {"concurrentRequests": "10"}}}
    ]
    gpu = read_for(stack_config(gpu="serverless-T4", scaleConcurrentRequests="4", maxReplicas="4"), "eastus")
    rules = declare_environment_and_app(gpu)["azure-native:app:ContainerApp"]["template"]["scale"]["rules"]
    assert rules == [{"name": "http-concurrency", "http": {"metadata": {"concurrentRequests": "4"}}}]


def test_probes_give_a_cold_start_time_to_serve_and_keep_traffic_away_until_the_model_is_loaded() -> None:
    gpu = read_for(stack_config(gpu="serverless-T4", minReplicas="0"), "westus3")
    container = declare_environment_and_app(gpu)["azure-native:app:ContainerApp"]["template"]["containers"][0]
    by_type = {probe["type"]: probe for probe in container["probes"]}
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
