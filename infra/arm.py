"""Azure Resource Manager calls the program makes itself, where azure-native has no invoke: global name availability
(storage accounts and registries) and the role assignments of a principal; and the HTTPS helpers they and the
registry's token exchange (infra/acr_token.py) share, retried with backoff on network errors and on Azure's "try
again" answers (429, 5xx); any other HTTP error is final."""

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

import pulumi

from infra.adoption import AzureLookupError
from infra.errors import ConfigError, registration_fix
from infra.registry import ACR_PULL_ROLE_ID

TIMEOUT_S = 60
RETRY_DELAYS_S = (2.0, 4.0, 8.0)  # then give up: four attempts within about 15 s plus the timeouts
_RETRIED_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class RequestFailed(Exception):
    """The request failed for good (after retries where retrying made sense)."""


def post(url: str, body: bytes, headers: dict[str, str]) -> Any:
    """POST `body` and return the JSON answer."""
    return _send(Request(url, data=body, headers=headers, method="POST"))


def get(url: str, headers: dict[str, str]) -> Any:
    """GET the JSON answer."""
    return _send(Request(url, headers=headers, method="GET"))


def _send(request: Request) -> Any:
    for delay in (*RETRY_DELAYS_S, None):
        try:
            with urlopen(request, timeout=TIMEOUT_S) as response:
                return json.load(response)
        except HTTPError as error:
            if error.code not in _RETRIED_STATUSES or delay is None:
                # Azure's JSON error body names the cause (e.g. MissingSubscriptionRegistration); keep it.
                body = error.read().decode("utf-8", "replace")[:1000] if error.fp is not None else ""
                raise RequestFailed(f"{error} {body}".strip()) from None
        except (URLError, TimeoutError, ConnectionError) as error:  # DNS, refused, reset, timed out
            if delay is None:
                raise RequestFailed(str(error)) from None
        except ValueError as error:  # not JSON
            raise RequestFailed(f"the answer is not JSON ({error})") from None
        time.sleep(delay)
    raise AssertionError("unreachable: the last attempt returns or raises")


ARM = "https://management.azure.com"


@dataclass(frozen=True)
class GlobalName:
    """A name unique across Azure, checked with its provider's checkNameAvailability action."""

    key: str  # the config key that sets it
    provider: str
    api_version: str
    resource_type: str
    description: str
    rule: str


STORAGE_ACCOUNT_NAME = GlobalName(
    "storageAccountName",
    "Microsoft.Storage",
    "2023-05-01",
    "Microsoft.Storage/storageAccounts",
    "storage account",
    "3-24 lowercase letters and digits",
)
REGISTRY_NAME = GlobalName(
    "registryName",
    "Microsoft.ContainerRegistry",
    "2023-07-01",
    "Microsoft.ContainerRegistry/registries",
    "registry",
    "5-50 letters and digits",
)


def require_free_name(
    kind: GlobalName, name: str, *, explicit: bool, subscription_id: str, arm_token: Callable[[], str]
) -> None:
    """Stop, naming the key, when ARM says the name is taken (by anyone, anywhere), and naming the command when the
    subscription has not registered the provider; a check that cannot be made otherwise is only a warning (creating
    the resource would then fail with Azure's own message)."""
    url = (
        f"{ARM}/subscriptions/{subscription_id}/providers/{kind.provider}/checkNameAvailability"
        f"?api-version={kind.api_version}"
    )
    body = json.dumps({"name": name, "type": kind.resource_type}).encode()
    try:
        answer = post(url, body, {"Authorization": f"Bearer {arm_token()}", "Content-Type": "application/json"})
    except RequestFailed as error:
        fix = registration_fix(str(error))
        if fix:  # creating the resource would fail the same way: stop now, saying what to do
            raise AzureLookupError(
                f"Checking whether {kind.description} name {name!r} is free failed, so nothing was created or "
                f"changed. {fix}Azure said: {error}"
            ) from None
        pulumi.log.warn(f"Could not check whether {kind.description} name {name!r} is free ({error}); continuing.")
        return
    if isinstance(answer, dict) and answer.get("nameAvailable") is False:
        how = "the name you configured" if explicit else "the default name"
        raise ConfigError(
            f"{kind.key}: {name!r} ({how}) is taken by a {kind.description} elsewhere in Azure ({kind.description} "
            f"names are global; Azure says: {answer.get('message') or answer.get('reason')}); choose another with "
            f"`pulumi config set {kind.key} <{kind.rule}>`"
        )


@dataclass(frozen=True)
class RoleAssignmentFound:
    id: str
    name: str


def find_acr_pull(registry_id: str, principal_id: str, arm_token: Callable[[], str]) -> RoleAssignmentFound | None:
    """The AcrPull assignment of this principal on the registry itself, if there is one: an existing pull identity
    usually has it, and ARM refuses a second one (RoleAssignmentExists). azure-native has no invoke to list them."""
    url = (
        f"{ARM}{registry_id}/providers/Microsoft.Authorization/roleAssignments?api-version=2022-04-01"
        f"&$filter=principalId%20eq%20'{principal_id}'"
    )
    try:
        answer = get(url, {"Authorization": f"Bearer {arm_token()}"})
    except RequestFailed as error:
        raise AzureLookupError(
            f"Looking up the role assignments of pull identity {principal_id} on registry {registry_id} failed, so "
            f"nothing was created or changed. {registration_fix(str(error))}Azure said: {error}"
        ) from None
    for assignment in answer.get("value", []) if isinstance(answer, dict) else []:
        properties = assignment.get("properties", {})
        same_scope = str(properties.get("scope", "")).lower() == registry_id.lower()
        if same_scope and str(properties.get("roleDefinitionId", "")).lower().endswith(ACR_PULL_ROLE_ID):
            return RoleAssignmentFound(assignment["id"], assignment["name"])
    return None
