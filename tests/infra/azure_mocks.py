"""Pulumi mocks that behave like Azure: lookups answer from a table of what exists, with Azure's real error shapes
("not found" is a provider error the program can catch, returned as a check failure, never raised inside the mock),
and the engine's builtin `readStackOutputs` answers with the previous run's outputs."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import runpy
import urllib.parse
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.error import HTTPError, URLError
from urllib.request import Request

import pulumi

REPO_ROOT = Path(__file__).resolve().parents[2]
PROJECT = "aitk-inference"
STACK = "dev"

SUBSCRIPTION_ID = "3f2a9c4e-8b1d-4e7a-9c2f-5d6e7f8a9b0c"
TENANT_ID = "72f988bf-86f1-41af-91ab-2d7cd011db47"
STORAGE_KEY = "c3RvcmFnZS1hY2NvdW50LWtleQ=="
WORKSPACE_KEY = "d29ya3NwYWNlLXNoYXJlZC1rZXk="
AAD_TOKEN = "aad-access-token-for-arm"  # what getClientToken answers (the user's Azure login)
ACR_TOKEN = "acr-refresh-token"  # what a registry's /oauth2/exchange answers for it
IDENTITY_PRINCIPAL_ID = "9d8c7b6a-5f4e-4d3c-9b2a-1f0e9d8c7b6a"
IDENTITY_CLIENT_ID = "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d"
GENERATED_PASSWORD = "Gen3ratedPassw0rdFromPulumiRandom"  # what pulumi-random's RandomPassword answers
ARM = "https://management.azure.com"
# How Pulumi's wire format marks a secret value (pulumi.runtime.rpc's _special_sig_key / _special_secret_sig).
SECRET_SIG_KEY = "4dabf18193072939515e22adb298388d"
SECRET_SIG = "1b47061264138c4ac30d75fd1eb44270"


def is_secret(value: Any) -> bool:
    return isinstance(value, dict) and value.get(SECRET_SIG_KEY) == SECRET_SIG


def reveal(value: Any) -> Any:
    """The value with secret markers removed (for asserting on what a resource receives)."""
    if is_secret(value):
        return reveal(value["value"])
    if isinstance(value, dict):
        return {key: reveal(item) for key, item in value.items()}
    if isinstance(value, list):
        return [reveal(item) for item in value]
    return value


def group_id(group: str) -> str:
    return f"/subscriptions/{SUBSCRIPTION_ID}/resourceGroups/{group}"


def storage_account_id(group: str, account: str) -> str:
    return f"{group_id(group)}/providers/Microsoft.Storage/storageAccounts/{account}"


def file_service_id(group: str, account: str) -> str:
    return f"{storage_account_id(group, account)}/fileServices/default"


def file_share_id(group: str, account: str, share: str) -> str:
    return f"{file_service_id(group, account)}/shares/{share}"


def workspace_id(group: str, workspace: str) -> str:
    return f"{group_id(group)}/providers/Microsoft.OperationalInsights/workspaces/{workspace}"


def environment_id(group: str, environment: str) -> str:
    return f"{group_id(group)}/providers/Microsoft.App/managedEnvironments/{environment}"


def environment_storage_id(group: str, environment: str, storage: str) -> str:
    return f"{environment_id(group, environment)}/storages/{storage}"


def container_app_id(group: str, app: str) -> str:
    return f"{group_id(group)}/providers/Microsoft.App/containerApps/{app}"


def registry_id(group: str, registry: str) -> str:
    return f"{group_id(group)}/providers/Microsoft.ContainerRegistry/registries/{registry}"


def identity_id(group: str, identity: str) -> str:
    return f"{group_id(group)}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{identity}"


def fingerprint(value: Any) -> str:
    # default=str: in preview some inputs are still unknown
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def azure_error(method: str, resource_id: str, status: int, code: str, message: str) -> str:
    """The shape of azure-native v3's provider errors (azcore's ResponseError)."""
    reason = {403: "Forbidden", 404: "Not Found", 429: "Too Many Requests"}[status]
    return (
        f"{method} {ARM}{resource_id}\n"
        "--------------------------------------------------------------------------------\n"
        f"RESPONSE {status}: {status} {reason}\n"
        f"ERROR CODE: {code}\n"
        "--------------------------------------------------------------------------------\n"
        f'{{"error": {{"code": "{code}", "message": "{message}"}}}}\n'
        "--------------------------------------------------------------------------------\n"
    )


def forbidden(resource_id: str, action: str) -> str:
    return azure_error(
        "GET",
        resource_id,
        403,
        "AuthorizationFailed",
        f"The client 'dev@contoso.com' with object id '0b1c2d3e' does not have authorization to perform action "
        f"'{action}' over scope '{resource_id}' or the scope is invalid.",
    )


def _not_found(resource_id: str, parent_missing: str | None) -> str:
    if "/resourceGroups/" in resource_id and resource_id.count("/") == 4:
        name = resource_id.rsplit("/", 1)[1]
        return azure_error(
            "GET", resource_id, 404, "ResourceGroupNotFound", f"Resource group '{name}' could not be found."
        )
    if parent_missing is not None:
        return azure_error(
            "GET",
            resource_id,
            404,
            "ParentResourceNotFound",
            f"Can not perform requested operation on nested resource. Parent resource '{parent_missing}' not found.",
        )
    provider_path = resource_id.split("/providers/", 1)[1]
    group = resource_id.split("/")[4]
    return azure_error(
        "GET",
        resource_id,
        404,
        "ResourceNotFound",
        f"The Resource '{provider_path}' under resource group '{group}' was not found. For more details please go to "
        "https://aka.ms/ARMResourceNotFoundFix",
    )


@dataclass
class Declared:
    typ: str
    name: str
    raw_inputs: dict[str, Any]  # with secret markers
    import_id: str | None
    state: dict[str, Any] = field(default_factory=dict)  # what Azure holds afterwards (secret markers removed)

    @property
    def inputs(self) -> dict[str, Any]:
        return reveal(self.raw_inputs)


@dataclass
class FakeAzure(pulumi.runtime.Mocks):
    """`existing`: ARM id -> the resource as the azure-native lookup invoke returns it (camelCase properties)."""

    subscription_id: str = (
        SUBSCRIPTION_ID  # what the client-config invoke answers (the table's ids use SUBSCRIPTION_ID)
    )
    existing: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # ARM id -> error text for its lookup (403, 429...)
    taken_storage_account_names: set[str] = field(default_factory=set)  # global names owned by someone else
    taken_registry_names: set[str] = field(default_factory=set)
    previous_outputs: dict[str, Any] = field(default_factory=dict)  # the stack's outputs after its previous run
    declared: list[Declared] = field(default_factory=list)
    lookups: list[str] = field(default_factory=list)
    invokes: list[str] = field(default_factory=list)  # every invoke's token, in order
    account_keys: dict[str, str] = field(default_factory=dict)  # storage account -> its key (else STORAGE_KEY)
    key_listings: list[str] = field(default_factory=list)  # accounts whose keys the program listed
    requests: list[Request] = field(default_factory=list)  # every HTTPS POST the program made itself
    token_exchanges: list[Request] = field(default_factory=list)  # those to registries' /oauth2/exchange
    refuse_token_exchange: bool = False  # the registry answers 401 (no push rights)
    # URL fragment -> how many of the next POSTs to such URLs fail with a connection reset
    network_failures: dict[str, int] = field(default_factory=dict)
    sleeps: list[float] = field(default_factory=list)  # the program's waits between retries

    def add(self, resource_id: str, properties: dict[str, Any]) -> None:
        self.existing[resource_id.lower()] = {"id": resource_id, "name": resource_id.rsplit("/", 1)[1], **properties}

    # -- invokes ---------------------------------------------------------------------------------------------------
    def call(  # type: ignore[override]  # Pulumi also takes a bare result dict, which its annotation omits
        self, args: pulumi.runtime.MockCallArgs
    ) -> dict[str, Any] | tuple[dict[str, Any], list[tuple[str, str]]]:
        """Success: the result; a provider error: ({}, [(property, reason)]), which the program sees as an exception."""
        token, a = args.token, args.args
        self.invokes.append(token)
        if token == "azure-native:authorization:getClientConfig":
            return {"subscriptionId": self.subscription_id, "tenantId": TENANT_ID, "clientId": "c", "objectId": "o"}
        if token == "azure-native:authorization:getClientToken":
            return {"token": AAD_TOKEN}
        if token == "pulumi:pulumi:readStackOutputs":
            return {"name": a["name"], "outputs": self.previous_outputs, "secretOutputNames": []}
        if token == "azure-native:storage:listStorageAccountKeys":
            self.key_listings.append(a["accountName"])
            key = self.account_keys.get(a["accountName"], STORAGE_KEY)
            return {"keys": [{"keyName": "key1", "value": key, "permissions": "FULL"}]}
        if token == "azure-native:operationalinsights:getSharedKeys":
            return {"primarySharedKey": WORKSPACE_KEY, "secondarySharedKey": "secondary"}
        group = a.get("resourceGroupName", "")
        ids = {
            "azure-native:resources:getResourceGroup": lambda: (group_id(group), []),
            "azure-native:storage:getStorageAccount": lambda: (
                storage_account_id(group, a["accountName"]),
                [group_id(group)],
            ),
            "azure-native:storage:getFileServiceProperties": lambda: (
                file_service_id(group, a["accountName"]),
                [group_id(group), storage_account_id(group, a["accountName"])],
            ),
            "azure-native:storage:getFileShare": lambda: (
                file_share_id(group, a["accountName"], a["shareName"]),
                [group_id(group), storage_account_id(group, a["accountName"])],
            ),
            "azure-native:operationalinsights:getWorkspace": lambda: (
                workspace_id(group, a["workspaceName"]),
                [group_id(group)],
            ),
            "azure-native:app:getManagedEnvironment": lambda: (
                environment_id(group, a["environmentName"]),
                [group_id(group)],
            ),
            "azure-native:app:getManagedEnvironmentsStorage": lambda: (
                environment_storage_id(group, a["environmentName"], a["storageName"]),
                [group_id(group), environment_id(group, a["environmentName"])],
            ),
            "azure-native:app:getContainerApp": lambda: (
                container_app_id(group, a["containerAppName"]),
                [group_id(group)],
            ),
            "azure-native:containerregistry:getRegistry": lambda: (
                registry_id(group, a["registryName"]),
                [group_id(group)],
            ),
            "azure-native:managedidentity:getUserAssignedIdentity": lambda: (
                identity_id(group, a["resourceName"]),
                [group_id(group)],
            ),
        }
        if token not in ids:
            return {}, [("", f"the fake Azure has no answer for {token}")]
        resource_id, parents = ids[token]()
        self.lookups.append(resource_id)
        if resource_id.lower() in self.errors:
            return {}, [("", self.errors[resource_id.lower()])]
        found = self.existing.get(resource_id.lower())
        if found is None:
            missing_parent = next((p for p in parents if p.lower() not in self.existing), None)
            if missing_parent is not None and missing_parent != group_id(group):
                return {}, [("", _not_found(resource_id, missing_parent))]
            if missing_parent == group_id(group) and token != "azure-native:resources:getResourceGroup":
                return {}, [("", _not_found(group_id(group), None))]
            return {}, [("", _not_found(resource_id, None))]
        return copy.deepcopy(found)

    # -- resources -------------------------------------------------------------------------------------------------
    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str | None, dict[str, Any]]:
        declared = Declared(args.typ, args.name, copy.deepcopy(args.inputs), args.resource_id or None)
        self.declared.append(declared)
        inputs = reveal(args.inputs)
        state = dict(args.inputs)
        group = inputs.get("resourceGroupName", "")
        if args.typ == "azure-native:resources:ResourceGroup":
            resource_id = group_id(inputs["resourceGroupName"])
            state["name"] = inputs["resourceGroupName"]
        elif args.typ == "azure-native:storage:StorageAccount":
            resource_id = storage_account_id(group, inputs["accountName"])
            state["name"] = inputs["accountName"]
        elif args.typ == "azure-native:storage:FileServiceProperties":
            resource_id = file_service_id(group, inputs["accountName"])
            state["name"] = "default"
        elif args.typ == "azure-native:storage:FileShare":
            resource_id = file_share_id(group, inputs["accountName"], inputs["shareName"])
            state["name"] = inputs["shareName"]
        elif args.typ == "azure-native:operationalinsights:Workspace":
            resource_id = workspace_id(group, inputs["workspaceName"])
            state["name"] = inputs["workspaceName"]
            state["customerId"] = "5b2c7d4e-0f1a-4b3c-8d9e-a1b2c3d4e5f6"
        elif args.typ == "azure-native:app:ManagedEnvironment":
            resource_id = environment_id(group, inputs["environmentName"])
            state["name"] = inputs["environmentName"]
        elif args.typ == "azure-native:app:ManagedEnvironmentsStorage":
            resource_id = environment_storage_id(group, inputs["environmentName"], inputs["storageName"])
            state["name"] = inputs["storageName"]
        elif args.typ == "azure-native:app:ContainerApp":
            resource_id = container_app_id(group, inputs["containerAppName"])
            state["name"] = inputs["containerAppName"]
            configuration = copy.deepcopy(inputs.get("configuration") or {})
            configuration.setdefault("ingress", {})["fqdn"] = (
                f"{inputs['containerAppName']}.bluesky-1a2b3c4d.eastus.azurecontainerapps.io"
            )
            state["configuration"] = configuration
            # Azure rolls a new revision whenever the template changes; the name's suffix is random in Azure.
            revision = f"{inputs['containerAppName']}--{fingerprint(inputs.get('template'))[:7]}"
            state |= {"latestRevisionName": revision, "latestReadyRevisionName": revision}
            identity = inputs.get("identity") or {}
            if identity.get("userAssignedIdentities"):  # Azure answers with a map: id -> principal and client ids
                state["identity"] = identity | {
                    "userAssignedIdentities": {
                        key: {"principalId": IDENTITY_PRINCIPAL_ID, "clientId": IDENTITY_CLIENT_ID}
                        for key in identity["userAssignedIdentities"]
                    }
                }
        elif args.typ == "azure-native:containerregistry:Registry":
            resource_id = registry_id(group, inputs["registryName"])
            state |= {"name": inputs["registryName"], "loginServer": f"{inputs['registryName'].lower()}.azurecr.io"}
        elif args.typ == "azure-native:managedidentity:UserAssignedIdentity":
            resource_id = identity_id(group, inputs["resourceName"])
            state |= {
                "name": inputs["resourceName"],
                "principalId": IDENTITY_PRINCIPAL_ID,
                "clientId": IDENTITY_CLIENT_ID,
            }
        elif args.typ == "azure-native:authorization:RoleAssignment":
            resource_id = (
                f"{inputs['scope']}/providers/Microsoft.Authorization/roleAssignments/{fingerprint(inputs)[:32]}"
            )
        elif args.typ == "random:index/randomPassword:RandomPassword":
            resource_id = f"{args.name}_id"
            state["result"] = GENERATED_PASSWORD
        elif args.typ == "random:index/randomId:RandomId":  # new keepers, new id (the provider replaces it)
            resource_id = f"{args.name}_id"
            state["hex"] = fingerprint(inputs.get("keepers"))[: 2 * int(inputs["byteLength"])]
        elif args.typ == "docker-build:index:Image":
            # A registry's digest is the hash of the pushed manifest: a different build, a different digest.
            resource_id = "sha256:" + fingerprint(inputs.get("tags"))
            state["digest"] = resource_id
        else:
            resource_id = f"{args.name}_id"
        if args.resource_id:  # an import: the state is what exists in Azure
            resource_id = args.resource_id
            existing = self.existing.get(resource_id.lower(), {})
            state |= {key: value for key, value in existing.items() if key not in args.inputs}
        state["id"] = resource_id
        declared.state = reveal(copy.deepcopy(state))
        return resource_id, state

    def urlopen(self, request: Request, timeout: float) -> io.BytesIO:
        """urlopen as the program's HTTPS POSTs see it: a registry's /oauth2/exchange (an ACR refresh token for the
        AAD token) and ARM's checkNameAvailability (taken: the names in `taken_*` and every existing one)."""
        self.requests.append(request)
        for fragment, failures in self.network_failures.items():
            if fragment in request.full_url and failures:
                self.network_failures[fragment] -= 1
                raise URLError(ConnectionResetError(104, "Connection reset by peer"))
        if request.full_url.endswith("/oauth2/exchange"):
            self.token_exchanges.append(request)
            if self.refuse_token_exchange:
                raise HTTPError(request.full_url, 401, "Unauthorized", Message(), None)
            return io.BytesIO(json.dumps({"refresh_token": ACR_TOKEN}).encode())
        if "/providers/Microsoft.Authorization/roleAssignments?" in request.full_url:
            return io.BytesIO(json.dumps({"value": self.role_assignments(request.full_url)}).encode())
        if "/checkNameAvailability" in request.full_url:
            assert request.headers["Authorization"] == f"Bearer {AAD_TOKEN}"
            asked = json.loads(request.data)  # type: ignore[arg-type]
            return io.BytesIO(json.dumps(self.name_availability(asked["type"], asked["name"])).encode())
        raise AssertionError(f"the fake Azure has no answer for POST {request.full_url}")

    def role_assignments(self, url: str) -> list[dict[str, Any]]:
        """ARM's list of role assignments at a scope, filtered by `principalId eq '...'` (those at the scope and
        above it, as ARM answers)."""
        assert url.startswith(ARM) and "api-version=" in url
        scope = url[len(ARM) :].split("/providers/Microsoft.Authorization/roleAssignments?")[0]
        principal = urllib.parse.unquote(url).split("principalId eq '")[1].rstrip("'")
        return [
            {"id": found["id"], "name": found["name"], "properties": found["properties"]}
            for key, found in self.existing.items()
            if "/providers/microsoft.authorization/roleassignments/" in key
            and found["properties"]["principalId"] == principal
            and scope.lower().startswith(found["properties"]["scope"].lower())
        ]

    def name_availability(self, resource_type: str, name: str) -> dict[str, Any]:
        """What ARM's checkNameAvailability answers (storage: names are lowercase; registries: case-insensitive)."""
        segment, taken = {
            "Microsoft.Storage/storageAccounts": ("/storageaccounts/", self.taken_storage_account_names),
            "Microsoft.ContainerRegistry/registries": ("/registries/", self.taken_registry_names),
        }[resource_type]
        existing = {key.rsplit("/", 1)[1] for key in self.existing if segment in key and key.count("/") == 8}
        if name.lower() in {n.lower() for n in taken} | existing:
            return {"nameAvailable": False, "reason": "AlreadyExists", "message": f"The name {name} is already in use."}
        return {"nameAvailable": True}

    def by_type(self, typ: str) -> list[Declared]:
        return [d for d in self.declared if d.typ == typ]

    def one(self, typ: str) -> Declared:
        found = self.by_type(typ)
        assert len(found) == 1, f"expected one {typ}, declared {len(found)}"
        return found[0]


@dataclass(frozen=True)
class Registration:
    """One resource as the program registered it: its place in the tree (what its URN is made of) and options."""

    typ: str
    name: str
    parent: tuple[str, str] | None  # (type, name) of the parent; None: the stack
    options: pulumi.ResourceOptions


@dataclass
class ProgramRun:
    azure: FakeAzure
    outputs: dict[str, Any] = field(default_factory=dict)
    secret_outputs: set[str] = field(default_factory=set)
    options: dict[str, pulumi.ResourceOptions] = field(default_factory=dict)  # by resource type token
    registrations: list[Registration] = field(default_factory=list)  # every resource, components included


def _capture_options(run: ProgramRun) -> None:
    def transformation(args: pulumi.ResourceTransformationArgs) -> None:
        run.options[args.type_] = args.opts
        parent = args.opts.parent
        run.registrations.append(
            Registration(
                args.type_,
                args.name,
                (parent._type, parent._name) if parent is not None else None,  # noqa: SLF001 - no public accessor
                args.opts,
            )
        )
        return None

    pulumi.runtime.register_stack_transformation(transformation)


def collect_stack_outputs(
    exported: dict[str, Any], outputs: dict[str, Any], secret_outputs: set[str]
) -> pulumi.Output[None]:
    """Resolves the root stack's exports into `outputs`, naming the secret ones in `secret_outputs`."""

    async def collect() -> None:
        for name, value in exported.items():
            output = pulumi.Output.from_input(value)
            outputs[name] = await output.future()
            if await output.is_secret():
                secret_outputs.add(name)

    return pulumi.Output.from_input(collect())


def run_program(
    azure: FakeAzure, config: dict[str, Any], *, preview: bool = False, secret_keys: tuple[str, ...] = ()
) -> ProgramRun:
    """Run __main__.py against `azure` with the given stack config (values JSON-encoded when not strings); keys in
    `secret_keys` were set with `pulumi config set --secret`."""
    pulumi.runtime.settings.ROOT.set(None)  # a fresh root stack (and its outputs) for every run
    pulumi.runtime.set_mocks(azure, project=PROJECT, stack=STACK, preview=preview, organization="organization")
    pulumi.runtime.set_all_config(
        {
            (key if ":" in key else f"{PROJECT}:{key}"): (value if isinstance(value, str) else json.dumps(value))
            for key, value in config.items()
        },
        [f"{PROJECT}:{key}" for key in secret_keys],
    )
    run = ProgramRun(azure)

    @pulumi.runtime.test
    def program() -> pulumi.Output[Any]:
        _capture_options(run)
        runpy.run_path(str(REPO_ROOT / "__main__.py"), run_name="__main__")
        stack = pulumi.runtime.get_root_resource()
        return collect_stack_outputs(stack.outputs, run.outputs, run.secret_outputs)  # type: ignore[union-attr]

    # Global name checks and the image's push credentials are HTTPS POSTs (infra/rest.py): answered by the fake
    # instead of the network, and its retries do not wait.
    with mock.patch("infra.rest.urlopen", azure.urlopen), mock.patch("infra.rest.time.sleep", azure.sleeps.append):
        program()
    return run
