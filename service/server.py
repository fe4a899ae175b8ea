"""The nnserve server: LitServe's workers, batching and queues, with nnserve's own HTTP edge.

LitServe parses every body as JSON or a form and queues without bound; nnserve's predict handler reads raw
image bodies too, decodes and validates in the HTTP process, refuses work beyond a bound at once (503), and
answers every failure in one JSON shape. Everything else (workers per device, dynamic batching, transport)
is LitServe's.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import multiprocessing as mp
import pickle
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import litserve as ls
from fastapi import HTTPException
from litserve.server import BaseRequestHandler
from litserve.transport.process_transport import MPQueueTransport
from litserve.utils import LitAPIStatus, ResponseBufferItem
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from models import load, model_names
from service import logs, metrics, schemas
from service.api import ModelAPI, build_api
from service.config import Settings
from service.errors import ApiError, error_response, install_handlers
from service.inputs import read_body
from service.runtime import resolve_device, threads_per_worker

logger = logging.getLogger("nnserve")

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class Gateway:
    """Pure ASGI edge: request id, API key, per-route metrics and one access-log line per request."""

    def __init__(self, app: ASGIApp, api_key: str | None, routes: set[str], access_log: bool) -> None:
        self.app = app
        self.access_log = access_log
        self.api_key = api_key.encode() if api_key else None
        self.routes = routes

    def _endpoint(self, path: str) -> str:
        if path in self.routes:
            return path
        return "/v1/models/{name}" if path.startswith("/v1/models/") else "other"

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        assert self.api_key is not None
        token = headers.get(b"x-api-key") or b""
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            token = auth[7:].strip()
        return hmac.compare_digest(token, self.api_key)

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = dict(scope["headers"])
        sent = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = sent if _REQUEST_ID.match(sent) else uuid.uuid4().hex
        token = logs.REQUEST_ID.set(request_id)
        status = 500

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        path = scope["path"]
        try:
            if self.api_key and path != "/health" and not self._authorized(headers):
                response = error_response(
                    401,
                    "unauthorized",
                    "a valid API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                    {"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - start
            endpoint = self._endpoint(path)
            metrics.REQUESTS.labels(endpoint, str(status)).inc()
            metrics.LATENCY.labels(endpoint).observe(elapsed)
            if self.access_log:
                logger.info("%s %s %d %.1fms", scope["method"], path, status, elapsed * 1000)
            logs.REQUEST_ID.reset(token)


class PredictHandler(BaseRequestHandler):
    """Parse in the HTTP process, admit within the in-flight bound, hand to LitServe's queue, await the answer."""

    def __init__(self, lit_api: ModelAPI, server: NNServer) -> None:
        super().__init__(lit_api, server)
        settings = server.settings
        self.api: ModelAPI = lit_api
        self.max_bytes = settings.max_request_bytes
        self.timeout = settings.request_timeout
        # The bound is per model; each HTTP server process takes its share.
        self.limit = max(1, settings.max_in_flight // settings.api_servers)
        self.in_flight = 0

    async def handle_request(self, request: Request, request_type: Any = None) -> Response:
        if self.in_flight >= self.limit:  # full already: refuse before spending time on the body
            raise self._overloaded()
        body = await read_body(request, self.max_bytes)
        payload = await self.api.parse(request, body)
        n = self.api.items(payload)
        if self.in_flight and self.in_flight + n > self.limit:
            raise self._overloaded()
        payload["request_id"] = logs.REQUEST_ID.get()
        self.in_flight += n
        metrics.IN_FLIGHT.labels(self.api.name).inc(n)
        try:
            response, status = await self._exchange(payload)
        finally:
            self.in_flight -= n
            metrics.IN_FLIGHT.labels(self.api.name).dec(n)
        if status == LitAPIStatus.ERROR:
            raise self._worker_failure(response)
        if isinstance(response, tuple):
            raise ApiError(*response)
        return Response(response, media_type="application/json")

    def _overloaded(self) -> ApiError:
        metrics.OVERLOADED.labels(self.api.name).inc()
        message = f"{self.api.name} has {self.in_flight} items in flight; retry shortly"
        return ApiError(503, "overloaded", message, {"Retry-After": "1"})

    async def _exchange(self, payload: dict[str, Any]) -> tuple[Any, Any]:
        uid, _ = await self._submit_request(payload)
        event = asyncio.Event()
        buffer = self.server.response_buffer
        buffer[uid] = ResponseBufferItem(event)
        try:
            await asyncio.wait_for(event.wait(), self.timeout)
        except TimeoutError:
            raise ApiError(504, "timeout", f"no answer within {self.timeout:g} s") from None
        finally:
            item = buffer.pop(uid, None)
        return item.response

    @staticmethod
    def _worker_failure(response: Any) -> ApiError:
        """LitServe reports its own failures (queue timeout, crashed call) as exceptions, maybe pickled."""
        if isinstance(response, bytes):
            try:
                response = pickle.loads(response)
            except Exception:
                response = None
        if isinstance(response, HTTPException) and response.status_code == 504:
            return ApiError(504, "timeout", "the request waited too long in the queue")
        return ApiError(500, "internal", "the model worker failed on this request")


class _NoManager:
    """Stands where LitServe keeps its multiprocessing manager, which nnserve does not start."""

    def shutdown(self) -> None:
        pass


class NNServer(ls.LitServer):
    """LitServer with nnserve's operational routes and predict handler in place of LitServe's defaults."""

    def __init__(self, apis: list[ModelAPI], settings: Settings, device: str) -> None:
        self.settings = settings
        self.apis = {api.name: api for api in apis}
        self.device_kind = device
        routes = {"/health", "/ready", "/v1/models", "/metrics", "/docs", "/openapi.json"}
        routes |= {api.api_path for api in apis}
        super().__init__(
            apis,
            accelerator=device,
            devices=1 if device == "cpu" else "auto",
            workers_per_device=settings.workers_per_device,
            timeout=settings.request_timeout,
            middlewares=[(Gateway, {"api_key": settings.api_key, "routes": routes, "access_log": settings.access_log})],
        )
        install_handlers(self.app)

    def _init_manager(self, num_api_servers: int) -> _NoManager:
        """Carry requests and responses over plain pipes, with no manager process.

        LitServe routes every queue operation through a manager process: a blocking round trip through a third
        process for each put and get, and some 50 MB for the process itself. A multiprocessing queue is one pipe
        write from a feeder thread and one read. Readiness is counted by the APIs themselves, so the setup-status
        dict the workers write to need not be shared.
        """
        ctx = mp.get_context("spawn")
        self.workers_setup_status = {}
        self._shutdown_event = ctx.Event()
        for api in self.litapi_connector:
            self.litapi_request_queues[api.api_path] = ctx.Queue()
        self._transport = MPQueueTransport(None, [ctx.Queue() for _ in range(num_api_servers)])
        return _NoManager()

    def _register_middleware(self) -> None:
        # Compressing small JSON answers costs more server time than it saves on the wire.
        self.middlewares = [m for m in self.middlewares if not (isinstance(m, tuple) and m[0] is GZipMiddleware)]
        super()._register_middleware()

    def verify_worker_status(self) -> None:
        """Start the HTTP servers at once, so /health answers and /ready says 503 while models load.

        A worker that fails to load exits, and LitServe's worker monitor then shuts the server down.
        """

    def model_info(self, api: ModelAPI) -> dict[str, Any]:
        return {
            "name": api.name,
            "version": api.manifest.version,
            "task": api.manifest.task,
            "backend": api.backend,
            "device": self.device_kind,
            "providers": api.planned_providers(),
            "ready": api.is_ready(),
            "manifest": api.manifest.model_dump(mode="json"),
        }

    def _register_internal_endpoints(self) -> None:
        app = self.app

        @app.get("/health", tags=["operations"])
        async def health() -> dict[str, str]:
            """The process is up (no API key needed: for liveness probes)."""
            return {"status": "ok"}

        @app.get("/ready", tags=["operations"], responses={503: {"description": "Models still loading."}})
        async def ready() -> Response:
            """Every model is loaded and warmed up."""
            waiting = [name for name, api in self.apis.items() if not api.is_ready()]
            if waiting:
                return JSONResponse({"status": "loading", "loading": waiting}, status_code=503)
            return JSONResponse({"status": "ready"})

        @app.get("/v1/models", tags=["models"], response_model=schemas.ModelList)
        async def list_models() -> dict[str, Any]:
            return {"models": [self.model_info(api) for api in self.apis.values()]}

        @app.get(
            "/v1/models/{name}",
            tags=["models"],
            response_model=schemas.ModelInfo,
            responses={404: {"model": schemas.ErrorResponse}},
        )
        async def get_model(name: str) -> dict[str, Any]:
            if name not in self.apis:
                raise ApiError(404, "not_found", f"no model {name!r}; serving: {', '.join(self.apis)}")
            return self.model_info(self.apis[name])

        @app.get("/metrics", tags=["operations"], response_class=Response)
        async def prometheus() -> Response:
            return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    def _register_api_endpoints(self, lit_api: ModelAPI, request_type: Any, response_type: Any) -> None:
        handler = PredictHandler(lit_api, self)

        async def predict(request: Request) -> Response:
            return await handler.handle_request(request)

        classify = lit_api.manifest.task == "classification"
        self.app.add_api_route(
            lit_api.api_path,
            predict,
            methods=["POST"],
            tags=["predict"],
            summary=f"{lit_api.name}: {lit_api.manifest.description}",
            response_model=schemas.ClassifyResponse if classify else schemas.ForecastResponse,
            responses=schemas.ERRORS,
            openapi_extra=schemas.CLASSIFY_BODY if classify else schemas.FORECAST_BODY,
        )


def build_server(settings: Settings) -> NNServer:
    """Load every manifest, pick the device, and wire one LitServe API per model."""
    names = settings.model_list() or model_names(settings.models_dir)
    if not names:
        raise SystemExit(f"no models found under {settings.models_dir.resolve()}")
    device = resolve_device(settings.device, settings.backend)
    threads = threads_per_worker(settings.intra_op_threads, settings.workers_per_device)
    apis = []
    for name in names:
        model = load(settings.models_dir, name)
        model.verify([settings.backend])
        apis.append(build_api(model, settings, device, threads))
    logger.info(
        "serving %s with %s on %s, %d thread(s) per worker", ", ".join(names), settings.backend, device, threads
    )
    return NNServer(apis, settings, device)
