"""The REST layer: HTTP in, HTTP out. It reads and parses requests and hands the work to the data plane."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service import logs, metrics, schemas, web
from service.api import ModelAPI
from service.dataplane import DataPlane
from service.errors import ApiError
from service.inputs import read_body

# Load balancers and probes cannot send headers.
PROBES = frozenset({"/health", "/ready", "/v2/health/live", "/v2/health/ready"})


def is_open(path: str) -> bool:
    """Served without an API key even when one is set: the probes, and the web page and API docs."""
    return path in PROBES or web.is_public(path)


def register_operations(app: FastAPI, plane: DataPlane) -> None:
    @app.api_route("/health", methods=["GET", "HEAD"], tags=["operations"], responses=schemas.ok(schemas.Health))
    async def health() -> dict[str, str]:
        """The process is up (no API key needed: for liveness probes)."""
        return {"status": "ok"}

    @app.get(
        "/ready",
        tags=["operations"],
        response_model=schemas.Readiness,
        responses={503: {"model": schemas.Readiness, "description": "A model cannot answer, or shutting down."}},
    )
    async def ready() -> Response:
        """Every model can answer (no API key needed: for readiness probes)."""
        if plane.draining():
            return JSONResponse({"status": "shutting_down", "not_ready": list(plane.apis)}, status_code=503)
        waiting = [name for name in plane.apis if not plane.model_ready(name)]
        if waiting:
            return JSONResponse({"status": "not_ready", "not_ready": waiting}, status_code=503)
        return JSONResponse({"status": "ready", "not_ready": []})

    @app.get("/v1/models", tags=["models"], response_model=schemas.ModelList)
    async def list_models() -> dict[str, Any]:
        return {"models": [plane.model_info(name) for name in plane.apis]}

    @app.get(
        "/v1/models/{name}",
        tags=["models"],
        response_model=schemas.ModelInfo,
        responses=schemas.errors(404),
    )
    async def get_model(name: str) -> dict[str, Any]:
        return plane.model_info(plane.known(name))

    @app.get("/metrics", tags=["operations"], response_class=Response, responses=schemas.METRICS)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")


def register_predict(app: FastAPI, plane: DataPlane, api: ModelAPI) -> None:
    settings = plane.settings
    name = api.name

    async def predict(request: Request) -> Response:
        plane.check_ready(name)
        plane.check_capacity(name, 1)  # full already: refuse before spending time on the body
        try:
            async with asyncio.timeout(settings.request_timeout):  # decoding counts against the timeout too
                body = await read_body(request, settings.max_request_bytes)
                payload = await api.parse(request, body)
                del body  # only the parse needs it: not held while the request waits for its batch
                payload["request_id"] = logs.REQUEST_ID.get()
                answer = await plane.infer(name, payload)
        except TimeoutError:
            raise ApiError(504, "timeout", f"no answer within {settings.request_timeout:g} s") from None
        if isinstance(answer, tuple):
            raise ApiError(*answer)
        return Response(answer, media_type="application/json")

    classify = api.manifest.task == "classification"
    app.add_api_route(
        api.api_path,
        predict,
        methods=["POST"],
        tags=["predict"],
        summary=f"{name}: {api.manifest.description}",
        response_model=schemas.ClassifyResponse if classify else schemas.ForecastResponse,
        responses=schemas.PREDICT_ERRORS,
        openapi_extra=(schemas.classify_operation if classify else schemas.forecast_operation)(settings, api.manifest),
    )


def register_unknown_model(app: FastAPI, plane: DataPlane) -> None:
    """404 naming the served models for a predict route of any other name. Starlette matches routes in order,
    so this must be added after every model's own route."""

    @app.post("/v1/{name}/predict", include_in_schema=False)
    async def unknown_model(name: str) -> None:
        raise plane.not_found(name)
