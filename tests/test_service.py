"""The service end to end: real HTTP on 127.0.0.1 against the committed models."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

import models
from bench.payloads import model_inputs, png_bytes
from bench.server import process_tree
from service.api import GPU_BATCH_SIZES, GPU_MODEL_BATCH, GPU_SMALL_BATCH, ModelAPI, padded_sizes
from service.config import Settings
from service.runtime import WIDE_BATCH, DeviceError, load_cuda_libraries, resolve_device
from tests.data import cifar_test_pngs, mnist_test_pngs, weather_2015
from tests.serving import ROOT, RunningServer, predict_multipart, running_server


def offline_probs(name: str, pngs: list[bytes]) -> np.ndarray:
    """The artifact run directly with ONNX Runtime, preprocessing written out from the manifest."""
    mv = models.load(models.DEFAULT_ROOT, name)
    x = model_inputs(mv.manifest, pngs, [])
    session = ort.InferenceSession(str(mv.artifact_path("onnx")), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert r.headers["x-request-id"]


def assert_still_serving(url: str) -> None:
    digit, label = mnist_test_pngs(1)[0]
    r = httpx.post(f"{url}/v1/digits/predict", content=digit, headers={"Content-Type": "image/png"}, timeout=30)
    assert r.status_code == 200 and r.json()["predictions"][0]["index"] == label


# --- accuracy and equality with the offline artifact ------------------------------------------------------


def test_digits_accuracy_over_http_equals_offline(server: RunningServer) -> None:
    items = mnist_test_pngs(10_000)
    pngs, labels = [b for b, _ in items], np.array([y for _, y in items])
    http = np.array([p["index"] for p in predict_multipart(server.url, "digits", pngs)])
    offline = offline_probs("digits", pngs).argmax(axis=1)
    assert (http == offline).all()
    manifest = models.load(models.DEFAULT_ROOT, "digits").manifest
    assert abs((http == labels).mean() - manifest.metric("accuracy").value) <= 0.001


def test_cifar_accuracy_over_http_equals_offline(server: RunningServer) -> None:
    items = cifar_test_pngs()
    pngs, labels = [b for b, _ in items], np.array([y for _, y in items])
    predictions = predict_multipart(server.url, "cifar", pngs)
    http = np.array([p["index"] for p in predictions])
    offline = offline_probs("cifar", pngs)
    assert (http == offline.argmax(axis=1)).all()
    top = np.array([p["top_k"][0]["probability"] for p in predictions])
    assert np.allclose(top, offline.max(axis=1), atol=1e-5)
    manifest = models.load(models.DEFAULT_ROOT, "cifar").manifest
    assert abs((http == labels).mean() - manifest.metric("accuracy").value) <= 0.001


def test_three_ways_to_send_an_image_agree(server: RunningServer) -> None:
    blob, _ = cifar_test_pngs()[0]
    pixels = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")).tolist()
    url = f"{server.url}/v1/cifar/predict"
    raw = httpx.post(url, content=blob, headers={"Content-Type": "image/png"}).json()
    form = httpx.post(url, files={"file": ("a.png", blob, "image/png")}).json()
    b64 = httpx.post(url, json={"instances": [{"b64": base64.b64encode(blob).decode()}]}).json()
    arr = httpx.post(url, json={"instances": [pixels]}).json()
    assert raw == form == b64 == arr
    assert raw["model"] == "cifar" and raw["version"] == models.load(models.DEFAULT_ROOT, "cifar").manifest.version


def test_any_size_and_mode_is_converted(server: RunningServer) -> None:
    digit, label = mnist_test_pngs(1)[0]
    big = Image.open(io.BytesIO(digit)).resize((112, 112)).convert("RGBA")
    buf = io.BytesIO()
    big.convert("RGB").save(buf, format="JPEG", quality=95)
    for body, kind in ((png_bytes(np.asarray(big)), "image/png"), (buf.getvalue(), "image/jpeg")):
        r = httpx.post(f"{server.url}/v1/digits/predict", content=body, headers={"Content-Type": kind})
        assert r.status_code == 200 and r.json()["predictions"][0]["index"] == label


def test_top_k(server: RunningServer) -> None:
    digit, _ = mnist_test_pngs(1)[0]
    r = httpx.post(f"{server.url}/v1/digits/predict?top_k=5", content=digit, headers={"Content-Type": "image/png"})
    scores = r.json()["predictions"][0]["top_k"]
    assert len(scores) == 5
    probs = [s["probability"] for s in scores]
    assert probs == sorted(probs, reverse=True) and 0.0 < sum(probs) <= 1.0 + 1e-6


def test_long_history_uses_its_most_recent_values(server: RunningServer) -> None:
    spec = models.load(models.DEFAULT_ROOT, "sequence").manifest.series
    assert spec is not None
    temps = weather_2015()
    url = f"{server.url}/v1/sequence/predict"
    longer = httpx.post(url, json={"series": [99.0] * 1000 + temps.tolist()})
    assert longer.status_code == 200, longer.text
    recent = httpx.post(url, json={"series": temps[-spec.max_history :].tolist()})
    assert longer.json()["predictions"] == recent.json()["predictions"]


def test_forecast_matches_offline_artifact(server: RunningServer) -> None:
    mv = models.load(models.DEFAULT_ROOT, "sequence")
    spec = mv.manifest.series
    assert spec is not None
    temps = weather_2015()
    windows = [temps[i : i + n] for i, n in ((0, spec.min_history), (40, 60), (100, spec.max_history))]
    body = [{"series": w.tolist(), "horizon": spec.horizon} for w in windows]
    r = httpx.post(f"{server.url}/v1/sequence/predict", json=body)
    assert r.status_code == 200, r.text
    got = [p["forecast"] for p in r.json()["predictions"]]
    session = ort.InferenceSession(str(mv.artifact_path("onnx")), providers=["CPUExecutionProvider"])
    for w, forecast in zip(windows, got, strict=True):
        want = session.run(None, {session.get_inputs()[0].name: w[None].astype(np.float32)})[0][0]
        assert len(forecast) == spec.horizon
        assert np.allclose(forecast, want, atol=1e-3)
    short = httpx.post(f"{server.url}/v1/sequence/predict", json={"series": windows[1].tolist(), "horizon": 2})
    assert np.allclose(short.json()["predictions"][0]["forecast"], got[1][:2])


# --- operations -----------------------------------------------------------------------------------------


def test_models_and_metadata(server: RunningServer) -> None:
    listed = httpx.get(f"{server.url}/v1/models").json()["models"]
    assert {m["name"] for m in listed} == set(models.model_names(models.DEFAULT_ROOT))
    info = httpx.get(f"{server.url}/v1/models/cifar").json()
    assert info["backend"] == "onnx" and info["device"] == "cpu" and info["providers"] == ["CPUExecutionProvider"]
    assert info["ready"] is True
    assert info["manifest"]["labels"][0] == "airplane"
    assert_error(httpx.get(f"{server.url}/v1/models/nope"), 404, "not_found")


def test_request_id_is_echoed_or_made(server: RunningServer) -> None:
    def request_id(sent: str | bytes | None) -> str:
        headers = {"X-Request-ID": sent} if sent is not None else {}
        return httpx.get(f"{server.url}/health", headers=headers).headers["x-request-id"]

    for valid in ("abc-123", "A.b_c:9-Z", "x" * 128):
        assert request_id(valid) == valid
    made = {request_id(sent) for sent in (None, "", "bad id\t!", "bad id", "x" * 129, "é".encode(), "a/b")}
    assert len(made) == 7  # each replaced by a fresh id
    assert all(re.fullmatch(r"[0-9a-f]{32}", made_id) for made_id in made), made
    httpx.get(f"{server.url}/v1/models", headers={"X-Request-ID": "trace-me-4711"})
    time.sleep(0.2)
    assert any("trace-me-4711" in line and "/v1/models 200" in line for line in server.output().splitlines())


def test_openapi_describes_the_routes(server: RunningServer) -> None:
    doc = httpx.get(f"{server.url}/openapi.json").json()
    for path in ("/v1/digits/predict", "/v1/cifar/predict", "/v1/sequence/predict", "/ready", "/v1/models"):
        assert path in doc["paths"]
    body = doc["paths"]["/v1/cifar/predict"]["post"]["requestBody"]["content"]
    assert {"image/png", "multipart/form-data", "application/json"} <= set(body)
    assert "ClassifyResponse" in json.dumps(doc["paths"]["/v1/cifar/predict"]["post"]["responses"]["200"])


def _digits_200s(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    name = 'nnserve_requests_total{endpoint="/v1/digits/predict",status="200"}'
    return float(_sample(text, name)) if name + " " in text else 0.0


def test_metrics_count_requests(server: RunningServer) -> None:
    before = _digits_200s(server.url)
    assert_still_serving(server.url)
    deadline = time.monotonic() + 5  # the gateway counts a request once its answer has left
    while _digits_200s(server.url) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _digits_200s(server.url) == before + 1
    text = httpx.get(f"{server.url}/metrics").text
    assert "nnserve_request_duration_seconds_bucket" in text
    assert 'nnserve_batch_size_count{model="digits"}' in text
    assert "nnserve_items_in_flight" in text


# --- bad input: a clear 4xx, and the server keeps serving ---------------------------------------------------

BAD_INPUTS = {
    "not an image": (
        "digits",
        {"content": b"hello, world", "headers": {"Content-Type": "image/png"}},
        400,
        "invalid_image",
    ),
    "empty body": ("digits", {"content": b"", "headers": {"Content-Type": "image/png"}}, 400, "empty_body"),
    "wrong content type": (
        "digits",
        {"content": b"x", "headers": {"Content-Type": "text/plain"}},
        415,
        "unsupported_media_type",
    ),
    "malformed json": (
        "digits",
        {"content": b'{"instances": [', "headers": {"Content-Type": "application/json"}},
        400,
        "invalid_json",
    ),
    "json without instances": ("digits", {"json": {"images": []}}, 400, "invalid_request"),
    "bad base64": ("digits", {"json": {"instances": [{"b64": "%%%"}]}}, 400, "invalid_image"),
    "ragged pixels": ("digits", {"json": {"instances": [[[1, 2], [3]]]}}, 400, "invalid_request"),
    "pixels out of range": ("digits", {"json": {"instances": [[[1, 2], [3, 999]]]}}, 400, "invalid_request"),
    "top_k too big": ("digits", {"json": {"instances": [[[0, 0], [0, 0]]], "top_k": 11}}, 422, "invalid_parameter"),
    "series too short": ("sequence", {"json": {"series": [1.0, 2.0]}}, 422, "invalid_series"),
    "series with NaN": (
        "sequence",
        {"content": b'{"series": [' + b"1.5, " * 30 + b"NaN]}", "headers": {"Content-Type": "application/json"}},
        422,
        "invalid_series",
    ),
    "series with Infinity": (
        "sequence",
        {"content": b'{"series": [' + b"1.5, " * 30 + b"Infinity]}", "headers": {"Content-Type": "application/json"}},
        422,
        "invalid_series",
    ),
    "series of strings": ("sequence", {"json": {"series": ["a"] * 30}}, 422, "invalid_series"),
    "horizon zero": ("sequence", {"json": {"series": [1.0] * 30, "horizon": 0}}, 422, "invalid_horizon"),
    "horizon too far": ("sequence", {"json": {"series": [1.0] * 30, "horizon": 1000}}, 422, "invalid_horizon"),
    "series not json": (
        "sequence",
        {"content": b"1,2,3", "headers": {"Content-Type": "text/csv"}},
        415,
        "unsupported_media_type",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_gets_a_clear_error(server: RunningServer, case: str) -> None:
    model, kwargs, status, code = BAD_INPUTS[case]
    assert_error(httpx.post(f"{server.url}/v1/{model}/predict", timeout=30, **kwargs), status, code)
    assert_still_serving(server.url)


def test_truncated_image(server: RunningServer) -> None:
    blob, _ = cifar_test_pngs()[0]
    half = blob[: len(blob) // 2]
    r = httpx.post(f"{server.url}/v1/cifar/predict", content=half, headers={"Content-Type": "image/png"})
    assert_error(r, 400, "invalid_image")
    assert_still_serving(server.url)


def test_decompression_bomb_is_refused(server: RunningServer) -> None:
    bomb = png_bytes(np.zeros((5000, 5000), dtype=np.uint8))  # 25 Mpx in a few kB
    assert len(bomb) < 100_000
    r = httpx.post(f"{server.url}/v1/digits/predict", content=bomb, headers={"Content-Type": "image/png"})
    assert_error(r, 413, "image_too_large")
    assert_still_serving(server.url)


def test_body_over_the_byte_limit(server: RunningServer) -> None:
    limit = Settings().max_request_bytes
    declared = httpx.post(
        f"{server.url}/v1/digits/predict",
        content=b"\0" * (limit + 1),
        headers={"Content-Type": "image/png"},
        timeout=30,
    )
    assert_error(declared, 413, "payload_too_large")
    assert "bytes exceeds" in declared.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: only counting what arrives can stop it
        for _ in range(limit // 2**16 + 2):
            yield b"\0" * 2**16

    chunked = httpx.post(
        f"{server.url}/v1/digits/predict", content=chunks(), headers={"Content-Type": "image/png"}, timeout=30
    )
    assert chunked.request.headers["transfer-encoding"] == "chunked" and "content-length" not in chunked.request.headers
    assert_error(chunked, 413, "payload_too_large")
    assert chunked.json()["error"]["message"] == f"request body exceeds the limit of {limit} bytes"
    assert_still_serving(server.url)


def test_too_many_items(server: RunningServer) -> None:
    digit, _ = mnist_test_pngs(1)[0]
    for n in (257, 300):
        files = [("files", (f"{i}.png", digit, "image/png")) for i in range(n)]
        assert_error(httpx.post(f"{server.url}/v1/digits/predict", files=files), 413, "too_many_items")
    instances = [[[0, 0], [0, 0]]] * 257
    assert_error(httpx.post(f"{server.url}/v1/digits/predict", json={"instances": instances}), 413, "too_many_items")
    assert_still_serving(server.url)


def test_unknown_route_and_method(server: RunningServer) -> None:
    assert_error(httpx.get(f"{server.url}/v1/digits/nothing"), 404, "not_found")
    assert_error(httpx.get(f"{server.url}/v1/digits/predict"), 405, "method_not_allowed")


# --- batching ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batching_server() -> RunningServer:
    # A batch window makes concurrent requests meet in one model call even on a fast model.
    with running_server(NNSERVE_BATCH_TIMEOUT="0.05", NNSERVE_API_SERVERS="1") as srv:
        yield srv


def test_concurrent_requests_are_batched_and_equal_single_results(
    server: RunningServer, batching_server: RunningServer
) -> None:
    items = mnist_test_pngs(48)
    singles = [
        httpx.post(f"{server.url}/v1/digits/predict", content=b, headers={"Content-Type": "image/png"}).json()
        for b, _ in items
    ]

    def send(blob: bytes) -> httpx.Response:
        return httpx.post(
            f"{batching_server.url}/v1/digits/predict", content=blob, headers={"Content-Type": "image/png"}, timeout=30
        )

    with ThreadPoolExecutor(max_workers=24) as pool:
        batched = list(pool.map(send, [b for b, _ in items]))
    assert [r.json()["predictions"] for r in batched] == [s["predictions"] for s in singles]

    text = httpx.get(f"{batching_server.url}/metrics").text
    requests = float(_sample(text, 'nnserve_batch_requests_sum{model="digits"}'))
    calls = float(_sample(text, 'nnserve_batch_requests_count{model="digits"}'))
    assert requests >= 48 and calls < requests, f"{requests} requests in {calls} model calls: nothing was batched"


def test_bad_requests_do_not_fail_their_batch(batching_server: RunningServer) -> None:
    items = mnist_test_pngs(16)

    def send(i: int) -> tuple[int, httpx.Response]:
        body = b"not a png" if i % 2 else items[i][0]
        return i, httpx.post(
            f"{batching_server.url}/v1/digits/predict", content=body, headers={"Content-Type": "image/png"}, timeout=30
        )

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(send, range(16)))
    for i, r in results:
        if i % 2:
            assert_error(r, 400, "invalid_image")
        else:
            assert r.status_code == 200 and r.json()["predictions"][0]["index"] == items[i][1]


def _sample(text: str, name: str) -> str:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return line.split()[-1]
    raise AssertionError(f"{name} not in metrics")


# --- overload, timeouts, auth, readiness, backends, devices -----------------------------------------------------


def test_overload_is_refused_early_and_nothing_hangs() -> None:
    items = mnist_test_pngs(8)
    files = [("files", (f"{i}.png", b, "image/png")) for i, (b, _) in enumerate(items)]
    labels = [y for _, y in items]
    with running_server(NNSERVE_MAX_IN_FLIGHT="16", NNSERVE_API_SERVERS="1", NNSERVE_BATCH_TIMEOUT="0.02") as srv:

        def send(_: int) -> httpx.Response:
            return httpx.post(f"{srv.url}/v1/digits/predict", files=files, timeout=20)

        with ThreadPoolExecutor(max_workers=48) as pool:
            responses = list(pool.map(send, range(192)))
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 503}
        assert statuses.count(503) > 0 and statuses.count(200) > 0
        for r in responses:
            if r.status_code == 200:
                assert [p["index"] for p in r.json()["predictions"]] == labels
            else:
                assert_error(r, 503, "overloaded")
                assert int(r.headers["retry-after"]) >= 1
        text = httpx.get(f"{srv.url}/metrics").text
        assert float(_sample(text, 'nnserve_overload_rejections_total{model="digits"}')) == statuses.count(503)
        assert_still_serving(srv.url)


def test_timeout_answers_504_json_and_access_log_can_be_off() -> None:
    with running_server(NNSERVE_REQUEST_TIMEOUT="0.000001", NNSERVE_ACCESS_LOG="false") as srv:
        digit, _ = mnist_test_pngs(1)[0]
        r = httpx.post(f"{srv.url}/v1/digits/predict", content=digit, headers={"Content-Type": "image/png"})
        assert_error(r, 504, "timeout")
        assert httpx.get(f"{srv.url}/health").status_code == 200
        assert r.headers["x-request-id"] not in srv.output()  # access log off


def test_api_key() -> None:
    with running_server(NNSERVE_API_KEY="s3cret") as srv:
        digit, _ = mnist_test_pngs(1)[0]
        url = f"{srv.url}/v1/digits/predict"
        image = {"Content-Type": "image/png"}
        assert httpx.get(f"{srv.url}/health").status_code == 200  # probes need no key
        assert httpx.get(f"{srv.url}/ready").status_code == 200
        assert_error(httpx.get(f"{srv.url}/v1/models"), 401, "unauthorized")
        assert_error(httpx.post(url, content=digit, headers=image), 401, "unauthorized")
        assert_error(httpx.post(url, content=digit, headers={**image, "X-API-Key": "wrong"}), 401, "unauthorized")
        assert_error(httpx.get(f"{srv.url}/metrics", headers={"Authorization": "Bearer s3cre"}), 401, "unauthorized")
        assert httpx.post(url, content=digit, headers={**image, "X-API-Key": "s3cret"}).status_code == 200
        assert httpx.post(url, content=digit, headers={**image, "Authorization": "Bearer s3cret"}).status_code == 200


def test_no_api_key_means_open(server: RunningServer) -> None:
    assert httpx.get(f"{server.url}/v1/models").status_code == 200


def test_ready_only_after_warm_up_and_torchscript_backend_agrees(server: RunningServer) -> None:
    # Worker mode: the HTTP servers answer at once while the workers load (inline mode accepts only once warm).
    with running_server(wait=False, NNSERVE_BACKEND="torchscript", NNSERVE_EXECUTION="worker") as srv:
        seen: list[tuple[int, int]] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(f"{srv.url}/ready", timeout=2)
                seen.append((httpx.get(f"{srv.url}/health", timeout=2).status_code, ready.status_code))
                if ready.status_code == 200:
                    break
                assert ready.json()["status"] == "not_ready"
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        assert seen and seen[-1] == (200, 200)
        assert (200, 503) in seen, f"never saw alive-but-not-ready: {seen[:5]}"

        info = httpx.get(f"{srv.url}/v1/models/digits").json()
        assert info["backend"] == "torchscript" and info["providers"] == ["torch:cpu"]
        pngs = [b for b, _ in cifar_test_pngs()[:64]]
        torchscript = predict_multipart(srv.url, "cifar", pngs)
        onnx = predict_multipart(server.url, "cifar", pngs)
        assert [p["index"] for p in torchscript] == [p["index"] for p in onnx]
        for a, b in zip(torchscript, onnx, strict=True):
            assert abs(a["top_k"][0]["probability"] - b["top_k"][0]["probability"]) < 1e-4
        assert "TracerWarning" not in srv.output() and "deprecated" not in srv.output().lower()


def test_device_selection() -> None:
    """auto falls back to the CPU here; a GPU-only setting fails at start with a clear message."""
    probe = ROOT / "models/digits/1/model.onnx"
    assert resolve_device("cpu", "onnx", probe) == "cpu"
    if resolve_device("auto", "onnx", probe) == "cuda":  # a machine with a usable GPU
        assert resolve_device("cuda", "onnx", probe) == "cuda"
        return
    with pytest.raises(DeviceError, match="no GPU is usable"):
        resolve_device("cuda", "onnx", probe)
    with running_server(wait=False, NNSERVE_DEVICE="cuda") as srv:
        assert srv.process.wait(timeout=60) != 0
        assert "NNSERVE_DEVICE=cuda" in srv.output() and "no GPU is usable" in srv.output()


def test_cuda_libraries_load_once_reporting_on_stderr(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """onnxruntime-gpu finds the CUDA libraries of NVIDIA's wheels only through preload_dlls(): it is called once
    per process, before the first CUDA session, and what it prints stays off stdout."""
    import onnxruntime as ort

    calls: list[int] = []

    def preload_dlls() -> None:
        calls.append(1)
        print("Failed to load libcudart.so.13")

    monkeypatch.setattr(ort, "preload_dlls", preload_dlls, raising=False)
    load_cuda_libraries.cache_clear()
    try:
        load_cuda_libraries()
        load_cuda_libraries()
    finally:
        load_cuda_libraries.cache_clear()
    out = capsys.readouterr()
    assert calls == [1]
    assert "libcudart.so.13" in out.err and out.out == ""


def test_gpu_model_calls_take_a_few_padded_sizes() -> None:
    """On a GPU every model call is padded up to a size warmed at start (at most 128 rows, larger batches in
    slices): powers of two for TorchScript, 4 or 128 for ONNX Runtime. The padding never reaches an answer. On a
    CPU calls go as they come, in slices of 32. Several arrays are sliced across, in order, without being joined
    first."""

    class Recorder:
        def __init__(self) -> None:
            self.providers, self.input_shape = ["recorder"], None
            self.sizes: list[int] = []

        def run(self, x: np.ndarray) -> np.ndarray:
            self.sizes.append(len(x))
            return x.sum(axis=1, keepdims=True)

    assert padded_sizes("onnx", on_gpu=False) == padded_sizes("torchscript", on_gpu=False) == ()
    assert padded_sizes("onnx", on_gpu=True) == (GPU_SMALL_BATCH, 128)
    # Each padded ONNX Runtime size has a session of its own: the small one below WIDE_BATCH, 128 at or above it.
    assert GPU_SMALL_BATCH < WIDE_BATCH <= GPU_MODEL_BATCH
    assert padded_sizes("torchscript", on_gpu=True) == GPU_BATCH_SIZES == (1, 2, 4, 8, 16, 32, 64, 128)
    api = object.__new__(ModelAPI)  # the model-call path alone: no manifest, no server
    api.runtime = recorder = Recorder()
    x = np.arange(300 * 3, dtype=np.float32).reshape(300, 3) + 1
    cases = [
        ("onnx", True, [128, 128, 128]),
        ("torchscript", True, [128, 128, 64]),
        ("onnx", False, [32] * 9 + [12]),
    ]
    for backend, on_gpu, sizes in cases:
        api.on_gpu, api.sizes = on_gpu, padded_sizes(backend, on_gpu)
        recorder.sizes.clear()
        np.testing.assert_array_equal(api.run(x), x.sum(axis=1, keepdims=True))
        assert recorder.sizes == sizes
    parts = [x[:10], x[10:11], x[11:200], x[200:]]
    recorder.sizes.clear()
    np.testing.assert_array_equal(api.run(parts, prepare=lambda a: a * 2), 2 * x.sum(axis=1, keepdims=True))
    assert recorder.sizes == [32] * 9 + [12]
    api.on_gpu, api.sizes = True, padded_sizes("onnx", on_gpu=True)
    for n, size in ((1, 4), (4, 4), (5, 128), (100, 128)):
        recorder.sizes.clear()
        np.testing.assert_array_equal(api.run(x[:n]), x[:n].sum(axis=1, keepdims=True))
        assert recorder.sizes == [size]
    api.on_gpu, api.sizes = True, GPU_BATCH_SIZES
    for n in (1, 3, 100):
        recorder.sizes.clear()
        assert api.run(x[:n]).shape == (n, 1)
        assert recorder.sizes == [1 << (n - 1).bit_length()]
    # In steps of a given size (the inline executor's), yielding between calls: the caller decides what runs there.
    api.on_gpu, api.sizes = False, ()
    recorder.sizes.clear()
    steps = api.run_steps(parts, None, 7)
    yields = 0
    while True:
        try:
            next(steps)
        except StopIteration as done:
            np.testing.assert_array_equal(done.value, x.sum(axis=1, keepdims=True))
            break
        yields += 1
        assert len(recorder.sizes) == yields  # one call per step
    assert recorder.sizes == [7] * 42 + [6] and yields == 42


def test_serving_imports_no_torch() -> None:
    code = (
        "import sys, service.__main__\n"
        "from service.config import Settings\n"
        "from service.server import build_server\n"
        "build_server(Settings(device='cpu'))\n"
        "print('torch' in sys.modules, 'litserve' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split()[-2:] == ["False", "True"]


@pytest.mark.parametrize("execution", ["inline", "worker"])
def test_running_server_maps_no_torch(execution: str) -> None:
    with running_server(NNSERVE_EXECUTION=execution) as srv:
        assert_still_serving(srv.url)  # every process has done its work once
        pids = process_tree(srv.process.pid)
        # main and two HTTP servers; in worker mode one inference worker per model too
        assert len(pids) >= (3 if execution == "inline" else 6), pids
        maps = {pid: Path(f"/proc/{pid}/maps").read_text() for pid in pids}
        assert not [pid for pid, mapped in maps.items() if "libtorch" in mapped]
        assert any("libonnxruntime" in mapped for mapped in maps.values())  # what a process loaded shows here


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in Settings.model_fields if f"`NNSERVE_{name.upper()}`" not in readme]
    assert not missing, f"README's configuration table lacks {missing}"
