"""The image the container app runs, and the app settings it runs with.

By default `pulumi up` builds `inference_app/` (its Dockerfile, that folder as the build context) for linux/amd64 and
pushes it to the stack's registry (infra/registry.py); the app then runs `<login server>/inference-app@sha256:...`.
Config `image` names a prebuilt image instead, and nothing is built.

Why pulumi-docker-build rather than pulumi-docker's `docker.Image`: it is Pulumi's maintained BuildKit provider, it
takes registry credentials per resource without touching the user's Docker config, it ignores registry password
changes when diffing (so a fresh short-lived token each run causes no rebuild) and it outputs the pushed `digest`.

The build context is `inference_app/`, not the repository root: Docker never receives the repository's virtual
environment, tests or git history, and only a change under `inference_app/` can change the image. Its tag is a hash
of that context, computed here the way Docker selects files (`inference_app/.dockerignore`), so an unchanged app keeps
its tag and the image resource shows no diff, while any change to a file of `inference_app/` gives a new tag.

Push authentication without the admin user: the Azure AD token of the identity running `pulumi up` (the azure-native
provider's own login, e.g. `az login`) is exchanged at the registry's `/oauth2/exchange` endpoint for an ACR refresh
token, the flow `az acr login --expose-token` uses. No `docker login` or `az acr login` step is needed, also on the
first `pulumi up`, which creates the registry it pushes to. The pushing identity needs push rights on the registry (Owner
or Contributor of the resource group have them; otherwise grant AcrPush).
"""

import hashlib
import json
import os
import posixpath
import re
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

import pulumi
import pulumi_docker_build as docker_build
from pulumi_azure_native import app, authorization

from infra.errors import ConfigError
from infra.registry import REGISTRY_SKUS, validate_registry_name

PROJECT_DIR = Path(__file__).resolve().parents[1]
# Relative to the project directory (where `pulumi up` runs the program and the provider), so that the image's inputs
# are the same on every machine.
BUILD_CONTEXT = Path("inference_app")
REPOSITORY = "inference-app"
DEFAULT_PLATFORM = "linux/amd64"  # the GPU workload profiles run amd64
# The user name ACR expects with a refresh token obtained from an Azure AD token (`az acr login --expose-token`).
ACR_TOKEN_USERNAME = "00000000-0000-0000-0000-000000000000"
TOKEN_EXCHANGE_TIMEOUT_S = 60


# -- configuration -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InferenceSettings:
    """App settings from Pulumi config; None leaves the app's own default (inference_app/settings.py)."""

    model_path: str | None = None
    adapter_path: str | None = None
    base_only: bool | None = None
    quantize_4bit: bool | None = None
    max_concurrent_generations: int | None = None
    model_revision: str | None = None  # any change rolls a new revision, which loads the adapter afresh


# InferenceSettings field -> the environment variable inference_app/settings.py reads for it.
SETTINGS_ENV = {
    "model_path": "INFERENCE_MODEL",
    "adapter_path": "INFERENCE_ADAPTER",
    "base_only": "INFERENCE_BASE_ONLY",
    "quantize_4bit": "INFERENCE_QUANTIZE_4BIT",
    "max_concurrent_generations": "INFERENCE_MAX_CONCURRENT_GENERATIONS",
    "model_revision": "INFERENCE_MODEL_REVISION",  # read by nobody: a new value only changes the revision template
}


@dataclass(frozen=True)
class ImageConfig:
    image: str | None = None  # a prebuilt image reference; None: build inference_app/
    build_platform: str = DEFAULT_PLATFORM
    registry_name: str | None = None  # None: aiacr<s> (infra/registry.py)
    registry_sku: str = "Basic"
    settings: InferenceSettings = field(default_factory=InferenceSettings)

    @property
    def builds(self) -> bool:
        return self.image is None


_PLATFORMS = tuple(platform.value for platform in docker_build.Platform)
_IMAGE_REFERENCE = re.compile(r"[^\s@]+(@sha256:[0-9a-f]{64})?")


def _text(config: pulumi.Config, key: str) -> str | None:
    value = config.get(key)
    if value is not None and not value.strip():
        raise ConfigError(f"{key}: must not be empty; remove it with `pulumi config rm {key}`")
    return value.strip() if value is not None else None


def _bool(config: pulumi.Config, key: str) -> bool | None:
    try:
        return config.get_bool(key)
    except pulumi.ConfigTypeError:
        raise ConfigError(f"{key}: must be true or false, got {config.get(key)!r}") from None


def _positive_int(config: pulumi.Config, key: str) -> int | None:
    try:
        value = config.get_int(key)
    except pulumi.ConfigTypeError:
        value = 0
    if value is not None and value < 1:
        raise ConfigError(f"{key}: must be an integer >= 1, got {config.get(key)!r}")
    return value


def _container_path(config: pulumi.Config, key: str) -> str | None:
    value = _text(config, key)
    if value is not None and not value.startswith("/"):
        raise ConfigError(
            f"{key}: must be an absolute path inside the container, e.g. /mount/<folder on the file share> "
            f"(the share is mounted at /mount), got {value!r}"
        )
    return value


def read_image_config(config: pulumi.Config) -> ImageConfig:
    """Read and validate the image, registry and app-setting keys; raises ConfigError naming the key."""
    image = _text(config, "image")
    if image is not None and not _IMAGE_REFERENCE.fullmatch(image):
        raise ConfigError(f"image: {image!r} is not an image reference such as myregistry.azurecr.io/app:1.0")
    platform = _text(config, "buildPlatform") or DEFAULT_PLATFORM
    if platform not in _PLATFORMS:
        raise ConfigError(f"buildPlatform: {platform!r} is not a platform Docker builds for, e.g. {DEFAULT_PLATFORM}")
    registry_name = _text(config, "registryName")
    registry_sku = _text(config, "registrySku") or "Basic"
    if registry_sku not in REGISTRY_SKUS:
        raise ConfigError(f"registrySku: must be one of {', '.join(REGISTRY_SKUS)}, got {registry_sku!r}")
    return ImageConfig(
        image=image,
        build_platform=platform,
        registry_name=validate_registry_name(registry_name) if registry_name is not None else None,
        registry_sku=registry_sku,
        settings=InferenceSettings(
            model_path=_container_path(config, "modelPath"),
            adapter_path=_container_path(config, "adapterPath"),
            base_only=_bool(config, "baseOnly"),
            quantize_4bit=_bool(config, "quantize4bit"),
            max_concurrent_generations=_positive_int(config, "maxConcurrentGenerations"),
            model_revision=_text(config, "modelRevision"),
        ),
    )


def container_env(settings: InferenceSettings) -> list[app.EnvironmentVarArgs]:
    """The container's environment: one INFERENCE_* variable per configured setting (none of them is secret)."""
    env = []
    for field_name, variable in SETTINGS_ENV.items():
        value = getattr(settings, field_name)
        if value is None:
            continue
        text = str(value).lower() if isinstance(value, bool) else str(value)
        env.append(app.EnvironmentVarArgs(name=variable, value=text))
    return env


def secret_env(secret_name: str, variable: str, value: pulumi.Input[str]) -> tuple[app.SecretArgs, app.EnvironmentVarArgs]:
    """A secret setting: a container app secret (never in the template in plain text) and the variable reading it."""
    return (
        app.SecretArgs(name=secret_name, value=pulumi.Output.secret(value)),
        app.EnvironmentVarArgs(name=variable, secret_ref=secret_name),
    )


def container_command(config: ImageConfig, default_commands: Sequence[str] | None) -> list[str] | None:
    """The container's command: the image's own, except for a prebuilt `image` with `defaultCommands` (the bicep's
    `/bin/bash -c '<commands joined by "; ">'`, for a stock image that installs and starts the app itself)."""
    if not default_commands:
        return None
    if config.builds:
        pulumi.log.warn(
            "defaultCommands is ignored: the built image starts the app by itself. It applies only together with "
            "`image` (a prebuilt image without our app); remove it (`pulumi config rm defaultCommands`, or from "
            "infra/provision/inference.parameters.json, where the AI Toolkit puts it) to silence this warning."
        )
        return None
    return ["/bin/bash", "-c", "; ".join(default_commands)]


# -- build context hash --------------------------------------------------------------------------------------------
def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex, as moby/patternmatcher compiles it (`*`, `?`, `**`, `[...]`, `\\`)."""
    regex, index = "^", 0
    while index < len(pattern):
        char = pattern[index]
        index += 1
        if char == "*" and pattern[index : index + 1] == "*":
            index += 1
            if pattern[index : index + 1] == "/":
                index += 1
            regex += ".*" if index == len(pattern) else "(.*/)?"
        elif char == "*":
            regex += "[^/]*"
        elif char == "?":
            regex += "[^/]"
        elif char == "\\" and index < len(pattern):
            regex += re.escape(pattern[index])
            index += 1
        elif char in "[]":
            regex += char
        else:
            regex += re.escape(char)
    return re.compile(regex + "$")


def read_dockerignore(context: Path) -> list[tuple[re.Pattern[str], bool]]:
    """(pattern, is_exception) in file order, read as Docker does: `#` comments, `!` exceptions, paths cleaned and
    relative to the context."""
    path = context / ".dockerignore"
    if not path.exists():
        return []
    patterns = []
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        if line.startswith("#") or not line.strip():
            continue
        pattern = line.strip()
        exception = pattern.startswith("!")
        pattern = posixpath.normpath(pattern.removeprefix("!").strip()).lstrip("/") or "."
        patterns.append((_dockerignore_regex(pattern), exception))
    return patterns


def is_ignored(relative_path: str, patterns: list[tuple[re.Pattern[str], bool]]) -> bool:
    """Docker's rule: the last pattern matching the path, or one of its parent folders, decides."""
    parents = relative_path.split("/")[:-1]
    candidates = [relative_path] + ["/".join(parents[: depth + 1]) for depth in range(len(parents))]
    ignored = False
    for regex, exception in patterns:
        if any(regex.match(candidate) for candidate in candidates):
            ignored = not exception
    return ignored


def context_files(context: Path) -> Iterator[str]:
    """Paths (relative, '/'-separated, sorted) of the files Docker sends for this context; the Dockerfile always."""
    if not (context / "Dockerfile").is_file():
        raise FileNotFoundError(f"{context / 'Dockerfile'} does not exist: the image cannot be built")
    patterns = read_dockerignore(context)
    for root, folders, files in os.walk(context):
        folders.sort()
        for name in sorted(files):
            relative = Path(root, name).relative_to(context).as_posix()
            if relative == "Dockerfile" or not is_ignored(relative, patterns):
                yield relative


def context_hash(context: Path, platform: str) -> str:
    """sha256 over the platform and every context file's path, executable bit and content."""
    digest = hashlib.sha256(platform.encode())
    for relative in context_files(context):
        path = context / relative
        digest.update(b"\0" + relative.encode() + b"\0" + (b"x" if os.access(path, os.X_OK) else b"-") + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def image_tag(context: Path, platform: str) -> str:
    return context_hash(context, platform)[:16]


# -- push credentials ----------------------------------------------------------------------------------------------
def exchange_for_acr_token(login_server: str, tenant_id: str, aad_token: str) -> str:
    """An ACR refresh token for `login_server` in exchange for an Azure AD access token (ACR's AAD-OAuth flow)."""
    body = urllib.parse.urlencode(
        {"grant_type": "access_token", "service": login_server, "tenant": tenant_id, "access_token": aad_token}
    ).encode()
    request = Request(
        f"https://{login_server}/oauth2/exchange",
        data=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        method="POST",
    )
    try:
        with urlopen(request, timeout=TOKEN_EXCHANGE_TIMEOUT_S) as response:
            token = json.load(response).get("refresh_token")
    except (HTTPError, URLError, TimeoutError, ValueError) as error:
        raise RuntimeError(
            f"Could not get a push token for registry {login_server} with your Azure login ({error}). Check "
            "`az login` (or the credentials azure-native uses) and that you may push to the registry (AcrPush)."
        ) from None
    if not isinstance(token, str) or not token:
        raise RuntimeError(f"Registry {login_server} answered the token exchange without a refresh_token")
    return token


def push_credentials(login_server: pulumi.Input[str]) -> docker_build.RegistryArgs:
    """Registry credentials for the build from the azure-native provider's login (a secret, never the admin user)."""
    client = authorization.get_client_config_output()
    aad_token = authorization.get_client_token_output().token
    acr_token = pulumi.Output.all(pulumi.Output.from_input(login_server), client.tenant_id, aad_token).apply(
        lambda values: exchange_for_acr_token(*values)
    )
    return docker_build.RegistryArgs(
        address=login_server, username=ACR_TOKEN_USERNAME, password=pulumi.Output.secret(acr_token)
    )


# -- the image -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InferenceImageArgs:
    login_server: pulumi.Input[str]
    platform: str = DEFAULT_PLATFORM
    context: Path = BUILD_CONTEXT
    project_dir: Path = PROJECT_DIR
    repository: str = REPOSITORY


class InferenceImage(pulumi.ComponentResource):
    """inference_app/ built and pushed; `ref` (`<login server>/<repository>@sha256:...`) is what the app runs."""

    tag: str
    digest: pulumi.Output[str]
    ref: pulumi.Output[str]

    def __init__(self, name: str, args: InferenceImageArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("inference:infra:InferenceImage", name, None, opts)
        self.tag = image_tag(args.project_dir / args.context, args.platform)
        repository = pulumi.Output.concat(args.login_server, "/", args.repository)
        image = docker_build.Image(
            "image",
            context=docker_build.BuildContextArgs(location=str(args.context)),
            dockerfile=docker_build.DockerfileArgs(location=str(args.context / "Dockerfile")),
            platforms=[docker_build.Platform(args.platform)],
            tags=[pulumi.Output.concat(repository, ":", self.tag)],
            push=True,
            registries=[push_credentials(args.login_server)],
            # A CUDA image takes minutes to build: `pulumi preview` only checks the Dockerfile; `up` builds once.
            build_on_preview=False,
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.digest = image.digest
        self.ref = pulumi.Output.concat(repository, "@", image.digest)
        self.register_outputs({"tag": self.tag, "ref": self.ref})


def app_image(config: ImageConfig, login_server: pulumi.Input[str]) -> pulumi.Input[str]:
    """What the container app runs: the prebuilt `image`, or inference_app/ built and pushed, by digest."""
    if config.image is not None:
        return config.image
    return InferenceImage("image", InferenceImageArgs(login_server=login_server, platform=config.build_platform)).ref
