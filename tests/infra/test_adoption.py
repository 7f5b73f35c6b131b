"""Existing Azure resources are adopted by name (imported with their Azure ids, retained on delete), missing ones
are created, `reference` mode only reads, and a second run never imports again."""

import json
import logging
from pathlib import Path
from typing import Any, cast

import pytest

from tests.infra.azure_mocks import (
    SUBSCRIPTION_ID,
    FakeAzure,
    ProgramRun,
    azure_error,
    container_app_id,
    environment_id,
    environment_storage_id,
    file_service_id,
    file_share_id,
    forbidden,
    group_id,
    is_secret,
    run_program,
    storage_account_id,
    workspace_id,
)
from tests.infra.stacks import (
    ACCOUNT,
    APP,
    ENV_STORAGE,
    ENVIRONMENT,
    FINE_TUNING_IDS,
    GROUP,
    LOCATION,
    SHARE,
    SUFFIX,
    TYPES,
    WORKSPACE,
    WORKSPACE_CUSTOMER_ID,
    add_fine_tuning_layout,
    default_suffix,
    gpu_profiles,
    write_parameters,
)

CONFIG = {"resourceGroupName": GROUP}


def statuses(run: ProgramRun) -> dict[str, str]:
    return {key: entry["status"] for key, entry in run.outputs["adoption"].items()}


def test_nothing_exists_everything_is_created(in_scratch_dir: Path) -> None:
    azure = FakeAzure()
    run = run_program(azure, CONFIG | {"location": LOCATION})
    assert set(statuses(run).values()) == {"created"}
    assert all(declared.import_id is None for declared in azure.declared)
    assert {declared.typ for declared in azure.declared} >= set(TYPES.values())
    retained = {typ for typ, options in run.options.items() if options.retain_on_delete}
    # What holds data is never deleted: the group (deleting it deletes its contents), the account, the share.
    assert retained == {TYPES["resourceGroup"], TYPES["storageAccount"], TYPES["fileService"], TYPES["fileShare"]}
    assert run.options[TYPES["fileShare"]].protect is True


def test_fine_tuning_layout_is_adopted_and_only_the_app_is_created(
    in_scratch_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    azure = FakeAzure()
    add_fine_tuning_layout(azure)
    run = run_program(azure, CONFIG | {"location": "westus3"})  # a region for new resources only

    for key, resource_id in FINE_TUNING_IDS.items():
        declared = azure.one(TYPES[key])
        assert declared.import_id == resource_id, key
        assert run.options[TYPES[key]].retain_on_delete is True, key
        assert run.outputs["adoption"][key] == {"status": "adopted", "id": resource_id}
    app = azure.one(TYPES["containerApp"])
    assert app.import_id is None and run.outputs["adoption"]["containerApp"]["status"] == "created"
    assert not run.options[TYPES["containerApp"]].retain_on_delete
    assert run.options[TYPES["fileShare"]].protect is True
    # The app runs on the fine-tuning environment, in its region, on its GPU profile and its share.
    assert app.inputs["managedEnvironmentId"] == environment_id(GROUP, ENVIRONMENT)
    assert app.inputs["location"] == LOCATION
    assert app.inputs["workloadProfileName"] == "GPU"
    assert app.inputs["template"]["volumes"][0]["storageName"] == ENV_STORAGE
    for key in FINE_TUNING_IDS:
        assert any(
            f"{key} " in line and "adopted (imported on this run, with this program's settings)" in line
            for line in caplog.messages
        ), key
    assert any(f"containerApp {APP}: created" in line for line in caplog.messages)
    assert "once more" not in caplog.text and "next `pulumi up`" not in caplog.text  # one run does it all


def test_the_import_run_declares_this_programs_settings_and_keeps_the_rest(in_scratch_dir: Path) -> None:
    """Since Pulumi 3.174 an import whose inputs differ is imported and updated in the same run
    (requiredPulumiVersion): the import run declares the desired state; what the program does not own stays as
    Azure has it."""
    azure = FakeAzure()
    add_fine_tuning_layout(azure)
    run_program(azure, CONFIG)
    account = azure.one(TYPES["storageAccount"]).inputs
    assert account["minimumTlsVersion"] == "TLS1_2"  # this program's, on the import run itself (Azure has TLS1_0)
    assert account["sku"] == {"name": "Standard_LRS"}  # read-only "tier" dropped
    assert account["accessTier"] == "Hot"
    assert account["encryption"] == {
        "keySource": "Microsoft.Storage",
        "services": {"file": {"enabled": True, "keyType": "Account"}},
    }
    assert "primaryEndpoints" not in account and "provisioningState" not in account
    assert azure.one(TYPES["resourceGroup"]).inputs == {
        "resourceGroupName": GROUP,
        "location": LOCATION,
        "tags": {"owner": "ml-team"},
    }
    assert azure.one(TYPES["fileShare"]).inputs["shareQuota"] == 1024
    assert azure.one(TYPES["fileShare"]).inputs["accessTier"] == "TransactionOptimized"
    workspace = azure.one(TYPES["logAnalyticsWorkspace"]).inputs
    assert workspace["sku"] == {"name": "PerGB2018"} and workspace["retentionInDays"] == 30
    environment = azure.one(TYPES["environment"]).inputs
    assert environment["workloadProfiles"] == gpu_profiles()
    assert environment["appLogsConfiguration"]["logAnalyticsConfiguration"]["customerId"] == WORKSPACE_CUSTOMER_ID
    assert "staticIp" not in environment and "defaultDomain" not in environment
    env_storage = azure.one(TYPES["environmentStorage"]).inputs
    assert env_storage["properties"]["azureFile"]["accessMode"] == "ReadWrite"


def previous_run_outputs(run: ProgramRun) -> dict[str, Any]:
    return {"adoption": run.outputs["adoption"]}


def test_second_run_does_not_import_again_and_applies_owned_properties(
    in_scratch_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first_azure = FakeAzure()
    add_fine_tuning_layout(first_azure)
    first = run_program(first_azure, CONFIG)

    caplog.set_level(logging.INFO)
    caplog.clear()
    second_azure = FakeAzure(existing=first_azure.existing, previous_outputs=previous_run_outputs(first))
    second = run_program(second_azure, CONFIG)
    assert all(declared.import_id is None for declared in second_azure.declared)
    assert "once more" not in caplog.text and f"storageAccount {ACCOUNT}: adopted" in caplog.text
    assert statuses(second) == statuses(first)
    for key in FINE_TUNING_IDS:
        assert second.options[TYPES[key]].retain_on_delete is True, key
    # Now an ordinary update: the properties this program owns take their declared values.
    assert second_azure.one(TYPES["storageAccount"]).inputs["minimumTlsVersion"] == "TLS1_2"


def test_running_twice_after_creating_everything_imports_nothing(in_scratch_dir: Path) -> None:
    first_azure = FakeAzure()
    first = run_program(first_azure, CONFIG | {"location": LOCATION})
    # Azure now holds what the first run created.
    second_azure = FakeAzure(previous_outputs=previous_run_outputs(first))
    for declared in first_azure.declared:
        if declared.typ in TYPES.values():
            second_azure.add(
                first.outputs["adoption"][next(k for k, t in TYPES.items() if t == declared.typ)]["id"],
                {key: value for key, value in declared.state.items() if key != "id"},
            )
    second = run_program(second_azure, CONFIG | {"location": LOCATION})
    assert all(declared.import_id is None for declared in second_azure.declared)
    assert set(statuses(second).values()) == {"created"}
    assert not second.options[TYPES["containerApp"]].retain_on_delete  # destroy still removes what it created
    first_inputs = {d.typ: d.inputs for d in first_azure.declared}
    second_inputs = {d.typ: d.inputs for d in second_azure.declared}
    assert second_inputs[TYPES["containerApp"]] == first_inputs[TYPES["containerApp"]]  # no diff
    assert second_inputs[TYPES["environment"]] == first_inputs[TYPES["environment"]]
    sleep = "time:index/sleep:Sleep"  # the AcrPull propagation wait: unchanged, so not waited for again
    assert second_inputs[sleep] == first_inputs[sleep]


def test_custom_names_from_parameters_file_mix_adopted_and_created(in_scratch_dir: Path) -> None:
    write_parameters(
        in_scratch_dir,
        {
            "storageAccountName": "teamstorage01",
            "fileShareName": "team-models",
            "acaEnvironmentName": "team-env",
            "acaAppName": "team-chat",
            "acaLogAnalyticsName": None,
            "acaEnvironmentStorageName": None,
        },
    )
    azure = FakeAzure()
    azure.add(group_id(GROUP), {"location": LOCATION})
    azure.add(
        storage_account_id(GROUP, "teamstorage01"),
        {"location": LOCATION, "kind": "StorageV2", "sku": {"name": "Standard_LRS"}},
    )
    azure.add(file_service_id(GROUP, "teamstorage01"), {"shareDeleteRetentionPolicy": {"enabled": True, "days": 7}})
    azure.add(file_share_id(GROUP, "teamstorage01", "team-models"), {"shareQuota": 2048})
    # the environment "team-env", the workspace and the app do not exist
    run = run_program(azure, CONFIG)
    assert statuses(run) == {
        "resourceGroup": "adopted",
        "storageAccount": "adopted",
        "fileService": "adopted",
        "fileShare": "adopted",
        "logAnalyticsWorkspace": "created",
        "environment": "created",
        "environmentStorage": "created",
        "containerApp": "created",
        "containerRegistry": "created",
        "pullIdentity": "created",
        "acrPullAssignment": "created",
    }
    assert azure.one(TYPES["fileShare"]).import_id == file_share_id(GROUP, "teamstorage01", "team-models")
    assert azure.one(TYPES["fileShare"]).inputs["shareQuota"] == 2048  # never shrunk
    assert azure.one(TYPES["environment"]).inputs["environmentName"] == "team-env"
    assert azure.one(TYPES["environment"]).import_id is None
    assert azure.one(TYPES["logAnalyticsWorkspace"]).inputs["workspaceName"] == WORKSPACE
    assert azure.one(TYPES["containerApp"]).inputs["containerAppName"] == "team-chat"


def test_forbidden_lookup_stops_the_program_and_declares_nothing(in_scratch_dir: Path) -> None:
    azure = FakeAzure()
    add_fine_tuning_layout(azure)
    account_id = storage_account_id(GROUP, ACCOUNT)
    azure.errors[account_id.lower()] = forbidden(account_id, "Microsoft.Storage/storageAccounts/read")
    with pytest.raises(
        Exception, match="(?s)Looking up storage account .* failed.*AuthorizationFailed.*does not have authorization"
    ) as error:
        run_program(azure, CONFIG)
    assert "RESPONSE 403" in str(error.value)
    assert azure.declared == []


def test_throttled_lookup_is_not_taken_for_missing(in_scratch_dir: Path) -> None:
    azure = FakeAzure()
    add_fine_tuning_layout(azure)
    env_id = environment_id(GROUP, ENVIRONMENT)
    azure.errors[env_id.lower()] = azure_error("GET", env_id, 429, "TooManyRequests", "Rate limit exceeded.")
    with pytest.raises(Exception, match="RESPONSE 429"):
        run_program(azure, CONFIG)
    assert azure.declared == []


def test_taken_global_storage_account_name_is_a_clear_error(in_scratch_dir: Path) -> None:
    azure = FakeAzure(taken_storage_account_names={"sharedname01"})
    with pytest.raises(
        Exception,
        match="storageAccountName: 'sharedname01' .* is taken by a storage account elsewhere in Azure"
        ".*pulumi config set storageAccountName",
    ):
        run_program(azure, CONFIG | {"location": LOCATION, "storageAccountName": "sharedname01"})
    assert azure.declared == []


def test_name_taken_by_our_own_existing_account_is_fine(in_scratch_dir: Path) -> None:
    azure = FakeAzure(taken_storage_account_names={ACCOUNT})  # it is taken: by the fine-tuning account itself
    add_fine_tuning_layout(azure)
    run = run_program(azure, CONFIG)
    assert statuses(run)["storageAccount"] == "adopted"


def test_global_names_are_checked_with_arms_name_availability(in_scratch_dir: Path) -> None:
    """Not by DNS (a caching resolver can be wrong): ARM's checkNameAvailability of each provider, as the user."""
    azure = FakeAzure()
    run_program(azure, CONFIG | {"location": LOCATION})
    checks = [r for r in azure.requests if "/checkNameAvailability" in r.full_url]
    assert [(r.get_method(), r.full_url) for r in checks] == [
        (
            "POST",
            f"https://management.azure.com/subscriptions/{SUBSCRIPTION_ID}/providers/Microsoft.Storage/"
            "checkNameAvailability?api-version=2023-05-01",
        ),
        (
            "POST",
            f"https://management.azure.com/subscriptions/{SUBSCRIPTION_ID}/providers/Microsoft.ContainerRegistry/"
            "checkNameAvailability?api-version=2023-07-01",
        ),
    ]
    assert [json.loads(cast(bytes, r.data)) for r in checks] == [
        {"name": ACCOUNT, "type": "Microsoft.Storage/storageAccounts"},
        {"name": f"aiacr{SUFFIX}", "type": "Microsoft.ContainerRegistry/registries"},
    ]


def test_a_name_check_that_cannot_be_made_is_retried_then_only_a_warning(
    in_scratch_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    retried = FakeAzure(network_failures={"Microsoft.Storage/checkNameAvailability": 2})
    run_program(retried, CONFIG | {"location": LOCATION})
    assert retried.sleeps == [2.0, 4.0] and "Could not check" not in caplog.text

    unreachable = FakeAzure(network_failures={"Microsoft.Storage/checkNameAvailability": 4})
    run = run_program(unreachable, CONFIG | {"location": LOCATION})
    assert f"Could not check whether storage account name '{ACCOUNT}' is free" in caplog.text
    assert statuses(run)["storageAccount"] == "created"  # Azure's own error would stop the creation if taken


def test_reference_mode_declares_none_of_the_existing_resources(in_scratch_dir: Path) -> None:
    azure = FakeAzure()
    add_fine_tuning_layout(azure)
    run = run_program(azure, CONFIG | {"existingResources": "reference"})
    # Only what did not exist is declared: the app, and the registry it pulls from with the identity it pulls as.
    assert {declared.typ for declared in azure.declared if declared.typ.startswith("azure-native:")} == {
        TYPES["containerApp"],
        TYPES["containerRegistry"],
        "azure-native:managedidentity:UserAssignedIdentity",
        "azure-native:authorization:RoleAssignment",
    }
    assert statuses(run) == {key: "referenced" for key in FINE_TUNING_IDS} | {
        "containerApp": "created",
        "containerRegistry": "created",
        "pullIdentity": "created",
        "acrPullAssignment": "created",
    }
    app = azure.one(TYPES["containerApp"]).inputs
    assert app["managedEnvironmentId"] == environment_id(GROUP, ENVIRONMENT)
    assert app["template"]["volumes"][0]["storageName"] == ENV_STORAGE
    assert run.outputs["STORAGE_ACCOUNT_NAME"] == ACCOUNT and run.outputs["FILE_SHARE_NAME"] == SHARE


def test_existing_container_app_not_in_stack_is_adopted(in_scratch_dir: Path) -> None:
    azure = FakeAzure()
    add_fine_tuning_layout(azure)
    azure.add(
        container_app_id(GROUP, APP),
        {
            "location": LOCATION,
            "managedEnvironmentId": environment_id(GROUP, ENVIRONMENT),
            "workloadProfileName": "GPU",
            "configuration": {
                "activeRevisionsMode": "Single",
                "ingress": {
                    "external": True,
                    "targetPort": 7860,
                    "fqdn": f"{APP}.bluesky-1a2b3c4d.eastus.azurecontainerapps.io",
                },
            },
            "template": {
                "containers": [{"name": APP, "image": "docker.io/pytorch/pytorch:2.4.0-cuda12.4-cudnn9-runtime"}]
            },
            "latestRevisionFqdn": "x",
        },
    )
    run = run_program(azure, CONFIG)
    app = azure.one(TYPES["containerApp"])
    assert app.import_id == container_app_id(GROUP, APP)
    # Imported and given this program's configuration in the same run: our image, probes, identity.
    ingress = app.inputs["configuration"]["ingress"]
    assert (ingress["external"], ingress["targetPort"]) == (True, 7860) and "fqdn" not in ingress
    (container,) = app.inputs["template"]["containers"]
    assert container["image"] == run.outputs["image"] != "docker.io/pytorch/pytorch:2.4.0-cuda12.4-cudnn9-runtime"
    assert [probe["type"] for probe in container["probes"]] == ["Startup", "Readiness", "Liveness"]
    assert app.inputs["identity"]["type"] == "UserAssigned"
    assert run.outputs["adoption"]["containerApp"]["status"] == "adopted"
    assert run.options[TYPES["containerApp"]].retain_on_delete is True


def test_existing_container_app_in_another_environment_is_refused_naming_the_keys(in_scratch_dir: Path) -> None:
    """An app's environment is fixed at creation: adopting it into ours would be a replacement, which the engine
    refuses for an import (and which would lose the app). Caught before anything is declared."""
    azure = FakeAzure()
    add_fine_tuning_layout(azure)
    other = environment_id(GROUP, "team-env").replace("/resourceGroups/", "/resourcegroups/")  # Azure's casing varies
    azure.add(container_app_id(GROUP, APP), {"location": LOCATION, "managedEnvironmentId": other})
    with pytest.raises(
        Exception,
        match=f"acaAppName: container app '{APP}' already exists in environment 'team-env', not in '{ENVIRONMENT}' "
        r"\(acaEnvironmentName\).*pulumi config set acaEnvironmentName team-env",
    ):
        run_program(azure, CONFIG)
    assert azure.declared == []


def test_existing_container_app_in_our_environment_passes_whatever_the_id_casing(in_scratch_dir: Path) -> None:
    azure = FakeAzure()
    add_fine_tuning_layout(azure)
    lowercased = environment_id(GROUP, ENVIRONMENT).lower()
    azure.add(container_app_id(GROUP, APP), {"location": LOCATION, "managedEnvironmentId": lowercased})
    run = run_program(azure, CONFIG)
    assert run.outputs["adoption"]["containerApp"]["status"] == "adopted"


def test_previous_run_is_read_from_this_stack(in_scratch_dir: Path) -> None:
    seen: list[str] = []

    class Recording(FakeAzure):
        def call(self, args: Any) -> Any:
            if args.token == "pulumi:pulumi:readStackOutputs":
                seen.append(args.args["name"])
            return super().call(args)

    run_program(Recording(), CONFIG | {"location": LOCATION})
    assert seen == ["organization/aitk-inference/dev"]


def test_unreadable_previous_outputs_fall_back_to_the_safe_side(
    in_scratch_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without the record, an existing resource is imported as it is (a no-op for the engine when it is already in
    the state) and retained on delete: nothing can be replaced or deleted."""

    class NoBackend(FakeAzure):
        def call(self, args: Any) -> Any:
            if args.token == "pulumi:pulumi:readStackOutputs":
                return {}, [("", "no backend client is available")]
            return super().call(args)

    caplog.set_level(logging.WARNING)
    azure = NoBackend()
    add_fine_tuning_layout(azure)
    run = run_program(azure, CONFIG)
    assert statuses(run)["storageAccount"] == "adopted"
    assert azure.one(TYPES["storageAccount"]).import_id == storage_account_id(GROUP, ACCOUNT)
    assert any("Could not read stack organization/aitk-inference/dev's previous outputs" in m for m in caplog.messages)


# -- ids as Azure spells them ----------------------------------------------------------------------------------------
def test_lowercased_ids_adopt_once_and_never_import_again(in_scratch_dir: Path) -> None:
    """Log Analytics answers with a lowercased id (`/resourcegroups/.../microsoft.operationalinsights/...`); in a
    group whose name has capitals the recorded and the looked-up ids still match: no second import."""
    group = "RG-Phi3-Finetune"
    suffix = default_suffix(group)
    workspace = f"ailog{suffix}"
    lowercased = workspace_id(group, workspace).lower()
    first_azure = FakeAzure()
    first_azure.add(group_id(group), {"location": LOCATION})
    first_azure.add(
        lowercased, {"location": LOCATION, "customerId": WORKSPACE_CUSTOMER_ID, "sku": {"name": "PerGB2018"}}
    )
    first = run_program(first_azure, {"resourceGroupName": group})
    assert first_azure.one(TYPES["logAnalyticsWorkspace"]).import_id == lowercased
    assert first.outputs["adoption"]["logAnalyticsWorkspace"] == {"status": "adopted", "id": lowercased}

    second_azure = FakeAzure(existing=first_azure.existing, previous_outputs=previous_run_outputs(first))
    second = run_program(second_azure, {"resourceGroupName": group})
    assert second_azure.one(TYPES["logAnalyticsWorkspace"]).import_id is None
    assert statuses(second)["logAnalyticsWorkspace"] == "adopted"
    assert second_azure.one(TYPES["storageAccount"]).inputs["accountName"] == f"aistorage{suffix}"  # case kept


def test_an_adopted_app_keeps_the_environment_id_as_azure_spells_it(in_scratch_dir: Path) -> None:
    azure = FakeAzure()
    add_fine_tuning_layout(azure)
    lowercased = environment_id(GROUP, ENVIRONMENT).lower()
    azure.add(container_app_id(GROUP, APP), {"location": LOCATION, "managedEnvironmentId": lowercased})
    run_program(azure, CONFIG)
    # The same id for ARM; declaring the other casing would show a change of a create-only property.
    assert azure.one(TYPES["containerApp"]).inputs["managedEnvironmentId"] == lowercased


def test_adopted_environment_storage_gets_the_key_of_the_account_it_points_to(in_scratch_dir: Path) -> None:
    azure = FakeAzure(account_keys={"teamdata01": "dGVhbWRhdGEwMS1rZXk="})
    add_fine_tuning_layout(azure)
    azure.add(
        environment_storage_id(GROUP, ENVIRONMENT, ENV_STORAGE),
        {"properties": {"azureFile": {"accountName": "teamdata01", "shareName": "models", "accessMode": "ReadOnly"}}},
    )
    run_program(azure, CONFIG)
    declared = azure.one(TYPES["environmentStorage"])
    assert declared.inputs["properties"]["azureFile"] == {
        "accountName": "teamdata01",
        "accountKey": "dGVhbWRhdGEwMS1rZXk=",  # not the key of storageAccountName's account
        "shareName": "models",
        "accessMode": "ReadOnly",
    }
    assert is_secret(declared.raw_inputs["properties"])
    assert "teamdata01" in azure.key_listings
