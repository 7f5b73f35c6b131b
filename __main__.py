"""Inference on Azure Container Apps: what the AI Toolkit's inference.bicep deployed, as a Pulumi program.

Resources (each created, adopted or referenced by name, see infra/adoption.py): resource group, storage account,
its file service and file share, Log Analytics workspace, Container Apps environment with a GPU workload profile,
the environment's Azure Files storage, the container registry with the identity the app pulls as, the inference
image built from inference_app/ and pushed there, the container app running it, and who may reach it (infra/access.py).
"""

import pulumi
from pulumi_azure_native import resources

from infra.access import EndpointAccess, needs_sticky_sessions, read_access_config
from infra.adoption import PreviousRun, mirror_inputs, plan_resources
from infra.app import TARGET_PORT, ContainerApp, ContainerAppArgs
from infra.config import read_config
from infra.environment import Environment, EnvironmentArgs
from infra.gpu import probes, require_gpu_region, scale_rules, workload_profiles
from infra.image import app_image, container_command, container_env, read_image_config
from infra.monitoring import Monitoring, MonitoringArgs
from infra.naming import resource_suffix
from infra.outputs import export_outputs
from infra.registry import Registry, RegistryArgs, default_registry_name, plan_registry
from infra.storage import Storage, StorageArgs

config = read_config(pulumi.Config())
image_config = read_image_config(pulumi.Config())
access_config = read_access_config(pulumi.Config())
gpu = config.gpu
previous_run = PreviousRun.read()
plan, names = plan_resources(config, previous_run)
registry_plan = plan_registry(
    image_config.registry_name or default_registry_name(resource_suffix(plan.resource_group_id)),
    config.resource_group_name,
    group_exists=plan.resource_group.existing is not None,
    mode=config.existing_resources,
    previous=previous_run,
    explicit=image_config.registry_name is not None,
)
require_gpu_region(gpu, plan.environment_location)
adoptions = plan.all() + [registry_plan]
for adoption in adoptions:
    pulumi.log.info(adoption.summary())
if any(adoption.import_now for adoption in adoptions):
    pulumi.log.info(
        "Existing resources are imported as they are on this run: "
        "run `pulumi up` once more to apply this program's settings to them."
    )

group_name: pulumi.Input[str] = config.resource_group_name
resource_ids: dict[str, pulumi.Output[str]] = {}
if plan.resource_group.declared:
    group = resources.ResourceGroup(
        "resource-group",
        resource_group_name=config.resource_group_name,
        **(
            mirror_inputs(plan.resource_group.existing, resources.ResourceGroupArgs)
            if plan.resource_group.existing is not None
            else {"location": plan.location}
        ),
        # Deleting a group deletes everything in it, the retained storage account and share included.
        opts=plan.resource_group.options(always_retain=True),
    )
    group_name = group.name
    resource_ids[plan.resource_group.key] = group.id

storage = Storage(
    "storage",
    StorageArgs(
        resource_group_name=group_name,
        location=plan.location,
        account=plan.storage_account,
        file_service=plan.file_service,
        share=plan.file_share,
    ),
)
monitoring = Monitoring(
    "monitoring", MonitoringArgs(resource_group_name=group_name, location=plan.location, workspace=plan.log_analytics)
)
environment = Environment(
    "environment",
    EnvironmentArgs(
        resource_group_name=group_name,
        location=plan.location,
        environment=plan.environment,
        environment_storage=plan.environment_storage,
        workload_profiles=workload_profiles(gpu),
        gpu_profile_name=gpu.profile.profile_name,
        logs_customer_id=monitoring.customer_id,
        logs_shared_key=monitoring.shared_key,
        storage_account_name=storage.account_name,
        storage_account_key=storage.account_key,
        share_name=storage.share_name,
        storage_access_mode=config.storage_access_mode,
    ),
)
registry = Registry(
    "registry",
    RegistryArgs(
        resource_group_name=group_name,
        location=plan.location,
        subscription_id=plan.subscription_id,
        registry=registry_plan,
        sku=image_config.registry_sku,
    ),
)
access = EndpointAccess("access", access_config)
if environment.gpu_profile_name is None:
    container_app = None
    pulumi.log.info(
        f"Container app {names.container_app}: created on the next `pulumi up`, once the environment imported on "
        "this run has its GPU workload profile."
    )
else:
    container_app = ContainerApp(
        "app",
        ContainerAppArgs(
            resource_group_name=group_name,
            location=plan.environment_location,
            adoption=plan.container_app,
            environment_id=environment.environment_id,
            environment_storage_name=environment.storage_name,
            volume_name=f"{names.file_share}volume",
            image=app_image(image_config, registry.login_server),  # built and pushed unless `image` is set
            command=container_command(image_config, config.default_commands),
            probes=probes(TARGET_PORT),
            env=[*container_env(image_config.settings), *access.env],
            secrets=access.secrets,
            registries=[registry.app_registry_credentials()],
            identity=registry.app_identity(),
            depends_on=registry.app_depends_on(),
            cpu=gpu.container_cpu,
            memory=gpu.container_memory,
            workload_profile_name=environment.gpu_profile_name,
            min_replicas=gpu.min_replicas,
            max_replicas=gpu.max_replicas,
            scale_rules=scale_rules(gpu),
            ip_security_restrictions=access.ip_security_restrictions,
            sticky_sessions=needs_sticky_sessions(gpu.max_replicas),
        ),
    )
    if plan.container_app.declared:  # a referenced app is only read
        access.protect_app(container_app.name, group_name)

for component in (storage, monitoring, environment, registry, container_app):
    if component is not None:
        resource_ids.update(component.resource_ids)
export_outputs(
    subscription_id=plan.subscription_id,
    resource_group_name=config.resource_group_name,
    storage_account_name=storage.account_name,
    file_share_name=storage.share_name,
    app=container_app,
    access=access,
    adoptions=[a for a in adoptions if container_app is not None or a is not plan.container_app],
    resource_ids=resource_ids,
)
