"""Inference on Azure Container Apps: what the AI Toolkit's inference.bicep deployed, as a Pulumi program.

Resources (each created, adopted or referenced by name, see infra/adoption.py): resource group, storage account,
its file service and file share, Log Analytics workspace, Container Apps environment with a GPU workload profile,
the environment's Azure Files storage, and the container app.
"""

import pulumi
from pulumi_azure_native import resources

from infra.adoption import PreviousRun, mirror_inputs, plan_resources
from infra.app import ContainerApp, ContainerAppArgs
from infra.config import read_config
from infra.environment import Environment, EnvironmentArgs, default_workload_profiles
from infra.monitoring import Monitoring, MonitoringArgs
from infra.outputs import export_outputs
from infra.storage import Storage, StorageArgs

config = read_config(pulumi.Config())
plan, names = plan_resources(config, PreviousRun.read())
for adoption in plan.all():
    pulumi.log.info(adoption.summary())
if any(adoption.import_now for adoption in plan.all()):
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
        workload_profiles=default_workload_profiles(config.maximum_instance_count),
        logs_customer_id=monitoring.customer_id,
        logs_shared_key=monitoring.shared_key,
        storage_account_name=storage.account_name,
        storage_account_key=storage.account_key,
        share_name=storage.share_name,
        storage_access_mode=config.storage_access_mode,
    ),
)
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
            location=environment.location,
            adoption=plan.container_app,
            environment_id=environment.environment_id,
            environment_storage_name=environment.storage_name,
            volume_name=f"{names.file_share}volume",
            image=config.image,
            command=config.container_command,
            cpu=config.container_cpu,
            memory=config.container_memory,
            workload_profile_name=environment.gpu_profile_name,
            min_replicas=config.min_replicas,
            max_replicas=config.max_replicas,
        ),
    )

for component in (storage, monitoring, environment, container_app):
    if component is not None:
        resource_ids.update(component.resource_ids)
export_outputs(
    subscription_id=plan.subscription_id,
    resource_group_name=config.resource_group_name,
    storage_account_name=storage.account_name,
    file_share_name=storage.share_name,
    app=container_app,
    adoptions=[a for a in plan.all() if container_app is not None or a is not plan.container_app],
    resource_ids=resource_ids,
)
