"""The registry, the pull identity, the image build and what the container app runs, under Pulumi mocks.

The components are wired here the way __main__.py wires them (registry -> image -> container app), against a small
fake Azure of their own; the registry's token endpoint is a fake `urlopen`, so nothing leaves the machine.
"""

from __future__ import annotations

import copy
import io
import json
import shutil
import socket
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.error import HTTPError
from urllib.request import Request

import pulumi
import pytest

from inference_app.settings import environment_variables
from infra.adoption import Adoption, PreviousRun
from infra.app import ContainerApp, ContainerAppArgs
from infra.errors import ConfigError
from infra.image import (
    ACR_TOKEN_USERNAME,
    BUILD_CONTEXT,
    PROJECT_DIR,
    REPOSITORY,
    SETTINGS_ENV,
    InferenceSettings,
    app_image,
    container_command,
    container_env,
    context_files,
    exchange_for_acr_token,
    image_tag,
    read_image_config,
    secret_env,
)
from infra.registry import (
    ACR_PULL_ROLE_ID,
    Registry,
    RegistryArgs,
    default_registry_name,
    plan_registry,
    validate_registry_name,
)
from tests.infra.azure_mocks import is_secret, reveal

PROJECT = "aitk-inference"
SUBSCRIPTION_ID = "3f2a9c4e-8b1d-4e7a-9c2f-5d6e7f8a9b0c"
TENANT_ID = "72f988bf-86f1-41af-91ab-2d7cd011db47"
GROUP = "rg-phi3-finetune"
GROUP_ID = f"/subscriptions/{SUBSCRIPTION_ID}/resourceGroups/{GROUP}"
LOCATION = "eastus"
SUFFIX = "q2ld5"
REGISTRY_NAME = f"aiacr{SUFFIX}"
LOGIN_SERVER = f"{REGISTRY_NAME}.azurecr.io"
REGISTRY_ID = f"{GROUP_ID}/providers/Microsoft.ContainerRegistry/registries/{REGISTRY_NAME}"
AAD_TOKEN = "aad-access-token-for-arm"
ACR_TOKEN = "acr-refresh-token"
DIGEST = "sha256:" + "5e" * 32
ACR_PULL = f"/subscriptions/{SUBSCRIPTION_ID}/providers/Microsoft.Authorization/roleDefinitions/{ACR_PULL_ROLE_ID}"


def not_found(resource_id: str) -> str:
    provider_path = resource_id.split("/providers/", 1)[1]
    return (
        f"GET https://management.azure.com{resource_id}\nRESPONSE 404: 404 Not Found\nERROR CODE: ResourceNotFound\n"
        f'{{"error": {{"code": "ResourceNotFound", "message": "The Resource \'{provider_path}\' under resource group '
        f"'{GROUP}' was not found.\"}}}}"
    )


@dataclass
class Declared:
    typ: str
    name: str
    raw_inputs: dict[str, Any]
    import_id: str | None

    @property
    def inputs(self) -> dict[str, Any]:
        return reveal(self.raw_inputs)


@dataclass
class FakeAzure(pulumi.runtime.Mocks):
    existing_registry: dict[str, Any] | None = None  # as getRegistry returns it
    declared: list[Declared] = field(default_factory=list)
    invokes: list[str] = field(default_factory=list)

    def call(self, args: pulumi.runtime.MockCallArgs) -> Any:
        self.invokes.append(args.token)
        if args.token == "azure-native:authorization:getClientConfig":
            return {"subscriptionId": SUBSCRIPTION_ID, "tenantId": TENANT_ID, "clientId": "c", "objectId": "o"}
        if args.token == "azure-native:authorization:getClientToken":
            return {"token": AAD_TOKEN}
        if args.token == "azure-native:containerregistry:getRegistry":
            registry_id = f"{GROUP_ID}/providers/Microsoft.ContainerRegistry/registries/{args.args['registryName']}"
            if self.existing_registry is None or self.existing_registry["id"] != registry_id:
                return {}, [("", not_found(registry_id))]
            return copy.deepcopy(self.existing_registry)
        return {}, [("", f"the fake Azure has no answer for {args.token}")]

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        self.declared.append(Declared(args.typ, args.name, copy.deepcopy(args.inputs), args.resource_id or None))
        inputs, state = reveal(args.inputs), dict(args.inputs)
        if args.typ == "azure-native:containerregistry:Registry":
            resource_id = f"{GROUP_ID}/providers/Microsoft.ContainerRegistry/registries/{inputs['registryName']}"
            state["loginServer"] = f"{inputs['registryName'].lower()}.azurecr.io"
        elif args.typ == "azure-native:managedidentity:UserAssignedIdentity":
            resource_id = f"{GROUP_ID}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{inputs['resourceName']}"
            state |= {"principalId": "9d8c7b6a-principal", "clientId": "1a2b3c4d-client"}
        elif args.typ == "azure-native:authorization:RoleAssignment":
            resource_id = f"{inputs['scope']}/providers/Microsoft.Authorization/roleAssignments/0f1e2d3c"
        elif args.typ == "docker-build:index:Image":
            resource_id = DIGEST
            state["digest"] = DIGEST
        elif args.typ == "azure-native:app:ContainerApp":
            resource_id = f"{GROUP_ID}/providers/Microsoft.App/containerApps/{inputs['containerAppName']}"
            state["latestRevisionName"] = f"{inputs['containerAppName']}--0000001"
            identity = inputs.get("identity") or {}
            if identity.get("userAssignedIdentities"):  # Azure answers with a map: id -> principal and client ids
                state["identity"] = identity | {
                    "userAssignedIdentities": {
                        key: {"principalId": "9d8c7b6a-principal", "clientId": "1a2b3c4d-client"}
                        for key in identity["userAssignedIdentities"]
                    }
                }
        else:
            resource_id = f"{args.name}_id"
        if args.resource_id:  # an import: the state is what exists
            resource_id = args.resource_id
            state |= {key: value for key, value in (self.existing_registry or {}).items() if key not in state}
        state["id"] = resource_id
        return resource_id, state

    def one(self, typ: str) -> Declared:
        found = [d for d in self.declared if d.typ == typ]
        assert len(found) == 1, f"expected one {typ}, declared {len(found)}"
        return found[0]

    def count(self, typ: str) -> int:
        return len([d for d in self.declared if d.typ == typ])


@dataclass
class TokenEndpoint:
    """The registry's /oauth2/exchange, as urlopen sees it."""

    requests: list[Request] = field(default_factory=list)
    fail_with: int | None = None

    def __call__(self, request: Request, timeout: float) -> io.BytesIO:
        self.requests.append(request)
        if self.fail_with is not None:
            raise HTTPError(request.full_url, self.fail_with, "Unauthorized", {}, None)  # type: ignore[arg-type]
        return io.BytesIO(json.dumps({"refresh_token": ACR_TOKEN}).encode())

    def form(self) -> dict[str, str]:
        (request,) = self.requests
        assert isinstance(request.data, bytes)
        return dict(urllib.parse.parse_qsl(request.data.decode()))


@dataclass
class Deployment:
    azure: FakeAzure
    token_endpoint: TokenEndpoint
    options: dict[str, pulumi.ResourceOptions]
    outputs: dict[str, Any]

    def app(self) -> dict[str, Any]:
        return self.azure.one("azure-native:app:ContainerApp").inputs


def deploy(
    config: dict[str, str] | None = None,
    *,
    azure: FakeAzure | None = None,
    default_commands: tuple[str, ...] | None = None,
    previous: PreviousRun = PreviousRun({}),
) -> Deployment:
    """Registry, image and container app wired as in __main__.py, with this stack config."""
    azure = azure or FakeAzure()
    pulumi.runtime.settings.ROOT.set(None)
    pulumi.runtime.set_mocks(azure, project=PROJECT, stack="dev", preview=False, organization="organization")
    pulumi.runtime.set_all_config({f"{PROJECT}:{key}": value for key, value in (config or {}).items()})
    deployment = Deployment(azure, TokenEndpoint(), {}, {})

    def capture(args: pulumi.ResourceTransformationArgs) -> None:
        deployment.options[args.type_] = args.opts

    @pulumi.runtime.test
    def program() -> pulumi.Output[Any]:
        pulumi.runtime.register_stack_transformation(capture)
        image_config = read_image_config(pulumi.Config())
        registry = Registry(
            "registry",
            RegistryArgs(
                resource_group_name=GROUP,
                location=LOCATION,
                subscription_id=SUBSCRIPTION_ID,
                registry=plan_registry(
                    image_config.registry_name or default_registry_name(SUFFIX),
                    GROUP,
                    True,
                    "adopt",
                    previous,
                    explicit=image_config.registry_name is not None,
                ),
                sku=image_config.registry_sku,
            ),
        )
        container_app = ContainerApp(
            "app",
            ContainerAppArgs(
                resource_group_name=GROUP,
                location=LOCATION,
                adoption=Adoption("containerApp", f"aiacaapp{SUFFIX}", "created"),
                environment_id=f"{GROUP_ID}/providers/Microsoft.App/managedEnvironments/aienv{SUFFIX}",
                environment_storage_name=f"aienvstorage{SUFFIX}",
                volume_name=f"aifileshare{SUFFIX}volume",
                image=app_image(image_config, registry.login_server),
                command=container_command(image_config, default_commands),
                env=container_env(image_config.settings),
                registries=[registry.app_registry_credentials()],
                identity=registry.app_identity(),
                depends_on=registry.app_depends_on(),
            ),
        )
        return pulumi.Output.all(
            login_server=registry.login_server, identity_id=registry.identity_id, name=container_app.name
        ).apply(deployment.outputs.update)

    def no_such_host(host: str, *args: Any, **kwargs: Any) -> Any:  # every registry name is free (no network)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with mock.patch("infra.image.urlopen", deployment.token_endpoint), mock.patch.object(
        socket, "getaddrinfo", no_such_host
    ):
        program()
    return deployment


# -- registry and identity -----------------------------------------------------------------------------------------
def test_registry_is_basic_with_the_admin_user_disabled() -> None:
    registry = deploy().azure.one("azure-native:containerregistry:Registry").inputs
    assert registry["registryName"] == REGISTRY_NAME
    assert registry["adminUserEnabled"] is False
    assert registry["sku"] == {"name": "Basic"}
    assert registry["location"] == LOCATION


def test_registry_name_and_sku_are_configurable() -> None:
    registry = deploy({"registryName": "contosoacr01", "registrySku": "Standard"}).azure.one(
        "azure-native:containerregistry:Registry"
    )
    assert registry.inputs["registryName"] == "contosoacr01"
    assert registry.inputs["sku"] == {"name": "Standard"}


def test_default_registry_name_follows_the_toolkit_scheme() -> None:
    assert default_registry_name(SUFFIX) == "aiacrq2ld5"
    assert validate_registry_name(default_registry_name(SUFFIX)) == "aiacrq2ld5"


@pytest.mark.parametrize("name", ["acr", "my-registry", "a" * 51, "ünïcode1"])
def test_invalid_registry_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="registryName"):
        validate_registry_name(name)


def test_identity_has_acr_pull_on_the_registry_only() -> None:
    deployment = deploy()
    identity = deployment.azure.one("azure-native:managedidentity:UserAssignedIdentity").inputs
    assert identity["resourceName"] == f"{REGISTRY_NAME}-pull"
    role = deployment.azure.one("azure-native:authorization:RoleAssignment").inputs
    assert role["roleDefinitionId"] == ACR_PULL
    assert role["scope"] == REGISTRY_ID
    assert role["principalId"] == "9d8c7b6a-principal"
    assert role["principalType"] == "ServicePrincipal"


def test_app_pulls_with_the_identity_and_no_password_exists() -> None:
    deployment = deploy()
    identity_id = deployment.outputs["identity_id"]
    app = deployment.app()
    assert app["configuration"]["registries"] == [{"server": LOGIN_SERVER, "identity": identity_id}]
    assert "secrets" not in app["configuration"]
    assert app["identity"] == {"type": "UserAssigned", "userAssignedIdentities": [identity_id]}
    assert not [token for token in deployment.azure.invokes if "credential" in token.lower()]
    assert "password" not in json.dumps(app).lower()


def test_app_waits_for_the_role_assignment() -> None:
    deployment = deploy()
    depends_on = deployment.options["azure-native:app:ContainerApp"].depends_on
    assert isinstance(depends_on, list)
    assert [type(resource).__name__ for resource in depends_on] == ["RoleAssignment"]


def test_an_existing_registry_is_adopted_then_its_admin_user_disabled() -> None:
    existing = {
        "id": REGISTRY_ID,
        "name": REGISTRY_NAME,
        "location": LOCATION,
        "loginServer": LOGIN_SERVER,
        "sku": {"name": "Standard", "tier": "Standard"},
        "adminUserEnabled": True,
    }
    first = deploy(azure=FakeAzure(existing_registry=existing))
    imported = first.azure.one("azure-native:containerregistry:Registry")
    assert imported.import_id == REGISTRY_ID
    assert imported.inputs["adminUserEnabled"] is True  # imported exactly as it is, so that the import succeeds

    second = deploy(
        azure=FakeAzure(existing_registry=existing),
        previous=PreviousRun({"containerRegistry": ("adopted", REGISTRY_ID)}),
    )
    updated = second.azure.one("azure-native:containerregistry:Registry")
    assert updated.import_id is None
    assert updated.inputs["adminUserEnabled"] is False
    assert updated.inputs["sku"] == {"name": "Standard"}  # the rest stays as Azure has it


# -- the image -----------------------------------------------------------------------------------------------------
def test_image_builds_inference_app_for_linux_amd64_and_pushes_to_the_registry() -> None:
    deployment = deploy()
    image = deployment.azure.one("docker-build:index:Image")
    tag = image_tag(PROJECT_DIR / BUILD_CONTEXT, "linux/amd64")
    assert image.inputs["context"] == {"location": "inference_app"}
    assert image.inputs["dockerfile"] == {"location": "inference_app/Dockerfile"}
    assert image.inputs["platforms"] == ["linux/amd64"]
    assert image.inputs["push"] is True
    assert image.inputs["tags"] == [f"{LOGIN_SERVER}/{REPOSITORY}:{tag}"]
    assert image.inputs["buildOnPreview"] is False


def test_push_uses_an_azure_ad_token_exchanged_at_the_registry() -> None:
    deployment = deploy()
    image = deployment.azure.one("docker-build:index:Image")
    registries = image.raw_inputs["registries"]
    assert reveal(registries) == [{"address": LOGIN_SERVER, "username": ACR_TOKEN_USERNAME, "password": ACR_TOKEN}]
    assert is_secret(registries)  # the token reaches the provider (and the state) only as a secret
    (request,) = deployment.token_endpoint.requests
    assert request.full_url == f"https://{LOGIN_SERVER}/oauth2/exchange"
    assert request.get_method() == "POST"
    assert deployment.token_endpoint.form() == {
        "grant_type": "access_token",
        "service": LOGIN_SERVER,
        "tenant": TENANT_ID,
        "access_token": AAD_TOKEN,
    }


def test_a_refused_token_exchange_names_the_fix() -> None:
    endpoint = TokenEndpoint(fail_with=401)
    with mock.patch("infra.image.urlopen", endpoint), pytest.raises(RuntimeError, match="az login"):
        exchange_for_acr_token(LOGIN_SERVER, TENANT_ID, AAD_TOKEN)


def test_app_runs_the_pushed_image_by_digest_with_its_own_command() -> None:
    container = deploy().app()["template"]["containers"][0]
    assert container["image"] == f"{LOGIN_SERVER}/{REPOSITORY}@{DIGEST}"
    assert "command" not in container


def test_an_unchanged_app_gives_identical_image_inputs() -> None:
    first = deploy().azure.one("docker-build:index:Image").inputs
    second = deploy().azure.one("docker-build:index:Image").inputs
    assert first == second


def test_prebuilt_image_builds_nothing_and_the_app_runs_it() -> None:
    prebuilt = "contoso.azurecr.io/inference-app@sha256:" + "0a" * 32
    deployment = deploy({"image": prebuilt})
    assert deployment.azure.count("docker-build:index:Image") == 0
    assert "azure-native:authorization:getClientToken" not in deployment.azure.invokes
    assert deployment.token_endpoint.requests == []
    container = deployment.app()["template"]["containers"][0]
    assert container["image"] == prebuilt
    assert "command" not in container


def test_default_commands_apply_only_to_a_prebuilt_image() -> None:
    commands = ("cd /mount/inference", "pip install -r requirements.txt", "python -m inference_app")
    stock = deploy({"image": "docker.io/pytorch/pytorch:2.4.0-cuda12.4-cudnn9-runtime"}, default_commands=commands)
    assert stock.app()["template"]["containers"][0]["command"] == ["/bin/bash", "-c", "; ".join(commands)]
    built = deploy(default_commands=commands)
    assert "command" not in built.app()["template"]["containers"][0]


# -- the build context hash ----------------------------------------------------------------------------------------
@pytest.fixture
def repository_copy(tmp_path: Path) -> Path:
    """A copy of inference_app/ in a scratch repository with an unrelated file beside it."""
    shutil.copytree(PROJECT_DIR / BUILD_CONTEXT, tmp_path / "inference_app", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "README.md").write_text("# readme\n")
    return tmp_path


def test_tag_changes_with_a_file_of_inference_app_only(repository_copy: Path) -> None:
    context = repository_copy / "inference_app"
    original = image_tag(context, "linux/amd64")
    assert original == image_tag(PROJECT_DIR / BUILD_CONTEXT, "linux/amd64")  # the copy is the same context

    (repository_copy / "README.md").write_text("# readme, edited\n")
    (repository_copy / "infra").mkdir()
    (repository_copy / "infra" / "new.py").write_text("x = 1\n")
    assert image_tag(context, "linux/amd64") == original

    (context / "__pycache__").mkdir(exist_ok=True)
    (context / "__pycache__" / "settings.cpython-311.pyc").write_bytes(b"\x00compiled")
    assert image_tag(context, "linux/amd64") == original  # .dockerignore'd: never sent to Docker

    settings = context / "settings.py"
    settings.write_text(settings.read_text() + "\n# a change\n")
    changed = image_tag(context, "linux/amd64")
    assert changed != original

    (context / "Dockerfile").write_text((context / "Dockerfile").read_text() + "\n# a change\n")
    assert image_tag(context, "linux/amd64") not in (original, changed)


def test_tag_depends_on_the_platform(repository_copy: Path) -> None:
    context = repository_copy / "inference_app"
    assert image_tag(context, "linux/amd64") != image_tag(context, "linux/arm64")


def _context(tmp_path: Path, dockerignore: str, files: list[str]) -> Path:
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    (tmp_path / ".dockerignore").write_text(dockerignore)
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    return tmp_path


def test_dockerignore_rules_are_dockers(tmp_path: Path) -> None:
    files = ["app.py", "notes.md", "docs/guide.md", "docs/keep.md", "a/b/cache.pyc", "build/out.bin", "x/build/y"]
    rules = "\n".join(
        [
            "# comment lines are ignored",
            "*.md",  # top level only: `*` does not cross `/`
            "docs",  # a folder excludes everything under it
            "!docs/keep.md",  # a later exception wins
            "**/*.pyc",  # any depth
            "/build/",  # leading and trailing slashes are cleaned away
            "Dockerfile",  # the Dockerfile is still sent
        ]
    )
    context = _context(tmp_path, rules, files)
    assert list(context_files(context)) == [".dockerignore", "Dockerfile", "app.py", "docs/keep.md", "x/build/y"]


def test_a_context_without_dockerfile_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Dockerfile"):
        list(context_files(tmp_path))


# -- app settings --------------------------------------------------------------------------------------------------
def test_app_settings_reach_the_container_as_environment_variables() -> None:
    config = {
        "modelPath": "/mount/model-cache/microsoft/Phi-3-mini-4k-instruct",
        "adapterPath": "/mount/models/qlora/qlora/gpu_model/adapter",
        "baseOnly": "false",
        "quantize4bit": "true",
        "maxConcurrentGenerations": "4",
        "modelRevision": "2026-11-25",
    }
    env = deploy(config).app()["template"]["containers"][0]["env"]
    assert env == [
        {"name": "INFERENCE_MODEL", "value": config["modelPath"]},
        {"name": "INFERENCE_ADAPTER", "value": config["adapterPath"]},
        {"name": "INFERENCE_BASE_ONLY", "value": "false"},
        {"name": "INFERENCE_QUANTIZE_4BIT", "value": "true"},
        {"name": "INFERENCE_MAX_CONCURRENT_GENERATIONS", "value": "4"},
        {"name": "INFERENCE_MODEL_REVISION", "value": "2026-11-25"},
    ]


def test_unset_settings_leave_the_apps_defaults() -> None:
    assert "env" not in deploy().app()["template"]["containers"][0]


def test_a_model_revision_change_changes_the_app_template() -> None:
    first = deploy({"modelRevision": "1"}).app()
    second = deploy({"modelRevision": "2"}).app()
    assert first["template"] != second["template"]
    assert first["configuration"] == second["configuration"]


def test_variable_names_are_the_ones_the_app_reads() -> None:
    read_by_app = set(environment_variables().values())
    assert set(SETTINGS_ENV.values()) - read_by_app == {"INFERENCE_MODEL_REVISION"}
    assert "INFERENCE_MODEL_REVISION" not in read_by_app  # so it can never change the app's behaviour


def test_secret_settings_become_container_app_secrets() -> None:
    secret, variable = secret_env("api-key", "INFERENCE_API_KEY", "s3cret")
    assert variable.secret_ref == "api-key" and variable.value is None
    assert secret.name == "api-key"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("image", "not an image"),
        ("buildPlatform", "linux/x86"),
        ("registryName", "my-registry"),
        ("registrySku", "Free"),
        ("modelPath", "model-cache/phi3"),
        ("adapterPath", "adapter"),
        ("baseOnly", "maybe"),
        ("quantize4bit", "2"),
        ("maxConcurrentGenerations", "0"),
        ("maxConcurrentGenerations", "many"),
        ("modelRevision", " "),
    ],
)
def test_invalid_config_is_refused_naming_the_key(key: str, value: str) -> None:
    pulumi.runtime.set_all_config({f"{PROJECT}:{key}": value})
    try:
        with pytest.raises(ConfigError, match=f"^{key}:"):
            read_image_config(pulumi.Config(PROJECT))
    finally:
        pulumi.runtime.set_all_config({})


def test_defaults_build_for_linux_amd64() -> None:
    pulumi.runtime.set_all_config({})
    config = read_image_config(pulumi.Config(PROJECT))
    assert config.builds and config.build_platform == "linux/amd64" and config.registry_sku == "Basic"
    assert config.settings == InferenceSettings()


def test_container_env_is_empty_by_default() -> None:
    assert container_env(InferenceSettings()) == []
