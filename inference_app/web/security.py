"""What every HTTP response and request goes through, whatever route serves it (the API or the Gradio UI):

- on a server listening on loopback only, a check of the Host header (400 for another name: DNS rebinding);
- quiet ends for requests whose client left mid-body (aborted uploads);
- a cap on the request body (413 with an OpenAI-style error), checked before any route reads it;
- CORS: only the app's own origin, and the configured extra ones, may read responses from a browser page
  (Gradio's own CORS handling, which trusts any origin when the Host is public, then stands aside);
- headers that keep other sites from framing the UI or sniffing content types, HSTS on HTTPS, and cookies that a
  page on another site cannot send along (SameSite=Lax instead of Gradio's SameSite=None).
"""

from __future__ import annotations

import re

from fastapi import FastAPI
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inference_app.api.errors import ApiError
from inference_app.settings import Settings

SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}
# The Host names a server listening on loopback answers to: another name there is a DNS-rebinding page on another
# site reaching this machine's server (which, without a password, would then serve it).
LOOPBACK_HOSTS = ["localhost", "127.0.0.1"]
HSTS = "max-age=31536000"  # one year; sent on HTTPS only, as browsers ignore it on HTTP
_SAMESITE_NONE = re.compile(r";\s*samesite=none", re.IGNORECASE)


def add_web_security(app: FastAPI, settings: Settings) -> None:
    # The last added is the outermost: every response, the 413 and CORS preflights included, gets the headers,
    # and an allowed origin can read the 413.
    app.add_middleware(ClientGoneQuietly)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(settings.allowed_origins),
        allow_credentials=True,
        allow_methods=["*"],
        allow_headers=["*"],
    )
    if settings.host in LOOPBACK_HOSTS:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=LOOPBACK_HOSTS, www_redirect=False)
    app.add_middleware(SecurityHeaders)


class ClientGoneQuietly:
    """Ends a request whose client left while its body was being read (an aborted upload) without an answer and
    without a log entry: nobody is left to answer, and uvicorn would log a 70-line traceback for each."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except ClientDisconnect:
            pass


class BodySizeLimit:
    """Answers 413 to a request whose body is larger than max_bytes: at once when its Content-Length says so; a
    chunked body is read up to the limit first (and handed on whole when it fits)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large()(scope, receive, send)
            return
        if "chunked" not in headers.get("transfer-encoding", "").lower():
            await self.app(scope, receive, send)
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._too_large()(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(body, receive), send)

    def _too_large(self) -> ASGIApp:
        return ApiError(
            413,
            f"the request body is larger than this server's limit of {self.max_bytes} bytes"
            " (--max-request-bytes): send a shorter conversation",
            code="request_too_large",
        ).response()


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that gives the whole body once, then waits for the client as the original does."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class SecurityHeaders:
    """Adds SECURITY_HEADERS (and HSTS on HTTPS) to every response, and makes SameSite=None cookies SameSite=Lax."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        https = scope.get("scheme") == "https"  # behind a proxy, from X-Forwarded-Proto when uvicorn trusts it

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
                if https:
                    headers["Strict-Transport-Security"] = HSTS
                cookies = headers.getlist("set-cookie")
                if cookies:
                    del headers["set-cookie"]
                    for cookie in cookies:
                        headers.append("set-cookie", _SAMESITE_NONE.sub("; SameSite=Lax", cookie))
            await send(message)

        await self.app(scope, receive, send_with_headers)
