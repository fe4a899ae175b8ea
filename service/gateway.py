"""The outermost ASGI layer: request id, API key, per-route metrics, one access-log line, and a last-resort 500.

It wraps the whole application (outside Starlette's own error middleware), so every response carries the
request id, 500s included, and every log line written while a request is handled names it.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from service import logs, metrics
from service.errors import error_response

logger = logging.getLogger("nnserve")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_V2_MODEL = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?(/ready|/config|/infer)?$")


class Gateway:
    """Pure ASGI: paths `is_open` accepts need no API key; `routes` name the metrics' labels."""

    def __init__(
        self, app: ASGIApp, api_key: str | None, routes: set[str], is_open: Callable[[str], bool], access_log: bool
    ) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.routes = routes
        self.is_open = is_open
        self.access_log = access_log

    def endpoint(self, path: str) -> str:
        """The metrics label of a path: a known route, or a small fixed set (labels must stay bounded)."""
        if path in self.routes:
            return path
        if path.startswith("/v1/models/"):
            return "/v1/models/{name}"
        v2 = _V2_MODEL.match(path)
        if v2:
            return "/v2/models/{name}" + ("/versions/{version}" if v2[1] else "") + (v2[2] or "")
        return "other"

    def authorized(self, headers: dict[bytes, bytes]) -> bool:
        assert self.api_key is not None
        token = headers.get(b"x-api-key") or b""
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            token = auth[7:].strip()
        return hmac.compare_digest(token, self.api_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = dict(scope["headers"])
        sent = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = sent if _REQUEST_ID.match(sent) else uuid.uuid4().hex
        token = logs.REQUEST_ID.set(request_id)
        status = 0

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        path = scope["path"]
        try:
            if self.api_key and not self.is_open(path) and not self.authorized(headers):
                response = error_response(
                    401,
                    "unauthorized",
                    "a valid API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                    {"WWW-Authenticate": "Bearer"},
                    path,
                )
                await response(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("unhandled error on %s %s", scope["method"], path)
            if not status:  # nothing sent yet: the client still gets an answer
                await error_response(500, "internal", "internal server error", path=path)(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - start
            endpoint = self.endpoint(path)
            metrics.REQUESTS.labels(endpoint, str(status or 500)).inc()
            metrics.LATENCY.labels(endpoint).observe(elapsed)
            if self.access_log:
                logger.info("%s %s %d %.1fms", scope["method"], path, status or 500, elapsed * 1000)
            logs.REQUEST_ID.reset(token)
