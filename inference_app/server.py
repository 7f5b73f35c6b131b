"""One HTTP server on one port: health and OpenAI API routes, with the Gradio UI mounted at /."""

from __future__ import annotations

import gradio as gr
import uvicorn
from fastapi import FastAPI

from inference_app.api_routes import build_api_router
from inference_app.generation import ModelService
from inference_app.settings import Settings
from inference_app.ui import build_ui


def build_app(settings: Settings, service: ModelService) -> FastAPI:
    app = FastAPI(
        title="inference_app",
        summary=f"Chat UI at / and an OpenAI-compatible API at /v1 for {settings.served_model_id}",
    )
    # The routes come first: the Gradio app mounted at / takes every path not matched before it.
    app.include_router(build_api_router(settings, service))
    return gr.mount_gradio_app(app, build_ui(settings, service), path="/", ssr_mode=False)


# On SIGTERM, open streams (Gradio's event streams never end by themselves) are cut after this many seconds,
# well within the platform's grace period before it kills the container.
GRACEFUL_SHUTDOWN_S = 10


def serve(settings: Settings, service: ModelService) -> None:
    """Serves until interrupted."""
    uvicorn.run(
        build_app(settings, service),
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
