"""HTTP routes: liveness, readiness, the OpenAI-compatible /v1 API and its docs (the latter behind the password in
password mode). The routes only route: chat completions are served by inference_app.api.chat_completions, errors are
inference_app.api.errors' ApiError, credentials are checked by inference_app.web.auth."""

from __future__ import annotations

import asyncio
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from inference_app.api.chat_completions import ChatCompletionServing
from inference_app.api.errors import ApiError, add_api_error_handlers
from inference_app.api.protocol import ChatCompletion, ChatCompletionRequest, ModelCard, ModelList, now
from inference_app.client_limit import PerClientLimit
from inference_app.service import ModelNotReadyError, ModelService
from inference_app.settings import Settings
from inference_app.web.auth import Authenticator

# The methods a route can be asked with. Each path answers every one of them itself (405 for those it does not
# serve, behind the same credentials check): none falls through to the Gradio app mounted at /.
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
READ = ["GET", "HEAD"]


def add_api_routes(
    app: FastAPI,
    settings: Settings,
    service: ModelService,
    authenticator: Authenticator | None,
    client_limit: PerClientLimit,
    stopping: asyncio.Event,
) -> None:
    """The health probes, open to all (the platform's probes carry no credentials); the OpenAI API and its docs,
    behind the password in password mode (authenticator set). The app must be built without FastAPI's own docs
    routes, which take no dependencies (docs_url, redoc_url and openapi_url None). Replies still running when
    `stopping` is set end with an error (the server is shutting down)."""
    credentials = [] if authenticator is None else [Depends(authenticator.require_credentials)]
    add_api_error_handlers(app)
    app.include_router(_health_router(service, authenticator))
    app.include_router(
        _openai_router(ChatCompletionServing(settings, service, client_limit, stopping), service),
        dependencies=credentials,
    )
    app.include_router(_docs_router(app), dependencies=credentials)


def _health_router(service: ModelService, authenticator: Authenticator | None) -> APIRouter:
    router = APIRouter()

    @router.api_route("/health", methods=READ, tags=["health"])
    async def health() -> dict[str, str]:
        """Liveness: answers as soon as the process serves HTTP, whatever the model's state."""
        # async: answered on the event loop itself, never queued behind busy worker threads.
        return {"status": "ok"}

    @router.api_route("/ready", methods=READ, tags=["health"])
    async def ready(request: Request) -> JSONResponse:
        """Readiness: 503 until the model and adapter are loaded, then 200. With the password (or without password
        mode), also the reason it is not ready, or what is served; anonymous callers get the status only (the
        reason is in the log)."""
        status_code = 200 if service.status == "ready" else 503
        if authenticator is not None and not authenticator.is_authenticated(request):
            return JSONResponse({"status": service.status}, status_code=status_code)
        try:
            info = service.info()
        except ModelNotReadyError as error:
            return JSONResponse({"status": service.status, "reason": str(error)}, status_code=503)
        return JSONResponse({"status": "ready", **info})

    _refuse_other_methods(router, "/health", READ)
    _refuse_other_methods(router, "/ready", READ)
    return router


def _openai_router(chat: ChatCompletionServing, service: ModelService) -> APIRouter:
    router = APIRouter()
    started_at = now()

    def require_served() -> None:
        if service.status == "failed":  # nothing is served
            raise ApiError(
                503,
                f"the model failed to load: {service.failure_reason}",
                type="service_unavailable",
                code="model_failed",
            )

    @router.api_route("/v1/models", methods=READ, tags=["openai"])
    def list_models() -> ModelList:
        require_served()
        # The default model (a request naming none runs it) first: clients that take the first id get it.
        default = service.served_model_id()
        ids = [default, *(model_id for model_id in service.model_ids() if model_id != default)]
        return ModelList(data=[ModelCard(id=model_id, created=started_at) for model_id in ids])

    @router.api_route("/v1/models/{model_id:path}", methods=READ, tags=["openai"])
    def retrieve_model(model_id: str) -> ModelCard:
        require_served()
        return ModelCard(id=service.resolve_model(model_id), created=started_at)

    @router.post(
        "/v1/chat/completions",
        tags=["openai"],
        response_model=ChatCompletion,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ChatCompletionRequest.model_json_schema()}},
            }
        },
    )
    async def chat_completions(request: Request) -> Response:
        """OpenAI chat completions; with "stream": true, server-sent chat.completion.chunk events ending with
        `data: [DONE]`."""
        return await chat.create(request)

    _refuse_other_methods(router, "/v1/models", READ)
    _refuse_other_methods(router, "/v1/chat/completions", ["POST"])

    @router.api_route("/v1/{path:path}", methods=list(HTTP_METHODS), include_in_schema=False)
    def unknown_api_url(request: Request) -> JSONResponse:
        # Without this, the Gradio app mounted at / would answer with its own 404 body.
        message = (
            f"Invalid URL ({request.method} {request.url.path}): this server has /v1/models and /v1/chat/completions"
        )
        return ApiError(404, message, code="unknown_url").response()

    return router


# Swagger UI's files, from the fastapi-offline package: FastAPI's default page loads them from a CDN, which leaves
# /docs blank offline.
_DOCS_ASSETS = Path(str(files("fastapi_offline") / "static"))
_DOCS_ASSET_NAMES = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png")


def _docs_router(app: FastAPI) -> APIRouter:
    """The OpenAPI schema and its Swagger UI page, with the page's scripts and styles served by the app itself."""
    router = APIRouter(include_in_schema=False)

    @router.api_route("/openapi.json", methods=READ)
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @router.api_route("/docs", methods=READ)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{app.title} - Swagger UI",
            swagger_js_url="/docs/assets/swagger-ui-bundle.js",
            swagger_css_url="/docs/assets/swagger-ui.css",
            swagger_favicon_url="/docs/assets/favicon.png",
        )

    @router.get("/docs/assets/{name}")
    def docs_asset(name: str) -> Response:
        if name not in _DOCS_ASSET_NAMES:
            return ApiError(404, f"no docs asset {name!r}", code="unknown_url").response()
        return FileResponse(_DOCS_ASSETS / name)

    _refuse_other_methods(router, "/openapi.json", READ)
    _refuse_other_methods(router, "/docs", READ)
    return router


def _refuse_other_methods(router: APIRouter, path: str, allowed: list[str]) -> None:
    """405 with Allow for the methods `path` does not serve (added after the route that serves the others)."""

    @router.api_route(
        path, methods=[method for method in HTTP_METHODS if method not in allowed], include_in_schema=False
    )
    def method_not_allowed(request: Request) -> JSONResponse:
        return ApiError(
            405,
            f"{request.method} is not allowed on {path}: use {' or '.join(allowed)}",
            code="method_not_allowed",
            headers={"Allow": ", ".join(allowed)},
        ).response()
