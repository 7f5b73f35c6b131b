"""The UI's sign-in and sign-out around Gradio's session cookie.

Gradio's POST /login (its login form) gets the brake on guessing that the API has (inference_app.web.auth.GuessingBrake,
shared with it: one budget per client address), and refuses other sites' pages: otherwise any page a visitor
opens could spend the visitor's budget with wrong passwords and lock them out. Gradio's own GET /logout ends every
session of the user (there is one user) and can be triggered by a link on any site; it is replaced by POST /logout,
which ends only the caller's session and refuses requests from other origins.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import HTTPConnection
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inference_app.web.auth import GuessingBrake, client_address, too_many_failures

LOGIN_PATHS = ("/login", "/login/")
HEARTBEAT_PATH = "/gradio_api/heartbeat/"


class LoginBrake:
    """Refuses POST /login from another site's page with 403 (not counted) and from a braked address with 429 and
    Retry-After; counts Gradio's answers: 400 (wrong credentials) is a failure, 200 a success."""

    def __init__(self, app: ASGIApp, brake: GuessingBrake) -> None:
        self.app = app
        self.brake = brake

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in LOGIN_PATHS:
            await self.app(scope, receive, send)
            return
        connection = HTTPConnection(scope)
        if not _same_origin(connection):
            await _other_site("sign in on this app's own page")(scope, receive, send)
            return
        address = client_address(connection)
        retry_after = self.brake.retry_after(address)
        if retry_after is not None:
            await too_many_failures(retry_after).response()(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                if message["status"] == 400:
                    self.brake.record_failure(address)
                elif message["status"] == 200:
                    self.brake.record_success(address)
            await send(message)

        await self.app(scope, receive, counting_send)


class HeartbeatNeedsSession:
    """Refuses Gradio's heartbeat stream (GET /gradio_api/heartbeat/<session>) to a caller without a session
    cookie: Gradio serves it to anyone, and each one holds a connection and a task open for as long as it likes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(HEARTBEAT_PATH):
            connection = HTTPConnection(scope)
            gradio_app = _mounted_gradio_app(scope["app"])
            if not any(token in gradio_app.tokens for token in _session_tokens(gradio_app, connection)):
                await JSONResponse({"detail": "sign in first"}, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def add_sign_out_routes(app: FastAPI) -> None:
    """POST /logout (the UI's Sign out button) and a 405 for GET /logout; added before Gradio is mounted at /."""

    @app.get("/logout", include_in_schema=False)
    def refuse_logout_by_link() -> JSONResponse:
        return JSONResponse(
            {"detail": "sign out with POST /logout (the UI's Sign out button)"},
            status_code=405,
            headers={"Allow": "POST"},
        )

    @app.post("/logout", include_in_schema=False)
    def sign_out(request: Request) -> Response:
        if not _same_origin(request):
            return _other_site("sign out from this app's own page")
        gradio_app = _mounted_gradio_app(request.app)
        response = JSONResponse({"signed_out": True})
        for token in _session_tokens(gradio_app, request):
            gradio_app.tokens.pop(token, None)  # this session only
        for name in _session_cookie_names(gradio_app):
            response.delete_cookie(name, path="/")
        return response


def _same_origin(connection: HTTPConnection) -> bool:
    """Whether the request comes from one of this app's pages: browsers send Origin with every POST; a request
    without it (curl) is not a cross-site one."""
    origin = connection.headers.get("origin")
    return origin is None or urlsplit(origin).netloc == connection.headers.get("host")


def _other_site(what_to_do: str) -> JSONResponse:
    return JSONResponse({"detail": what_to_do}, status_code=403)


def _session_cookie_names(gradio_app: Any) -> tuple[str, str]:
    """Gradio's session cookies: a Secure one (HTTPS) and a plain one (HTTP); the token is the same."""
    return f"access-token-{gradio_app.cookie_id}", f"access-token-unsecure-{gradio_app.cookie_id}"


def _session_tokens(gradio_app: Any, connection: HTTPConnection) -> list[str]:
    return [token for name in _session_cookie_names(gradio_app) if (token := connection.cookies.get(name))]


def _mounted_gradio_app(app: FastAPI) -> Any:
    """Gradio's app (which holds the session tokens), mounted at / by server.build_app."""
    return next(route.app for route in app.routes if isinstance(route, Mount))
