"""The GPU the inference app runs on, its sizing, and how it scales.

Config `gpu` picks a workload profile: `dedicated-A100` (the bicep's `NC24-A100` nodes, billed per running node, with
`minimumInstanceCount`/`maximumInstanceCount`) or a serverless GPU (`serverless-T4`, `serverless-A100`: billed per
second per replica, scales to zero, no instance counts). The container's cpu/memory default to the profile's
per-replica size; `minReplicas`/`maxReplicas` bound the app and an HTTP concurrency rule scales it. (The probes that
give a replica starting from zero time to load the model are the app's: infra/app.py.)
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, cast, get_args

import pulumi
from pulumi_azure_native import app

from infra.config_source import ConfigSource
from infra.errors import ConfigError

GpuChoice = Literal["dedicated-A100", "serverless-T4", "serverless-A100"]
DEFAULT_GPU: GpuChoice = "dedicated-A100"

# Where Azure offers each profile type, as lowercase region names without spaces (the form `location` takes).
# Sources (MicrosoftDocs/azure-docs, articles/container-apps/):
# - dedicated: workload-profiles-overview.md, "Dedicated profile details" (ms.date 2025-11-04, re-checked
#   2026-11-28): "GPU | NC24-A100, NC48-A100, NC96-A100 | ... | West US 3, North Europe", capacity by support request;
#   "GPU-enabled Dedicated profiles must be configured when creating an environment" (infra/workload_profiles.py);
# - serverless: gpu-serverless-overview.md#supported-regions, "Serverless GPUs are available in the following regions"
#   (A100: Australia East, Brazil South, East US, Italy North, Sweden Central, West US, West US 3; T4 also in Central
#   India, France Central, Japan East, North Central US, South Central US, South East Asia, South India, West Europe
#   (only in a workload profiles environment created there after the profile arrived), West US 2); read 2026-11-25
#   on learn.microsoft.com, which also listed Canada Central, and re-checked 2026-11-28 against the newest copy
#   reachable from here (the page at ms.date 2025-06-02, mirrored in xtqqczze/MicrosoftDocs-azure-docs) plus the
#   2026 sample simonjj/gemma4-on-aca, whose README lists the serverless GPU regions as australiaeast, brazilsouth,
#   canadacentral, eastus, italynorth, swedencentral, uksouth, westus, westus3: UK South added from it. A region
#   wrongly listed costs the user Azure's own error at `pulumi up`; one wrongly missing stops them here.
# Azure adds regions over time: `skipGpuRegionCheck: true` skips this check when the table is behind.
_SERVERLESS_A100_REGIONS = frozenset(
    {
        "australiaeast",
        "brazilsouth",
        "canadacentral",
        "eastus",
        "italynorth",
        "swedencentral",
        "uksouth",
        "westus",
        "westus3",
    }
)
_SERVERLESS_T4_REGIONS = _SERVERLESS_A100_REGIONS | frozenset(
    {
        "centralindia",
        "francecentral",
        "japaneast",
        "northcentralus",
        "southcentralus",
        "southeastasia",
        "southindia",
        "westeurope",
        "westus2",
    }
)
_DEDICATED_A100_REGIONS = frozenset({"westus3", "northeurope"})


@dataclass(frozen=True)
class GpuProfile:
    """One workload profile type and what a replica on it may use (same source as the region table: vCPU and
    memory per node for dedicated profiles, per replica for serverless ones; one GPU either way)."""

    profile_type: str
    profile_name: str  # the name in the environment; `GPU` as the bicep for the dedicated one
    cpu: float
    memory_gib: float
    serverless: bool
    regions: frozenset[str]

    @property
    def memory(self) -> str:
        return f"{self.memory_gib:g}Gi"


PROFILES: Mapping[GpuChoice, GpuProfile] = {
    "dedicated-A100": GpuProfile("NC24-A100", "GPU", 24.0, 220.0, False, _DEDICATED_A100_REGIONS),
    "serverless-T4": GpuProfile("Consumption-GPU-NC8as-T4", "GPU-T4", 8.0, 56.0, True, _SERVERLESS_T4_REGIONS),
    "serverless-A100": GpuProfile("Consumption-GPU-NC24-A100", "GPU-A100", 24.0, 220.0, True, _SERVERLESS_A100_REGIONS),
}

# HTTP scale rule: a replica takes this many concurrent requests before another one is added (ACA's default is 10;
# the inference app serves 16 generations at once by default and answers 429 beyond, so scaling starts before that).
DEFAULT_CONCURRENT_REQUESTS = 10
# The bicep's profile range: no node is kept when nothing runs on it.
DEFAULT_MINIMUM_INSTANCE_COUNT = 0
DEFAULT_MAXIMUM_INSTANCE_COUNT = 2

_MEMORY = re.compile(r"(\d+(?:\.\d+)?)Gi")


@dataclass(frozen=True)
class GpuConfig:
    gpu: GpuChoice
    profile: GpuProfile
    container_cpu: float
    container_memory: str
    min_replicas: int
    max_replicas: int
    minimum_instance_count: int | None  # dedicated only: nodes kept running (billed) at all times
    maximum_instance_count: int | None  # dedicated only: the most nodes the profile may run
    concurrent_requests: int
    skip_region_check: bool = False  # `skipGpuRegionCheck`: for regions Azure added after the table above
    # Instance count keys set in config or the parameters file: applied to an adopted environment's GPU profile,
    # whose live counts are kept otherwise (infra/workload_profiles.py).
    configured_counts: frozenset[str] = frozenset()


def normalize_region(location: str) -> str:
    """`West US 3` and `westus3` are the same region to ARM."""
    return location.replace(" ", "").lower()


def _cpu(source: ConfigSource, profile: GpuProfile) -> float:
    value = source.raw("containerCpu")
    if value is None:
        return profile.cpu
    try:
        cpu = float(value)
    except ValueError:
        cpu = 0.0
    if not 0 < cpu <= profile.cpu:
        raise ConfigError(
            f"containerCpu: must be a number of vCPUs above 0 and at most {profile.cpu:g} "
            f"(what a {profile.profile_type} replica gets), got {value!r}"
        )
    return cpu


def _memory(source: ConfigSource, profile: GpuProfile) -> str:
    value = source.raw("containerMemory")
    if value is None:
        return profile.memory
    match = _MEMORY.fullmatch(str(value).strip())
    if match is None or not 0 < float(match.group(1)) <= profile.memory_gib:
        raise ConfigError(
            f"containerMemory: must be a size in Gi above 0 and at most {profile.memory} "
            f"(what a {profile.profile_type} replica gets), such as '{profile.memory}', got {value!r}"
        )
    return str(value).strip()


def require_gpu_region(config: GpuConfig, location: str) -> None:
    """Fail, naming the regions that offer it, when `location` (the environment's region) does not offer `gpu`."""
    gpu = config.gpu
    region = normalize_region(location)
    if config.skip_region_check or region in PROFILES[gpu].regions:
        return
    others = [other for other, profile in PROFILES.items() if other != gpu and region in profile.regions]
    hint = f"; {location} offers gpu {' and '.join(others)}" if others else ""
    raise ConfigError(
        f"gpu: {gpu} ({PROFILES[gpu].profile_type}) is not offered in {location!r}; Azure offers it in "
        f"{', '.join(sorted(PROFILES[gpu].regions))}{hint}. Use a region that offers it (`location`; an existing "
        "environment or resource group decides it), pick another `gpu`, or, if Azure has added the region since, "
        "`pulumi config set skipGpuRegionCheck true`"
    )


def read_gpu_config(source: ConfigSource) -> GpuConfig:
    """Read and validate `gpu`, sizing, replica range, instance counts and scaling; raises ConfigError naming the
    key and the rule. The region check needs the environment's region, known after the lookups:
    `require_gpu_region`."""
    gpu = cast(GpuChoice, source.choice("gpu", get_args(GpuChoice), DEFAULT_GPU))
    profile = PROFILES[gpu]

    min_replicas = source.integer("minReplicas", 1, minimum=0)
    max_replicas = source.integer("maxReplicas", 1, minimum=1)
    if min_replicas > max_replicas:
        raise ConfigError(f"minReplicas: must not exceed maxReplicas ({min_replicas} > {max_replicas})")

    minimum_count: int | None = None
    maximum_count: int | None = None
    configured_counts = frozenset(
        key for key in ("minimumInstanceCount", "maximumInstanceCount") if source.raw(key) is not None
    )
    if profile.serverless:
        # The parameters file's maximumInstanceCount belongs to the bicep's dedicated profile: only Pulumi config
        # counts here, where setting a count is a mistake worth reporting.
        counts = [key for key in ("minimumInstanceCount", "maximumInstanceCount") if source.in_stack_config(key)]
        if counts:
            raise ConfigError(
                f"{counts[0]}: serverless GPU profiles ({gpu}) have no instance counts, they bill per replica; "
                f"remove it with `pulumi config rm {counts[0]}`, or use gpu dedicated-A100"
            )
    else:
        minimum_count = source.integer("minimumInstanceCount", DEFAULT_MINIMUM_INSTANCE_COUNT, minimum=0)
        maximum_count = source.integer("maximumInstanceCount", DEFAULT_MAXIMUM_INSTANCE_COUNT, minimum=1)
        if minimum_count > maximum_count:
            raise ConfigError(
                f"minimumInstanceCount: must not exceed maximumInstanceCount ({minimum_count} > {maximum_count})"
            )
        if min_replicas == 0 and minimum_count > 0:
            raise ConfigError(
                f"minReplicas: 0 on dedicated-A100 needs minimumInstanceCount 0, otherwise {minimum_count} "
                "NC24-A100 node(s) keep running and billing while the app sits at zero; set minimumInstanceCount 0, "
                "set minReplicas 1 or more, or use a serverless gpu"
            )

    config = GpuConfig(
        gpu=gpu,
        profile=profile,
        container_cpu=_cpu(source, profile),
        container_memory=_memory(source, profile),
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        minimum_instance_count=minimum_count,
        maximum_instance_count=maximum_count,
        concurrent_requests=source.integer("scaleConcurrentRequests", DEFAULT_CONCURRENT_REQUESTS, minimum=1),
        skip_region_check=source.boolean("skipGpuRegionCheck", False),
        configured_counts=configured_counts if not profile.serverless else frozenset(),
    )
    if "maximumInstanceCount" in configured_counts:
        require_nodes_for_replicas(
            config, maximum_count, "maximumInstanceCount is", "raise maximumInstanceCount or lower maxReplicas"
        )
    return config


def require_nodes_for_replicas(config: GpuConfig, maximum: int | None, whose_maximum: str, fix: str) -> None:
    """Each replica takes a dedicated node's only GPU: more replicas than the profile's maximum nodes would never be
    scheduled."""
    if config.profile.serverless or maximum is None or config.max_replicas <= maximum:
        return
    raise ConfigError(
        f"maxReplicas: {config.max_replicas} replicas need {config.max_replicas} {config.profile.profile_type} nodes "
        f"(one GPU each), but {whose_maximum} {maximum}; {fix}"
    )


def warn_without_a_spare_node(config: GpuConfig, maximum: int | None) -> None:
    """With as many replicas as the profile has nodes, every node is taken: a new revision (a new image, settings or
    `modelRevision`) has no node to start on, and in single revision mode the old replicas stay until it is ready,
    so the update hangs until it times out."""
    if config.profile.serverless or maximum is None or config.max_replicas < maximum:
        return
    pulumi.log.warn(
        f"maxReplicas: {config.max_replicas} replicas can fill all {maximum} {config.profile.profile_type} nodes of "
        "the GPU profile (one GPU each), leaving no node for a new revision: an update that changes the image, the "
        "settings or modelRevision would hang. Allow one more node than replicas (`pulumi config set "
        f"maximumInstanceCount {config.max_replicas + 1}`), lower maxReplicas, or use a serverless gpu "
        "(`pulumi config set gpu serverless-A100`)."
    )


def gpu_workload_profile(gpu: GpuConfig) -> app.WorkloadProfileArgs:
    """The environment's GPU profile; serverless profiles take no instance counts."""
    return app.WorkloadProfileArgs(
        name=gpu.profile.profile_name,
        workload_profile_type=gpu.profile.profile_type,
        minimum_count=gpu.minimum_instance_count,
        maximum_count=gpu.maximum_instance_count,
    )


def workload_profiles(gpu: GpuConfig) -> list[app.WorkloadProfileArgs]:
    """Every workload profiles environment has `Consumption`; the GPU profile is added beside it."""
    return [app.WorkloadProfileArgs(name="Consumption", workload_profile_type="Consumption"), gpu_workload_profile(gpu)]


def scale_rules(gpu: GpuConfig) -> list[app.ScaleRuleArgs]:
    """Scale on concurrent HTTP requests per replica; with minReplicas 0 this rule is also what wakes the app."""
    return [
        app.ScaleRuleArgs(
            name="http-concurrency",
            http=app.HttpScaleRuleArgs(metadata={"concurrentRequests": str(gpu.concurrent_requests)}),
        )
    ]
