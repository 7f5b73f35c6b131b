"""The inference container app: one container on the GPU workload profile, the file share mounted at /mount, HTTPS
ingress on port 7860.

Everything other features plug in (registry credentials, identity, secrets, env vars, probes, scale rules, IP
allow-list, sticky sessions) is a plain argument, so those features are wired in __main__.py without changing this
module.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import pulumi
from pulumi_azure_native import app

from infra.adoption import Adoption, mirror_inputs

TARGET_PORT = 7860
MOUNT_PATH = "/mount"


@dataclass(frozen=True)
class ContainerAppArgs:
    resource_group_name: pulumi.Input[str]
    location: str
    adoption: Adoption
    environment_id: pulumi.Input[str]
    environment_storage_name: pulumi.Input[str]
    volume_name: str  # bicep: '<fileShareName>volume'
    image: pulumi.Input[str]
    command: Sequence[str] | None = None  # None: the image's own entrypoint
    cpu: float = 24.0
    memory: str = "220Gi"
    probes: Sequence[app.ContainerAppProbeArgs] = ()  # infra/gpu.py: sized for a cold start
    env: Sequence[app.EnvironmentVarArgs] = ()
    secrets: Sequence[app.SecretArgs] = ()
    registries: Sequence[app.RegistryCredentialsArgs] = ()
    identity: app.ManagedServiceIdentityArgs | None = None  # None: no managed identity
    workload_profile_name: str = "GPU"
    min_replicas: int = 1
    max_replicas: int = 1
    scale_rules: Sequence[app.ScaleRuleArgs] = ()
    ip_security_restrictions: Sequence[app.IpSecurityRestrictionRuleArgs] = ()
    sticky_sessions: bool = False
    depends_on: Sequence[pulumi.Resource] = field(default_factory=list)


def _configuration(args: ContainerAppArgs) -> app.ConfigurationArgs:
    return app.ConfigurationArgs(
        active_revisions_mode=app.ActiveRevisionsMode.SINGLE,
        ingress=app.IngressArgs(
            external=True,
            target_port=TARGET_PORT,
            transport=app.IngressTransportMethod.AUTO,
            allow_insecure=False,
            traffic=[app.TrafficWeightArgs(latest_revision=True, weight=100)],
            ip_security_restrictions=list(args.ip_security_restrictions) or None,
            sticky_sessions=app.IngressStickySessionsArgs(affinity=app.Affinity.STICKY)
            if args.sticky_sessions
            else None,
        ),
        secrets=list(args.secrets) or None,
        registries=list(args.registries) or None,
    )


def _template(args: ContainerAppArgs) -> app.TemplateArgs:
    return app.TemplateArgs(
        containers=[
            app.ContainerArgs(
                name=args.adoption.name,
                image=args.image,
                command=list(args.command) if args.command is not None else None,
                resources=app.ContainerResourcesArgs(cpu=args.cpu, memory=args.memory),
                env=list(args.env) or None,
                probes=list(args.probes) or None,
                volume_mounts=[app.VolumeMountArgs(volume_name=args.volume_name, mount_path=MOUNT_PATH)],
            )
        ],
        scale=app.ScaleArgs(
            min_replicas=args.min_replicas, max_replicas=args.max_replicas, rules=list(args.scale_rules) or None
        ),
        volumes=[
            app.VolumeArgs(
                name=args.volume_name,
                storage_type=app.StorageType.AZURE_FILE,
                storage_name=args.environment_storage_name,
            )
        ],
    )


def _first_image(template: app.outputs.TemplateResponse | None) -> str:
    return (template.containers[0].image or "") if template is not None and template.containers else ""


class ContainerApp(pulumi.ComponentResource):
    fqdn: pulumi.Output[str]
    name: pulumi.Output[str]
    # The revision serving traffic: in single revision mode a new revision takes over once it is ready, so a revision
    # that never gets ready (bad image, failing probes) leaves the previous one here.
    active_revision: pulumi.Output[str]
    image: pulumi.Output[str]  # what the app's container runs

    def __init__(self, name: str, args: ContainerAppArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("inference:infra:ContainerApp", name, None, opts)
        options = pulumi.ResourceOptions.merge(
            args.adoption.options(parent=self), pulumi.ResourceOptions(depends_on=list(args.depends_on))
        )
        if not args.adoption.declared:  # existingResources: reference, and an app of this name exists
            existing = args.adoption.existing
            self.name = pulumi.Output.from_input(args.adoption.name)
            self.fqdn = pulumi.Output.from_input(existing.configuration.ingress.fqdn or "")
            self.active_revision = pulumi.Output.from_input(existing.latest_ready_revision_name or "")
            self.image = pulumi.Output.from_input(_first_image(existing.template))
            self.resource_ids: dict[str, pulumi.Output[str]] = {}
            self.register_outputs({"fqdn": self.fqdn, "activeRevision": self.active_revision})
            return
        if args.adoption.import_now:
            # An app of this name already exists and is not in this stack: import it as it is; the next
            # `pulumi up` replaces its configuration with the one below.
            container_app = app.ContainerApp(
                "app",
                container_app_name=args.adoption.name,
                resource_group_name=args.resource_group_name,
                **mirror_inputs(args.adoption.existing, app.ContainerAppArgs),
                opts=options,
            )
        else:
            container_app = app.ContainerApp(
                "app",
                container_app_name=args.adoption.name,
                resource_group_name=args.resource_group_name,
                location=args.location,
                managed_environment_id=args.environment_id,
                workload_profile_name=args.workload_profile_name,
                identity=args.identity or app.ManagedServiceIdentityArgs(type=app.ManagedServiceIdentityType.NONE),
                configuration=_configuration(args),
                template=_template(args),
                opts=options,
            )
        self.name = container_app.name
        self.active_revision = container_app.latest_ready_revision_name
        self.image = container_app.template.apply(_first_image)
        self.resource_ids = {args.adoption.key: container_app.id}
        self.fqdn = container_app.configuration.apply(
            lambda configuration: (
                (configuration.ingress.fqdn if configuration and configuration.ingress else None) or ""
            )
        )
        self.register_outputs({"fqdn": self.fqdn, "activeRevision": self.active_revision})
