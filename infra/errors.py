"""Errors the user can fix; raised before any resource is declared where possible."""


class ConfigError(Exception):
    """Invalid configuration: the message names the key, the rule and the fix."""
