"""The exception hierarchy: one class per way a call can fail, so callers catch exactly what they can handle."""

from __future__ import annotations

import builtins

import httpx


class NNServeError(Exception):
    """Base of everything this package raises on purpose."""


class APIError(NNServeError):
    """The server answered with an HTTP error; `code` and `message` are its own words."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        code: str,
        request_id: str | None = None,
        response: httpx.Response | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.code = code
        self.request_id = request_id
        self.response = response

    def __str__(self) -> str:
        rid = f" [request {self.request_id}]" if self.request_id else ""
        return f"{self.status_code} {self.code}: {self.message}{rid}"


class BadRequestError(APIError):
    """400: the image, JSON or body shape could not be used."""


class AuthenticationError(APIError):
    """401: the server needs an API key and got none or a wrong one."""


class NotFoundError(APIError):
    """404: unknown route or model."""


class PayloadTooLargeError(APIError):
    """413: too many bytes, items or pixels in one request; split it (see `predict_many`)."""


class UnsupportedMediaTypeError(APIError):
    """415: the route does not accept this content type."""


class UnprocessableError(APIError):
    """422: well-formed but invalid values (series length, horizon, query parameters)."""


class ServerError(APIError):
    """5xx: the server failed; the request itself may be fine."""


class OverloadedError(ServerError):
    """503: too much work in flight or models still loading; raised once retries are spent."""


class RequestTimeoutError(ServerError, builtins.TimeoutError):
    """504: the server gave up on the request within its own time limit."""


class ConnectionError(NNServeError, builtins.ConnectionError):
    """No usable answer: the server could not be reached or dropped the connection, after retries."""


class ClientTimeoutError(ConnectionError, builtins.TimeoutError):
    """The client's own timeout ran out before the server answered (not retried: it would only wait longer)."""


STATUS_ERRORS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError,
    422: UnprocessableError,
    503: OverloadedError,
    504: RequestTimeoutError,
}


def error_class(status_code: int) -> type[APIError]:
    """The most specific class for an HTTP error status."""
    if status_code in STATUS_ERRORS:
        return STATUS_ERRORS[status_code]
    return ServerError if status_code >= 500 else APIError
