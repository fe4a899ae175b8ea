"""Request and response shapes for the OpenAPI document (responses are built as bytes in the workers).

Response shapes are pydantic models. Request bodies are JSON Schema built per model when its route is registered,
from the limits in force (Settings) and the model's manifest, so the document states the real bounds. Errors
every route can meet at the connection level (408, 431, 503 over the connection limit) and the API key's 401 are
added to the whole document by `service/openapi.py`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from models import Manifest
from service.config import Settings


class Health(BaseModel):
    status: str = Field(description="Always ok.")


class ClassScore(BaseModel):
    index: int
    label: str
    probability: float


class ClassPrediction(BaseModel):
    index: int = Field(description="Most probable class.")
    label: str
    probability: float
    top_k: list[ClassScore] = Field(description="The top_k most probable classes, most probable first.")


class ClassifyResponse(BaseModel):
    model: str
    version: str
    predictions: list[ClassPrediction] = Field(description="One per image, in request order.")


class Forecast(BaseModel):
    forecast: list[float] = Field(description="The next `horizon` values.")
    history_used: int = Field(description="How many of the most recent history values the model read.")


class ForecastResponse(BaseModel):
    model: str
    version: str
    predictions: list[Forecast] = Field(description="One per series, in request order.")


class ErrorDetail(BaseModel):
    code: str = Field(description="Machine-readable, e.g. invalid_image, too_many_items, overloaded.")
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelInfo(BaseModel):
    name: str
    version: str
    task: str
    backend: str
    device: str
    execution: str = Field(description="inline (in the HTTP processes) or worker (LitServe inference workers).")
    providers: list[str]
    ready: bool
    manifest: dict[str, Any]


class Readiness(BaseModel):
    status: str = Field(description="ready, not_ready or shutting_down.")
    not_ready: list[str] = Field(description="Models that cannot answer now.")


class ModelList(BaseModel):
    models: list[ModelInfo]


# --- Open Inference Protocol (v2) -----------------------------------------------------------------------------
class V2Error(BaseModel):
    error: str = Field(description="What was wrong.")


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2Live(BaseModel):
    live: bool


class V2Ready(BaseModel):
    ready: bool


class V2ModelReady(BaseModel):
    name: str
    ready: bool


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 marks a dynamic axis.")


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


class V2ConfigTensor(BaseModel):
    name: str
    data_type: str
    dims: list[int] = Field(description="Without the batch axis; -1 marks a dynamic axis.")
    label_filename: str | None = None


class V2ModelConfig(BaseModel):
    """Triton's model configuration, in JSON."""

    name: str
    platform: str
    backend: str
    max_batch_size: int = Field(description="Most items in one request (NNSERVE_MAX_ITEMS_PER_REQUEST).")
    input: list[V2ConfigTensor]
    output: list[V2ConfigTensor]
    dynamic_batching: dict[str, int]
    version_policy: dict[str, Any]


class V2OutputTensor(BaseModel):
    name: str
    datatype: str = Field(description="FP32, or BYTES for classification.")
    shape: list[int]
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size when the tensor follows as binary.")
    data: list[float | str] | None = Field(None, description="Row-major, when not binary.")


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = Field(None, description="The request's id, when it sent one.")
    outputs: list[V2OutputTensor]


# --- request bodies, built per model ----------------------------------------------------------------------------
_BINARY = {"type": "string", "format": "binary"}
# Content types a classifier reads as one encoded image; any other image/* is read the same way.
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp", "application/octet-stream")


def image_limits(settings: Settings) -> dict[str, int]:
    return {
        "max_request_bytes": settings.max_request_bytes,
        "max_items_per_request": settings.max_items_per_request,
        "max_image_pixels": settings.max_image_pixels,
        "max_request_pixels": settings.max_request_pixels,
    }


def series_limits(settings: Settings, manifest: Manifest) -> dict[str, int]:
    spec = manifest.series
    assert spec is not None
    return {
        "max_request_bytes": settings.max_request_bytes,
        "max_items_per_request": settings.max_items_per_request,
        "min_history": spec.min_history,
        "max_history": spec.max_history,
        "horizon": spec.horizon,
    }


def top_k_schema(labels: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": 1, "maximum": labels, "default": min(3, labels)}


def classify_operation(settings: Settings, manifest: Manifest) -> dict[str, Any]:
    """`openapi_extra` of a classifier's predict route: its `top_k` query parameter and its three body forms."""
    assert manifest.labels is not None
    labels = len(manifest.labels)
    limits = image_limits(settings)
    items = {"minItems": 1, "maxItems": settings.max_items_per_request}
    instance = {
        "oneOf": [
            {
                "type": "object",
                "properties": {"b64": {"type": "string", "contentEncoding": "base64"}},
                "required": ["b64"],
                "description": "An encoded image (PNG, JPEG, WebP, GIF or BMP), base64.",
            },
            {
                "type": "array",
                "minItems": 1,
                "description": "Pixel rows, H x W (grayscale) or H x W x C (C = 1, 3 or 4), values 0..255.",
            },
        ]
    }
    json_body = {
        "type": "object",
        "properties": {
            "instances": {"type": "array", "items": instance, **items, "description": "One image each."},
            "top_k": {**top_k_schema(labels), "description": "Takes precedence over the query's top_k."},
        },
        "required": ["instances"],
    }
    multipart = {
        "type": "object",
        "properties": {"files": {"type": "array", "items": _BINARY, **items}},
        "description": "One or more file parts, any field name, one image each, in order.",
    }
    content: dict[str, Any] = {media: {"schema": _BINARY} for media in IMAGE_TYPES}
    content["multipart/form-data"] = {"schema": multipart}
    # Swagger UI's "Try it out" starts from the example: a 2x2 pixel array, scaled to the model's size.
    content["application/json"] = {"schema": json_body, "example": {"instances": [[[0, 255], [255, 0]]], "top_k": 3}}
    return {
        "parameters": [
            {
                "name": "top_k",
                "in": "query",
                "required": False,
                "schema": top_k_schema(labels),
                "description": "How many of the most probable classes to answer.",
            }
        ],
        "requestBody": {
            "required": True,
            "description": (
                f"Images, in any of these forms. Formats: PNG, JPEG, WebP, GIF (first frame), BMP, recognized from "
                f"the bytes. At most {limits['max_request_bytes']} bytes, {limits['max_items_per_request']} images, "
                f"{limits['max_image_pixels']} pixels per image and {limits['max_request_pixels']} pixels in all "
                "(413 above)."
            ),
            "content": content,
            "x-limits": limits,
        },
    }


def forecast_operation(settings: Settings, manifest: Manifest) -> dict[str, Any]:
    """`openapi_extra` of a forecaster's predict route: one series object, or a list of them."""
    limits = series_limits(settings, manifest)
    series = {
        "type": "object",
        "properties": {
            "series": {
                "type": "array",
                "items": {"type": "number"},
                "minItems": limits["min_history"],
                "description": (
                    f"History, oldest first: at least {limits['min_history']} finite values; of a longer one, the "
                    f"model reads the most recent {limits['max_history']}."
                ),
            },
            "horizon": {
                "type": "integer",
                "minimum": 1,
                "maximum": limits["horizon"],
                "default": limits["horizon"],
                "description": "How many values to forecast.",
            },
        },
        "required": ["series"],
    }
    many = {"type": "array", "items": series, "minItems": 1, "maxItems": limits["max_items_per_request"]}
    return {
        "requestBody": {
            "required": True,
            "description": (
                f"One series, or a list of at most {limits['max_items_per_request']}; at most "
                f"{limits['max_request_bytes']} bytes (413 above)."
            ),
            "content": {
                "application/json": {
                    "schema": {"oneOf": [series, many]},
                    "example": {"series": [float(i % 7) for i in range(limits["min_history"])], "horizon": 1},
                }
            },
            "x-limits": limits,
        }
    }


def v2_infer_operation(settings: Settings) -> dict[str, Any]:
    """`openapi_extra` of the v2 infer routes: a JSON request, or a JSON header followed by binary tensors."""
    tensor = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "datatype": {"type": "string", "enum": ["FP32", "BYTES"]},
            "parameters": {"type": "object", "description": "binary_data_size: its bytes follow the JSON header."},
            "data": {"type": "array", "description": "Row-major, flat or nested; BYTES elements as base64."},
        },
        "required": ["name", "shape", "datatype"],
    }
    output = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "parameters": {"type": "object", "description": "binary_data (bool), classification (k)."},
        },
        "required": ["name"],
    }
    request = {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "parameters": {"type": "object", "description": "binary_data_output (bool); horizon for forecasters."},
            "inputs": {"type": "array", "items": tensor, "minItems": 1},
            "outputs": {"type": "array", "items": output},
        },
        "required": ["inputs"],
    }
    return {
        "parameters": [
            {
                "name": "Inference-Header-Content-Length",
                "in": "header",
                "required": False,
                "schema": {"type": "integer", "minimum": 1},
                "description": "With binary tensor data: the length of the JSON header that starts the body.",
            }
        ],
        "requestBody": {
            "required": True,
            "description": (
                f"At most {settings.max_request_bytes} bytes and {settings.max_items_per_request} items (413 above)."
            ),
            "content": {
                "application/json": {"schema": request},
                "application/octet-stream": {"schema": _BINARY},
            },
            "x-limits": {
                "max_request_bytes": settings.max_request_bytes,
                "max_items_per_request": settings.max_items_per_request,
            },
        },
    }


# --- responses ------------------------------------------------------------------------------------------------
_ERROR_TEXT = {
    400: "Bad input: not an accepted image, empty body, malformed JSON or request.",
    404: "No such model (the message names the served ones), or no such version.",
    413: "Body, item count or image pixels over the limit.",
    415: "Content type not accepted.",
    422: "Invalid series, horizon or top_k.",
    500: "The model failed on this request.",
    503: "Not ready, overloaded, or the model's worker stopped (see Retry-After).",
    504: "No answer within the request timeout.",
}

RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}


def errors(*statuses: int, v2: bool = False) -> dict[int | str, dict[str, Any]]:
    """`responses` for the error statuses a route's own code answers; under /v2 in the protocol's error shape."""
    shape = V2Error if v2 else ErrorResponse
    return {
        status: {
            "model": shape,
            "description": _ERROR_TEXT[status],
            **({"headers": dict(RETRY_AFTER)} if status == 503 else {}),
        }
        for status in statuses
    }


PREDICT_ERRORS = errors(400, 413, 415, 422, 500, 503, 504)
INFER_ERRORS = errors(400, 404, 413, 500, 503, 504, v2=True)


def ok(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """`responses` documenting a 200 of `model` without FastAPI re-validating what the route returns."""
    return {200: {"model": model}}


METRICS = {200: {"description": "Prometheus text format.", "content": {"text/plain": {"schema": {"type": "string"}}}}}


def v2_ready(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """A v2 readiness route's answers: 200 when ready, 503 (same shape) when not."""
    return {**ok(model), 503: {"model": model, "description": "Not ready."}}


V2_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": V2InferResponse,
        "description": "JSON; or, when binary outputs were asked for, the JSON header followed by the tensors' bytes.",
        "content": {"application/octet-stream": {"schema": _BINARY}},
        "headers": {
            "Inference-Header-Content-Length": {
                "description": "With binary outputs: the length of the JSON header that starts the body.",
                "schema": {"type": "integer"},
            }
        },
    },
    **INFER_ERRORS,
}
