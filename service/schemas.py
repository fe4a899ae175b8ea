"""Request and response shapes, for the OpenAPI document (responses are built as bytes in the workers)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ClassScore(BaseModel):
    index: int
    label: str
    probability: float


class ClassPrediction(BaseModel):
    index: int = Field(description="Most probable class.")
    label: str
    probability: float
    top_k: list[ClassScore]


class ClassifyResponse(BaseModel):
    model: str
    version: str
    predictions: list[ClassPrediction] = Field(description="One per image, in request order.")


class ClassifyJSON(BaseModel):
    instances: list[Any] = Field(
        description='Images as {"b64": "<base64 PNG/JPEG>"} or pixel arrays HxW / HxWxC with values 0..255.'
    )
    top_k: int | None = None


class ForecastRequest(BaseModel):
    series: list[float] = Field(description="History, oldest first.")
    horizon: int | None = Field(None, description="Values to forecast; default the model's horizon.")


class Forecast(BaseModel):
    forecast: list[float]
    history_used: int = Field(description="How many of the most recent history values the model read.")


class ForecastResponse(BaseModel):
    model: str
    version: str
    predictions: list[Forecast] = Field(description="One per series, in request order.")


class ErrorDetail(BaseModel):
    code: str
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


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "Bad input: not an image, empty body, malformed JSON.",
        401: "Missing or wrong API key.",
        408: "The request's headers or body did not arrive in time.",
        413: "Body, item count or image size over the limit.",
        415: "Content type not accepted.",
        422: "Invalid series, horizon or parameter.",
        500: "The model failed on this request.",
        503: "Overloaded, not ready, shutting down, or the model's worker stopped (see Retry-After).",
        504: "Timed out.",
    }.items()
}


def _body(schema: type[BaseModel], images: bool) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": schema.model_json_schema()}}
    if images:
        binary = {"type": "string", "format": "binary"}
        content["image/png"] = {"schema": binary}
        content["image/jpeg"] = {"schema": binary}
        content["multipart/form-data"] = {
            "schema": {"type": "object", "properties": {"files": {"type": "array", "items": binary}}}
        }
    return {"requestBody": {"required": True, "content": content}}


CLASSIFY_BODY = _body(ClassifyJSON, images=True)
FORECAST_BODY = _body(ForecastRequest, images=False)
