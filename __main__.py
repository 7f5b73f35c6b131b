"""Inference on Azure Container Apps: what the AI Toolkit's inference.bicep deployed, as a Pulumi program.

Resources (each created, adopted or referenced by name, see infra/adoption.py): resource group, storage account,
its file service and file share, Log Analytics workspace, Container Apps environment with a GPU workload profile,
the environment's Azure Files storage, the container registry with the identity the app pulls as, the inference
image built from inference_app/ and pushed there, the container app running it, and who may reach it (infra/access.py).
"""

from infra.access import EndpointAccess, needs_sticky_sessions
from infra.adoption import Ledger
from infra.app import ContainerApp, ContainerAppArgs
from infra.config import read_config
from infra.environment import Environment, EnvironmentArgs
from infra.gpu import require_gpu_region, scale_rules
from infra.image import app_image
from infra.image_config import container_command, container_env
from infra.monitoring import Monitoring, MonitoringArgs
from infra.outputs import export_outputs
from infra.plan import plan_resources
from infra.registry import Registry, RegistryArgs
from infra.resource_group import ResourceGroup, ResourceGroupArgs
from infra.storage import Storage, StorageArgs

config = read_config()
plan, names = plan_resources(config)
require_gpu_region(config.gpu, plan.environment_location)
ledger = Ledger()  # what this stack manages, exported as `adoption` for the next run

group = ResourceGroup("resource-group", ResourceGroupArgs(plan.resource_group, plan.location, ledger))
storage = Storage(
    "storage",
    StorageArgs(group.name, plan.location, plan.storage_account, plan.file_service, plan.file_share, ledger),
)
monitoring = Monitoring("monitoring", MonitoringArgs(group.name, plan.location, plan.log_analytics, ledger))
environment = Environment(
    "environment",
    EnvironmentArgs(
        resource_group_name=group.name,
        location=plan.location,
        environment=plan.environment,
        environment_storage=plan.environment_storage,
        workload_profiles=plan.workload_profiles,
        logs_customer_id=monitoring.customer_id,
        logs_shared_key=monitoring.shared_key,
        storage_account_name=storage.account_name,
        storage_account_key=storage.account_key,
        share_name=storage.share_name,
        storage_access_mode=config.storage_access_mode,
        ledger=ledger,
    ),
)
registry = Registry(
    "registry",
    RegistryArgs(
        resource_group_name=group.name,
        location=plan.location,
        subscription_id=plan.subscription_id,
        registry=plan.container_registry,
        pull_identity=plan.pull_identity,
        acr_pull=plan.acr_pull,
        ledger=ledger,
        sku=config.registry_sku,
    ),
)
image = app_image(config.image, registry.login_server)  # inference_app/ built and pushed, unless `image` is set
access = EndpointAccess("access", config.access)
container_app = ContainerApp(
    "app",
    ContainerAppArgs(
        resource_group_name=group.name,
        location=plan.environment_location,
        adoption=plan.container_app,
        ledger=ledger,
        environment_id=environment.environment_id,
        environment_storage_name=environment.storage_name,
        volume_name=f"{names.file_share}volume",
        image=image,
        command=container_command(config.image, config.default_commands),
        serves_inference_app=not config.runs_foreign_image,
        env=[*container_env(config.image.settings), *access.env],
        secrets=access.secrets,
        registries=registry.app_registries(config.image.image),
        identity=registry.app_identity(),
        depends_on=registry.app_depends_on(),
        cpu=config.gpu.container_cpu,
        memory=config.gpu.container_memory,
        workload_profile_name=environment.gpu_profile_name,
        min_replicas=config.gpu.min_replicas,
        max_replicas=config.gpu.max_replicas,
        scale_rules=scale_rules(config.gpu),
        ip_security_restrictions=access.ip_security_restrictions,
        sticky_sessions=needs_sticky_sessions(config.gpu.max_replicas),
    ),
)
if plan.container_app.declared:  # a referenced app is only read
    access.protect_app(container_app.name, group.name)

export_outputs(
    subscription_id=plan.subscription_id,
    resource_group_name=plan.resource_group.name,  # as Azure spells it, once the group exists
    storage_account_name=storage.account_name,
    file_share_name=storage.share_name,
    app=container_app,
    access=access,
    ledger=ledger,
)
