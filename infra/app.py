"""The inference container app: one container on the GPU workload profile, the file share mounted at /mount, HTTPS
ingress on port 7860.

Everything other features plug in (registry credentials, identity, secrets, env vars, scale rules, IP allow-list,
sticky sessions) is a plain argument, so those features are wired in __main__.py without changing this module. The
probes are the app's own: they know its health endpoints and how long it takes to load a model.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import pulumi
from pulumi_azure_native import app

from inference_app.settings import CONTAINER_TERMINATION_GRACE_S
from infra.adoption import Adoption, Ledger, declare_or_reference, stack_tags

TARGET_PORT = 7860
MOUNT_PATH = "/mount"


@dataclass(frozen=True)
class ContainerAppArgs:
    resource_group_name: pulumi.Input[str]
    location: str
    adoption: Adoption
    ledger: Ledger
    environment_id: pulumi.Input[str]
    environment_storage_name: pulumi.Input[str]
    volume_name: str  # bicep: '<fileShareName>volume'
    image: pulumi.Input[str]
    command: Sequence[str] | None = None  # None: the image's own entrypoint
    # False: a prebuilt image started by `defaultCommands` (the bicep's mode), which serves no /health or /ready
    serves_inference_app: bool = True
    cpu: float = 24.0
    memory: str = "220Gi"
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


# Startup probe: the server must answer within 10 s + 10 x 30 s = 310 s of the container starting (time enough for
# the bicep's default command, which pip-installs the app's requirements before serving); a 30 s period keeps the
# wait after it answers short, which a cold start from zero pays on its first request. Loading the model can take
# longer than that: readiness (`/ready`, 503 until the model is loaded) keeps traffic away meanwhile without
# restarting the replica. ACA caps: initial delay <= 60 s, period <= 240 s, failure threshold <= 10.
STARTUP_INITIAL_DELAY_S = 10
STARTUP_PERIOD_S = 30
STARTUP_FAILURE_THRESHOLD = 10


def probes(port: int) -> list[app.ContainerAppProbeArgs]:
    """Startup and liveness on `/health` (the server is up), readiness on `/ready` (the model is loaded)."""

    def http_get(path: str) -> app.ContainerAppProbeHttpGetArgs:
        return app.ContainerAppProbeHttpGetArgs(path=path, port=port, scheme=app.Scheme.HTTP)

    return [
        app.ContainerAppProbeArgs(
            type=app.Type.STARTUP,
            http_get=http_get("/health"),
            initial_delay_seconds=STARTUP_INITIAL_DELAY_S,
            period_seconds=STARTUP_PERIOD_S,
            timeout_seconds=5,
            failure_threshold=STARTUP_FAILURE_THRESHOLD,
        ),
        app.ContainerAppProbeArgs(
            type=app.Type.READINESS,
            http_get=http_get("/ready"),
            period_seconds=5,
            timeout_seconds=5,
            failure_threshold=3,
        ),
        app.ContainerAppProbeArgs(
            type=app.Type.LIVENESS,
            http_get=http_get("/health"),
            period_seconds=30,
            timeout_seconds=5,
            failure_threshold=3,
        ),
    ]


# A prebuilt image started by the bicep's `defaultCommands` answers on the target port once its server is up, and
# nothing tells when its model is loaded: TCP probes, with the startup budget the bicep gave it (60 s + 10 x 120 s).
FOREIGN_STARTUP_INITIAL_DELAY_S = 60
FOREIGN_STARTUP_PERIOD_S = 120


def foreign_image_probes(port: int) -> list[app.ContainerAppProbeArgs]:
    """TCP startup, readiness and liveness on the target port, for an image that is not inference_app/."""
    tcp = app.ContainerAppProbeTcpSocketArgs(port=port)
    return [
        app.ContainerAppProbeArgs(
            type=app.Type.STARTUP,
            tcp_socket=tcp,
            initial_delay_seconds=FOREIGN_STARTUP_INITIAL_DELAY_S,
            period_seconds=FOREIGN_STARTUP_PERIOD_S,
            timeout_seconds=5,
            failure_threshold=STARTUP_FAILURE_THRESHOLD,
        ),
        app.ContainerAppProbeArgs(
            type=app.Type.READINESS, tcp_socket=tcp, period_seconds=5, timeout_seconds=5, failure_threshold=3
        ),
        app.ContainerAppProbeArgs(
            type=app.Type.LIVENESS, tcp_socket=tcp, period_seconds=30, timeout_seconds=5, failure_threshold=3
        ),
    ]


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
                probes=probes(TARGET_PORT) if args.serves_inference_app else foreign_image_probes(TARGET_PORT),
                volume_mounts=[app.VolumeMountArgs(volume_name=args.volume_name, mount_path=MOUNT_PATH)],
            )
        ],
        termination_grace_period_seconds=CONTAINER_TERMINATION_GRACE_S,  # the app ends its streams within it
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


EnvironmentIds = tuple[pulumi.Output[str] | None, pulumi.Output[str] | None]  # managedEnvironmentId, environmentId


def _environment_ids(environment_id: pulumi.Input[str], adoption: Adoption) -> EnvironmentIds:
    """The app's environment, a create-only property Azure records twice (`environmentId` and the deprecated
    `managedEnvironmentId`). An app this stack creates sets `managedEnvironmentId` (as it always has: adding the
    other to an app in the state would replace it); an app it did not create (adopted, e.g. the AI Toolkit's
    bicep-deployed app) sets each one its live app has, spelled as Azure spells it when they differ only in case
    (ARM ids are case-insensitive, some GET answers lowercase them). Anything else would replace the app on import,
    which the engine refuses."""
    wanted = pulumi.Output.from_input(environment_id)
    live = adoption.foreign
    if live is None:
        return wanted, None

    def as_azure_spells_it(recorded: str | None) -> pulumi.Output[str] | None:
        if not recorded:
            return None
        return wanted.apply(lambda declared: recorded if recorded.lower() == declared.lower() else declared)

    return as_azure_spells_it(live.managed_environment_id), as_azure_spells_it(live.environment_id)


def _first_image(template: app.outputs.TemplateResponse | None) -> str:
    return (template.containers[0].image or "") if template is not None and template.containers else ""


def _fqdn(configuration: app.outputs.ConfigurationResponse | None) -> str:
    return (configuration.ingress.fqdn if configuration and configuration.ingress else None) or ""


class ContainerApp(pulumi.ComponentResource):
    fqdn: pulumi.Output[str]
    name: pulumi.Output[str]
    # The revision serving traffic: in single revision mode a new revision takes over once it is ready, so a revision
    # that never gets ready (bad image, failing probes) leaves the previous one here.
    active_revision: pulumi.Output[str]
    image: pulumi.Output[str]  # what the app's container runs

    def __init__(self, name: str, args: ContainerAppArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("inference:infra:ContainerApp", name, None, opts)
        # An existing app of this name is adopted with this configuration in the same run that imports it
        # (infra/plan.py refuses one in another environment, which would need a replacement).
        managed_environment_id, environment_id = _environment_ids(args.environment_id, args.adoption)
        container_app = declare_or_reference(
            args.adoption,
            args.ledger,
            lambda options: app.ContainerApp(
                "app",
                container_app_name=args.adoption.name,
                resource_group_name=args.resource_group_name,
                location=args.location,
                managed_environment_id=managed_environment_id,
                environment_id=environment_id,
                tags=stack_tags() if args.adoption.foreign is None else args.adoption.foreign.tags,
                workload_profile_name=args.workload_profile_name,
                identity=args.identity or app.ManagedServiceIdentityArgs(type=app.ManagedServiceIdentityType.NONE),
                configuration=_configuration(args),
                template=_template(args),
                opts=options,
            ),
            parent=self,
            depends_on=args.depends_on,
        )
        self.name = container_app.output("name")
        self.active_revision = container_app.output("latest_ready_revision_name").apply(lambda name: name or "")
        self.image = container_app.output("template").apply(_first_image)
        self.fqdn = container_app.output("configuration").apply(_fqdn)
        self.register_outputs({"fqdn": self.fqdn, "activeRevision": self.active_revision})
