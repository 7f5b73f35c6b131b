"""The API's error type: every refusal is an OpenAI-style body ({"error": {"message", "type", "param", "code"}}),
and the one table of how ModelService's refusals are answered, for every route."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from inference_app.api.protocol import ErrorBody, ErrorDetail
from inference_app.service import (
    CapacityExceededError,
    InvalidRequestError,
    ModelFailedError,
    ModelLoadingError,
    PromptTooLongError,
    UnknownModelError,
)

# Seconds a client should wait before retrying: a slot frees when any running reply ends; loading takes longer.
RETRY_AFTER_BUSY_S = 1
RETRY_AFTER_LOADING_S = 10


class ApiError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(
        self,
        status_code: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)
        self.headers = headers

    def response(self) -> JSONResponse:
        body = ErrorBody(error=self.detail).model_dump()
        return JSONResponse(body, status_code=self.status_code, headers=self.headers)


# ModelService's refusals, as the API answers them (a subclass before its base: the first match wins).
SERVICE_ERRORS: dict[type[Exception], Callable[[Any], ApiError]] = {
    UnknownModelError: lambda error: ApiError(404, str(error), param="model", code="model_not_found"),
    PromptTooLongError: lambda error: ApiError(400, str(error), param=error.param, code="context_length_exceeded"),
    InvalidRequestError: lambda error: ApiError(400, str(error), param=error.param, code="invalid_value"),
    CapacityExceededError: lambda error: ApiError(
        429,
        str(error),
        type="rate_limit_error",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(RETRY_AFTER_BUSY_S)},
    ),
    ModelLoadingError: lambda error: ApiError(
        503,
        f"{error}; retry shortly (GET /ready turns 200 when it is served)",
        type="service_unavailable",
        code="model_loading",
        headers={"Retry-After": str(RETRY_AFTER_LOADING_S)},
    ),
    ModelFailedError: lambda error: ApiError(
        503, f"the model failed to load: {error}", type="service_unavailable", code="model_failed"
    ),
}


def api_error_of(error: Exception) -> ApiError:
    """`error` as the API answers it: itself if an ApiError, its SERVICE_ERRORS entry if a refusal of the service."""
    if isinstance(error, ApiError):
        return error
    for error_type, answer in SERVICE_ERRORS.items():
        if isinstance(error, error_type):
            return answer(error)
    raise TypeError(f"no API answer for {type(error).__name__}")


def add_api_error_handlers(app: FastAPI) -> None:
    """An ApiError or a refusal of the service (SERVICE_ERRORS) raised anywhere in a route or a dependency becomes
    its response; any other exception a 500 with an OpenAI-style body (instead of Starlette's plain text), its
    details in the log only."""

    async def api_error_response(request: Request, error: Exception) -> Response:
        return api_error_of(error).response()

    async def unexpected_error_response(request: Request, error: Exception) -> Response:
        # Starlette logs the exception with its traceback after this answer is sent.
        return ApiError(500, "internal server error (the server's log has the details)", type="server_error").response()

    handled: list[type[Exception]] = [ApiError, *SERVICE_ERRORS]
    for error_type in handled:
        app.add_exception_handler(error_type, api_error_response)
    app.add_exception_handler(Exception, unexpected_error_response)


# Pydantic names the member of a union that an error is about in its location (stop: str | list[str] fails as
# ("stop", "str")); those names are types, not parameters.
_UNION_MEMBER = re.compile(r"^(str|int|float|bool)$|[^A-Za-z0-9_]")


def validation_error(error: ValidationError) -> ApiError:
    """The first problem, named by its parameter path as OpenAI does (e.g. messages[0].role)."""
    first = error.errors()[0]
    parts = [part for part in first["loc"] if isinstance(part, int) or not _UNION_MEMBER.search(part)]
    param = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in parts).lstrip(".")
    reason = str(first["ctx"]["error"]) if first["type"] == "value_error" else first["msg"]
    if first["type"] == "missing":
        return ApiError(400, f"missing required parameter '{param}'", param=param, code="missing_required_parameter")
    return ApiError(400, f"invalid '{param}': {reason}", param=param, code="invalid_value")
