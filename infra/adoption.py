"""Create, adopt or reference: the one way the program declares an Azure resource that may already exist.

`decide` turns a lookup by name into an `Adoption` (created / adopted / referenced), `declare_or_reference` declares
the resource (or, when it is only referenced, keeps what the lookup found) and records its id in the `Ledger`, which
is exported as the stack output `adoption` and read back by the next run (`PreviousRun`). How and why: docs/
(existing resources).
"""

import inspect
import re
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import pulumi
from pulumi._types import is_output_type

from infra.errors import registration_fix

Status = Literal["created", "adopted", "referenced"]
Mode = Literal["adopt", "reference"]

ADOPTION_OUTPUT = "adoption"

# How Azure (and azure-native, old and new error formats) says "does not exist".
_NOT_FOUND = re.compile(
    r"ResourceNotFound|ResourceGroupNotFound|ParentResourceNotFound|RESPONSE 404|StatusCode=404|Status=404"
    r"|404 Not Found"
)

T = TypeVar("T")
R = TypeVar("R", bound=pulumi.CustomResource)


class AzureLookupError(Exception):
    """A lookup failed for a reason other than "not found"; nothing is declared."""


def lookup(description: str, fetch: Callable[[], T]) -> T | None:
    """Run one lookup invoke: its result, None when Azure says it does not exist, or stop on any other error."""
    try:
        return fetch()
    except Exception as error:  # the SDK raises a plain Exception for provider errors
        if _NOT_FOUND.search(str(error)):
            return None
        raise AzureLookupError(
            f"Looking up {description} failed, so nothing was created or changed. "
            f"{registration_fix(str(error))}Azure said: {error}"
        ) from error


@dataclass(frozen=True)
class PreviousRun:
    """What this stack managed after its previous update: resource key -> (status, Azure id)."""

    resources: Mapping[str, tuple[str, str]]

    @staticmethod
    def read() -> "PreviousRun":
        stack = f"{pulumi.get_organization()}/{pulumi.get_project()}/{pulumi.get_stack()}"
        try:
            result = pulumi.runtime.invoke("pulumi:pulumi:readStackOutputs", {"name": stack}).value or {}
        except Exception as error:
            # Safe to go on without it: existing resources are then imported with the inputs they have (a no-op for
            # any the state already holds) and retained on delete; nothing is replaced or deleted.
            pulumi.log.warn(
                f"Could not read stack {stack}'s previous outputs ({error}); existing resources are treated as not "
                "yet managed by this stack (they are imported as they are and never deleted)."
            )
            return PreviousRun({})
        recorded = (result.get("outputs") or {}).get(ADOPTION_OUTPUT) or {}
        return PreviousRun(
            {
                key: (entry["status"], entry["id"])
                for key, entry in recorded.items()
                if isinstance(entry, Mapping) and entry.get("status") and entry.get("id")
            }
        )

    def manages(self, key: str, azure_id: str) -> Status | None:
        """The status this stack recorded for that very resource (ids compare case-insensitively, as in ARM)."""
        status, recorded_id = self.resources.get(key, ("", ""))
        if recorded_id.lower() != azure_id.lower():
            return None
        if status == "created":
            return "created"
        if status == "adopted":
            return "adopted"
        return None


@dataclass(frozen=True)
class Adoption:
    """The decision for one resource."""

    key: str  # camelCase name used in outputs and logs, e.g. "storageAccount"
    name: str
    status: Status
    existing: Any = None  # the lookup result (typed invoke result) when the resource exists in Azure
    # Not in this stack's record: the Azure id imported on this run, spelled as the program declares the resource
    # (the import's path must equal the declared names, case included, or the engine sees a replacement). The
    # engine (Pulumi CLI >= 3.174, `requiredPulumiVersion`) imports it and applies the declared inputs in the same
    # run; only a diff that would replace it fails, which infra/plan.py refuses before (`require_no_replacement`).
    # For a resource the stack's state already holds, the import is a no-op.
    import_id: str | None = None

    @property
    def foreign(self) -> Any:
        """What Azure has, for a resource this stack did not create (adopted or referenced): its inputs mirror it.
        None for the stack's own, which it declares as it created them."""
        return self.existing if self.status != "created" else None

    @property
    def declared(self) -> bool:
        """Whether this program declares (manages) the resource; referenced ones are only read."""
        return self.status != "referenced"

    @property
    def azure_id(self) -> str | None:
        return getattr(self.existing, "id", None)

    def options(
        self,
        *,
        always_retain: bool = False,
        protect: bool = False,
        parent: pulumi.Resource | None = None,
        depends_on: Sequence[pulumi.Resource] = (),
    ) -> pulumi.ResourceOptions:
        """Resource options: import on the adopting run; adopted resources are never deleted by `destroy`."""
        return pulumi.ResourceOptions(
            parent=parent,
            import_=self.import_id,
            retain_on_delete=always_retain or self.status == "adopted",
            protect=protect,
            depends_on=list(depends_on) or None,
        )

    def summary(self) -> str:
        if self.import_id is not None and self.status == "created":
            return (
                f"{self.key} {self.name}: created (by an earlier run of this stack that did not finish; its tags say "
                "so), managed as the stack's own"
            )
        if self.import_id is not None:
            return f"{self.key} {self.name}: adopted (imported on this run, with this program's settings)"
        return f"{self.key} {self.name}: {self.status}"


def stack_tags() -> dict[str, str]:
    """The tags this stack puts on what it creates: how a later run knows them as its own even when the record of a
    run was never saved (a run that failed, e.g. on GPU quota, saves no outputs)."""
    return {"pulumi-project": pulumi.get_project(), "pulumi-stack": pulumi.get_stack()}


def made_by_this_stack(existing: Any) -> bool:
    tags = getattr(existing, "tags", None) or {}
    return all(tags.get(key) == value for key, value in stack_tags().items())


def decide(
    key: str,
    name: str,
    existing: Any,
    mode: Mode,
    previous: PreviousRun,
    *,
    declared_id: str,
    made_here: bool | None = None,
) -> Adoption:
    """`declared_id`: the resource's id spelled as the program declares it; `made_here`: whether this stack created
    it (default: its tags say so; resources without tags follow their parent)."""
    if existing is None:
        return Adoption(key, name, "created")
    managed_status = previous.manages(key, existing.id)
    if managed_status is not None:  # already in this stack: an ordinary update, never a second import
        return Adoption(key, name, managed_status, existing)
    # ARM ids are case-insensitive, but the import's path parameters must equal the declared ones exactly.
    import_id = declared_id if declared_id.lower() == str(existing.id).lower() else str(existing.id)
    if made_here if made_here is not None else made_by_this_stack(existing):
        return Adoption(key, name, "created", existing, import_id=import_id)
    if mode == "reference":
        return Adoption(key, name, "referenced", existing)
    return Adoption(key, name, "adopted", existing, import_id=import_id)


def _as_input(value: Any) -> Any:
    """A lookup result value as an input: output types (FooResponse, FooResponseBar) become FooArgs / FooBarArgs,
    keeping only the properties the input type accepts (read-only ones such as an ingress fqdn are dropped).
    None when there is no input type for it (a read-only structure)."""
    if isinstance(value, list):
        return [item for item in map(_as_input, value) if item is not None]
    if not is_output_type(type(value)):
        return value
    package = sys.modules[type(value).__module__.rsplit(".", 1)[0]]
    args_type = getattr(package, type(value).__name__.replace("Response", "") + "Args", None)
    return args_type(**mirror_inputs(value, args_type)) if args_type is not None else None


def mirror_inputs(existing: Any, args_type: type) -> dict[str, Any]:
    """Inputs equal to what exists in Azure: every non-empty property of `existing` that `args_type` accepts."""
    accepted = {
        name: parameter.annotation
        for name, parameter in inspect.signature(args_type).parameters.items()
        if not name.startswith("_")
    }
    values = {name: _mirrored(getattr(existing, name, None), annotation) for name, annotation in accepted.items()}
    return {name: value for name, value in values.items() if value is not None}


def _mirrored(value: Any, accepted_type: Any) -> Any:
    """One property as the input type takes it. ARM answers user-assigned identities with a map, identity id -> its
    principal and client ids; most inputs (storage, workspace, environment) take the list of ids, the registry's the
    map."""
    if isinstance(value, Mapping) and not is_output_type(type(value)):
        if _accepts_list(accepted_type):
            return list(value)
        return {key: _as_input(item) for key, item in value.items()}
    return _as_input(value)


def _accepts_list(annotation: Any) -> bool:
    options = typing.get_args(annotation) or (annotation,)
    return any(typing.get_origin(option) in (list, Sequence) for option in options)


@dataclass
class Ledger:
    """What this stack manages, resource key -> (status, Azure id): exported as `adoption`, the record the next run
    reads back (PreviousRun)."""

    entries: dict[str, tuple[Status, pulumi.Output[str]]] = field(default_factory=dict)

    def record(self, adoption: Adoption, resource_id: pulumi.Input[str]) -> None:
        self.entries[adoption.key] = (adoption.status, pulumi.Output.from_input(resource_id))

    def output(self) -> pulumi.Output[dict[str, dict[str, str]]]:
        statuses = {key: status for key, (status, _) in self.entries.items()}
        return pulumi.Output.all(**{key: resource_id for key, (_, resource_id) in self.entries.items()}).apply(
            lambda ids: {key: {"status": statuses[key], "id": ids[key]} for key in statuses}
        )


@dataclass(frozen=True)
class Managed(Generic[R]):
    """A resource this run declares, or, when it is only referenced, what its lookup found."""

    adoption: Adoption
    resource: R | None  # None: referenced

    @property
    def dependencies(self) -> list[pulumi.Resource]:
        """What something using it waits for: the declared resource; nothing when it is only referenced."""
        return [self.resource] if self.resource is not None else []

    def output(self, attribute: str) -> pulumi.Output[Any]:
        """The declared resource's output, or the lookup's value of the same name (the SDK names both alike)."""
        if self.resource is not None:
            return getattr(self.resource, attribute)
        value = getattr(self.adoption.existing, attribute)
        # apply keeps a typed lookup result (e.g. ConfigurationResponse) as it is; from_input would make it a dict.
        return pulumi.Output.from_input(0).apply(lambda _: value)


def declare_or_reference(
    adoption: Adoption,
    ledger: Ledger,
    declare: Callable[[pulumi.ResourceOptions], R],
    *,
    parent: pulumi.Resource,
    always_retain: bool = False,
    protect: bool = False,
    depends_on: Sequence[pulumi.Resource] = (),
) -> Managed[R]:
    """Declare the resource with `declare(options)` unless it is only referenced, and record its id in the ledger."""
    options = adoption.options(always_retain=always_retain, protect=protect, parent=parent, depends_on=depends_on)
    managed = Managed(adoption, declare(options) if adoption.declared else None)
    ledger.record(adoption, managed.output("id"))
    return managed
