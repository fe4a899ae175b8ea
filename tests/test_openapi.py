"""The OpenAPI document tells the truth: schemathesis checks the live server against it, and hand-picked requests
compare what it says with what the server does."""

from __future__ import annotations

import base64
from collections import Counter
from collections.abc import Iterator
from importlib.metadata import version

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import load_all_checks
from schemathesis.specs.openapi import checks as openapi_checks

from models import load
from service.config import Settings
from service.schemas import IMAGE_TYPES
from tests.data import mnist_test_pngs
from tests.serving import RunningServer, running_server

load_all_checks()

API_KEY = "openapi-test-key"
# Limits other than the defaults, so that the document is seen to take them from the settings.
LIMITS = {
    "NNSERVE_MAX_ITEMS_PER_REQUEST": "5",
    "NNSERVE_MAX_REQUEST_BYTES": "200000",
    "NNSERVE_MAX_IMAGE_PIXELS": "10000",
    "NNSERVE_MAX_REQUEST_PIXELS": "40000",
}
SEED = 20261125
EXAMPLES = 25  # per operation and generation mode: 1,000 requests in about 30 s
CHECKS = [
    schemathesis.checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.response_headers_conformance,
]


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[RunningServer]:
    with running_server(NNSERVE_API_KEY=API_KEY, **LIMITS) as srv:
        yield srv


def test_the_server_keeps_to_its_document(keyed_server: RunningServer) -> None:
    schema = schemathesis.openapi.from_url(f"{keyed_server.url}/openapi.json")
    failures: list[str] = []
    seen: Counter[tuple[str, int]] = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @seed(SEED)
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def run(case: schemathesis.Case) -> None:
                response = case.call_and_validate(headers={"X-API-Key": API_KEY}, checks=CHECKS, timeout=30)
                seen[case.operation.label, response.status_code] += 1

            try:
                run()
            except Unsatisfiable:
                assert mode == schemathesis.GenerationMode.NEGATIVE, f"{operation.label}: no valid request"
            except Exception as e:
                failures.append(f"{operation.label} ({mode}): {e}")
    print("\n".join(f"{label} {status}: {n}" for (label, status), n in sorted(seen.items())))
    assert not failures, "\n\n".join(failures)


def test_real_requests_of_every_form_keep_to_the_document(keyed_server: RunningServer) -> None:
    """Valid requests of each body form, which random generation seldom makes, and the document's own examples,
    through the same checks."""
    schema = schemathesis.openapi.from_url(f"{keyed_server.url}/openapi.json")
    png = mnist_test_pngs(1)[0][0]
    b64 = base64.b64encode(png).decode()
    digits = {"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.0] * 784}
    week = [10.0 + i % 7 for i in range(30)]
    cases = [
        ("/v1/digits/predict", {"body": png, "media_type": "image/png", "query": {"top_k": 2}}),
        ("/v1/digits/predict", {"body": {"files": [png, png]}, "media_type": "multipart/form-data"}),
        ("/v1/digits/predict", {"body": {"instances": [{"b64": b64}, [[0] * 28] * 28], "top_k": 10}}),
        ("/v1/sequence/predict", {"body": [{"series": week}, {"series": week[:14], "horizon": 3}]}),
        ("/v2/models/{name}/infer", {"path_parameters": {"name": "digits"}, "body": {"inputs": [digits]}}),
        (
            "/v2/models/{name}/infer",
            {
                "path_parameters": {"name": "digits"},
                "body": {
                    "id": "7",
                    "inputs": [{"name": "input", "datatype": "BYTES", "shape": [1], "data": [b64]}],
                    "outputs": [{"name": "output", "parameters": {"classification": 3}}],
                },
            },
        ),
        (
            "/v2/models/{name}/infer",
            {
                "path_parameters": {"name": "sequence"},
                "body": {
                    "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 30], "data": week}],
                    "parameters": {"horizon": 2, "binary_data_output": True},
                },
            },
        ),
    ]
    doc = httpx.get(f"{keyed_server.url}/openapi.json").json()
    for name in ("digits", "cifar", "sequence"):  # the examples "Try it out" starts from
        path = f"/v1/{name}/predict"
        cases.append(
            (path, {"body": doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["example"]})
        )
    for path, fields in cases:
        case = schema[path]["POST"].Case(**{"media_type": "application/json", **fields})
        response = case.call_and_validate(headers={"X-API-Key": API_KEY}, checks=CHECKS, timeout=30)
        assert response.status_code == 200, (path, response.text)


# --- what the document says, compared with what the server does --------------------------------------------------
def test_title_and_version_are_the_package_s(server: RunningServer) -> None:
    info = httpx.get(f"{server.url}/openapi.json").json()["info"]
    assert info["title"] == "nnserve"
    assert info["version"] == version("nnserve")


def test_the_limits_in_the_document_are_the_settings(keyed_server: RunningServer) -> None:
    doc = httpx.get(f"{keyed_server.url}/openapi.json").json()
    settings = Settings(**{k.removeprefix("NNSERVE_").lower(): v for k, v in LIMITS.items()})
    sequence = load(settings.models_dir, "sequence").manifest
    assert sequence.series is not None
    for name in ("digits", "cifar"):
        operation = doc["paths"][f"/v1/{name}/predict"]["post"]
        body = operation["requestBody"]
        assert body["x-limits"] == {
            "max_request_bytes": settings.max_request_bytes,
            "max_items_per_request": settings.max_items_per_request,
            "max_image_pixels": settings.max_image_pixels,
            "max_request_pixels": settings.max_request_pixels,
        }
        assert body["content"]["application/json"]["schema"]["properties"]["instances"]["maxItems"] == 5
        assert body["content"]["multipart/form-data"]["schema"]["properties"]["files"]["maxItems"] == 5
        labels = len(load(settings.models_dir, name).manifest.labels or [])
        (top_k,) = operation["parameters"]
        assert (top_k["name"], top_k["in"]) == ("top_k", "query")
        assert top_k["schema"] == {"type": "integer", "minimum": 1, "maximum": labels, "default": 3}
    body = doc["paths"]["/v1/sequence/predict"]["post"]["requestBody"]
    one, many = body["content"]["application/json"]["schema"]["oneOf"]
    assert one["properties"]["series"]["minItems"] == sequence.series.min_history
    assert one["properties"]["horizon"]["maximum"] == sequence.series.horizon
    assert many == {"type": "array", "items": one, "minItems": 1, "maxItems": 5}
    assert body["x-limits"]["max_history"] == sequence.series.max_history
    # ... and the server holds to them.
    key = {"X-API-Key": API_KEY}
    pixels = {"instances": [[[0] * 8] * 8] * 6}
    answer = httpx.post(f"{keyed_server.url}/v1/digits/predict", json=pixels, headers=key)
    assert (answer.status_code, answer.json()["error"]["code"]) == (413, "too_many_items")
    big = {"instances": [[[0] * 101] * 100]}  # 10,100 pixels, over the 10,000 per image
    answer = httpx.post(f"{keyed_server.url}/v1/digits/predict", json=big, headers=key)
    assert (answer.status_code, answer.json()["error"]["code"]) == (413, "image_too_large")
    answer = httpx.post(f"{keyed_server.url}/v1/digits/predict", content=b"0" * 200_001, headers=key)
    assert (answer.status_code, answer.json()["error"]["code"]) == (413, "payload_too_large")
    short = {"series": [1.0] * (sequence.series.min_history - 1)}
    answer = httpx.post(f"{keyed_server.url}/v1/sequence/predict", json=short, headers=key)
    assert (answer.status_code, answer.json()["error"]["code"]) == (422, "invalid_series")


def test_every_documented_content_type_is_accepted_and_others_are_415(server: RunningServer) -> None:
    doc = httpx.get(f"{server.url}/openapi.json").json()
    operation = doc["paths"]["/v1/digits/predict"]["post"]
    content = set(operation["requestBody"]["content"])
    assert content == {*IMAGE_TYPES, "multipart/form-data", "application/json"}
    png, label = mnist_test_pngs(1)[0]
    url = f"{server.url}/v1/digits/predict"
    for media in IMAGE_TYPES:
        answer = httpx.post(url, content=png, headers={"Content-Type": media})
        assert answer.status_code == 200, (media, answer.text)
        assert answer.json()["predictions"][0]["index"] == label
    answer = httpx.post(url, files=[("files", ("a.png", png)), ("files", ("b.png", png))])
    assert answer.status_code == 200 and len(answer.json()["predictions"]) == 2
    answer = httpx.post(url, params={"top_k": 5}, json={"instances": [{"b64": base64.b64encode(png).decode()}]})
    assert answer.status_code == 200 and len(answer.json()["predictions"][0]["top_k"]) == 5
    assert "415" in operation["responses"] and "text/plain" not in content
    answer = httpx.post(url, content=png, headers={"Content-Type": "text/plain"})
    assert (answer.status_code, answer.json()["error"]["code"]) == (415, "unsupported_media_type")
    forecast = doc["paths"]["/v1/sequence/predict"]["post"]
    assert set(forecast["requestBody"]["content"]) == {"application/json"} and "415" in forecast["responses"]
    answer = httpx.post(f"{server.url}/v1/sequence/predict", content=b"{}", headers={"Content-Type": "text/csv"})
    assert answer.status_code == 415


def test_the_api_key_is_a_security_scheme_only_when_one_is_set(
    server: RunningServer, keyed_server: RunningServer
) -> None:
    open_doc = httpx.get(f"{server.url}/openapi.json").json()
    assert "securitySchemes" not in open_doc["components"]
    assert not any("security" in op or "401" in op["responses"] for op in operations(open_doc))
    doc = httpx.get(f"{keyed_server.url}/openapi.json").json()
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearer"] == {**schemes["bearer"], "type": "http", "scheme": "bearer"}
    assert schemes["apiKey"] == {**schemes["apiKey"], "type": "apiKey", "in": "header", "name": "X-API-Key"}
    probes = {"/health", "/ready", "/v2/health/live", "/v2/health/ready"}
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            url = keyed_server.url + path.replace("{name}", "digits").replace("{version}", "1")
            answer = httpx.request(method, url)
            if path in probes:
                assert "security" not in operation and "401" not in operation["responses"], path
                assert answer.status_code == 200, path
            else:
                assert operation["security"] == [{"bearer": []}, {"apiKey": []}], path
                assert answer.status_code == 401 and "401" in operation["responses"], path
    for header in ({"Authorization": f"Bearer {API_KEY}"}, {"X-API-Key": API_KEY}):
        assert httpx.get(f"{keyed_server.url}/v1/models", headers=header).status_code == 200


def test_connection_level_answers_and_metrics_are_documented(server: RunningServer) -> None:
    doc = httpx.get(f"{server.url}/openapi.json").json()
    for operation in operations(doc):
        assert {"408", "431"} <= set(operation["responses"])
    answer = httpx.get(f"{server.url}/v1/models", headers={"X-Padding": "x" * 20_000})
    assert (answer.status_code, answer.json()["error"]["code"]) == (431, "headers_too_large")
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    assert httpx.get(f"{server.url}/metrics").headers["content-type"].startswith("text/plain")
    ready = doc["paths"]["/ready"]["get"]["responses"]
    assert ready["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Readiness"}
    assert {"$ref": "#/components/schemas/Readiness"} in ready["503"]["content"]["application/json"]["schema"]["anyOf"]


def test_a_non_finite_answer_is_refused_not_sent_as_invalid_json(server: RunningServer) -> None:
    """Finite values near float32's limit overflow inside the forecaster; JSON cannot carry the NaN it answers."""
    extreme = [3.0e38, -3.0e38] * 10
    answer = httpx.post(f"{server.url}/v1/sequence/predict", json={"series": extreme})
    assert (answer.status_code, answer.json()["error"]["code"]) == (422, "invalid_input")
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, len(extreme)], "data": extreme}
    answer = httpx.post(f"{server.url}/v2/models/sequence/infer", json={"inputs": [tensor]})
    assert answer.status_code == 400 and "not finite" in answer.json()["error"]


def operations(doc: dict) -> list[dict]:
    return [operation for item in doc["paths"].values() for operation in item.values()]
