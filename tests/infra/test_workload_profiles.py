"""An existing environment's GPU workload profile. A dedicated GPU profile can only be
configured when an environment is created, serverless ones can be added later (except serverless T4 in West
Europe); the configured instance counts apply to the profile this stack created or adopted, and `maxReplicas` is
checked against the maximum the profile keeps. All decided before anything is declared."""

import logging
from pathlib import Path
from typing import Any

import pytest

from tests.infra.azure_mocks import FakeAzure, ProgramRun, environment_id, run_program
from tests.infra.stacks import APP, ENVIRONMENT, GROUP, TYPES, add_fine_tuning_layout, write_parameters

CONFIG = {"resourceGroupName": GROUP}
CONSUMPTION = {"name": "Consumption", "workloadProfileType": "Consumption", "enableFips": False}
GENERAL = {"name": "general", "workloadProfileType": "D4", "minimumCount": 1, "maximumCount": 3, "enableFips": False}


def a100(name: str = "GPU", minimum: int = 0, maximum: int = 1) -> dict[str, Any]:
    """A dedicated NC24-A100 profile as Azure's GET answers it."""
    return {
        "name": name,
        "workloadProfileType": "NC24-A100",
        "minimumCount": minimum,
        "maximumCount": maximum,
        "enableFips": False,
    }


def run_on(profiles: list[dict[str, Any]], config: dict[str, Any], **layout: Any) -> tuple[FakeAzure, ProgramRun]:
    azure = FakeAzure()
    add_fine_tuning_layout(azure, profiles=profiles, **layout)
    return azure, run_program(azure, CONFIG | config)


def declared_profiles(azure: FakeAzure) -> list[dict[str, Any]]:
    return azure.one(TYPES["environment"]).inputs["workloadProfiles"]


# -- a missing GPU profile -------------------------------------------------------------------------------------------
def test_a_dedicated_profile_is_not_added_to_an_existing_environment(in_scratch_dir: Path) -> None:
    azure = FakeAzure()
    add_fine_tuning_layout(azure, profiles=[CONSUMPTION, GENERAL])
    with pytest.raises(
        Exception,
        match=rf"gpu: dedicated-A100 needs an NC24-A100 workload profile, which Azure only adds when an environment "
        rf"is created, and Container Apps environment '{ENVIRONMENT}' has none \(its profiles: Consumption "
        r"\(Consumption\), general \(D4\)\).*`pulumi config set gpu serverless-A100`.*"
        r"`pulumi config set acaEnvironmentName <new name>`",
    ):
        run_program(azure, CONFIG)
    assert azure.declared == []  # refused up front, not by Azure halfway through


@pytest.mark.parametrize(
    ("gpu", "location", "added"),
    [
        ("serverless-A100", "westus3", {"name": "GPU-A100", "workloadProfileType": "Consumption-GPU-NC24-A100"}),
        ("serverless-T4", "eastus", {"name": "GPU-T4", "workloadProfileType": "Consumption-GPU-NC8as-T4"}),
    ],
)
def test_a_serverless_profile_is_added_and_the_app_created_in_the_same_run(
    in_scratch_dir: Path, gpu: str, location: str, added: dict[str, Any]
) -> None:
    azure, run = run_on([CONSUMPTION, GENERAL], {"gpu": gpu}, location=location)
    environment = azure.one(TYPES["environment"])
    assert environment.import_id == environment_id(GROUP, ENVIRONMENT)
    assert declared_profiles(azure) == [CONSUMPTION, GENERAL, added | {"enableFips": False}]
    assert azure.one(TYPES["containerApp"]).inputs["workloadProfileName"] == added["name"]
    assert run.outputs["endpoint"].startswith(f"https://{APP}.")


def test_serverless_t4_is_not_added_to_an_existing_environment_in_west_europe(in_scratch_dir: Path) -> None:
    azure = FakeAzure()
    add_fine_tuning_layout(azure, profiles=[CONSUMPTION], location="westeurope")
    with pytest.raises(
        Exception, match=f"gpu: serverless-T4 cannot be added to the existing environment '{ENVIRONMENT}' in West Eur"
    ):
        run_program(azure, CONFIG | {"gpu": "serverless-T4"})
    assert azure.declared == []


def test_a_consumption_only_environment_is_refused_naming_the_key(in_scratch_dir: Path) -> None:
    """Azure's GET answer of a Consumption-only environment has no workloadProfiles key at all."""
    azure = FakeAzure()
    add_fine_tuning_layout(azure, profiles=[])
    del azure.existing[environment_id(GROUP, ENVIRONMENT).lower()]["workloadProfiles"]
    with pytest.raises(Exception, match=f"acaEnvironmentName: Container Apps environment '{ENVIRONMENT}' is a Cons"):
        run_program(azure, CONFIG | {"gpu": "serverless-A100"})
    assert azure.declared == []


def test_reference_mode_without_gpu_profile_says_what_to_do(in_scratch_dir: Path) -> None:
    azure = FakeAzure()
    add_fine_tuning_layout(azure, profiles=[{"name": "Consumption", "workloadProfileType": "Consumption"}])
    with pytest.raises(Exception, match="has no GPU workload profile.*existingResources adopt"):
        run_program(azure, CONFIG | {"existingResources": "reference"})
    assert azure.declared == []


def test_a_gpu_profile_name_taken_by_another_type_is_refused(in_scratch_dir: Path) -> None:
    azure = FakeAzure()
    add_fine_tuning_layout(azure, profiles=[CONSUMPTION, GENERAL | {"name": "GPU-A100"}])
    with pytest.raises(Exception, match="gpu: .* has a workload profile named 'GPU-A100' of type D4"):
        run_program(azure, CONFIG | {"gpu": "serverless-A100"})


# -- an existing GPU profile: instance counts --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("live", "config", "expected"),
    [
        # Unset counts keep what the adopted profile has (adoption adds, it does not shrink)...
        (a100("a100", 0, 4), {"maxReplicas": 3}, a100("a100", 0, 4)),
        (a100("GPU", 1, 1), {}, a100("GPU", 1, 1)),
        # ...set ones are applied: lowering the minimum to 0 stops paying for an idle node, raising the maximum
        # lets more replicas be scheduled.
        (a100("GPU", 1, 1), {"minimumInstanceCount": 0}, a100("GPU", 0, 1)),
        (a100("GPU", 0, 1), {"maximumInstanceCount": 3, "maxReplicas": 3}, a100("GPU", 0, 3)),
        (a100("a100", 1, 4), {"minimumInstanceCount": 0, "maximumInstanceCount": 2}, a100("a100", 0, 2)),
    ],
)
def test_configured_counts_apply_to_the_adopted_gpu_profile(
    in_scratch_dir: Path, live: dict[str, Any], config: dict[str, Any], expected: dict[str, Any]
) -> None:
    azure, _ = run_on([CONSUMPTION, live], config)
    assert declared_profiles(azure) == [CONSUMPTION, expected]
    assert azure.one(TYPES["containerApp"]).inputs["workloadProfileName"] == live["name"]


def test_the_parameters_files_count_applies_too(in_scratch_dir: Path) -> None:
    write_parameters(in_scratch_dir, {"maximumInstanceCount": 3})
    azure, _ = run_on([CONSUMPTION, a100("GPU", 0, 1)], {})
    assert declared_profiles(azure) == [CONSUMPTION, a100("GPU", 0, 3)]


def test_counts_apply_to_the_profile_of_an_environment_this_stack_created(in_scratch_dir: Path) -> None:
    """A later run of the stack that created the environment: every count is the program's (defaults included)."""
    first_azure = FakeAzure()
    first = run_program(first_azure, CONFIG | {"location": "westus3", "maximumInstanceCount": 4})
    created = first_azure.one(TYPES["environment"])
    second_azure = FakeAzure(previous_outputs={"adoption": first.outputs["adoption"]})
    second_azure.add(first.outputs["adoption"]["resourceGroup"]["id"], {"location": "westus3"})
    second_azure.add(created.state["id"], {k: v for k, v in created.state.items() if k != "id"})
    run_program(second_azure, CONFIG)  # maximumInstanceCount back to its default, 2
    assert declared_profiles(second_azure) == [CONSUMPTION, a100("GPU", 0, 2)]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"maxReplicas": 2},
            rf"maxReplicas: 2 replicas need 2 NC24-A100 nodes \(one GPU each\), but the GPU profile 'GPU' of "
            rf"environment '{ENVIRONMENT}' has a maximum of 1; raise maximumInstanceCount or lower maxReplicas",
        ),
        (
            {"maxReplicas": 2, "existingResources": "reference"},
            r"maxReplicas: 2 replicas need 2 NC24-A100 nodes .* has a maximum of 1; lower maxReplicas$",
        ),
    ],
)
def test_max_replicas_is_checked_against_the_maximum_the_profile_keeps(
    in_scratch_dir: Path, config: dict[str, Any], message: str
) -> None:
    azure = FakeAzure()
    add_fine_tuning_layout(azure, profiles=[CONSUMPTION, a100("GPU", 0, 1)])
    with pytest.raises(Exception, match=message):
        run_program(azure, CONFIG | config)
    assert azure.declared == []


def test_reference_mode_says_configured_counts_are_not_applied(
    in_scratch_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    azure, _ = run_on([CONSUMPTION, a100("GPU", 0, 1)], {"existingResources": "reference", "minimumInstanceCount": 0})
    assert azure.by_type(TYPES["environment"]) == []
    assert any(
        message.startswith("minimumInstanceCount: not applied, existingResources is 'reference'")
        and "keeps its instance counts (0-1)" in message
        for message in caplog.messages
    )


def test_a_new_environment_checks_max_replicas_against_the_default_maximum(in_scratch_dir: Path) -> None:
    azure = FakeAzure()
    with pytest.raises(Exception, match=r"maxReplicas: 3 replicas need 3 NC24-A100 nodes .* maximumInstanceCount is 2"):
        run_program(azure, CONFIG | {"location": "westus3", "maxReplicas": 3})
    assert azure.declared == []
