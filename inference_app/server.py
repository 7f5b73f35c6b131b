"""One HTTP server on one port: health and OpenAI API routes, with the Gradio UI mounted at /."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import gradio as gr
import uvicorn
from fastapi import FastAPI

from inference_app.api.routes import add_api_routes
from inference_app.service import ModelService
from inference_app.settings import Settings
from inference_app.web.auth import Authenticator, GuessingBrake, PasswordCheck, authentication_mode, login_message
from inference_app.web.security import add_web_security
from inference_app.web.sign_in import LoginBrake, add_sign_out_routes
from inference_app.web.ui import THEME, build_ui

logger = logging.getLogger(__name__)

# On SIGTERM, open streams (Gradio's event streams never end by themselves) are cut after this many seconds,
# well within the platform's grace period before it kills the container.
GRACEFUL_SHUTDOWN_S = 10


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
    brake = GuessingBrake()  # one budget of failed sign-ins per address, for the API and the UI's login form
    app.state.guessing_brake = brake
    if check is not None:
        app.add_middleware(LoginBrake, brake=brake)
    add_web_security(app, settings)  # added last: outermost, around every answer, a braked login's too
    # The routes come first: the Gradio app mounted at / takes every path not matched before it.
    add_api_routes(app, settings, service, None if check is None else Authenticator(check, brake))
    if check is not None:
        add_sign_out_routes(app)
    # In password mode Gradio shows its login form at / and refuses its own API without the session cookie.
    return gr.mount_gradio_app(
        app,
        build_ui(settings, service, sign_out=check is not None),
        path="/",
        ssr_mode=False,
        theme=THEME,
        auth=None if check is None else check.accepts_login,
        auth_message=None if check is None else login_message(settings),
    )


def uvicorn_config(settings: Settings, service: ModelService, **options: Any) -> uvicorn.Config:
    """How the app is served (by serve() and by the tests' harness); `options` add to uvicorn's."""
    return uvicorn.Config(
        build_app(settings, service),
        host=settings.host,
        port=settings.port,
        server_header=False,  # no "server: uvicorn": nothing to tell a scanner
        forwarded_allow_ips=settings.forwarded_allow_ips,
        **options,
    )


def serve(settings: Settings, service: ModelService) -> None:
    """Serves until interrupted; the service starts loading once the port listens."""
    server = uvicorn.Server(uvicorn_config(settings, service, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
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
