"""inference_app/ built for the GPU profiles' platform and pushed to the stack's registry; the app runs it by digest.

The build context is `inference_app/` (never the repository's virtual environment, tests or git history) and the tag
hashes exactly the files Docker receives (infra/dockerignore.py), so an unchanged app keeps its tag and shows no
diff. Built with pulumi-docker-build (Pulumi's BuildKit provider: per-resource registry credentials, no diff on a
fresh token, the pushed `digest` as an output); pushed with an Azure AD token (infra/acr_token.py). Why these
choices: docs/.
"""

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import pulumi
import pulumi_docker_build as docker_build

from infra.acr_token import push_credentials
from infra.dockerignore import context_files
from infra.image_config import DEFAULT_PLATFORM, ImageConfig

PROJECT_DIR = Path(__file__).resolve().parents[1]
# Relative to the project directory (where `pulumi up` runs the program and the provider), so that the image's inputs
# are the same on every machine.
BUILD_CONTEXT = Path("inference_app")
REPOSITORY = "inference-app"


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
