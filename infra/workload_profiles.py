"""The Container Apps environment's workload profiles, planned before anything is declared: an existing environment
keeps its profiles, an existing GPU profile of the configured type is reused (with the configured instance counts where
this stack manages the environment), a missing GPU profile is added where Azure allows it. What Azure would refuse
stops the program naming the key to change. infra/environment.py declares the result."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pulumi
from pulumi_azure_native import app

from infra.adoption import Adoption
from infra.errors import ConfigError
from infra.gpu import (
    GpuConfig,
    normalize_region,
    require_nodes_for_replicas,
    warn_without_a_spare_node,
    workload_profiles,
)


def _existing_profiles(existing: Any) -> list[app.WorkloadProfileArgs]:
    return [
        app.WorkloadProfileArgs(
            name=profile.name,
            workload_profile_type=profile.workload_profile_type,
            minimum_count=profile.minimum_count,
            maximum_count=profile.maximum_count,
            enable_fips=profile.enable_fips,
        )
        for profile in existing.workload_profiles or []
    ]


def _of_type(profiles: Sequence[Any], profile_type: str) -> Any:
    """The profile of this type (ARM compares types case-insensitively), if there is one."""
    return next((p for p in profiles if str(p.workload_profile_type).lower() == profile_type.lower()), None)


def _describe(profiles: Sequence[Any]) -> str:
    return ", ".join(f"{p.name} ({p.workload_profile_type})" for p in profiles) or "none"


_RAISE_MAXIMUM = "raise maximumInstanceCount or lower maxReplicas"


@dataclass(frozen=True)
class WorkloadProfiles:
    profiles: list[app.WorkloadProfileArgs]  # what the environment declares (unused when it is only referenced)
    gpu_profile_name: str  # the one the app runs on


def plan_workload_profiles(environment: Adoption, gpu: GpuConfig) -> WorkloadProfiles:
    """The environment's workload profiles and the GPU profile the app runs on, decided before anything is declared.
    An existing environment keeps its profiles; an existing profile of the configured GPU type (any name) is
    reused, with the configured instance counts when this stack manages the environment; a missing GPU profile is
    added where Azure allows it. What Azure would refuse stops the program naming the key to change."""
    desired = workload_profiles(gpu)
    existing = environment.existing
    if existing is None:
        require_nodes_for_replicas(gpu, gpu.maximum_instance_count, "maximumInstanceCount is", _RAISE_MAXIMUM)
        warn_without_a_spare_node(gpu, gpu.maximum_instance_count)
        return WorkloadProfiles(desired, gpu.profile.profile_name)
    live = _existing_profiles(existing)
    name = environment.name
    if not live:
        raise ConfigError(
            f"acaEnvironmentName: Container Apps environment {name!r} is a Consumption-only environment (no workload "
            "profiles), which cannot get a GPU workload profile; choose a new environment name with "
            "`pulumi config set acaEnvironmentName <name>` (it is created with the GPU profile)"
        )
    gpu_type = gpu.profile.profile_type
    reused = _of_type(live, gpu_type)
    if reused is not None:
        return WorkloadProfiles(_with_counts(environment, live, reused, gpu), str(reused.name))
    if environment.status == "referenced":
        raise ConfigError(
            f"Container Apps environment {name!r} has no GPU workload profile of type {gpu_type} (config `gpu`), "
            f"and existingResources is 'reference' so it cannot be added; its profiles: {_describe(live)}. Choose "
            "the `gpu` of one of them, add one in Azure, or use `pulumi config set existingResources adopt`"
        )
    if not gpu.profile.serverless:
        # Microsoft's workload profiles overview: "GPU-enabled Dedicated profiles must be configured when creating
        # an environment."
        raise ConfigError(
            f"gpu: {gpu.gpu} needs an {gpu_type} workload profile, which Azure only adds when an environment is "
            f"created, and Container Apps environment {name!r} has none (its profiles: {_describe(live)}). Use a "
            "serverless GPU, which can be added to it (`pulumi config set gpu serverless-A100`), or a new "
            "environment (`pulumi config set acaEnvironmentName <new name>`)"
        )
    if gpu.gpu == "serverless-T4" and normalize_region(str(existing.location)) == "westeurope":
        # Serverless GPU overview: in West Europe, T4 needs an environment created after it became available there.
        raise ConfigError(
            f"gpu: serverless-T4 cannot be added to the existing environment {name!r} in West Europe (Azure offers "
            "it there only to environments created with it); use a new environment "
            "(`pulumi config set acaEnvironmentName <new name>`)"
        )
    taken = next((p for p in live if p.name == gpu.profile.profile_name), None)
    if taken is not None:
        raise ConfigError(
            f"gpu: Container Apps environment {name!r} has a workload profile named {taken.name!r} of type "
            f"{taken.workload_profile_type}, so the {gpu_type} profile cannot be added under that name; choose the "
            f"`gpu` of one of its profiles ({_describe(live)}) or another `acaEnvironmentName`"
        )
    names = {p.name for p in live}
    return WorkloadProfiles(live + [p for p in desired if p.name not in names], gpu.profile.profile_name)


def _with_counts(
    environment: Adoption, live: list[app.WorkloadProfileArgs], reused: Any, gpu: GpuConfig
) -> list[app.WorkloadProfileArgs]:
    """The live profiles, the reused GPU profile with the instance counts this stack applies: all of them on an
    environment it created, those set in config on one it adopted (the live counts are kept otherwise), none on
    one it only references. `maxReplicas` is then checked against the maximum the profile will have."""
    if gpu.profile.serverless:
        return live
    applied = {
        "minimumInstanceCount": gpu.minimum_instance_count,
        "maximumInstanceCount": gpu.maximum_instance_count,
    }
    if environment.status == "adopted":
        applied = {key: value for key, value in applied.items() if key in gpu.configured_counts}
    elif environment.status == "referenced":
        if gpu.configured_counts:
            pulumi.log.warn(
                f"{', '.join(sorted(gpu.configured_counts))}: not applied, existingResources is 'reference'; the GPU "
                f"profile {reused.name!r} of environment {environment.name!r} keeps its instance counts "
                f"({reused.minimum_count}-{reused.maximum_count})"
            )
        applied = {}
    minimum = applied.get("minimumInstanceCount", reused.minimum_count)
    maximum = applied.get("maximumInstanceCount", reused.maximum_count)
    require_nodes_for_replicas(
        gpu,
        maximum,
        f"the GPU profile {reused.name!r} of environment {environment.name!r} has a maximum of",
        "lower maxReplicas" if environment.status == "referenced" else _RAISE_MAXIMUM,
    )
    warn_without_a_spare_node(gpu, maximum)
    return [
        app.WorkloadProfileArgs(
            name=p.name,
            workload_profile_type=p.workload_profile_type,
            minimum_count=minimum,
            maximum_count=maximum,
            enable_fips=p.enable_fips,
        )
        if p.name == reused.name
        else p
        for p in live
    ]
