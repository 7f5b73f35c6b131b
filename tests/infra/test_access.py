"""`access` modes, the IP allow-list and sticky sessions (infra/access.py), checked on what the whole program
(`__main__.py`, under the Azure mocks) gives Azure and exports."""

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.infra.azure_mocks import GENERATED_PASSWORD, FakeAzure, ProgramRun, is_secret, reveal, run_program
from tests.infra.stacks import APP, GROUP, LOCATION

CLIENT_ID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
TENANT_ID = "72f988bf-86f1-41af-91ab-2d7cd011db47"
BASE = {"resourceGroupName": GROUP, "location": LOCATION}

RANDOM_PASSWORD = "random:index/randomPassword:RandomPassword"
RANDOM_ID = "random:index/randomId:RandomId"
CONTAINER_APP = "azure-native:app:ContainerApp"
AUTH_CONFIG = "azure-native:app:ContainerAppsAuthConfig"


def plain_strings(value: Any) -> Iterator[str]:
    """Every string in `value` that is not inside a secret."""
    if is_secret(value):
        return
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from plain_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from plain_strings(item)


def deploy(secrets: tuple[str, ...] = (), **values: Any) -> ProgramRun:
    """The program with this stack config; keys in `secrets` were set with `pulumi config set --secret`."""
    return run_program(FakeAzure(), BASE | values, secret_keys=secrets)


def app_inputs(run: ProgramRun) -> dict[str, Any]:
    """The container app's inputs with secret markers kept (reveal() for the values)."""
    return run.azure.one(CONTAINER_APP).raw_inputs


def password_version(run: ProgramRun) -> str:
    return str(run.azure.one(RANDOM_ID).state["hex"])


@pytest.fixture(autouse=True)
def _scratch(in_scratch_dir: Path) -> None:
    """Every test runs the program in a scratch directory."""


# -- password -------------------------------------------------------------------------------------------------------


def test_password_is_the_default_with_a_generated_secret_password() -> None:
    run = deploy()

    random_password = run.azure.one(RANDOM_PASSWORD).inputs
    assert random_password["length"] == 32 and random_password["special"] is False
    container_app = app_inputs(run)
    assert reveal(container_app)["configuration"]["secrets"] == [
        {"name": "inference-auth-password", "value": GENERATED_PASSWORD}
    ]
    assert reveal(container_app)["template"]["containers"][0]["env"] == [
        {"name": "INFERENCE_AUTH_USERNAME", "value": "admin"},
        {"name": "INFERENCE_AUTH_PASSWORD", "secretRef": "inference-auth-password"},
        {"name": "ACCESS_PASSWORD_VERSION", "value": password_version(run)},
    ]
    # `pulumi stack output --show-secrets accessPassword` shows it; nothing shows it in plain text.
    assert (run.outputs["accessUsername"], run.outputs["accessPassword"]) == ("admin", GENERATED_PASSWORD)
    assert run.secret_outputs == {"accessPassword"}
    for inputs in (container_app, run.azure.one(RANDOM_PASSWORD).raw_inputs, run.azure.one(RANDOM_ID).raw_inputs):
        assert GENERATED_PASSWORD not in set(plain_strings(inputs))


def test_a_new_password_makes_a_new_revision() -> None:
    """Secret changes alone do not restart an ACA revision: a random tag kept by the password goes into the env."""
    run = deploy(("accessPassword",), accessPassword="correct-horse-battery")

    version = run.azure.one(RANDOM_ID).raw_inputs
    assert reveal(version) == {"byteLength": 4, "keepers": {"password": "correct-horse-battery"}}
    assert "correct-horse-battery" not in set(plain_strings(version))
    env = reveal(app_inputs(run))["template"]["containers"][0]["env"]
    assert {"name": "ACCESS_PASSWORD_VERSION", "value": password_version(run)} in env
    other = deploy(("accessPassword",), accessPassword="correct-horse-staple")
    assert password_version(other) != password_version(run)  # a new password, a new tag: a new revision
    assert run.azure.by_type(AUTH_CONFIG) == []


def test_password_from_secret_config_replaces_the_generated_one() -> None:
    run = deploy(("accessPassword",), accessUsername="mlteam", accessPassword="correct-horse-battery")

    assert run.azure.by_type(RANDOM_PASSWORD) == []
    container_app = app_inputs(run)
    [secret] = reveal(container_app)["configuration"]["secrets"]
    assert secret == {"name": "inference-auth-password", "value": "correct-horse-battery"}
    assert "correct-horse-battery" not in set(plain_strings(container_app))
    assert reveal(container_app)["template"]["containers"][0]["env"][0] == {
        "name": "INFERENCE_AUTH_USERNAME",
        "value": "mlteam",
    }
    assert run.outputs["accessPassword"] == "correct-horse-battery"
    assert run.secret_outputs == {"accessPassword"}


# -- public ---------------------------------------------------------------------------------------------------------


def public_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [message for message in caplog.messages if message.startswith("access is public")]


def test_public_declares_no_credentials_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    run = deploy(access="public")

    [warning] = public_warnings(caplog)
    assert warning.startswith("access is public: anyone on the internet who finds the URL can use the model")
    container_app = reveal(app_inputs(run))
    assert "secrets" not in container_app["configuration"]
    assert "env" not in container_app["template"]["containers"][0]
    assert run.azure.by_type(RANDOM_PASSWORD) == [] and run.azure.by_type(AUTH_CONFIG) == []
    assert "accessUsername" not in run.outputs and "accessPassword" not in run.outputs  # None: not exported
    assert run.secret_outputs == set()


def test_public_with_an_allow_list_says_who_can_reach_it(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    deploy(access="public", allowedIpRanges=["203.0.113.0/24"])
    [warning] = public_warnings(caplog)
    assert "any address in allowedIpRanges (203.0.113.0/24)" in warning


# -- entra ----------------------------------------------------------------------------------------------------------


def test_entra_turns_on_built_in_authentication_with_the_named_registration() -> None:
    run = deploy(
        ("entraClientSecret",),
        access="entra",
        entraClientId=CLIENT_ID,
        entraTenantId=TENANT_ID,
        entraClientSecret="client~secret~value",
    )

    container_app = app_inputs(run)
    assert reveal(container_app)["configuration"]["secrets"] == [
        {"name": "microsoft-provider-authentication-secret", "value": "client~secret~value"}
    ]
    assert "client~secret~value" not in set(plain_strings(container_app))
    assert "env" not in reveal(container_app)["template"]["containers"][0]  # the app itself asks for no password

    auth = run.azure.one(AUTH_CONFIG).raw_inputs
    assert "client~secret~value" not in set(plain_strings(auth))
    assert reveal(auth) == {
        "authConfigName": "current",
        "containerAppName": APP,
        "resourceGroupName": GROUP,
        "platform": {"enabled": True},
        "globalValidation": {
            "unauthenticatedClientAction": "RedirectToLoginPage",
            "redirectToProvider": "azureactivedirectory",
        },
        "identityProviders": {
            "azureActiveDirectory": {
                "enabled": True,
                "registration": {
                    "clientId": CLIENT_ID,
                    "openIdIssuer": f"https://login.microsoftonline.com/{TENANT_ID}/v2.0",
                    "clientSecretSettingName": "microsoft-provider-authentication-secret",
                },
                "validation": {"allowedAudiences": [f"api://{CLIENT_ID}"]},
            }
        },
        "httpSettings": {"requireHttps": True},
    }
    assert "accessUsername" not in run.outputs and run.secret_outputs == set()


def test_entra_without_a_client_secret_and_with_own_audiences() -> None:
    run = deploy(
        access="entra",
        entraClientId=CLIENT_ID.upper(),
        entraTenantId="contoso.onmicrosoft.com",
        entraAllowedAudiences=["https://contoso.com/inference"],
    )

    assert "secrets" not in reveal(app_inputs(run))["configuration"]
    aad = run.azure.one(AUTH_CONFIG).inputs["identityProviders"]["azureActiveDirectory"]
    assert aad["registration"] == {
        "clientId": CLIENT_ID,
        "openIdIssuer": "https://login.microsoftonline.com/contoso.onmicrosoft.com/v2.0",
    }
    assert aad["validation"] == {"allowedAudiences": ["https://contoso.com/inference"]}


# -- IP allow-list and sticky sessions -------------------------------------------------------------------------------


def test_allowed_ip_ranges_reach_the_ingress_as_allow_rules() -> None:
    # Normalized (a host is a /32), deduplicated, in the order given.
    run = deploy(allowedIpRanges=["203.0.113.0/24", "198.51.100.7", " 192.0.2.16/28 ", "203.0.113.0/24"])

    ingress = reveal(app_inputs(run))["configuration"]["ingress"]
    assert ingress["ipSecurityRestrictions"] == [
        {"name": "allow-0", "description": "allowedIpRanges[0]", "ipAddressRange": "203.0.113.0/24", "action": "Allow"},
        {
            "name": "allow-1",
            "description": "allowedIpRanges[1]",
            "ipAddressRange": "198.51.100.7/32",
            "action": "Allow",
        },
        {"name": "allow-2", "description": "allowedIpRanges[2]", "ipAddressRange": "192.0.2.16/28", "action": "Allow"},
    ]


def test_no_allow_list_means_no_restrictions() -> None:
    ingress = reveal(app_inputs(deploy()))["configuration"]["ingress"]
    assert "ipSecurityRestrictions" not in ingress


@pytest.mark.parametrize(("max_replicas", "sticky"), [(1, False), (2, True), (3, True)])
def test_sticky_sessions_whenever_more_than_one_replica(max_replicas: int, sticky: bool) -> None:
    # One NC24-A100 node per replica.
    ingress = reveal(app_inputs(deploy(maxReplicas=max_replicas, maximumInstanceCount=max(2, max_replicas))))
    assert ingress["configuration"]["ingress"].get("stickySessions") == ({"affinity": "sticky"} if sticky else None)


# -- invalid settings -------------------------------------------------------------------------------------------------

ENTRA = {"access": "entra", "entraClientId": CLIENT_ID, "entraTenantId": TENANT_ID}


@pytest.mark.parametrize(
    ("secrets", "values", "message"),
    [
        ((), {"accessPassword": "correct-horse-battery"}, r"accessPassword: is stored in plain text .* --secret"),
        (("accessPassword",), {"accessPassword": "short"}, "accessPassword: must be at least 12 characters"),
        (
            (),
            {"accessUsername": "ad:min"},
            "accessUsername: must be non-empty, without ':' or whitespace .* got 'ad:min'",
        ),
        ((), {"accessUsername": "two words"}, "accessUsername: "),
        ((), {"access": "open"}, "access: must be one of public, password, entra, got 'open'"),
        ((), {"access": "entra", "entraTenantId": TENANT_ID}, "entraClientId: required when access is entra: the Ap"),
        ((), ENTRA | {"entraClientId": "my-app"}, "entraClientId: .* got 'my-app'"),
        ((), {"access": "entra", "entraClientId": CLIENT_ID}, "entraTenantId: required when access is entra: the Dir"),
        ((), ENTRA | {"entraTenantId": "contoso"}, "entraTenantId: .* got 'contoso'"),
        (
            (),
            ENTRA | {"entraClientSecret": "plain"},
            r"entraClientSecret: is stored in plain text .* `pulumi config set --secret entraClientSecret",
        ),
        ((), ENTRA | {"entraAllowedAudiences": "api://x"}, "entraAllowedAudiences: must be a list of strings"),
        (
            (),
            ENTRA | {"accessUsername": "admin"},
            "accessUsername: only used when access is password, but access is entra",
        ),
        ((), {"entraClientId": CLIENT_ID}, "entraClientId: only used when access is entra, but access is password"),
        (
            ("accessPassword",),
            {"access": "public", "accessPassword": "correct-horse-battery"},
            "accessPassword: only used when access is password, but access is public",
        ),
        (
            (),
            {"allowedIpRanges": ["10.0.0.1/24"]},
            r"allowedIpRanges: '10.0.0.1/24' is not an IPv4 address or CIDR block .*host bits set",
        ),
        (
            (),
            {"allowedIpRanges": ["2001:db8::/32"]},
            "allowedIpRanges: '2001:db8::/32' is IPv6; Azure Container Apps IP restrictions accept IPv4",
        ),
        ((), {"allowedIpRanges": ["my-office"]}, "allowedIpRanges: 'my-office' is not an IPv4 address or CIDR block"),
        ((), {"allowedIpRanges": ["10.0.0.0/33"]}, "allowedIpRanges: '10.0.0.0/33' is not an IPv4 address"),
        (
            (),
            {"allowedIpRanges": "203.0.113.0/24"},
            r"allowedIpRanges: must be a list of strings, e.g. `pulumi config set --path 'allowedIpRanges\[0\]'",
        ),
        ((), {"allowedIpRanges": [24]}, "allowedIpRanges: must be a list of strings"),
    ],
)
def test_invalid_settings_fail_before_any_cloud_call(
    secrets: tuple[str, ...], values: dict[str, Any], message: str
) -> None:
    azure = FakeAzure()
    with pytest.raises(Exception, match=message):
        run_program(azure, BASE | values, secret_keys=secrets)
    assert azure.lookups == [] and azure.declared == []
