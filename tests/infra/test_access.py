"""`access` modes, the IP allow-list and sticky sessions (infra/access.py), checked on what Azure would receive.

The container app here is declared the way `__main__.py` wires it: the access component's secrets, env vars and IP
rules go into the app, and `protect_app` gets the app's name.
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import pulumi
import pytest
from pulumi_azure_native import app

from infra.access import (
    AccessConfig,
    EndpointAccess,
    ip_security_restrictions,
    needs_sticky_sessions,
    read_access_config,
)
from infra.errors import ConfigError
from tests.infra.azure_mocks import collect_stack_outputs, is_secret, reveal

PROJECT = "aitk-inference"
APP_NAME = "aiacaapp4kx2p"
GENERATED_PASSWORD = "Gen3ratedPassw0rdFromPulumiRandom"
CLIENT_ID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
TENANT_ID = "72f988bf-86f1-41af-91ab-2d7cd011db47"

RANDOM_PASSWORD = "random:index/randomPassword:RandomPassword"
RANDOM_ID = "random:index/randomId:RandomId"
PASSWORD_VERSION = "9f2c41d7"
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


@pytest.fixture(autouse=True)
def _clean_config() -> Iterator[None]:
    yield
    pulumi.runtime.set_all_config({})


def stack_config(secrets: tuple[str, ...] = (), **values: Any) -> pulumi.Config:
    """The stack's config; keys in `secrets` were set with `pulumi config set --secret`."""
    pulumi.runtime.set_all_config(
        {f"{PROJECT}:{key}": value if isinstance(value, str) else json.dumps(value) for key, value in values.items()},
        [f"{PROJECT}:{key}" for key in secrets],
    )
    return pulumi.Config(PROJECT)


@dataclass
class Run:
    resources: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # inputs (secret markers kept) by type
    outputs: dict[str, Any] = field(default_factory=dict)
    secret_outputs: set[str] = field(default_factory=set)

    def one(self, typ: str) -> dict[str, Any]:
        declared = self.resources.get(typ, [])
        assert len(declared) == 1, f"expected one {typ}, declared {len(declared)}"
        return declared[0]


class RecordingMocks(pulumi.runtime.Mocks):
    def __init__(self, run: Run) -> None:
        self.run = run

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        self.run.resources.setdefault(args.typ, []).append(args.inputs)
        state = dict(args.inputs)
        if args.typ == RANDOM_PASSWORD:
            state["result"] = GENERATED_PASSWORD
        if args.typ == RANDOM_ID:
            state["hex"] = PASSWORD_VERSION
        if args.typ == CONTAINER_APP:
            state["name"] = reveal(args.inputs)["containerAppName"]
        return f"{args.name}-id", state

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict[str, Any], list[tuple[str, str]] | None]:
        return {}, [("", f"no invoke expected, got {args.token}")]


def deploy(config: AccessConfig, max_replicas: int = 1) -> Run:
    """Declare the access component and a container app wired to it under Pulumi mocks, export what __main__.py
    exports, and collect the stack outputs."""
    run = Run()
    pulumi.runtime.settings.ROOT.set(None)
    pulumi.runtime.set_mocks(RecordingMocks(run), project=PROJECT, stack="dev", preview=False)

    @pulumi.runtime.test
    def program() -> pulumi.Output[Any]:
        access = EndpointAccess("access", config)
        container_app = app.ContainerApp(
            "app",
            container_app_name=APP_NAME,
            resource_group_name="rg",
            configuration=app.ConfigurationArgs(
                secrets=access.secrets or None,
                ingress=app.IngressArgs(
                    external=True,
                    target_port=7860,
                    allow_insecure=False,
                    ip_security_restrictions=access.ip_security_restrictions or None,
                    sticky_sessions=app.IngressStickySessionsArgs(affinity=app.Affinity.STICKY)
                    if needs_sticky_sessions(max_replicas)
                    else None,
                ),
            ),
            template=app.TemplateArgs(
                containers=[app.ContainerArgs(name="inference", image="image", env=access.env or None)]
            ),
        )
        access.protect_app(container_app.name, "rg")
        for name, value in access.stack_outputs().items():
            pulumi.export(name, value)
        exported = pulumi.runtime.get_root_resource().outputs  # type: ignore[union-attr]
        return collect_stack_outputs(exported, run.outputs, run.secret_outputs)

    program()
    return run


# -- password -------------------------------------------------------------------------------------------------------


def test_password_is_the_default_with_a_generated_secret_password() -> None:
    config = read_access_config(stack_config())
    assert (config.mode, config.username, config.password) == ("password", "admin", None)

    run = deploy(config)

    random_password = reveal(run.one(RANDOM_PASSWORD))
    assert random_password["length"] == 32 and random_password["special"] is False
    container_app = run.one(CONTAINER_APP)
    assert reveal(container_app)["configuration"]["secrets"] == [
        {"name": "inference-auth-password", "value": GENERATED_PASSWORD}
    ]
    assert reveal(container_app)["template"]["containers"][0]["env"] == [
        {"name": "INFERENCE_AUTH_USERNAME", "value": "admin"},
        {"name": "INFERENCE_AUTH_PASSWORD", "secretRef": "inference-auth-password"},
        {"name": "ACCESS_PASSWORD_VERSION", "value": PASSWORD_VERSION},
    ]
    # `pulumi stack output --show-secrets accessPassword` shows it; nothing shows it in plain text.
    assert run.outputs == {"accessUsername": "admin", "accessPassword": GENERATED_PASSWORD}
    assert run.secret_outputs == {"accessPassword"}
    for inputs in (container_app, run.one(RANDOM_PASSWORD), run.one(RANDOM_ID)):
        assert GENERATED_PASSWORD not in set(plain_strings(inputs))


def test_a_new_password_makes_a_new_revision() -> None:
    """Secret changes alone do not restart an ACA revision: a random tag kept by the password goes into the env."""
    config = read_access_config(stack_config(("accessPassword",), accessPassword="correct-horse-battery"))
    run = deploy(config)

    version = run.one(RANDOM_ID)
    assert reveal(version) == {"byteLength": 4, "keepers": {"password": "correct-horse-battery"}}
    assert "correct-horse-battery" not in set(plain_strings(version))
    env = reveal(run.one(CONTAINER_APP))["template"]["containers"][0]["env"]
    assert {"name": "ACCESS_PASSWORD_VERSION", "value": PASSWORD_VERSION} in env
    assert AUTH_CONFIG not in run.resources


def test_password_from_secret_config_replaces_the_generated_one() -> None:
    config = read_access_config(
        stack_config(("accessPassword",), accessUsername="mlteam", accessPassword="correct-horse-battery")
    )
    run = deploy(config)

    assert RANDOM_PASSWORD not in run.resources
    container_app = run.one(CONTAINER_APP)
    [secret] = reveal(container_app)["configuration"]["secrets"]
    assert secret == {"name": "inference-auth-password", "value": "correct-horse-battery"}
    assert "correct-horse-battery" not in set(plain_strings(container_app))
    assert reveal(container_app)["template"]["containers"][0]["env"][0] == {
        "name": "INFERENCE_AUTH_USERNAME",
        "value": "mlteam",
    }
    assert run.outputs["accessPassword"] == "correct-horse-battery"
    assert run.secret_outputs == {"accessPassword"}


@pytest.mark.parametrize(
    ("secrets", "values", "message"),
    [
        ((), {"accessPassword": "correct-horse-battery"}, r"accessPassword: is stored in plain text .* --secret"),
        (("accessPassword",), {"accessPassword": "short"}, "accessPassword: must be at least 12 characters"),
        ((), {"accessUsername": "ad:min"}, "accessUsername: 1-64 letters, digits, .* got 'ad:min'"),
        ((), {"accessUsername": "two words"}, "accessUsername: "),
        ((), {"access": "open"}, "access: must be one of public, password, entra, got 'open'"),
    ],
)
def test_invalid_password_settings_fail(secrets: tuple[str, ...], values: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        read_access_config(stack_config(secrets, **values))


# -- public ---------------------------------------------------------------------------------------------------------


def test_public_declares_no_credentials_and_warns() -> None:
    config = read_access_config(stack_config(access="public"))
    with mock.patch.object(pulumi.log, "warn") as warn:
        run = deploy(config)

    [call] = warn.call_args_list
    assert call.args[0].startswith("access is public: anyone on the internet who finds the URL can use the model")
    container_app = reveal(run.one(CONTAINER_APP))
    assert "secrets" not in container_app["configuration"]
    assert "env" not in container_app["template"]["containers"][0]
    assert RANDOM_PASSWORD not in run.resources and AUTH_CONFIG not in run.resources
    assert run.outputs == {}  # username and password are None: not exported


def test_public_with_an_allow_list_says_who_can_reach_it() -> None:
    config = read_access_config(stack_config(access="public", allowedIpRanges=["203.0.113.0/24"]))
    with mock.patch.object(pulumi.log, "warn") as warn:
        deploy(config)
    assert "any address in allowedIpRanges (203.0.113.0/24)" in warn.call_args.args[0]


# -- entra ----------------------------------------------------------------------------------------------------------


def test_entra_turns_on_built_in_authentication_with_the_named_registration() -> None:
    config = read_access_config(
        stack_config(
            ("entraClientSecret",),
            access="entra",
            entraClientId=CLIENT_ID,
            entraTenantId=TENANT_ID,
            entraClientSecret="client~secret~value",
        )
    )
    run = deploy(config)

    container_app = run.one(CONTAINER_APP)
    assert reveal(container_app)["configuration"]["secrets"] == [
        {"name": "microsoft-provider-authentication-secret", "value": "client~secret~value"}
    ]
    assert "client~secret~value" not in set(plain_strings(container_app))
    assert "env" not in reveal(container_app)["template"]["containers"][0]  # the app itself asks for no password

    auth = run.one(AUTH_CONFIG)
    assert "client~secret~value" not in set(plain_strings(auth))
    assert reveal(auth) == {
        "authConfigName": "current",
        "containerAppName": APP_NAME,
        "resourceGroupName": "rg",
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
    assert run.outputs == {}


def test_entra_without_a_client_secret_and_with_own_audiences() -> None:
    config = read_access_config(
        stack_config(
            access="entra",
            entraClientId=CLIENT_ID.upper(),
            entraTenantId="contoso.onmicrosoft.com",
            entraAllowedAudiences=["https://contoso.com/inference"],
        )
    )
    run = deploy(config)

    assert "secrets" not in reveal(run.one(CONTAINER_APP))["configuration"]
    aad = reveal(run.one(AUTH_CONFIG))["identityProviders"]["azureActiveDirectory"]
    assert aad["registration"] == {
        "clientId": CLIENT_ID,
        "openIdIssuer": "https://login.microsoftonline.com/contoso.onmicrosoft.com/v2.0",
    }
    assert aad["validation"] == {"allowedAudiences": ["https://contoso.com/inference"]}


@pytest.mark.parametrize(
    ("secrets", "values", "message"),
    [
        ((), {"entraTenantId": TENANT_ID}, "entraClientId: required when access is entra: the Application"),
        ((), {"entraClientId": "my-app", "entraTenantId": TENANT_ID}, "entraClientId: .* got 'my-app'"),
        ((), {"entraClientId": CLIENT_ID}, "entraTenantId: required when access is entra: the Directory"),
        ((), {"entraClientId": CLIENT_ID, "entraTenantId": "contoso"}, "entraTenantId: .* got 'contoso'"),
        (
            (),
            {"entraClientId": CLIENT_ID, "entraTenantId": TENANT_ID, "entraClientSecret": "plain"},
            r"entraClientSecret: is stored in plain text .* `pulumi config set --secret entraClientSecret",
        ),
        (
            (),
            {"entraClientId": CLIENT_ID, "entraTenantId": TENANT_ID, "entraAllowedAudiences": "api://x"},
            "entraAllowedAudiences: must be a list of strings",
        ),
        (
            (),
            {"entraClientId": CLIENT_ID, "entraTenantId": TENANT_ID, "accessUsername": "admin"},
            "accessUsername: only used when access is password, but access is entra",
        ),
    ],
)
def test_invalid_entra_settings_fail(secrets: tuple[str, ...], values: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        read_access_config(stack_config(secrets, access="entra", **values))


def test_keys_of_another_mode_are_reported() -> None:
    with pytest.raises(ConfigError, match="entraClientId: only used when access is entra, but access is password"):
        read_access_config(stack_config(entraClientId=CLIENT_ID))
    with pytest.raises(ConfigError, match="accessPassword: only used when access is password, but access is public"):
        read_access_config(stack_config(("accessPassword",), access="public", accessPassword="correct-horse-battery"))


# -- IP allow-list and sticky sessions -------------------------------------------------------------------------------


def test_allowed_ip_ranges_reach_the_ingress_as_allow_rules() -> None:
    config = read_access_config(
        stack_config(allowedIpRanges=["203.0.113.0/24", "198.51.100.7", " 192.0.2.16/28 ", "203.0.113.0/24"])
    )
    assert config.allowed_ip_ranges == ("203.0.113.0/24", "198.51.100.7/32", "192.0.2.16/28")

    run = deploy(config)

    ingress = reveal(run.one(CONTAINER_APP))["configuration"]["ingress"]
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
    assert read_access_config(stack_config()).allowed_ip_ranges == ()
    assert ip_security_restrictions(()) == []
    ingress = reveal(deploy(read_access_config(stack_config())).one(CONTAINER_APP))["configuration"]["ingress"]
    assert "ipSecurityRestrictions" not in ingress


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["10.0.0.1/24"], r"allowedIpRanges: '10.0.0.1/24' is not an IPv4 address or CIDR block .*host bits set"),
        (
            ["2001:db8::/32"],
            "allowedIpRanges: '2001:db8::/32' is IPv6; Azure Container Apps IP restrictions accept IPv4",
        ),
        (["my-office"], "allowedIpRanges: 'my-office' is not an IPv4 address or CIDR block"),
        (["10.0.0.0/33"], "allowedIpRanges: '10.0.0.0/33' is not an IPv4 address"),
        (
            "203.0.113.0/24",
            r"allowedIpRanges: must be a list of strings, e.g. `pulumi config set --path 'allowedIpRanges\[0\]'",
        ),
        ([24], "allowedIpRanges: must be a list of strings"),
    ],
)
def test_invalid_ip_ranges_fail(value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        read_access_config(stack_config(allowedIpRanges=value))


def test_sticky_sessions_whenever_more_than_one_replica() -> None:
    assert not needs_sticky_sessions(1)
    assert needs_sticky_sessions(2)
    config = read_access_config(stack_config())
    single = reveal(deploy(config, max_replicas=1).one(CONTAINER_APP))["configuration"]["ingress"]
    assert "stickySessions" not in single
    several = reveal(deploy(config, max_replicas=3).one(CONTAINER_APP))["configuration"]["ingress"]
    assert several["stickySessions"] == {"affinity": "sticky"}
