"""Password mode: one username and password guard both the OpenAI API and the Gradio UI.

The API takes the password as a bearer token (what OpenAI clients send as their API key) or by HTTP basic auth; the
UI's login form (Gradio's own) calls the same check. Every comparison takes constant time.
"""

from __future__ import annotations

import base64
import secrets

from fastapi.security.utils import get_authorization_scheme_param

from inference_app.settings import Settings

# Bearer, not Basic: a browser meeting a refused API path shows no password dialog of its own.
WWW_AUTHENTICATE = 'Bearer realm="inference"'
INVALID_CREDENTIALS_MESSAGE = (
    "Missing or invalid credentials: send 'Authorization: Bearer <password>'"
    " (pulumi stack output --show-secrets accessPassword) or HTTP basic auth."
)
# Shown as HTML above Gradio's login form.
LOGIN_MESSAGE = (
    "Sign in with this deployment's username and password: <code>pulumi stack output accessUsername</code> and"
    " <code>pulumi stack output --show-secrets accessPassword</code>."
)


class PasswordCheck:
    """Checks credentials against the one configured username and password."""

    def __init__(self, username: str, password: str) -> None:
        self._username = username.encode()
        self._password = password.encode()

    @classmethod
    def for_settings(cls, settings: Settings) -> PasswordCheck | None:
        """The check for the configured password, or None when authentication is off."""
        if settings.auth_password is None:
            return None
        return cls(settings.auth_username, settings.auth_password)

    def accepts_login(self, username: str, password: str) -> bool:
        # Both are compared whatever the first gives: the time taken tells nothing about which one was wrong.
        username_matches = secrets.compare_digest(username.encode(), self._username)
        password_matches = secrets.compare_digest(password.encode(), self._password)
        return username_matches and password_matches

    def accepts_authorization(self, header: str | None) -> bool:
        """Whether an Authorization header is `Bearer <password>` or `Basic base64(<username>:<password>)`
        (scheme names in any case, as RFC 7235 has it)."""
        scheme, value = get_authorization_scheme_param(header)
        if scheme.lower() == "bearer":
            return secrets.compare_digest(value.encode(), self._password)
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(value, validate=True).decode()
            except ValueError:  # not base64, or not UTF-8
                return False
            username, separator, password = decoded.partition(":")  # the password may contain ":"
            return bool(separator) and self.accepts_login(username, password)
        return False


def authentication_mode(settings: Settings) -> str:
    """The startup log line saying which mode is on (never the password)."""
    if settings.auth_password is None:
        return "authentication: off (INFERENCE_AUTH_PASSWORD not set)"
    return f"authentication: password (user {settings.auth_username})"
