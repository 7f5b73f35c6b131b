"""The stack's container registry and the identity the container app pulls with.

No registry password exists anywhere: the admin user is disabled, the app pulls as a user-assigned managed identity
holding `AcrPull` on the registry, and `pulumi up` pushes with a short-lived Azure AD token (infra/acr_token.py).
"""

from dataclasses import dataclass
from typing import Any

import pulumi
import pulumiverse_time
from pulumi_azure_native import app, authorization, containerregistry, managedidentity

from infra.adoption import Adoption, Ledger, declare_or_reference, mirror_inputs, stack_tags

# Built-in role "AcrPull" (the same id in every tenant).
ACR_PULL_ROLE_ID = "7f951dda-4ed3-4680-a7ca-43fe172d538d"
# How long a new AcrPull assignment is given to take effect before the app pulls (reports say 1-5 minutes); it runs
# while the image builds, so a build usually hides it.
ACR_PULL_PROPAGATION = "3m"
AZURE_REGISTRY_DOMAIN = ".azurecr.io"


def acr_pull_role_definition_id(subscription_id: str) -> str:
    return f"/subscriptions/{subscription_id}/providers/Microsoft.Authorization/roleDefinitions/{ACR_PULL_ROLE_ID}"


@dataclass(frozen=True)
class RegistryArgs:
    resource_group_name: pulumi.Input[str]
    location: str
    subscription_id: str
    registry: Adoption
    pull_identity: Adoption
    acr_pull: Adoption
    ledger: Ledger
    sku: str = "Basic"


def _registry_args(args: RegistryArgs) -> dict[str, Any]:
    existing = args.registry.foreign
    owned = dict(admin_user_enabled=False)
    if existing is not None:  # sku, region and the rest stay as Azure has them
        return mirror_inputs(existing, containerregistry.RegistryArgs) | owned
    return dict(sku=containerregistry.SkuArgs(name=args.sku), location=args.location, tags=stack_tags(), **owned)


class Registry(pulumi.ComponentResource):
    login_server: pulumi.Output[str]
    registry_id: pulumi.Output[str]
    identity_id: pulumi.Output[str]  # resource id of the user-assigned identity the app pulls (and runs) as
    identity_principal_id: pulumi.Output[str]
    identity_client_id: pulumi.Output[str]

    def __init__(self, name: str, args: RegistryArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("inference:infra:Registry", name, None, opts)
        registry = declare_or_reference(
            args.registry,
            args.ledger,
            lambda options: containerregistry.Registry(
                "registry",
                registry_name=args.registry.name,
                resource_group_name=args.resource_group_name,
                **_registry_args(args),
                opts=options,
            ),
            parent=self,
        )  # a referenced registry still gets the pull identity's role assignment
        self.login_server = registry.output("login_server")
        existing_registry = args.registry.existing
        self._login_server = (
            str(existing_registry.login_server).lower()
            if existing_registry is not None
            else f"{args.registry.name.lower()}{AZURE_REGISTRY_DOMAIN}"
        )
        self._identity_name = args.pull_identity.name
        self.registry_id = registry.output("id")

        existing_identity = args.pull_identity.foreign
        identity = declare_or_reference(
            args.pull_identity,
            args.ledger,
            lambda options: managedidentity.UserAssignedIdentity(
                "pull-identity",
                resource_name_=args.pull_identity.name,
                resource_group_name=args.resource_group_name,
                # An existing identity keeps its region and tags (a new region would replace it).
                **(
                    mirror_inputs(existing_identity, managedidentity.UserAssignedIdentityArgs)
                    if existing_identity is not None
                    else {"location": args.location, "tags": stack_tags()}
                ),
                opts=options,
            ),
            parent=self,
        )
        self.identity_id = identity.output("id")
        self.identity_principal_id = identity.output("principal_id")
        self.identity_client_id = identity.output("client_id")
        existing_assignment = args.acr_pull.existing
        assignment = declare_or_reference(
            args.acr_pull,
            args.ledger,
            lambda options: authorization.RoleAssignment(
                "acr-pull",
                # An existing assignment keeps its name (the name is its identity); a new one gets a generated GUID.
                role_assignment_name=existing_assignment.name if existing_assignment is not None else None,
                principal_id=self.identity_principal_id,
                # A new identity's service principal takes a while to replicate; the type lets ARM accept it at once.
                principal_type=authorization.PrincipalType.SERVICE_PRINCIPAL,
                role_definition_id=acr_pull_role_definition_id(args.subscription_id),
                scope=self.registry_id,
                opts=options,
            ),
            parent=self,
        )
        self._pull_ready = assignment.dependencies
        if args.acr_pull.status == "created":
            # A new assignment takes minutes to reach the registry (microsoft/azure-container-apps#646: the first
            # revision's pull fails and the deployment times out). Wait once, when it is created: the Sleep is
            # created with it (and again only if it is replaced); adopted or referenced ones are in effect already.
            self._pull_ready = [
                pulumiverse_time.Sleep(
                    "acr-pull-propagation",
                    create_duration=ACR_PULL_PROPAGATION,
                    triggers={"roleAssignmentId": assignment.output("id")},
                    opts=pulumi.ResourceOptions(parent=self, depends_on=assignment.dependencies),
                )
            ]
        self.register_outputs(
            {
                "loginServer": self.login_server,
                "identityId": self.identity_id,
                "identityPrincipalId": self.identity_principal_id,
            }
        )

    def app_registries(self, image: str | None) -> list[app.RegistryCredentialsArgs]:
        """The container app's registry entries: the stack's registry, and the registry of a prebuilt `image` in
        another Azure Container Registry (Container Apps picks credentials by server; without an entry it pulls
        anonymously, which a private registry refuses). Both pull as the identity, no password secret."""
        entries = [app.RegistryCredentialsArgs(server=self.login_server, identity=self.identity_id)]
        host = image.split("/", 1)[0].lower() if image is not None and "/" in image else ""
        if host.endswith(AZURE_REGISTRY_DOMAIN) and host != self._login_server:
            entries.append(app.RegistryCredentialsArgs(server=host, identity=self.identity_id))
            name = host.removesuffix(AZURE_REGISTRY_DOMAIN)
            self.identity_principal_id.apply(
                lambda principal_id: pulumi.log.warn(
                    f"image: pulled from {host} as the identity {self._identity_name} (principal id {principal_id}), "
                    "which needs AcrPull on that registry; grant it once, e.g. `az role assignment create "
                    f"--assignee-object-id {principal_id} --assignee-principal-type ServicePrincipal --role AcrPull "
                    f"--scope $(az acr show --name {name} --query id --output tsv)`",
                    resource=self,
                )
            )
        return entries

    def app_identity(self) -> app.ManagedServiceIdentityArgs:
        """The container app's identity: the same user-assigned identity (it must be attached to pull with it)."""
        return app.ManagedServiceIdentityArgs(
            type=app.ManagedServiceIdentityType.USER_ASSIGNED,
            user_assigned_identities=[self.identity_id],
        )

    def app_depends_on(self) -> list[pulumi.Resource]:
        """The app must wait for the AcrPull assignment, or its first revision fails to pull the image (nothing to
        wait for when the assignment already exists and is only referenced)."""
        return self._pull_ready
