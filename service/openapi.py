"""The OpenAPI document at /openapi.json: FastAPI's, from each route's own declarations (shapes and bodies in
`service/schemas.py`), completed with what holds across routes and only the whole server knows:

- the package version;
- the API key, when one is set: a security scheme each way the gateway reads it (`Authorization: Bearer` and
  `X-API-Key`), required by every route but the open ones (`routes.is_open`), which may answer 401;
- the answers `service/http.py` gives before a request reaches the application: 408 (head or body too slow), 431
  (head too large) and 503 over the connection limit (/health too, past twice the limit, when a connection is
  refused unread), in /v1's error shape whatever the path, and without X-Request-ID;
- X-Request-ID on every other answer.

FastAPI's own 422 (its validation error shape) is dropped: no route declares a typed parameter that can fail it;
routes that answer 422 themselves say so in nnserve's error shape.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service import routes, schemas
from service.config import Settings
from service.errors import is_v2
from service.v2 import server_version

DESCRIPTION = (
    "Classifiers and a forecaster over HTTP: `/v1` REST routes and the Open Inference Protocol (KServe v2) under "
    '`/v2`. Errors are `{"error": {"code": ..., "message": ...}}`; under `/v2`, the protocol\'s `{"error": "..."}`.'
)
METHODS = ("get", "head", "post", "put", "delete", "patch", "options")
# Answered in the protocol layer: no application code ran, so no request id was attached.
CONNECTION_ERRORS = {
    408: "The request's head or body did not arrive in time (the connection is closed).",
    431: "Request line and headers over the limit (the connection is closed).",
}
OVER_LIMIT = "Every connection of this server process is busy (too_many_connections, with Retry-After)."
REQUEST_ID = {
    "X-Request-ID": {
        "description": "The request's id: the client's own X-Request-ID when valid, else a new one.",
        "schema": {"type": "string"},
        "required": True,
    }
}
SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <API key>"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "X-API-Key: <API key>"},
}


def install(app: FastAPI, settings: Settings, versions: dict[str, str]) -> None:
    """Serve the completed document at the app's openapi_url (built once, on first request); `versions` maps
    each served model to its version."""

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=server_version(), description=DESCRIPTION, routes=app.routes)
            app.openapi_schema = complete(doc, api_key=bool(settings.api_key), versions=versions)
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]


def complete(doc: dict[str, Any], api_key: bool, versions: dict[str, str]) -> dict[str, Any]:
    doc = copy.deepcopy(doc)  # FastAPI shares dicts between operations (a route's `responses`, for one)
    seen: set[str] = set()
    for path, item in doc["paths"].items():
        for method in METHODS:
            if method in item:
                operation = item[method]
                _complete_operation(path, operation, api_key)
                _name_the_models(operation, versions)
                if operation["operationId"] in seen:  # FastAPI names GET and HEAD of one route alike
                    operation["operationId"] += f"_{method}"
                seen.add(operation["operationId"])
    components = doc.setdefault("components", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.get("schemas", {}).pop(name, None)
    if api_key:
        components["securitySchemes"] = SECURITY_SCHEMES
    return doc


def _ref(model: type) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _error(description: str, model: type) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _complete_operation(path: str, operation: dict[str, Any], api_key: bool) -> None:
    responses = operation["responses"]
    if "HTTPValidationError" in str(responses.get("422")):
        del responses["422"]
    for response in responses.values():
        response.setdefault("headers", {}).update(REQUEST_ID)
    if api_key and not routes.is_open(path):
        operation["security"] = [{"bearer": []}, {"apiKey": []}]
        unauthorized = _error("Missing or wrong API key.", schemas.V2Error if is_v2(path) else schemas.ErrorResponse)
        unauthorized["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}, **REQUEST_ID}
        responses["401"] = unauthorized
    for status, text in CONNECTION_ERRORS.items():
        responses[str(status)] = _error(text, schemas.ErrorResponse)
    _add_over_limit(responses)
    operation["responses"] = dict(sorted(responses.items()))


def _name_the_models(operation: dict[str, Any], versions: dict[str, str]) -> None:
    """Path parameters `name` and `version` list what is served (any other answers 404)."""
    served = {"name": sorted(versions), "version": sorted(set(versions.values()))}
    for parameter in operation.get("parameters", []):
        if parameter["in"] == "path" and parameter["name"] in served:
            parameter["schema"] = {"type": "string", "enum": served[parameter["name"]]}


def _add_over_limit(responses: dict[str, Any]) -> None:
    """503 from the connection limit, beside any 503 the route answers itself (in another shape, maybe)."""
    over = _error(OVER_LIMIT, schemas.ErrorResponse)
    over["headers"] = dict(schemas.RETRY_AFTER)
    own = responses.get("503")
    if own is None:
        responses["503"] = over
        return
    own["description"] = f"{own['description']} Or: {OVER_LIMIT}"
    headers = own.setdefault("headers", {})
    headers.pop("X-Request-ID", None)
    headers.update(schemas.RETRY_AFTER)
    media = own.setdefault("content", {}).setdefault("application/json", {})
    schema = media.get("schema")
    if schema is not None and schema != _ref(schemas.ErrorResponse):
        media["schema"] = {"anyOf": [schema, _ref(schemas.ErrorResponse)]}
    else:
        media["schema"] = _ref(schemas.ErrorResponse)
