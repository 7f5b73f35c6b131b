"""Push credentials without a registry password: the Azure AD token of whoever runs `pulumi up` (the azure-native
provider's own login, e.g. `az login`) exchanged at the registry's `/oauth2/exchange` endpoint for an ACR refresh
token, the flow `az acr login --expose-token` uses (retried on network errors, infra/arm.py). The pushing identity
needs push rights on the registry (Owner or Contributor of the resource group have them; otherwise grant AcrPush)."""

import urllib.parse

import pulumi
import pulumi_docker_build as docker_build
from pulumi_azure_native import authorization

from infra.arm import RequestFailed, post

# The user name ACR expects with a refresh token obtained from an Azure AD token (`az acr login --expose-token`).
ACR_TOKEN_USERNAME = "00000000-0000-0000-0000-000000000000"


def exchange_for_acr_token(login_server: str, tenant_id: str, aad_token: str) -> str:
    """An ACR refresh token for `login_server` in exchange for an Azure AD access token (ACR's AAD-OAuth flow)."""
    body = urllib.parse.urlencode(
        {"grant_type": "access_token", "service": login_server, "tenant": tenant_id, "access_token": aad_token}
    ).encode()
    try:
        answer = post(
            f"https://{login_server}/oauth2/exchange", body, {"Content-Type": "application/x-www-form-urlencoded"}
        )
    except RequestFailed as error:
        raise RuntimeError(
            f"Could not get a push token for registry {login_server} with your Azure login ({error}). Check "
            "`az login` (or the credentials azure-native uses) and that you may push to the registry (AcrPush)."
        ) from None
    token = answer.get("refresh_token") if isinstance(answer, dict) else None
    if not isinstance(token, str) or not token:
        raise RuntimeError(f"Registry {login_server} answered the token exchange without a refresh_token")
    return token


def push_credentials(login_server: pulumi.Input[str]) -> docker_build.RegistryArgs:
    """Registry credentials for the build from the azure-native provider's login (a secret, never the admin user)."""
    client = authorization.get_client_config_output()
    aad_token = authorization.get_client_token_output().token
    acr_token = pulumi.Output.all(pulumi.Output.from_input(login_server), client.tenant_id, aad_token).apply(
        lambda values: exchange_for_acr_token(*values)
    )
    return docker_build.RegistryArgs(
        address=login_server, username=ACR_TOKEN_USERNAME, password=pulumi.Output.secret(acr_token)
    )
