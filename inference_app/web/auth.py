"""Password mode: one username and password guard both the OpenAI API and the Gradio UI.

The API takes the password as a bearer token (what OpenAI clients send as their API key) or by HTTP basic auth; the
UI's login form (Gradio's own) calls the same check. The same rules hold on every path: the password is compared as
UTF-8 bytes (so non-ASCII passwords work in headers too), the username with surrounding spaces trimmed, every
comparison in constant time. Repeated failures from one client address are braked (see GuessingBrake).
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping

from fastapi import Request
from fastapi.security.utils import get_authorization_scheme_param
from starlette.requests import HTTPConnection

from inference_app.api.errors import ApiError
from inference_app.settings import Settings, env_var, option_name

# The brake on guessing (GuessingBrake): this many failed sign-ins from one address within the window pause it.
MAX_FAILED_SIGN_INS = 10
FAILED_SIGN_IN_WINDOW_S = 60.0
# Bearer, not Basic: a browser meeting a refused API path shows no password dialog of its own.
WWW_AUTHENTICATE = 'Bearer realm="inference"'
INVALID_CREDENTIALS_MESSAGE = (
    "Missing or invalid credentials: send 'Authorization: Bearer <password>'"
    " (pulumi stack output --show-secrets accessPassword) or HTTP basic auth."
)
# Azure Container Apps sets it in every container it runs: the app is deployed, so `pulumi stack output` knows the
# credentials (learn.microsoft.com/azure/container-apps/environment-variables, built-in variables).
DEPLOYED_MARKER = "CONTAINER_APP_NAME"


def login_message(settings: Settings, environ: Mapping[str, str] = os.environ) -> str:
    """The HTML above Gradio's login form: where this server's username and password come from."""
    if DEPLOYED_MARKER in environ:
        where = (
            "Sign in with this deployment's username and password: <code>pulumi stack output accessUsername</code> and"
            " <code>pulumi stack output --show-secrets accessPassword</code>."
        )
    else:
        where = (
            "Sign in with the username and password this server was started with"
            f" (<code>{option_name('auth_username')}</code>, <code>{option_name('auth_password')}</code>)."
        )
    # The default name is no secret (the docs print it); a name someone chose is not shown to anonymous visitors.
    if settings.auth_username == Settings.auth_username:
        where += f" The username is <code>{Settings.auth_username}</code>."
    brake = f"After {MAX_FAILED_SIGN_INS} failed attempts, sign-in pauses for up to {FAILED_SIGN_IN_WINDOW_S:.0f} s."
    return f"{where} {brake}"


class PasswordCheck:
    """Checks credentials against the one configured username and password."""

    def __init__(self, username: str, password: str) -> None:
        self._username = username.strip().encode()
        self._password = password.encode()

    @classmethod
    def for_settings(cls, settings: Settings) -> PasswordCheck | None:
        """The check for the configured password, or None when authentication is off."""
        if settings.auth_password is None:
            return None
        return cls(settings.auth_username, settings.auth_password)

    def accepts_login(self, username: str, password: str) -> bool:
        """The login form's check (Gradio calls it with the form's fields)."""
        return self._accepts(username.strip().encode(), password.encode())

    def accepts_authorization(self, header: str | None) -> bool:
        """Whether an Authorization header is `Bearer <password>` or `Basic base64(<username>:<password>)`
        (scheme names in any case, as RFC 7235 has it)."""
        scheme, value = get_authorization_scheme_param(header)
        try:
            # Starlette decodes header bytes as latin-1: encoding back gives the bytes the client sent (UTF-8).
            raw = value.encode("latin-1")
        except UnicodeEncodeError:
            return False
        if scheme.lower() == "bearer":
            return secrets.compare_digest(raw, self._password)
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(raw, validate=True)
                username, separator, password = decoded.partition(b":")  # the password may contain ":"
                username = username.decode().strip().encode()
            except (binascii.Error, UnicodeDecodeError):  # not base64, or a username that is not UTF-8
                return False
            return bool(separator) and self._accepts(username, password)
        return False

    def _accepts(self, username: bytes, password: bytes) -> bool:
        # Both are compared whatever the first gives: the time taken tells nothing about which one was wrong.
        username_matches = secrets.compare_digest(username, self._username)
        password_matches = secrets.compare_digest(password, self._password)
        return username_matches and password_matches


class GuessingBrake:
    """Refuses a client address for a while after too many failed sign-ins from it.

    After MAX_FAILURES failures within WINDOW_S seconds, the address is refused (429 with Retry-After) until the
    oldest of them is WINDOW_S old: a guesser gets at most MAX_FAILURES tries a minute, and a user who mistyped
    waits at most a minute. A success forgets the address's failures.

    Each call costs the same however many addresses are tracked: they are kept in the order of their latest failure,
    so those whose failures have all expired are at the front and are dropped from there. At most MAX_ADDRESSES are
    tracked (about 30 MB with 10 failures each); beyond that the one whose latest failure is oldest is forgotten,
    which only a guesser with that many addresses can bring about, and it already has that many budgets.
    """

    MAX_FAILURES = MAX_FAILED_SIGN_INS
    WINDOW_S = FAILED_SIGN_IN_WINDOW_S
    MAX_ADDRESSES = 10_000

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # address -> times of its failures within the window, oldest first; the address that failed last is last.
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    @property
    def tracked_addresses(self) -> int:
        return len(self._failures)

    def retry_after(self, address: str) -> int | None:
        """Seconds the address must wait before trying again, or None if it may try now."""
        now = self._clock()
        failures = self._failures.get(address)
        if failures is None:
            return None
        while failures and failures[0] <= now - self.WINDOW_S:
            failures.popleft()
        if len(failures) < self.MAX_FAILURES:
            return None
        return max(1, math.ceil(failures[0] + self.WINDOW_S - now))

    def record_failure(self, address: str) -> None:
        now = self._clock()
        self._forget_expired(now)
        failures = self._failures.setdefault(address, deque(maxlen=self.MAX_FAILURES))
        failures.append(now)
        self._failures.move_to_end(address)
        if len(self._failures) > self.MAX_ADDRESSES:
            self._failures.popitem(last=False)

    def record_success(self, address: str) -> None:
        self._failures.pop(address, None)

    def _forget_expired(self, now: float) -> None:
        """Drops the addresses whose latest failure is out of the window (each is dropped once: O(1) on average)."""
        while self._failures:
            address, failures = next(iter(self._failures.items()))
            if failures and failures[-1] > now - self.WINDOW_S:
                return
            del self._failures[address]


def client_address(connection: HTTPConnection) -> str:
    """The caller's address; behind a proxy, the one uvicorn takes from X-Forwarded-For (--forwarded-allow-ips)."""
    return connection.client.host if connection.client else "unknown"


def too_many_failures(retry_after: int) -> ApiError:
    return ApiError(
        429,
        f"too many failed sign-ins from your address: retry in {retry_after} s",
        type="rate_limit_error",
        code="too_many_failed_sign_ins",
        headers={"Retry-After": str(retry_after)},
    )


class Authenticator:
    """The API's credentials check, with the brake on guessing: the checks the routes depend on."""

    def __init__(self, check: PasswordCheck, brake: GuessingBrake) -> None:
        self.check = check
        self.brake = brake

    def is_authenticated(self, request: Request) -> bool:
        """Whether the request carries the password; raises the 429 ApiError for a braked address that tries.
        A request without an Authorization header is anonymous, not a failure."""
        header = request.headers.get("Authorization")
        if header is None:
            return False
        address = client_address(request)
        retry_after = self.brake.retry_after(address)
        if retry_after is not None:
            raise too_many_failures(retry_after)
        if self.check.accepts_authorization(header):
            self.brake.record_success(address)
            return True
        self.brake.record_failure(address)
        return False

    async def require_credentials(self, request: Request) -> None:
        """A FastAPI dependency refusing a request without the password with the API's one 401."""
        # The same answer whatever was wrong, and never an echo of what the client sent.
        if not self.is_authenticated(request):
            raise ApiError(
                401,
                INVALID_CREDENTIALS_MESSAGE,
                code="invalid_api_key",
                headers={"WWW-Authenticate": WWW_AUTHENTICATE},
            )


def authentication_mode(settings: Settings) -> str:
    """The startup log line saying which mode is on (never the password)."""
    if settings.auth_password is None:
        return f"authentication: off ({env_var('auth_password')} not set)"
    return f"authentication: password (user {settings.auth_username})"
