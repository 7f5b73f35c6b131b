"""Issue 18: the Azure double refuses what Azure and the engine refuse (a replacing import), and the real-`pulumi up`
defects it exposed: adopting the toolkit's app, a re-run after a failed run, the group's spelling, mirrored
identities, unregistered providers, a dedicated GPU profile without a spare node."""

import logging
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from tests.infra.azure_mocks import (
    CREATE_ONLY,
    IMPORT_REFUSED,
    FakeAzure,
    ProgramRun,
    container_app_id,
    environment_id,
    group_id,
    identity_id,
    import_replacements,
    registry_id,
    run_program,
    storage_account_id,
    workspace_id,
)
from tests.infra.stacks import (
    APP,
    ENVIRONMENT,
    GROUP,
    LOCATION,
    SUFFIX,
    TYPES,
    add_fine_tuning_layout,
    add_toolkit_app,
    default_suffix,
)

CONFIG = {"resourceGroupName": GROUP}
OWN_TAGS = {"pulumi-project": "aitk-inference", "pulumi-stack": "dev"}


def statuses(run: ProgramRun) -> dict[str, str]:
    return {key: entry["status"] for key, entry in run.outputs["adoption"].items()}


# -- the double ------------------------------------------------------------------------------------------------------
def test_every_declared_type_has_its_create_only_properties_and_their_source(in_scratch_dir: Path) -> None:
    azure = FakeAzure()
    run_program(azure, CONFIG | {"location": LOCATION})
    declared = {d.typ for d in azure.declared if d.typ.startswith("azure-native:")}
    assert declared <= set(CREATE_ONLY)
    assert all(entry.source for entry in CREATE_ONLY.values())


def test_a_create_only_property_that_differs_or_is_missing_or_a_path_in_another_case_is_a_replacement() -> None:
    app_type = "azure-native:app:ContainerApp"
    app_id = container_app_id(GROUP, APP)
    env = environment_id(GROUP, ENVIRONMENT)
    body = {"location": "West US 3", "environmentId": env, "managedEnvironmentId": env}
    inputs = {"resourceGroupName": GROUP, "containerAppName": APP, "location": "westus3"}
    assert (
        import_replacements(app_type, app_id, inputs | {"environmentId": env, "managedEnvironmentId": env}, body) == []
    )
    assert import_replacements(app_type, app_id, inputs | {"managedEnvironmentId": env}, body) == [
        f"environmentId {env!r} (in Azure) -> None"
    ]
    assert import_replacements(
        "azure-native:resources:ResourceGroup", group_id("rg-phi3"), {"resourceGroupName": "rg-Phi3"}, {}
    ) == ["resourceGroupName 'rg-phi3' (from the id) -> 'rg-Phi3'"]


def test_the_double_raises_the_engines_error_in_up_and_warns_in_preview() -> None:
    azure = FakeAzure()
    refused: tuple[str, str, str, dict[str, str], dict[str, str]] = (
        "azure-native:resources:ResourceGroup",
        "group",
        group_id("rg-phi3"),
        {"resourceGroupName": "RG"},
        {},
    )
    with mock.patch("pulumi.runtime.is_dry_run", return_value=False), pytest.raises(Exception, match=IMPORT_REFUSED):
        azure.refuse_a_replacing_import(*refused)
    with mock.patch("pulumi.runtime.is_dry_run", return_value=True):
        azure.refuse_a_replacing_import(*refused)
    assert len(azure.preview_warnings) == 1 and IMPORT_REFUSED in azure.preview_warnings[0]


# -- 1. the toolkit's app is adopted in one run ----------------------------------------------------------------------
@pytest.mark.parametrize("preview", [True, False])
def test_the_toolkits_bicep_deployed_app_is_adopted_in_one_run(in_scratch_dir: Path, preview: bool) -> None:
    azure = FakeAzure()
    add_fine_tuning_layout(azure)
    add_toolkit_app(azure)
    run = run_program(azure, CONFIG, preview=preview)  # raises in `up` if any import would replace
    assert azure.preview_warnings == []
    app = azure.one(TYPES["containerApp"])
    assert app.import_id == container_app_id(GROUP, APP)
    # Both create-only environment ids, as the bicep's app has them.
    assert app.inputs["environmentId"] == app.inputs["managedEnvironmentId"] == environment_id(GROUP, ENVIRONMENT)
    if not preview:
        assert statuses(run)["containerApp"] == "adopted"


# -- 2. a failed first run -------------------------------------------------------------------------------------------
def test_a_rerun_after_a_failed_first_run_keeps_what_the_stack_created_as_its_own(in_scratch_dir: Path) -> None:
    """A failed `pulumi up` (GPU quota, typically) keeps in the state what it created but saves no outputs, so no
    `adoption` record: the tags say whose the resources are."""
    first_azure = FakeAzure()
    first = run_program(first_azure, CONFIG | {"location": LOCATION})
    in_state = {d.state["id"].lower() for d in first_azure.declared}
    second_azure = first_azure.after(previous_outputs={}, in_state=in_state)
    second = run_program(second_azure, CONFIG | {"location": LOCATION})

    assert statuses(second) == statuses(first) == {key: "created" for key in statuses(first)}
    retained = {typ for typ, options in second.options.items() if options.retain_on_delete}
    # `pulumi destroy` removes what the stack created, as after a run that succeeded.
    assert retained == {typ for typ, options in first.options.items() if options.retain_on_delete}
    assert TYPES["containerRegistry"] not in retained and TYPES["environment"] not in retained
    assert second_azure.by_type("time:index/sleep:Sleep")  # the AcrPull wait is kept
    first_inputs = {d.typ: d.inputs for d in first_azure.declared}
    for declared in second_azure.declared:  # declared as created, not mirrored from Azure
        # (the role assignment now names the GUID azure-native generated for it, which the state's inputs hold)
        inputs = {key: value for key, value in declared.inputs.items() if key != "roleAssignmentName"}
        assert inputs == first_inputs[declared.typ], declared.typ
    for typ in ("containerRegistry", "environment", "logAnalyticsWorkspace", "storageAccount", "containerApp"):
        assert second_azure.one(TYPES[typ]).inputs["tags"] == OWN_TAGS


def test_resources_of_another_stack_are_still_adopted(in_scratch_dir: Path) -> None:
    first_azure = FakeAzure()
    run_program(first_azure, CONFIG | {"location": LOCATION})
    other = first_azure.after()
    for found in other.existing.values():
        if "tags" in found:
            found["tags"] = found["tags"] | {"pulumi-stack": "prod"}
    run = run_program(other, CONFIG | {"location": LOCATION})
    assert statuses(run)["containerRegistry"] == statuses(run)["environment"] == "adopted"


# -- 3. the group's spelling -----------------------------------------------------------------------------------------
def test_a_group_configured_in_another_case_is_adopted_with_azures_spelling(in_scratch_dir: Path) -> None:
    azure = FakeAzure()
    suffix = default_suffix("rg-phi3")
    add_fine_tuning_layout(
        azure,
        group="rg-phi3",
        account=f"aistorage{suffix}",
        share=f"aifileshare{suffix}",
        environment=f"aienv{suffix}",
        environment_storage=f"aienvstorage{suffix}",
        workspace=f"ailog{suffix}",
    )
    run = run_program(azure, {"resourceGroupName": "rg-Phi3"})  # raises if any import would replace
    declared_groups = {d.inputs["resourceGroupName"] for d in azure.declared if "resourceGroupName" in d.inputs}
    assert declared_groups == {"rg-phi3"}
    assert run.outputs["RESOURCE_GROUP_NAME"] == "rg-phi3"
    assert statuses(run)["environment"] == "adopted"


# -- 4. mirrored identities ------------------------------------------------------------------------------------------
USER_IDENTITY = identity_id(GROUP, "team-identity")
ARM_IDENTITY = {
    "type": "UserAssigned",
    "userAssignedIdentities": {USER_IDENTITY: {"principalId": "p-1", "clientId": "c-1"}},
}


AS_IDS = [USER_IDENTITY]  # what most SDK inputs take
AS_MAP = ARM_IDENTITY["userAssignedIdentities"]  # what the registry's takes


@pytest.mark.parametrize(
    ("key", "resource_id", "body", "declared"),
    [
        ("storageAccount", storage_account_id(GROUP, f"aistorage{SUFFIX}"), None, AS_IDS),
        ("logAnalyticsWorkspace", workspace_id(GROUP, f"ailog{SUFFIX}"), None, AS_IDS),
        ("environment", environment_id(GROUP, ENVIRONMENT), None, AS_IDS),
        (
            "containerRegistry",
            registry_id(GROUP, f"aiacr{SUFFIX}"),
            {"location": LOCATION, "sku": {"name": "Basic"}, "loginServer": f"aiacr{SUFFIX}.azurecr.io"},
            AS_MAP,
        ),
    ],
)
def test_mirrored_user_assigned_identities_take_the_shape_of_the_sdks_input(
    in_scratch_dir: Path, key: str, resource_id: str, body: dict[str, Any] | None, declared: Any
) -> None:
    azure = FakeAzure()
    add_fine_tuning_layout(azure)
    if body is not None:
        azure.add(resource_id, body)
    azure.existing[resource_id.lower()]["identity"] = ARM_IDENTITY
    run_program(azure, CONFIG)
    identity = azure.one(TYPES[key]).inputs["identity"]
    assert identity == {"type": "UserAssigned", "userAssignedIdentities": declared}


# -- 6. no spare GPU node --------------------------------------------------------------------------------------------
def test_replicas_filling_every_dedicated_node_warn_with_the_fix(
    in_scratch_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    run_program(FakeAzure(), CONFIG | {"location": LOCATION})  # defaults: 1 replica, 2 nodes
    assert "no node for a new revision" not in caplog.text
    run_program(FakeAzure(), CONFIG | {"location": LOCATION, "maxReplicas": 2, "maximumInstanceCount": 2})
    assert "no node for a new revision" in caplog.text
    assert "pulumi config set maximumInstanceCount 3" in caplog.text


def test_an_adopted_profile_without_a_spare_node_warns_too(
    in_scratch_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    azure = FakeAzure()
    add_fine_tuning_layout(azure)  # its GPU profile has at most 1 node
    run_program(azure, CONFIG)
    assert "maxReplicas: 1 replicas can fill all 1 NC24-A100 nodes" in caplog.text


# -- 7. unregistered resource providers ------------------------------------------------------------------------------
def test_an_unregistered_provider_is_named_with_the_command_that_registers_it(in_scratch_dir: Path) -> None:
    azure = FakeAzure(unregistered={"Microsoft.App"})
    add_fine_tuning_layout(azure)
    with pytest.raises(
        Exception, match=r"resource provider Microsoft\.App: .*az provider register --namespace Microsoft\.App"
    ):
        run_program(azure, CONFIG)
    assert azure.declared == []


def test_an_unregistered_provider_stops_the_global_name_check_too(in_scratch_dir: Path) -> None:
    """In a new group nothing is looked up; the storage account's name check is the first call to Microsoft.Storage."""
    azure = FakeAzure(unregistered={"Microsoft.Storage"})
    with pytest.raises(Exception, match=r"az provider register --namespace Microsoft\.Storage"):
        run_program(azure, CONFIG | {"location": LOCATION})
    assert azure.declared == []
