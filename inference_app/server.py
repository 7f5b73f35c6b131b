"""One HTTP server on one port: health and OpenAI API routes, with the Gradio UI mounted at /.

uvicorn serves it, with bounds on what a client can hold: a connection must send its request's headers within
REQUEST_HEADERS_TIMEOUT_S of opening (or of its previous response), an idle keep-alive connection is closed after
KEEP_ALIVE_TIMEOUT_S, and running out of file descriptors is logged once a minute, not at every accept() retry.
On SIGTERM, replies still streaming when the container's grace period nearly ends get an error event, then the rest
is cut; on SIGINT (Ctrl+C) that happens at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from types import FrameType
from typing import Any

import gradio as gr
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from inference_app.api.routes import add_api_routes
from inference_app.client_limit import PerClientLimit
from inference_app.service import ModelService
from inference_app.settings import CONTAINER_TERMINATION_GRACE_S, Settings
from inference_app.web.auth import Authenticator, GuessingBrake, PasswordCheck, authentication_mode, login_message
from inference_app.web.security import add_web_security
from inference_app.web.sign_in import HeartbeatNeedsSession, LoginBrake, add_sign_out_routes
from inference_app.web.ui import THEME, build_ui

logger = logging.getLogger(__name__)

REQUEST_HEADERS_TIMEOUT_S = 5  # a client that has not sent a whole request head by then is disconnected
KEEP_ALIVE_TIMEOUT_S = 5  # uvicorn's default, stated: an idle connection between requests is closed after this
# On SIGTERM, replies still streaming after STREAMS_END_AFTER_S get an error event and end; whatever is still open
# STREAM_END_MARGIN_S later (Gradio's event streams never end by themselves) is cut, and the process exits before
# the platform kills it at CONTAINER_TERMINATION_GRACE_S.
STREAMS_END_AFTER_S = CONTAINER_TERMINATION_GRACE_S - 6
STREAM_END_MARGIN_S = 2
ACCEPT_FAILURE_LOG_INTERVAL_S = 60.0


def build_app(settings: Settings, service: ModelService) -> FastAPI:
    check = PasswordCheck.for_settings(settings)
    logger.info(authentication_mode(settings))
    app = FastAPI(
        title="inference_app",
        summary=f"Chat UI at / and an OpenAI-compatible API at /v1 for {settings.served_model_id}",
        # The API routes serve /docs and /openapi.json themselves, behind the password in password mode.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.stopping = asyncio.Event()  # set by AppServer when the streams must end (see STREAMS_END_AFTER_S)
    brake = GuessingBrake()  # one budget of failed sign-ins per address, for the API and the UI's login form
    app.state.guessing_brake = brake
    if check is not None:
        app.add_middleware(LoginBrake, brake=brake)
        app.add_middleware(HeartbeatNeedsSession)
    add_web_security(app, settings)  # added last: outermost, around every answer, a braked login's too
    # The routes come first: the Gradio app mounted at / takes every path not matched before it.
    authenticator = None if check is None else Authenticator(check, brake)
    client_limit = PerClientLimit(settings.max_generations_per_client)  # one count per client for the API and the UI
    add_api_routes(app, settings, service, authenticator, client_limit, app.state.stopping)
    if check is not None:
        add_sign_out_routes(app)
    # In password mode Gradio shows its login form at / and refuses its own API without the session cookie.
    return gr.mount_gradio_app(
        app,
        build_ui(settings, service, client_limit, sign_out=check is not None),
        path="/",
        ssr_mode=False,
        theme=THEME,
        auth=None if check is None else check.accepts_login,
        auth_message=None if check is None else login_message(settings),
    )


def uvicorn_server(
    settings: Settings, service: ModelService, *, streams_end_after_s: float = STREAMS_END_AFTER_S, **options: Any
) -> AppServer:
    """How the app is served (by serve() and by the tests' harness); `options` add to uvicorn's Config."""
    app = build_app(settings, service)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=HeadersTimeoutProtocol,
        timeout_keep_alive=KEEP_ALIVE_TIMEOUT_S,
        timeout_graceful_shutdown=round(streams_end_after_s + STREAM_END_MARGIN_S),
        server_header=False,  # no "server: uvicorn": nothing to tell a scanner
        forwarded_allow_ips=settings.forwarded_allow_ips,
        **options,
    )
    logging.getLogger("uvicorn.access").addFilter(ACCESS_LOG_FILTER)  # once: addFilter skips a filter it has
    return AppServer(config, stopping=app.state.stopping, streams_end_after_s=streams_end_after_s)


class AccessLogFilter(logging.Filter):
    """uvicorn's access log lines without query strings: a client may send its API key as ?api_key=. (The path
    itself is logged percent-encoded, so CR or ANSI escapes in it cannot forge lines or drive a terminal.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) == 5:  # uvicorn's: client, method, path, version, status
            client, method, path, version, status = record.args
            record.args = (client, method, str(path).partition("?")[0], version, status)
        return True


ACCESS_LOG_FILTER = AccessLogFilter()


def serve(settings: Settings, service: ModelService) -> None:
    """Serves until interrupted; the service starts loading once the port listens."""
    server = uvicorn_server(settings, service)
    threading.Thread(
        target=_load_once_listening, args=(server, service), name="load-once-listening", daemon=True
    ).start()
    server.run()


def _load_once_listening(server: uvicorn.Server, service: ModelService) -> None:
    while not server.started:
        if server.should_exit:
            return
        time.sleep(0.05)
    service.start_loading()


class AppServer(uvicorn.Server):
    """uvicorn's server, logging file-descriptor exhaustion once a minute and ending streams before its shutdown
    cuts them."""

    def __init__(self, config: uvicorn.Config, *, stopping: asyncio.Event, streams_end_after_s: float) -> None:
        super().__init__(config)
        self._stopping = stopping
        self._streams_end_after_s = streams_end_after_s

    async def startup(self, sockets: Any = None) -> None:
        asyncio.get_running_loop().set_exception_handler(AcceptFailureLog().handle)
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGINT:  # Ctrl+C at a terminal: whoever presses it wants out now, not after the grace period
            self._streams_end_after_s = 0
            self.config.timeout_graceful_shutdown = STREAM_END_MARGIN_S
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: Any = None) -> None:
        ending = asyncio.get_running_loop().call_later(self._streams_end_after_s, self._stopping.set)
        try:
            await super().shutdown(sockets)
        finally:
            ending.cancel()


class AcceptFailureLog:
    """An event loop exception handler: while the process is out of file descriptors, asyncio retries accept()
    every second and reports each failure with a traceback; this logs one line a minute instead."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._logged_at: float | None = None
        self._unlogged = 0

    def handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if isinstance(context.get("exception"), ValueError) and "._start_serving(" in repr(context.get("handle")):
            # Each failed accept() schedules a retry (up to `backlog` of them a second); those still pending when
            # the listening socket closes at shutdown fail on its closed descriptor: nothing to report.
            return
        if context.get("message") != "socket.accept() out of system resource":
            loop.default_exception_handler(context)
            return
        now = self._clock()
        if self._logged_at is not None and now - self._logged_at < ACCEPT_FAILURE_LOG_INTERVAL_S:
            self._unlogged += 1
            return
        logger.error(
            "cannot accept connections: %s (%d more times since the last report); new clients wait until"
            " connections close: raise the open-file limit (ulimit -n) or find who holds them",
            context.get("exception"),
            self._unlogged,
        )
        self._logged_at, self._unlogged = now, 0


class HeadersTimeoutProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection that has not sent a whole request head within
    REQUEST_HEADERS_TIMEOUT_S of opening or of its previous response: uvicorn itself waits for a first request
    forever, and stops its keep-alive timer at the first byte of the next one."""

    _headers_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._expect_request_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._expect_request_head()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._headers_deadline is not None:
            self._headers_deadline.cancel()
        super().connection_lost(exc)

    def _expect_request_head(self) -> None:
        if self._headers_deadline is not None:
            self._headers_deadline.cancel()
        self._headers_deadline = self.loop.call_later(REQUEST_HEADERS_TIMEOUT_S, self._close_unless_requested)

    def _close_unless_requested(self) -> None:
        waiting_for_a_request = self.cycle is None or self.cycle.response_complete
        # A connection upgraded to another protocol (a WebSocket) is no longer this one's to close.
        if waiting_for_a_request and self.transport.get_protocol() is self and not self.transport.is_closing():
            self.transport.close()
