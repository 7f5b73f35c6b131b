"""At the program level, the whole program (`__main__.py`) under mocks creates the registry and the pull
identity, builds and pushes inference_app/ and runs it by digest with identity-based pull, passes app settings as
environment variables, runs a prebuilt `image` without building, and rolls a new revision on a `modelRevision`
change. (The components alone, the build context hash and the Dockerfile: test_registry_image.py,
test_dockerfile.py.)"""

import json
import logging
import urllib.parse
from pathlib import Path
from typing import Any, cast

import pulumiverse_time
import pytest
from pulumi_azure_native import authorization

from inference_app.settings import parse_settings
from infra.acr_token import ACR_TOKEN_USERNAME
from infra.image import BUILD_CONTEXT, PROJECT_DIR, REPOSITORY, image_tag
from infra.image_config import DEFAULT_PLATFORM
from infra.registry import ACR_PULL_ROLE_ID
from infra.unique_string import unique_string
from tests.infra.azure_mocks import (
    AAD_TOKEN,
    ACR_TOKEN,
    IDENTITY_PRINCIPAL_ID,
    SUBSCRIPTION_ID,
    TENANT_ID,
    FakeAzure,
    ProgramRun,
    group_id,
    identity_id,
    is_secret,
    registry_id,
    run_program,
)

GROUP = "rg-phi3-finetune"
CONFIG = {"resourceGroupName": GROUP, "location": "westus3"}
SUFFIX = unique_string(f"/subscriptions/{SUBSCRIPTION_ID}/resourceGroups/{GROUP}")[:5]
REGISTRY = f"aiacr{SUFFIX}"
LOGIN_SERVER = f"{REGISTRY}.azurecr.io"
PREBUILT = "myregistry.azurecr.io/inference-app@sha256:" + "ab" * 32

REGISTRY_TYPE = "azure-native:containerregistry:Registry"
IDENTITY_TYPE = "azure-native:managedidentity:UserAssignedIdentity"
ROLE_ASSIGNMENT_TYPE = "azure-native:authorization:RoleAssignment"
IMAGE_TYPE = "docker-build:index:Image"
SLEEP_TYPE = "time:index/sleep:Sleep"
APP_TYPE = "azure-native:app:ContainerApp"


def deploy(config: dict[str, Any] | None = None, azure: FakeAzure | None = None) -> tuple[FakeAzure, ProgramRun]:
    azure = azure or FakeAzure()
    return azure, run_program(azure, CONFIG | (config or {}))


def container(azure: FakeAzure) -> dict[str, Any]:
    (only,) = azure.one(APP_TYPE).inputs["template"]["containers"]
    return only


@pytest.fixture
def built(in_scratch_dir: Path) -> tuple[FakeAzure, ProgramRun]:
    return deploy()


def test_registry_is_basic_with_the_admin_user_disabled(built: tuple[FakeAzure, ProgramRun]) -> None:
    azure, run = built
    registry = azure.one(REGISTRY_TYPE)
    assert registry.inputs["registryName"] == REGISTRY
    assert registry.inputs["adminUserEnabled"] is False
    assert registry.inputs["sku"] == {"name": "Basic"}
    assert registry.inputs["location"] == "westus3"
    assert run.outputs["adoption"]["containerRegistry"] == {"status": "created", "id": registry_id(GROUP, REGISTRY)}


def test_identity_has_acr_pull_scoped_to_the_registry(built: tuple[FakeAzure, ProgramRun]) -> None:
    azure, _ = built
    identity = azure.one(IDENTITY_TYPE).inputs
    assert identity["resourceName"] == f"{REGISTRY}-pull"
    assignment = azure.one(ROLE_ASSIGNMENT_TYPE).inputs
    assert assignment["roleDefinitionId"] == (
        f"/subscriptions/{SUBSCRIPTION_ID}/providers/Microsoft.Authorization/roleDefinitions/"
        "7f951dda-4ed3-4680-a7ca-43fe172d538d"
    )
    assert ACR_PULL_ROLE_ID == "7f951dda-4ed3-4680-a7ca-43fe172d538d"  # the built-in AcrPull role, in every tenant
    assert assignment["scope"] == registry_id(GROUP, REGISTRY)
    assert assignment["principalId"] == IDENTITY_PRINCIPAL_ID
    assert assignment["principalType"] == "ServicePrincipal"


def test_app_pulls_and_runs_as_the_identity_and_no_password_exists(built: tuple[FakeAzure, ProgramRun]) -> None:
    azure, run = built
    app = azure.one(APP_TYPE).inputs
    pull_identity = identity_id(GROUP, f"{REGISTRY}-pull")
    assert app["configuration"]["registries"] == [{"server": LOGIN_SERVER, "identity": pull_identity}]
    assert app["identity"] == {"type": "UserAssigned", "userAssignedIdentities": [pull_identity]}
    # No registry password secret: the only secret is the endpoint's password (access: password, the default).
    assert [secret["name"] for secret in app["configuration"]["secrets"]] == ["inference-auth-password"]
    assert not [token for token in azure.invokes if "credential" in token.lower()]  # no registry password is read
    # The first revision pulls at once: the app waits for the new role assignment to take effect.
    depends_on = run.options[APP_TYPE].depends_on
    assert isinstance(depends_on, list)
    assert [type(dependency) for dependency in depends_on] == [pulumiverse_time.Sleep]


def test_a_new_acr_pull_assignment_is_given_time_to_take_effect(built: tuple[FakeAzure, ProgramRun]) -> None:
    """microsoft/azure-container-apps#646: a revision created right after the assignment fails its pull."""
    azure, run = built
    sleep = azure.one(SLEEP_TYPE)
    assignment = azure.one(ROLE_ASSIGNMENT_TYPE)
    assert sleep.inputs == {"createDuration": "3m", "triggers": {"roleAssignmentId": assignment.state["id"]}}
    assert [type(d) for d in cast(list[Any], run.options[SLEEP_TYPE].depends_on)] == [authorization.RoleAssignment]


def test_image_builds_inference_app_for_linux_amd64_and_pushes_to_the_registry(
    built: tuple[FakeAzure, ProgramRun],
) -> None:
    azure, _ = built
    image = azure.one(IMAGE_TYPE)
    tag = image_tag(PROJECT_DIR / BUILD_CONTEXT, DEFAULT_PLATFORM)
    assert image.inputs["context"] == {"location": "inference_app"}
    assert image.inputs["dockerfile"] == {"location": "inference_app/Dockerfile"}
    assert image.inputs["platforms"] == ["linux/amd64"]
    assert image.inputs["tags"] == [f"{LOGIN_SERVER}/{REPOSITORY}:{tag}"]
    assert image.inputs["push"] is True
    # Pushed with the user's Azure AD token exchanged at the registry, never an admin password.
    (registry,) = image.inputs["registries"]
    assert registry == {"address": LOGIN_SERVER, "username": ACR_TOKEN_USERNAME, "password": ACR_TOKEN}
    assert is_secret(image.raw_inputs["registries"])  # the password makes the whole list a secret
    (request,) = azure.token_exchanges
    assert (request.get_method(), request.full_url) == ("POST", f"https://{LOGIN_SERVER}/oauth2/exchange")
    assert isinstance(request.data, bytes)
    assert dict(urllib.parse.parse_qsl(request.data.decode())) == {
        "grant_type": "access_token",
        "service": LOGIN_SERVER,
        "tenant": TENANT_ID,
        "access_token": AAD_TOKEN,
    }
    assert AAD_TOKEN not in json.dumps(image.inputs)
    assert azure.invokes.count("azure-native:authorization:getClientToken") == 2  # name checks, then the push


def test_the_token_exchange_is_retried_on_network_errors(in_scratch_dir: Path) -> None:
    azure = FakeAzure(network_failures={"/oauth2/exchange": 2})
    _, run = deploy(azure=azure)
    exchanges = [r.full_url for r in azure.requests if r.full_url.endswith("/oauth2/exchange")]
    assert exchanges == [f"https://{LOGIN_SERVER}/oauth2/exchange"] * 3
    assert azure.sleeps == [2.0, 4.0]  # backoff between the attempts
    assert run.outputs["image"].startswith(f"{LOGIN_SERVER}/{REPOSITORY}@sha256:")


def test_a_token_exchange_that_keeps_failing_names_the_fix(in_scratch_dir: Path) -> None:
    azure = FakeAzure(network_failures={"/oauth2/exchange": 4})
    with pytest.raises(Exception, match="Could not get a push token for registry .*Connection reset by peer.*az login"):
        deploy(azure=azure)
    assert azure.sleeps == [2.0, 4.0, 8.0]  # four attempts, then the error


def test_a_refused_token_exchange_names_the_fix(in_scratch_dir: Path) -> None:
    with pytest.raises(Exception, match="Could not get a push token for registry .* `az login`.*AcrPush"):
        deploy(azure=FakeAzure(refuse_token_exchange=True))


def test_app_runs_the_pushed_digest_with_the_images_own_command(built: tuple[FakeAzure, ProgramRun]) -> None:
    azure, run = built
    digest = azure.one(IMAGE_TYPE).state["digest"]
    assert digest.startswith("sha256:")
    assert container(azure)["image"] == f"{LOGIN_SERVER}/{REPOSITORY}@{digest}"
    assert "command" not in container(azure)
    assert run.outputs["image"] == f"{LOGIN_SERVER}/{REPOSITORY}@{digest}"


def test_a_prebuilt_image_builds_nothing_and_the_app_runs_it(in_scratch_dir: Path) -> None:
    azure, run = deploy({"image": PREBUILT})
    assert azure.by_type(IMAGE_TYPE) == []
    assert azure.token_exchanges == []  # no push, so no push token either
    # One Azure AD token, for ARM's name checks (cached); none for a push (a build asks for a second one).
    assert azure.invokes.count("azure-native:authorization:getClientToken") == 1
    assert container(azure)["image"] == PREBUILT
    assert "command" not in container(azure)
    assert run.outputs["image"] == PREBUILT
    # The app still pulls as the identity (a CI may push into the stack's registry).
    assert azure.one(APP_TYPE).inputs["configuration"]["registries"][0]["server"] == LOGIN_SERVER


@pytest.mark.parametrize(
    ("image", "servers"),
    [
        # Another private Azure registry: an entry for it too, pulling as the same identity.
        (PREBUILT, [LOGIN_SERVER, "myregistry.azurecr.io"]),
        # The stack's own registry (any case), or a public registry: the stack's entry only.
        (f"{REGISTRY.upper()}.azurecr.io/inference-app:1", [LOGIN_SERVER]),
        ("docker.io/pytorch/pytorch:2.4.0-cuda12.4-cudnn9-runtime", [LOGIN_SERVER]),
    ],
)
def test_a_prebuilt_image_in_another_azure_registry_is_pulled_as_the_identity(
    in_scratch_dir: Path, caplog: pytest.LogCaptureFixture, image: str, servers: list[str]
) -> None:
    """Container Apps picks registry credentials by server: without an entry a private registry is pulled from
    anonymously, and refuses."""
    caplog.set_level(logging.WARNING)
    azure, _ = deploy({"image": image})
    registries = azure.one(APP_TYPE).inputs["configuration"]["registries"]
    pull_identity = identity_id(GROUP, f"{REGISTRY}-pull")
    assert registries == [{"server": server, "identity": pull_identity} for server in servers]
    grant = [message for message in caplog.messages if message.startswith("image: pulled from")]
    if len(servers) == 2:  # the identity needs AcrPull there, which this stack cannot grant: say so
        assert grant == [
            f"image: pulled from myregistry.azurecr.io as the identity {REGISTRY}-pull (principal id "
            f"{IDENTITY_PRINCIPAL_ID}), which needs AcrPull on that registry; grant it once, e.g. `az role "
            f"assignment create --assignee-object-id {IDENTITY_PRINCIPAL_ID} --assignee-principal-type "
            "ServicePrincipal --role AcrPull --scope $(az acr show --name myregistry --query id --output tsv)`"
        ]
    else:
        assert grant == []


def test_default_commands_apply_only_with_a_prebuilt_image(
    in_scratch_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    commands = ["cd /mount/inference", "pip install -r requirements.txt", "python -m inference_app"]
    stock = "docker.io/pytorch/pytorch:2.4.0-cuda12.4-cudnn9-runtime"
    azure, _ = deploy({"image": stock, "defaultCommands": commands, "access": "public"})
    assert container(azure)["command"] == ["/bin/bash", "-c", "; ".join(commands)]
    caplog.set_level(logging.WARNING)
    azure, _ = deploy({"defaultCommands": commands})
    assert "command" not in container(azure)
    assert "defaultCommands is ignored" in caplog.text


def test_a_stock_image_with_default_commands_gets_probes_it_can_answer(in_scratch_dir: Path) -> None:
    """Issue 18, 5: such an image serves neither /health nor /ready: TCP probes on the target port, with the bicep's
    startup budget (60 s + 10 x 120 s), not the 310 s the app's own server gets."""
    commands = ["cd /mount/inference", "pip install -r requirements.txt", "python serve.py"]
    azure, _ = deploy({"image": "docker.io/pytorch/pytorch:2.4.0", "defaultCommands": commands, "access": "public"})
    probes = container(azure)["probes"]
    assert [probe["type"] for probe in probes] == ["Startup", "Readiness", "Liveness"]
    assert all(probe["tcpSocket"] == {"port": 7860} and "httpGet" not in probe for probe in probes)
    startup = probes[0]
    assert startup["initialDelaySeconds"] + startup["failureThreshold"] * startup["periodSeconds"] == 60 + 10 * 120
    # The built image (and a prebuilt one of this app, without defaultCommands) keeps its own HTTP probes.
    azure, _ = deploy({"image": "contoso.azurecr.io/inference-app:1.0"})
    assert {probe["httpGet"]["path"] for probe in container(azure)["probes"]} == {"/health", "/ready"}


def test_password_access_is_refused_for_a_stock_image_naming_the_choices(in_scratch_dir: Path) -> None:
    """Issue 18, 5: the password is checked by inference_app/'s server; a stock image would ignore it and leave the
    endpoint open while the stack exports a password."""
    with pytest.raises(
        Exception, match=r"access: password .*`pulumi config set access entra`.*`pulumi config set access public`"
    ):
        deploy({"image": "docker.io/pytorch/pytorch:2.4.0", "defaultCommands": ["python serve.py"]})


def app_settings(azure: FakeAzure) -> dict[str, str]:
    """The container's INFERENCE_* variables other than the access ones (tests/infra/test_access.py)."""
    return {
        variable["name"]: variable["value"]
        for variable in container(azure).get("env", [])
        if not variable["name"].startswith(("INFERENCE_AUTH_", "ACCESS_"))
    }


def test_app_settings_reach_the_container_as_environment_variables(in_scratch_dir: Path) -> None:
    azure, _ = deploy(
        {
            "modelPath": "/mount/models/phi-3-mini",
            "adapterPath": "/mount/models/run7/adapter",
            "baseOnly": "false",
            "quantize4bit": "true",
            "dtype": "float16",
            "maxConcurrentGenerations": "4",
            "maxGenerationsPerClient": "2",
            "modelRevision": "run7",
        }
    )
    assert app_settings(azure) == {
        "INFERENCE_MODEL": "/mount/models/phi-3-mini",
        "INFERENCE_ADAPTERS": "/mount/models/run7/adapter",
        "INFERENCE_BASE_ONLY": "false",
        "INFERENCE_QUANTIZE_4BIT": "true",
        "INFERENCE_DTYPE": "float16",
        "INFERENCE_MAX_CONCURRENT_GENERATIONS": "4",
        "INFERENCE_MAX_GENERATIONS_PER_CLIENT": "2",
        "INFERENCE_MODEL_REVISION": "run7",
    }


@pytest.mark.parametrize(
    ("config", "env", "app_reads"),
    [
        ({"maxRequestBytes": "65536"}, {"INFERENCE_MAX_REQUEST_BYTES": "65536"}, {"max_request_bytes": 65536}),
        ({"maxRequestBytes": 1}, {"INFERENCE_MAX_REQUEST_BYTES": "1"}, {"max_request_bytes": 1}),
        (
            {"allowedOrigins": ["https://chat.example.com"]},
            {"INFERENCE_ALLOWED_ORIGINS": "https://chat.example.com"},
            {"allowed_origins": ("https://chat.example.com",)},
        ),
        (
            {"allowedOrigins": ["https://chat.example.com/", " http://localhost:3000", "https://[::1]:8443"]},
            {"INFERENCE_ALLOWED_ORIGINS": "https://chat.example.com,http://localhost:3000,https://[::1]:8443"},
            {"allowed_origins": ("https://chat.example.com", "http://localhost:3000", "https://[::1]:8443")},
        ),
        ({"allowedOrigins": []}, {}, {"allowed_origins": ()}),  # none besides the app's own: the app's default
        (
            {"adapters": ["run1=/mount/models/run1/adapter", "run2=/mount/models/run2/adapter"]},
            {"INFERENCE_ADAPTERS": "run1=/mount/models/run1/adapter,run2=/mount/models/run2/adapter"},
            {"model_ids": ("Phi-3-mini-4k-instruct", "run1", "run2")},
        ),
        (
            {"adapterPath": "/mount/models/run7/adapter"},
            {"INFERENCE_ADAPTERS": "/mount/models/run7/adapter"},
            {"served_adapters": (("Phi-3-mini-4k-instruct-ft", Path("/mount/models/run7/adapter")),)},
        ),
    ],
)
def test_http_settings_reach_the_container_as_the_app_reads_them(
    in_scratch_dir: Path, config: dict[str, Any], env: dict[str, str], app_reads: dict[str, Any]
) -> None:
    azure, _ = deploy({"access": "public"} | config)
    assert app_settings(azure) == env
    settings = parse_settings([], environ=env)
    assert {name: getattr(settings, name) for name in app_reads} == app_reads


def test_unset_settings_leave_the_apps_defaults(in_scratch_dir: Path) -> None:
    azure, _ = deploy({"access": "public"})  # no access variables either
    assert "env" not in container(azure)


def test_a_model_revision_change_changes_the_template_and_the_active_revision(in_scratch_dir: Path) -> None:
    first_azure, first = deploy({"modelRevision": "2026-11-24"})
    same_azure, same = deploy({"modelRevision": "2026-11-24"})
    second_azure, second = deploy({"modelRevision": "2026-11-25"})
    first_app, second_app = first_azure.one(APP_TYPE).inputs, second_azure.one(APP_TYPE).inputs
    assert (
        same_azure.one(APP_TYPE).inputs == first_app
        and same.outputs["activeRevision"] == first.outputs["activeRevision"]
    )
    assert second_app["template"] != first_app["template"]
    assert {key: value for key, value in second_app.items() if key != "template"} == {
        key: value for key, value in first_app.items() if key != "template"
    }
    assert second.outputs["activeRevision"] != first.outputs["activeRevision"]
    assert second.outputs["activeRevision"].startswith(f"aiacaapp{SUFFIX}--")
    assert second_azure.one(IMAGE_TYPE).inputs == first_azure.one(IMAGE_TYPE).inputs  # no rebuild


def test_registry_name_sku_and_platform_come_from_config(in_scratch_dir: Path) -> None:
    azure, _ = deploy({"registryName": "TeamRegistry01", "registrySku": "Standard", "buildPlatform": "linux/arm64"})
    assert azure.one(REGISTRY_TYPE).inputs["registryName"] == "TeamRegistry01"
    assert azure.one(REGISTRY_TYPE).inputs["sku"] == {"name": "Standard"}
    assert azure.one(IDENTITY_TYPE).inputs["resourceName"] == "TeamRegistry01-pull"
    image = azure.one(IMAGE_TYPE).inputs
    assert image["platforms"] == ["linux/arm64"]
    assert image["tags"][0].startswith("teamregistry01.azurecr.io/inference-app:")  # login servers are lowercase


def test_outputs_include_the_active_revision_and_no_registry_secret(built: tuple[FakeAzure, ProgramRun]) -> None:
    _, run = built
    assert run.outputs["activeRevision"].startswith(f"aiacaapp{SUFFIX}--")
    assert ACR_TOKEN not in json.dumps(run.outputs) and AAD_TOKEN not in json.dumps(run.outputs)


def test_preview_declares_the_build_without_building(in_scratch_dir: Path) -> None:
    azure = FakeAzure()
    run_program(azure, CONFIG, preview=True)
    assert azure.one(IMAGE_TYPE).inputs.get("buildOnPreview") is False


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"image": "my image:1"}, "image: 'my image:1' is not an image reference"),
        ({"buildPlatform": "linux/sparc"}, "buildPlatform: 'linux/sparc' is not a platform"),
        ({"registryName": "my-registry"}, "registryName: 'my-registry' is not a valid name: 5-50 letters"),
        ({"registryName": "acr"}, "registryName: 'acr' is not a valid name"),
        ({"registryName": "a" * 51}, "registryName: '" + "a" * 51 + "' is not a valid name"),
        ({"registryName": "ünïcode1"}, "registryName: 'ünïcode1' is not a valid name"),
        ({"registrySku": "Free"}, "registrySku: must be one of Basic, Standard, Premium"),
        ({"modelPath": "models/phi3"}, "modelPath: must be an absolute path inside the container"),
        ({"adapterPath": "adapter"}, "adapterPath: must be an absolute path inside the container"),
        ({"adapters": ["/mount/a"]}, "adapters: '/mount/a' is not NAME=PATH with an absolute path"),
        ({"adapters": ["run1=models/a"]}, "adapters: 'run1=models/a' is not NAME=PATH with an absolute path"),
        ({"adapters": ["my run=/mount/a"]}, "adapters has 'my run=/mount/a': give NAME=PATH"),
        ({"adapters": []}, "adapters: must be a non-empty list of strings"),
        ({"adapters": ["a=/mount/a"], "adapterPath": "/mount/b"}, "adapterPath and adapters are both set"),
        ({"baseOnly": "yes"}, "baseOnly: must be true or false"),
        ({"quantize4bit": "2"}, "quantize4bit: must be true or false"),
        ({"dtype": "fp16"}, "dtype: must be one of auto, bfloat16, float16, float32, got 'fp16'"),
        ({"maxConcurrentGenerations": "0"}, "maxConcurrentGenerations: must be an integer >= 1"),
        ({"maxConcurrentGenerations": "many"}, "maxConcurrentGenerations: must be an integer >= 1"),
        ({"maxRequestBytes": "0"}, "maxRequestBytes: must be an integer >= 1"),
        ({"maxRequestBytes": "1MiB"}, "maxRequestBytes: must be an integer >= 1"),
        ({"allowedOrigins": "https://chat.example.com"}, "allowedOrigins: must be a list of strings, e.g. `pulumi"),
        ({"allowedOrigins": ["chat.example.com"]}, "allowedOrigins: 'chat.example.com' is not one origin: give"),
        ({"allowedOrigins": ["ftp://example.com"]}, "allowedOrigins: 'ftp://example.com' is not one origin"),
        ({"allowedOrigins": ["https://example.com/chat"]}, "allowedOrigins: 'https://example.com/chat' is not one"),
        ({"allowedOrigins": ["https://"]}, "allowedOrigins: 'https://' is not one origin"),
        ({"allowedOrigins": ["https://a.example,https://b.example"]}, "allowedOrigins: 'https://a.example,https:"),
        ({"allowedOrigins": [" "]}, "allowedOrigins: ' ' is not one origin"),
        ({"modelRevision": " "}, "modelRevision: must be a non-empty string"),
    ],
)
def test_invalid_image_config_fails_before_any_cloud_call(
    in_scratch_dir: Path, config: dict[str, Any], expected: str
) -> None:
    azure = FakeAzure()
    with pytest.raises(Exception, match=expected.replace("(", r"\(")):
        deploy(config, azure)
    assert azure.lookups == [] and azure.declared == []


# -- the registry is adopted like the other resources ---------------------------------------------------------------
def existing_registry(azure: FakeAzure, name: str = REGISTRY) -> str:
    azure.add(group_id(GROUP), {"location": "westus3"})
    resource_id = registry_id(GROUP, name)
    azure.add(
        resource_id,
        {
            "location": "westus3",
            "sku": {"name": "Standard", "tier": "Standard"},
            "adminUserEnabled": True,
            "loginServer": f"{name.lower()}.azurecr.io",
            "publicNetworkAccess": "Enabled",
            "provisioningState": "Succeeded",
        },
    )
    return resource_id


def test_an_existing_registry_is_adopted_with_its_admin_user_disabled_in_one_run(in_scratch_dir: Path) -> None:
    azure = FakeAzure(taken_registry_names={REGISTRY})  # the name is taken: by this very registry
    resource_id = existing_registry(azure)
    _, first = deploy(azure=azure)
    registry = azure.one(REGISTRY_TYPE)
    assert registry.import_id == resource_id
    assert registry.inputs["adminUserEnabled"] is False  # disabled on the import run itself (Azure has it on)
    assert registry.inputs["sku"] == {"name": "Standard"}  # kept as Azure has it
    assert first.options[REGISTRY_TYPE].retain_on_delete is True
    assert first.outputs["adoption"]["containerRegistry"] == {"status": "adopted", "id": resource_id}

    second_azure = FakeAzure(existing=azure.existing, previous_outputs={"adoption": first.outputs["adoption"]})
    deploy(azure=second_azure)
    registry = second_azure.one(REGISTRY_TYPE)
    assert registry.import_id is None
    assert registry.inputs["adminUserEnabled"] is False
    assert registry.inputs["sku"] == {"name": "Standard"}  # kept as Azure has it
    assert second_azure.one(ROLE_ASSIGNMENT_TYPE).inputs["scope"] == resource_id


def test_reference_mode_reads_an_existing_registry_and_still_grants_pull(in_scratch_dir: Path) -> None:
    azure = FakeAzure()
    resource_id = existing_registry(azure)
    _, run = deploy({"existingResources": "reference"}, azure)
    assert azure.by_type(REGISTRY_TYPE) == []
    assert azure.one(ROLE_ASSIGNMENT_TYPE).inputs["scope"] == resource_id
    assert azure.one(IMAGE_TYPE).inputs["tags"][0].startswith(f"{LOGIN_SERVER}/")
    assert run.outputs["adoption"]["containerRegistry"] == {"status": "referenced", "id": resource_id}


def test_a_registry_name_taken_elsewhere_is_a_clear_error(in_scratch_dir: Path) -> None:
    azure = FakeAzure(taken_registry_names={"sharedregistry"})
    with pytest.raises(
        Exception,
        match="registryName: 'sharedregistry' .* is taken by a registry elsewhere in Azure"
        ".*pulumi config set registryName",
    ):
        deploy({"registryName": "sharedregistry"}, azure)
    assert azure.declared == []


# -- the pull identity is adopted like the other resources ----------------------------------------------------------
EXISTING_PRINCIPAL = "5c4b3a29-1807-4f6e-9d5c-4b3a29180706"


def existing_identity(azure: FakeAzure, *, with_acr_pull: bool) -> tuple[str, str]:
    """What a first stack on the same group (or one that lost its state) left: `<registry>-pull`, and usually
    its AcrPull assignment on the registry. Returns their ids."""
    resource_id = identity_id(GROUP, f"{REGISTRY}-pull")
    azure.add(
        resource_id,
        {
            "location": "eastus",  # not the stack's region: kept, a new one would replace the identity
            "tags": {"owner": "ml-team"},
            "principalId": EXISTING_PRINCIPAL,
            "clientId": "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d",
            "tenantId": TENANT_ID,
        },
    )
    assignment_id = f"{registry_id(GROUP, REGISTRY)}/providers/Microsoft.Authorization/roleAssignments/7c9e6679"
    if with_acr_pull:
        azure.add(
            assignment_id,
            {
                "properties": {
                    "principalId": EXISTING_PRINCIPAL,
                    "roleDefinitionId": f"/subscriptions/{SUBSCRIPTION_ID}/providers/Microsoft.Authorization/"
                    f"roleDefinitions/{ACR_PULL_ROLE_ID}",
                    "scope": registry_id(GROUP, REGISTRY),
                }
            },
        )
    return resource_id, assignment_id


def test_an_existing_pull_identity_and_its_acr_pull_are_adopted(in_scratch_dir: Path) -> None:
    azure = FakeAzure()
    existing_registry(azure)
    identity, assignment = existing_identity(azure, with_acr_pull=True)
    _, run = deploy(azure=azure)
    declared = azure.one(IDENTITY_TYPE)
    assert declared.import_id == identity
    assert declared.inputs == {
        "resourceName": f"{REGISTRY}-pull",
        "resourceGroupName": GROUP,
        "location": "eastus",
        "tags": {"owner": "ml-team"},
    }
    role = azure.one(ROLE_ASSIGNMENT_TYPE)
    assert role.import_id == assignment  # not a second one, which ARM refuses (RoleAssignmentExists)
    assert azure.by_type(SLEEP_TYPE) == []  # in effect already: no wait
    assert [type(d) for d in cast(list[Any], run.options[APP_TYPE].depends_on)] == [authorization.RoleAssignment]
    assert role.inputs["roleAssignmentName"] == "7c9e6679" and role.inputs["principalId"] == EXISTING_PRINCIPAL
    assert run.options[IDENTITY_TYPE].retain_on_delete is True
    assert {key: run.outputs["adoption"][key] for key in ("pullIdentity", "acrPullAssignment")} == {
        "pullIdentity": {"status": "adopted", "id": identity},
        "acrPullAssignment": {"status": "adopted", "id": assignment},
    }
    assert azure.one(APP_TYPE).inputs["identity"]["userAssignedIdentities"] == [identity]

    second_azure = FakeAzure(existing=azure.existing, previous_outputs={"adoption": run.outputs["adoption"]})
    deploy(azure=second_azure)
    assert (
        second_azure.one(IDENTITY_TYPE).import_id is None and second_azure.one(ROLE_ASSIGNMENT_TYPE).import_id is None
    )


def test_an_existing_pull_identity_without_acr_pull_gets_it(in_scratch_dir: Path) -> None:
    azure = FakeAzure()
    existing_registry(azure)
    identity, _ = existing_identity(azure, with_acr_pull=False)
    _, run = deploy(azure=azure)
    assert azure.one(IDENTITY_TYPE).import_id == identity
    role = azure.one(ROLE_ASSIGNMENT_TYPE)
    assert role.import_id is None and "roleAssignmentName" not in role.inputs
    assert role.inputs["principalId"] == EXISTING_PRINCIPAL
    assert run.outputs["adoption"]["acrPullAssignment"]["status"] == "created"
    assert [type(d) for d in cast(list[Any], run.options[APP_TYPE].depends_on)] == [pulumiverse_time.Sleep]  # new: wait


def test_reference_mode_uses_the_existing_identity_and_assignment_as_they_are(in_scratch_dir: Path) -> None:
    azure = FakeAzure()
    existing_registry(azure)
    identity, _ = existing_identity(azure, with_acr_pull=True)
    _, run = deploy({"existingResources": "reference"}, azure)
    assert azure.by_type(IDENTITY_TYPE) == [] and azure.by_type(ROLE_ASSIGNMENT_TYPE) == []
    app = azure.one(APP_TYPE).inputs
    assert app["configuration"]["registries"] == [{"server": LOGIN_SERVER, "identity": identity}]
    assert not run.options[APP_TYPE].depends_on  # the assignment exists: nothing to wait for
