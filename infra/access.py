"""Who may reach the endpoint: config `access` (`public`, `password`, `entra`) and the `allowedIpRanges` allow-list.

- `password` (default): the inference app itself requires a username and password (Gradio login for the UI, HTTP
  bearer or basic auth for the API). The password comes from the secret config `accessPassword`, else pulumi-random
  generates one; the container gets it as a container app secret, referenced by `INFERENCE_AUTH_PASSWORD`.
- `entra`: the container app's built-in authentication (Easy Auth) signs users in with a Microsoft Entra ID app
  registration the user names; the app itself runs without a password.
- `public`: no sign-in at all, as the bicep did; a warning is logged on every run.

Everything the container app needs (secrets, env vars, IP rules) is computed before the app is declared; Entra's auth
config is a child resource of the app, so it is declared afterwards with `EndpointAccess.protect_app`.
"""

import argparse
import ipaddress
import re
from dataclasses import dataclass
from typing import Literal, cast, get_args

import pulumi
import pulumi_random
from pulumi_azure_native import app

from inference_app.settings import MIN_PASSWORD_LENGTH, Settings, env_var, parse_auth_username
from infra.config_source import ConfigSource
from infra.errors import ConfigError

AccessMode = Literal["public", "password", "entra"]
DEFAULT_ACCESS: AccessMode = "password"
DEFAULT_USERNAME = Settings().auth_username
GENERATED_PASSWORD_LENGTH = 32

# The contract with the inference app (see the README's "Access" section).
USERNAME_ENV = env_var("auth_username")
PASSWORD_ENV = env_var("auth_password")
PASSWORD_SECRET_NAME = "inference-auth-password"
PASSWORD_VERSION_ENV = "ACCESS_PASSWORD_VERSION"  # not read by the app; see EndpointAccess
# The container app secret holding the Entra client secret; the Azure portal uses the same name.
ENTRA_SECRET_NAME = "microsoft-provider-authentication-secret"
ENTRA_LOGIN_ENDPOINT = "https://login.microsoftonline.com"

PASSWORD_KEYS = ("accessUsername", "accessPassword")
ENTRA_KEYS = ("entraClientId", "entraTenantId", "entraClientSecret", "entraAllowedAudiences")

_GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_TENANT_DOMAIN = re.compile(r"(?=.{4,253}$)([a-zA-Z0-9-]{1,63}\.)+[a-zA-Z]{2,63}")


@dataclass(frozen=True)
class EntraConfig:
    client_id: str
    tenant_id: str  # a GUID, or a verified domain such as contoso.onmicrosoft.com
    client_secret: pulumi.Output[str] | None  # None: implicit flow (ID tokens only)
    allowed_audiences: tuple[str, ...]

    @property
    def issuer(self) -> str:
        return f"{ENTRA_LOGIN_ENDPOINT}/{self.tenant_id}/v2.0"


@dataclass(frozen=True)
class AccessConfig:
    mode: AccessMode
    username: str | None = None  # password mode
    password: pulumi.Output[str] | None = None  # password mode, from config; None: generated
    entra: EntraConfig | None = None  # entra mode
    allowed_ip_ranges: tuple[str, ...] = ()  # normalized IPv4 CIDRs; empty: any address


def normalize_ip_range(key: str, value: str) -> str:
    """An IPv4 address or CIDR block, as Azure expects it (`203.0.113.7` becomes `203.0.113.7/32`)."""
    try:
        network = ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as error:
        raise ConfigError(
            f"{key}: {value!r} is not an IPv4 address or CIDR block such as 203.0.113.0/24 ({error})"
        ) from None
    if network.version != 4:
        raise ConfigError(f"{key}: {value!r} is IPv6; Azure Container Apps IP restrictions accept IPv4 only")
    return str(network)


def _read_allowed_ip_ranges(source: ConfigSource) -> tuple[str, ...]:
    ranges = [
        normalize_ip_range("allowedIpRanges", item)
        for item in source.string_list("allowedIpRanges", "203.0.113.0/24") or ()
    ]
    return tuple(dict.fromkeys(ranges))  # a range listed twice is one rule


def _reject_keys_of_other_modes(source: ConfigSource, mode: AccessMode) -> None:
    """A key of another mode is most likely a mode set wrongly: say so rather than ignore it."""
    for keys, owner in ((PASSWORD_KEYS, "password"), (ENTRA_KEYS, "entra")):
        if owner == mode:
            continue
        for key in keys:
            if source.in_stack_config(key):
                raise ConfigError(
                    f"{key}: only used when access is {owner}, but access is {mode}; "
                    f"`pulumi config set access {owner}` or `pulumi config rm {key}`"
                )


def _read_password(source: ConfigSource) -> pulumi.Output[str] | None:
    raw = source.raw("accessPassword")
    if raw is not None and len(raw) < MIN_PASSWORD_LENGTH:
        raise ConfigError(
            f"accessPassword: must be at least {MIN_PASSWORD_LENGTH} characters; or `pulumi config rm accessPassword` "
            "to have one generated"
        )
    return source.secret("accessPassword")


def _read_entra(source: ConfigSource) -> EntraConfig:
    client_id = source.raw("entraClientId")
    tenant_id = source.raw("entraTenantId")
    if client_id is None or not _GUID.fullmatch(client_id.strip()):
        raise ConfigError(
            "entraClientId: required when access is entra: the Application (client) ID of your app registration, "
            f"a GUID, got {client_id!r}"
        )
    if tenant_id is None or not (_GUID.fullmatch(tenant_id.strip()) or _TENANT_DOMAIN.fullmatch(tenant_id.strip())):
        raise ConfigError(
            "entraTenantId: required when access is entra: the Directory (tenant) ID of the app registration (a GUID "
            f"or a domain such as contoso.onmicrosoft.com), got {tenant_id!r}"
        )
    client_id = client_id.strip().lower()
    audiences = source.string_list("entraAllowedAudiences", f"api://{client_id}") or (f"api://{client_id}",)
    return EntraConfig(
        client_id=client_id,
        tenant_id=tenant_id.strip(),
        client_secret=source.secret("entraClientSecret"),
        allowed_audiences=tuple(audiences),
    )


def read_access_config(source: ConfigSource) -> AccessConfig:
    """Read and validate `access`, its mode's keys and `allowedIpRanges`; raises ConfigError naming the key and the
    rule."""
    access_mode = cast(AccessMode, source.choice("access", get_args(AccessMode), DEFAULT_ACCESS))
    _reject_keys_of_other_modes(source, access_mode)
    allowed_ip_ranges = _read_allowed_ip_ranges(source)
    if access_mode == "password":
        username = (source.raw("accessUsername") or DEFAULT_USERNAME).strip()
        try:
            parse_auth_username(username)  # the app's own rule: a username it would refuse at start is refused here
        except argparse.ArgumentTypeError as error:
            raise ConfigError(f"accessUsername: {error}, got {username!r}") from None
        return AccessConfig(
            access_mode, username=username, password=_read_password(source), allowed_ip_ranges=allowed_ip_ranges
        )
    if access_mode == "entra":
        return AccessConfig(access_mode, entra=_read_entra(source), allowed_ip_ranges=allowed_ip_ranges)
    return AccessConfig(access_mode, allowed_ip_ranges=allowed_ip_ranges)


def ip_security_restrictions(allowed_ip_ranges: tuple[str, ...]) -> list[app.IpSecurityRestrictionRuleArgs]:
    """One Allow rule per range: with any Allow rule, ACA's ingress refuses every other address."""
    return [
        app.IpSecurityRestrictionRuleArgs(
            name=f"allow-{index}",
            description=f"allowedIpRanges[{index}]",
            ip_address_range=ip_range,
            action=app.Action.ALLOW,
        )
        for index, ip_range in enumerate(allowed_ip_ranges)
    ]


def needs_sticky_sessions(max_replicas: int) -> bool:
    """Gradio's queue keeps each browser session's state on one replica: with more than one replica, ingress must
    send a session back to the replica it started on (session affinity)."""
    return max_replicas > 1


class EndpointAccess(pulumi.ComponentResource):
    """What the container app needs for the chosen access mode. Pass `secrets`, `env` and `ip_security_restrictions`
    to the app; once the app exists, call `protect_app` (it declares Entra's auth config, nothing in other modes)."""

    mode: AccessMode
    username: str | None
    password: pulumi.Output[str] | None  # always a secret
    secrets: list[app.SecretArgs]
    env: list[app.EnvironmentVarArgs]
    ip_security_restrictions: list[app.IpSecurityRestrictionRuleArgs]

    def __init__(self, name: str, config: AccessConfig, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("inference:infra:EndpointAccess", name, None, opts)
        self._config = config
        self.mode = config.mode
        self.username = config.username
        self.password = None
        self.secrets = []
        self.env = []
        self.ip_security_restrictions = ip_security_restrictions(config.allowed_ip_ranges)

        if config.mode == "public":
            reach = (
                f"any address in allowedIpRanges ({', '.join(config.allowed_ip_ranges)})"
                if config.allowed_ip_ranges
                else "anyone on the internet who finds the URL"
            )
            pulumi.log.warn(
                f"access is public: {reach} can use the model and spend your GPU time. "
                "`pulumi config set access password` (the default) requires a password.",
                resource=self,
            )
        elif config.mode == "password":
            password = config.password
            if password is None:
                # Letters and digits only: the password travels in shells, HTTP headers and login forms unquoted.
                generated = pulumi_random.RandomPassword(
                    "access-password",
                    length=GENERATED_PASSWORD_LENGTH,
                    special=False,
                    opts=pulumi.ResourceOptions(parent=self),
                )
                password = generated.result
            self.password = pulumi.Output.secret(password)
            # Changing a container app secret does not start a new revision, so running replicas would keep the old
            # password: a random tag, replaced whenever the password changes (keepers), goes into an env var and so
            # makes a new revision. It is random, so it tells nothing about the password.
            password_version = pulumi_random.RandomId(
                "access-password-version",
                byte_length=4,
                keepers={"password": self.password},
                opts=pulumi.ResourceOptions(parent=self),
            )
            self.secrets = [app.SecretArgs(name=PASSWORD_SECRET_NAME, value=self.password)]
            self.env = [
                app.EnvironmentVarArgs(name=USERNAME_ENV, value=config.username),
                app.EnvironmentVarArgs(name=PASSWORD_ENV, secret_ref=PASSWORD_SECRET_NAME),
                app.EnvironmentVarArgs(name=PASSWORD_VERSION_ENV, value=password_version.hex),
            ]
        elif config.entra is not None and config.entra.client_secret is not None:
            self.secrets = [app.SecretArgs(name=ENTRA_SECRET_NAME, value=config.entra.client_secret)]

        self.register_outputs({"mode": self.mode, "username": self.username, "password": self.password})

    def stack_outputs(self) -> dict[str, pulumi.Input[str]]:
        """What to export: in password mode `accessUsername` and `accessPassword` (a secret, shown by
        `pulumi stack output --show-secrets accessPassword`); nothing in other modes."""
        if self.password is None or self.username is None:
            return {}
        return {"accessUsername": self.username, "accessPassword": self.password}

    def protect_app(
        self, container_app_name: pulumi.Input[str], resource_group_name: pulumi.Input[str]
    ) -> app.ContainerAppsAuthConfig | None:
        """Entra mode: turn on the app's built-in authentication. Browsers without a session are redirected to the
        Microsoft sign-in page; API clients send `Authorization: Bearer <Entra access token>`."""
        entra = self._config.entra
        if entra is None:
            return None
        return app.ContainerAppsAuthConfig(
            "entra-auth",
            auth_config_name="current",  # the only name ACA accepts
            container_app_name=container_app_name,
            resource_group_name=resource_group_name,
            platform=app.AuthPlatformArgs(enabled=True),
            global_validation=app.GlobalValidationArgs(
                unauthenticated_client_action=app.UnauthenticatedClientActionV2.REDIRECT_TO_LOGIN_PAGE,
                redirect_to_provider="azureactivedirectory",
            ),
            identity_providers=app.IdentityProvidersArgs(
                azure_active_directory=app.AzureActiveDirectoryArgs(
                    enabled=True,
                    registration=app.AzureActiveDirectoryRegistrationArgs(
                        client_id=entra.client_id,
                        open_id_issuer=entra.issuer,
                        client_secret_setting_name=ENTRA_SECRET_NAME if entra.client_secret is not None else None,
                    ),
                    validation=app.AzureActiveDirectoryValidationArgs(allowed_audiences=list(entra.allowed_audiences)),
                )
            ),
            http_settings=app.HttpSettingsArgs(require_https=True),
            opts=pulumi.ResourceOptions(parent=self),
        )
