"""Errors the user can fix; raised before any resource is declared where possible."""

import re


class ConfigError(Exception):
    """Invalid configuration: the message names the key, the rule and the fix."""


# Azure's answer (409) when the subscription has not registered a resource provider: "The subscription is not
# registered to use namespace 'Microsoft.App'. See https://aka.ms/rps-not-found ...".
_UNREGISTERED = re.compile(r"MissingSubscriptionRegistration.*?namespace '([\w.]+)'", re.DOTALL)


def registration_fix(azure_error: str) -> str:
    """For an error saying a resource provider is not registered: which one, and the command that registers it;
    "" for any other error."""
    match = _UNREGISTERED.search(azure_error)
    if match is None:
        return ""
    namespace = match.group(1)
    return (
        f"The subscription has not registered the resource provider {namespace}: register it once with "
        f"`az provider register --namespace {namespace} --wait` (or in the portal: Subscription > Resource "
        "providers), then run `pulumi up` again. "
    )
