"""The Open Inference Protocol (KServe v2) over HTTP, beside /v1, on the same models, admission and batches.

Routes: `GET /v2` (server metadata), `/v2/health/live`, `/v2/health/ready`, and per model, with or without
`/versions/{version}`: `GET /v2/models/{name}` (metadata), `.../ready`, `.../config` (Triton's model
configuration extension) and `POST .../infer`. A v2 request becomes the same payload as a /v1 one, marked
`"protocol": "v2"`, so both join one pool of batches; the model answers the raw output tensor and
`service/v2_codec.py` encodes it. Errors under /v2 are the protocol's `{"error": "..."}` (see `service/errors.py`).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service import logs, schemas
from service import v2_codec as codec
from service.api import ModelAPI
from service.dataplane import DataPlane
from service.errors import ApiError
from service.inputs import read_body

EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration"]
PLATFORMS = {"onnx": "onnxruntime_onnx", "torchscript": "pytorch_libtorch"}
BACKENDS = {"onnx": "onnxruntime", "torchscript": "pytorch"}
HEADER_LENGTH = "Inference-Header-Content-Length"


def server_version() -> str:
    try:
        return version("nnserve")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def model_metadata(api: ModelAPI) -> dict[str, Any]:
    manifest = api.manifest
    return {
        "name": api.name,
        "versions": [manifest.version],
        "platform": PLATFORMS[api.backend],
        "inputs": [
            {"name": manifest.input.name, "datatype": codec.FP32, "shape": codec.tensor_shape(manifest.input.shape)}
        ],
        "outputs": [
            {"name": manifest.output.name, "datatype": codec.FP32, "shape": codec.tensor_shape(manifest.output.shape)}
        ],
    }


def model_config(api: ModelAPI, max_items: int, batch_timeout: float) -> dict[str, Any]:
    """Triton's ModelConfig in JSON: dims leave out the batch axis, which `max_batch_size` bounds per request."""
    manifest = api.manifest
    return {
        "name": api.name,
        "platform": PLATFORMS[api.backend],
        "backend": BACKENDS[api.backend],
        "max_batch_size": max_items,
        "input": [
            {
                "name": manifest.input.name,
                "data_type": "TYPE_FP32",
                "dims": codec.tensor_shape(manifest.input.shape[1:]),
            }
        ],
        "output": [
            {
                "name": manifest.output.name,
                "data_type": "TYPE_FP32",
                "dims": codec.tensor_shape(manifest.output.shape[1:]),
                **({"label_filename": "labels"} if manifest.labels else {}),
            }
        ],
        "dynamic_batching": {"max_queue_delay_microseconds": round(batch_timeout * 1e6)},
        "version_policy": {"specific": {"versions": [int(manifest.version)]}},
    }


def unversioned(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """`endpoint` without its `version` argument, which FastAPI would otherwise read from the query string."""
    signature = inspect.signature(endpoint)

    @functools.wraps(endpoint)
    async def call(**kwargs: Any) -> Any:
        return await endpoint(**kwargs)

    call.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[p for p in signature.parameters.values() if p.name != "version"]
    )
    return call


def bad_request(e: codec.ProtocolError) -> ApiError:
    return ApiError(e.status, "bad_request" if e.status == 400 else "too_many_items", str(e))


def register_v2(app: FastAPI, plane: DataPlane) -> None:
    settings = plane.settings

    def served(name: str, version: str | None) -> ModelAPI:
        """The model behind a /v2 path: 404 for an unknown name or a version other than the served one."""
        api = plane.apis[plane.known(name)]
        if version is not None and version != api.manifest.version:
            raise ApiError(
                404, "not_found", f"model {name} has no version {version!r}; serving version {api.manifest.version}"
            )
        return api

    def per_model(suffix: str, method: str, endpoint: Callable[..., Any], **doc: Any) -> None:
        """Register `endpoint` at /v2/models/{name}{suffix} and at .../versions/{version}{suffix}."""
        for path, call in (
            (f"/v2/models/{{name}}{suffix}", unversioned(endpoint)),
            (f"/v2/models/{{name}}/versions/{{version}}{suffix}", endpoint),
        ):
            app.add_api_route(path, call, methods=[method], tags=["v2"], **doc)

    @app.get("/v2", tags=["v2"], responses=schemas.ok(schemas.V2ServerMetadata))
    async def server_metadata() -> dict[str, Any]:
        """Server metadata: name, version and the protocol extensions it speaks."""
        return {"name": "nnserve", "version": server_version(), "extensions": EXTENSIONS}

    @app.get("/v2/health/live", tags=["v2"], responses=schemas.ok(schemas.V2Live))
    async def live() -> dict[str, bool]:
        """The process is up (no API key needed)."""
        return {"live": True}

    @app.get("/v2/health/ready", tags=["v2"], responses=schemas.v2_ready(schemas.V2Ready))
    async def ready() -> Response:
        """Every model can answer (no API key needed); 503 otherwise."""
        ok = all(plane.model_ready(name) for name in plane.apis)
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503, headers=None if ok else {"Retry-After": "1"})

    async def metadata(name: str, version: str | None = None) -> dict[str, Any]:
        return model_metadata(served(name, version))

    async def model_ready(name: str, version: str | None = None) -> Response:
        ok = plane.model_ready(served(name, version).name)
        return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503)

    async def config(name: str, version: str | None = None) -> dict[str, Any]:
        return model_config(served(name, version), settings.max_items_per_request, settings.batch_timeout)

    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        api = served(name, version)
        plane.check_ready(api.name)
        plane.check_capacity(api.name, 1)  # full already: refuse before spending time on the body
        try:
            async with asyncio.timeout(settings.request_timeout):  # decoding counts against the timeout too
                body = await read_body(request, settings.max_request_bytes)
                parsed, payload = await parse(api, body, request.headers.get(HEADER_LENGTH))
                del body  # the payload holds what the model needs: not held while the request waits for its batch
                payload["request_id"] = logs.REQUEST_ID.get()
                answer = await plane.infer(api.name, payload)
        except TimeoutError:
            raise ApiError(504, "timeout", f"no answer within {settings.request_timeout:g} s") from None
        if isinstance(answer, tuple):
            raise ApiError(*answer)
        outputs = codec.outputs_for(parsed, api.manifest, answer)
        content, header_length = codec.encode_response(api.name, api.manifest.version, parsed.id, outputs)
        if header_length is None:
            return Response(content, media_type="application/json")
        return Response(content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})

    async def parse(api: ModelAPI, body: bytes, header_length: str | None) -> tuple[codec.InferRequest, dict[str, Any]]:
        """The protocol request, and the model's payload (the same one /v1 builds, marked v2)."""
        max_items = settings.max_items_per_request
        try:
            request = codec.parse_request(body, header_length)
            codec.check_outputs(request, api.manifest)
            # The answer needs the request's id and outputs only: its input tensors (views of the body) stay behind.
            answer_to = replace(request, inputs=[])
            if api.manifest.task == "forecast":
                x, horizon = codec.forecast_input(request, api.manifest, max_items)
                return answer_to, {"x": list(x), "horizon": [horizon] * len(x), "protocol": "v2"}
            images = codec.classifier_input(request, api.manifest, max_items)
        except codec.ProtocolError as e:
            raise bad_request(e) from None
        x = images if isinstance(images, np.ndarray) else await api.decoder.decode(images)
        return answer_to, {"x": x, "top_k": 1, "protocol": "v2"}

    per_model("", "GET", metadata, responses={**schemas.ok(schemas.V2ModelMetadata), **schemas.errors(404, v2=True)})
    per_model(
        "/ready",
        "GET",
        model_ready,
        responses={**schemas.v2_ready(schemas.V2ModelReady), **schemas.errors(404, v2=True)},
    )
    per_model("/config", "GET", config, responses={**schemas.ok(schemas.V2ModelConfig), **schemas.errors(404, v2=True)})
    per_model(
        "/infer",
        "POST",
        infer,
        responses=schemas.V2_INFER_RESPONSES,
        openapi_extra=schemas.v2_infer_operation(settings),
    )
