"""The image the container app runs (config `image`, else inference_app/ built by infra/image.py), and the app
settings it runs with (INFERENCE_* environment variables)."""

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import pulumi
import pulumi_docker_build as docker_build
from pulumi_azure_native import app

from inference_app.settings import DTYPES, env_var, parse_adapter, parse_origins
from infra.config_source import ConfigSource
from infra.errors import ConfigError

DEFAULT_PLATFORM = "linux/amd64"  # the GPU workload profiles run amd64


@dataclass(frozen=True)
class InferenceSettings:
    """App settings from Pulumi config; None leaves the app's own default (inference_app/settings.py)."""

    model_path: str | None = None
    adapters: tuple[str, ...] | None = None  # NAME=PATH or a bare PATH each, as the app's --adapter takes them
    base_only: bool | None = None
    quantize_4bit: bool | None = None
    dtype: str | None = None
    max_concurrent_generations: int | None = None
    max_generations_per_client: int | None = None
    max_request_bytes: int | None = None
    allowed_origins: tuple[str, ...] | None = None
    model_revision: str | None = None  # any change rolls a new revision, which loads the adapter afresh


# InferenceSettings field -> the environment variable inference_app/settings.py reads for it (the fields are the app's
# Settings fields); INFERENCE_MODEL_REVISION is read by nobody: a new value only changes the revision template.
SETTINGS_ENV = {
    setting.name: "INFERENCE_MODEL_REVISION" if setting.name == "model_revision" else env_var(setting.name)
    for setting in fields(InferenceSettings)
}


@dataclass(frozen=True)
class ImageConfig:
    image: str | None = None  # a prebuilt image reference; None: build inference_app/
    build_platform: str = DEFAULT_PLATFORM
    settings: InferenceSettings = field(default_factory=InferenceSettings)

    @property
    def builds(self) -> bool:
        return self.image is None


_PLATFORMS = tuple(platform.value for platform in docker_build.Platform)
_IMAGE_REFERENCE = re.compile(r"[^\s@]+(@sha256:[0-9a-f]{64})?")


def _container_path(source: ConfigSource, key: str) -> str | None:
    value = source.string(key)
    if value is not None and not value.startswith("/"):
        raise ConfigError(
            f"{key}: must be an absolute path inside the container, e.g. /mount/<folder on the file share> "
            f"(the share is mounted at /mount), got {value!r}"
        )
    return value


def _dtype(source: ConfigSource) -> str | None:
    value = source.string("dtype")
    if value is not None and value not in DTYPES:
        raise ConfigError(f"dtype: must be one of {', '.join(DTYPES)}, got {value!r}")
    return value


def _adapters(source: ConfigSource) -> tuple[str, ...] | None:
    """`adapters` (NAME=PATH items: Pulumi.yaml cannot declare a map's type), else the one `adapterPath`; each item as
    the app's own --adapter parser reads it, with an absolute path in the container."""
    example = "run2=/mount/models/run2/adapter"
    items = source.string_list("adapters", example, non_empty=True)
    if items is None:
        path = _container_path(source, "adapterPath")
        return None if path is None else (path,)
    if source.raw("adapterPath") is not None:
        raise ConfigError("adapterPath and adapters are both set: list every adapter in adapters, remove adapterPath")
    for item in items:
        try:
            adapter = parse_adapter(item)
        except argparse.ArgumentTypeError as error:
            raise ConfigError(f"adapters {error}") from None
        if adapter.name is None or not str(adapter.path).startswith("/") or "," in item:
            raise ConfigError(
                f"adapters: {item!r} is not NAME=PATH with an absolute path in the container, e.g. "
                f"`pulumi config set --path 'adapters[1]' {example}`"
            )
    return items


def _allowed_origins(source: ConfigSource) -> tuple[str, ...] | None:
    """Each item must be one origin as the app's own parser reads it, so that a value the app would refuse at start
    is refused here instead; an empty list is the app's default."""
    example = "https://chat.example.com"
    origins: list[str] = []
    for item in source.string_list("allowedOrigins", example) or ():
        try:
            parsed = parse_origins(item)
        except argparse.ArgumentTypeError:
            parsed = ()
        if len(parsed) != 1:  # also an empty item, or several joined with commas
            raise ConfigError(
                f"allowedOrigins: {item!r} is not one origin: give each item as scheme://host[:port] (http or "
                f"https, no path), e.g. `pulumi config set --path 'allowedOrigins[0]' {example}`"
            )
        origins.extend(parsed)
    return tuple(origins) or None


def read_image_config(source: ConfigSource) -> ImageConfig:
    """Read and validate the image and app-setting keys; raises ConfigError naming the key."""
    image = source.string("image")
    if image is not None and not _IMAGE_REFERENCE.fullmatch(image):
        raise ConfigError(f"image: {image!r} is not an image reference such as myregistry.azurecr.io/app:1.0")
    platform = source.string("buildPlatform") or DEFAULT_PLATFORM
    if platform not in _PLATFORMS:
        raise ConfigError(f"buildPlatform: {platform!r} is not a platform Docker builds for, e.g. {DEFAULT_PLATFORM}")
    return ImageConfig(
        image=image,
        build_platform=platform,
        settings=InferenceSettings(
            model_path=_container_path(source, "modelPath"),
            adapters=_adapters(source),
            base_only=source.boolean("baseOnly", None),
            quantize_4bit=source.boolean("quantize4bit", None),
            dtype=_dtype(source),
            max_concurrent_generations=source.integer("maxConcurrentGenerations", None, minimum=1),
            max_generations_per_client=source.integer("maxGenerationsPerClient", None, minimum=1),
            max_request_bytes=source.integer("maxRequestBytes", None, minimum=1),
            allowed_origins=_allowed_origins(source),
            model_revision=source.string("modelRevision"),
        ),
    )


def container_env(settings: InferenceSettings) -> list[app.EnvironmentVarArgs]:
    """The container's environment: one INFERENCE_* variable per configured setting (none of them is secret)."""
    env = []
    for field_name, variable in SETTINGS_ENV.items():
        value = getattr(settings, field_name)
        if value is not None:
            env.append(app.EnvironmentVarArgs(name=variable, value=_env_text(value)))
    return env


def _env_text(value: str | int | bool | tuple[str, ...]) -> str:
    """A setting written as inference_app/settings.py parses it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(value)  # the app splits lists at commas
    return str(value)


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
