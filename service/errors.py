"""One error shape for every failure: `{"error": {"code": ..., "message": ...}}` with a 4xx/5xx status.

Under /v2 the Open Inference Protocol fixes the shape instead: `{"error": "<message>"}`, which its clients read.
"""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    503: "unavailable",
    504: "timeout",
}


class ApiError(Exception):
    """A failure the client should hear about, with a machine-readable code and a sentence for people."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def response(self, path: str = "") -> Response:
        return error_response(self.status, self.code, self.message, self.headers, path)


def is_v2(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, path: str = ""
) -> Response:
    """The error body for a request to `path`."""
    error = message if is_v2(path) else {"code": code, "message": message}
    return Response(
        json.dumps({"error": error}).encode(), status_code=status, media_type="application/json", headers=headers
    )


def install_handlers(app: FastAPI) -> None:
    """Route FastAPI's and Starlette's own errors through the same JSON shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return exc.response(request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        code = _CODES.get(exc.status_code, "error")
        return error_response(exc.status_code, code, message, exc.headers, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return error_response(422, "invalid_parameter", problems, path=request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        # Starlette re-raises the exception after this answer; the gateway logs it with the request id.
        return error_response(500, "internal", "internal server error", path=request.url.path)
