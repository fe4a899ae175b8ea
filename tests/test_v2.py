"""The Open Inference Protocol (v2) end to end: tritonclient.http against a real server, answers equal to /v1's."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from tritonclient.utils import InferenceServerException

import models
from bench.payloads import model_inputs
from tests.data import cifar_test_pngs, mnist_test_pngs, weather_2015
from tests.serving import RunningServer, predict_multipart, running_server
from tests.test_service import assert_still_serving
from tests.test_v2_codec import classes

CHUNK = 64  # images per v2 request


def client(server: RunningServer, **kwargs: object) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=120.0, **kwargs)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def fp32_input(x: np.ndarray, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    return tensor.set_data_from_numpy(x, binary_data=binary)


def bytes_input(blobs: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("input", [len(blobs)], "BYTES")
    return tensor.set_data_from_numpy(np.array(blobs, dtype=object), binary_data=True)


def bytes_json_body(blobs: list[bytes], outputs: list[dict] | None = None) -> dict:
    """BYTES images in plain JSON: base64 elements (tritonclient's JSON BYTES must be UTF-8, which PNGs are not)."""
    data = [base64.b64encode(b).decode("ascii") for b in blobs]
    body: dict = {"inputs": [{"name": "input", "datatype": "BYTES", "shape": [len(blobs)], "data": data}]}
    if outputs is not None:
        body["outputs"] = outputs
    return body


def v2_logits_bytes(server: RunningServer, name: str, pngs: list[bytes]) -> np.ndarray:
    """Logits for encoded images, CHUNK per request, alternating binary (tritonclient) and JSON (base64) bodies."""
    out = []
    with client(server) as c, httpx.Client(timeout=120) as http:
        for n, i in enumerate(range(0, len(pngs), CHUNK)):
            blobs = pngs[i : i + CHUNK]
            if n % 2 == 0:
                out.append(c.infer(name, [bytes_input(blobs)]).as_numpy("output"))
            else:
                r = http.post(f"{server.url}/v2/models/{name}/infer", json=bytes_json_body(blobs))
                assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
                (output,) = r.json()["outputs"]
                out.append(np.asarray(output["data"], dtype=np.float32).reshape(output["shape"]))
    return np.concatenate(out)


def v2_logits_fp32(server: RunningServer, name: str, x: np.ndarray) -> np.ndarray:
    """Logits for preprocessed tensors, CHUNK per request, alternating binary and JSON tensor data."""
    out = []
    with client(server) as c:
        for n, i in enumerate(range(0, len(x), CHUNK)):
            binary = n % 2 == 0
            requested = [triton.InferRequestedOutput("output", binary_data=binary)]
            result = c.infer(name, [fp32_input(x[i : i + CHUNK], binary)], outputs=requested)
            out.append(result.as_numpy("output"))
    return np.concatenate(out)


def assert_equal_to_v1(v1: list[dict], logits: np.ndarray, atol: float) -> int:
    """Every v2 answer names the /v1 class, with the /v1 probability; returns how many were compared."""
    probs = softmax(logits)
    assert len(v1) == len(logits)
    assert [p["index"] for p in v1] == probs.argmax(axis=1).tolist()
    np.testing.assert_allclose([p["probability"] for p in v1], probs.max(axis=1), atol=atol)
    return len(v1)


# --- metadata and readiness ---------------------------------------------------------------------------------


def test_server_and_model_metadata(server: RunningServer) -> None:
    with client(server) as c:
        assert c.is_server_live() and c.is_server_ready()
        meta = c.get_server_metadata()
        assert meta["name"] == "nnserve" and meta["version"]
        assert set(meta["extensions"]) >= {"binary_tensor_data", "classification", "model_configuration"}
        expected = {
            "digits": ([-1, 1, 28, 28], [-1, 10]),
            "cifar": ([-1, 3, 32, 32], [-1, 10]),
            "sequence": ([-1, -1], [-1, 7]),
        }
        for name, (input_shape, output_shape) in expected.items():
            assert c.is_model_ready(name) and c.is_model_ready(name, "1")
            assert not c.is_model_ready(name, "2")
            for version in ("", "1"):
                meta = c.get_model_metadata(name, version)
                assert meta["name"] == name and meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
                assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": input_shape}]
                assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": output_shape}]
            config = c.get_model_config(name)
            assert config["name"] == name and config["platform"] == "onnxruntime_onnx"
            assert config["max_batch_size"] == 256
            assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": input_shape[1:]}]
            assert config["output"][0]["dims"] == output_shape[1:]
            with pytest.raises(InferenceServerException) as missing:
                c.get_model_metadata(name, "2")
            assert missing.value.status() == "404" and "no version '2'" in missing.value.message()
        with pytest.raises(InferenceServerException) as unknown:
            c.get_model_config("resnet50")
        assert unknown.value.status() == "404" and "serving: cifar, digits, sequence" in unknown.value.message()


def test_v2_health_is_open_and_requests_are_labelled(server: RunningServer) -> None:
    assert httpx.get(f"{server.url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{server.url}/v2/health/ready").json() == {"ready": True}
    assert httpx.get(f"{server.url}/v2/models/digits/ready").json() == {"name": "digits", "ready": True}
    with client(server) as c:
        c.get_model_metadata("cifar", "1")
        c.infer("digits", [fp32_input(DIGIT, True)])
    text = httpx.get(f"{server.url}/metrics").text
    assert 'endpoint="/v2/models/{name}/infer",status="200"' in text
    assert 'endpoint="/v2/models/{name}/versions/{version}",status="200"' in text
    assert 'endpoint="/v2/models/{name}/ready",status="200"' in text
    assert 'endpoint="/v2/health/ready",status="200"' in text
    assert '/v2/models/cifar"' not in text and "/v2/models/digits/" not in text  # no label per model name


# --- answers equal /v1's, on real data ------------------------------------------------------------------------


def test_digits_equal_v1_on_2000_mnist_images(server: RunningServer) -> None:
    pngs = [png for png, _ in mnist_test_pngs(2000)]
    v1 = predict_multipart(server.url, "digits", pngs)
    manifest = models.load(models.DEFAULT_ROOT, "digits").manifest
    equal = assert_equal_to_v1(v1, v2_logits_bytes(server, "digits", pngs), atol=2e-6)
    equal += assert_equal_to_v1(v1, v2_logits_fp32(server, "digits", model_inputs(manifest, pngs, [])), atol=1e-5)
    assert equal == 4000


def test_cifar_equal_v1_on_all_517_test_images(server: RunningServer) -> None:
    pngs = [png for png, _ in cifar_test_pngs()]
    v1 = predict_multipart(server.url, "cifar", pngs)
    manifest = models.load(models.DEFAULT_ROOT, "cifar").manifest
    equal = assert_equal_to_v1(v1, v2_logits_bytes(server, "cifar", pngs), atol=2e-6)
    equal += assert_equal_to_v1(v1, v2_logits_fp32(server, "cifar", model_inputs(manifest, pngs, [])), atol=1e-5)
    assert equal == 2 * 517


def test_classification_extension_equals_v1_top_k(server: RunningServer) -> None:
    pngs = [png for png, _ in cifar_test_pngs()]
    v1 = predict_multipart(server.url, "cifar", pngs)  # top_k 3 by default
    got: list[list[tuple[float, int, str]]] = []
    with client(server) as c, httpx.Client(timeout=120) as http:
        for n, i in enumerate(range(0, len(pngs), CHUNK)):
            blobs = pngs[i : i + CHUNK]
            if n % 2 == 0:
                requested = [triton.InferRequestedOutput("output", binary_data=True, class_count=3)]
                strings = c.infer("cifar", [bytes_input(blobs)], outputs=requested).as_numpy("output")
            else:
                ask = [{"name": "output", "parameters": {"classification": 3}}]
                r = http.post(f"{server.url}/v2/models/cifar/infer", json=bytes_json_body(blobs, ask))
                (output,) = r.json()["outputs"]
                assert output["datatype"] == "BYTES" and output["shape"] == [len(blobs), 3]
                strings = np.array(output["data"], dtype=object).reshape(output["shape"])
            got.extend(classes(strings))
    want = [[(s["index"], s["label"]) for s in p["top_k"]] for p in v1]
    assert [[(i, label) for _, i, label in row] for row in got] == want
    assert sum(len(row) for row in got) == 3 * 517


def test_sequence_equals_v1_with_and_without_horizon(server: RunningServer) -> None:
    temps = weather_2015()
    for length in (14, 60, 365):
        windows = np.stack([temps[i : i + length] for i in range(0, 365 - length + 1, max(1, (365 - length) // 40))])
        body = [{"series": w.tolist(), "horizon": 7} for w in windows]
        r = httpx.post(f"{server.url}/v1/sequence/predict", json=body, timeout=60)
        v1 = np.array([p["forecast"] for p in r.json()["predictions"]])
        with client(server) as c:
            for binary in (True, False):
                full = c.infer("sequence", [fp32_input(windows, binary)]).as_numpy("output")
                assert full.shape == (len(windows), 7)
                np.testing.assert_allclose(full, v1, atol=1e-4)
                short = c.infer("sequence", [fp32_input(windows, binary)], parameters={"horizon": 3})
                np.testing.assert_allclose(short.as_numpy("output"), v1[:, :3], atol=1e-4)


def test_asyncio_client_with_v1_alongside(server: RunningServer) -> None:
    """tritonclient.http.aio requests, concurrent with /v1 ones for the same model, all answered correctly."""
    digits = mnist_test_pngs(64)

    async def run() -> tuple[list[int], list[int]]:
        async with (
            triton_aio.InferenceServerClient(server.url.removeprefix("http://")) as c,
            httpx.AsyncClient(timeout=60) as http,
        ):

            async def v2(png: bytes) -> int:
                return int((await c.infer("digits", [bytes_input([png])])).as_numpy("output").argmax())

            async def v1(png: bytes) -> int:
                r = await http.post(
                    f"{server.url}/v1/digits/predict", content=png, headers={"Content-Type": "image/png"}
                )
                return int(r.json()["predictions"][0]["index"])

            v2_answers = asyncio.gather(*(v2(png) for png, _ in digits))
            v1_answers = asyncio.gather(*(v1(png) for png, _ in digits))
            return list(await v2_answers), list(await v1_answers)

    v2_answers, v1_answers = asyncio.run(run())
    assert v2_answers == v1_answers
    assert sum(a == label for a, (_, label) in zip(v2_answers, digits, strict=True)) >= 63


# --- refusals -------------------------------------------------------------------------------------------------

DIGIT = np.zeros((1, 1, 28, 28), dtype=np.float32)


def fp32_json(shape: list[int], data: list, datatype: str = "FP32", name: str = "input") -> dict:
    return {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}]}


BINARY_BODY = json.dumps(
    {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "parameters": {"binary_data_size": 3136}}
        ]
    }
).encode()
NAN_DIGIT = json.dumps(fp32_json([1, 1, 28, 28], [0.0] * 783 + [float("nan")])).encode()  # Python writes NaN
BAD_V2: dict[str, tuple[str, dict, int, str]] = {
    "wrong datatype": ("digits", {"json": fp32_json([1, 1, 28, 28], [0] * 784, "INT32")}, 400, "datatype 'INT32'"),
    "wrong shape": ("digits", {"json": fp32_json([1, 3, 28, 28], [0.0] * 3 * 784)}, 400, "does not match"),
    "cifar shape to digits": ("digits", {"json": fp32_json([1, 3, 32, 32], [0.0] * 3072)}, 400, "does not match"),
    "shape and data disagree": ("digits", {"json": fp32_json([2, 1, 28, 28], [0.0] * 784)}, 400, "784 values"),
    "unknown input name": ("digits", {"json": fp32_json([1, 1, 28, 28], [0.0] * 784, name="x")}, 400, "named 'input'"),
    "unknown output name": (
        "digits",
        {"json": {**fp32_json([1, 1, 28, 28], [0.0] * 784), "outputs": [{"name": "probs"}]}},
        400,
        "'probs'",
    ),
    "non-image bytes": ("cifar", {"json": bytes_json_body([b"hello, world"])}, 400, "not a PNG, JPEG, WebP, GIF"),
    "truncated image": ("cifar", {"json": bytes_json_body([cifar_test_pngs()[0][0][:200]])}, 400, "item 0"),
    "binary without its header": (
        "digits",
        {"content": BINARY_BODY + DIGIT.tobytes(), "headers": {"Content-Type": "application/octet-stream"}},
        400,
        "Inference-Header-Content-Length",
    ),
    "header length past the body": (
        "digits",
        {"content": BINARY_BODY + DIGIT.tobytes(), "headers": {"Inference-Header-Content-Length": "99999"}},
        400,
        "Inference-Header-Content-Length",
    ),
    "binary data short": (
        "digits",
        {
            "content": BINARY_BODY + DIGIT.tobytes()[:-8],
            "headers": {"Inference-Header-Content-Length": str(len(BINARY_BODY))},
        },
        400,
        "runs past",
    ),
    "binary data long": (
        "digits",
        {
            "content": BINARY_BODY + DIGIT.tobytes() + b"\0" * 8,
            "headers": {"Inference-Header-Content-Length": str(len(BINARY_BODY))},
        },
        400,
        "account for",
    ),
    "NaN pixels": ("digits", {"content": NAN_DIGIT}, 400, "NaN"),
    "history too short": ("sequence", {"json": fp32_json([1, 5], [1.0] * 5)}, 400, "14 to 365"),
    "history NaN": (
        "sequence",
        {
            "content": b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 14], "data": ['
            + b"1.0, " * 13
            + b"NaN]}]}"
        },
        400,
        "NaN",
    ),
    "horizon too far": (
        "sequence",
        {"json": {**fp32_json([1, 14], [1.0] * 14), "parameters": {"horizon": 30}}},
        400,
        "from 1 to 7",
    ),
    "classification of a forecast": (
        "sequence",
        {
            "json": {
                **fp32_json([1, 14], [1.0] * 14),
                "outputs": [{"name": "output", "parameters": {"classification": 1}}],
            }
        },
        400,
        "not a classifier",
    ),
    "too many images": ("digits", {"json": fp32_json([257, 1, 28, 28], [0.0] * 257 * 784)}, 413, "limit is 256"),
    "body over the byte limit": ("digits", {"content": b"\0" * (10 * 2**20 + 1)}, 413, "exceeds the limit"),
    "unknown model": ("resnet50", {"json": fp32_json([1], [0.0])}, 404, "serving: cifar, digits, sequence"),
}


@pytest.mark.parametrize("case", BAD_V2, ids=list(BAD_V2))
def test_bad_v2_input_gets_a_clear_error(server: RunningServer, case: str) -> None:
    model, kwargs, status, message = BAD_V2[case]
    r = httpx.post(f"{server.url}/v2/models/{model}/infer", timeout=60, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert isinstance(error, str) and message in error, error
    assert r.headers["x-request-id"]
    assert_still_serving(server.url)


def test_unserved_version_and_tritonclient_errors(server: RunningServer) -> None:
    with client(server) as c:
        with pytest.raises(InferenceServerException) as wrong_version:
            c.infer("digits", [fp32_input(DIGIT, True)], model_version="7")
        assert wrong_version.value.status() == "404" and "no version '7'" in wrong_version.value.message()
        with pytest.raises(InferenceServerException) as not_an_image:
            c.infer("digits", [bytes_input([b"GIF89a but not really"])])
        assert not_an_image.value.status() == "400" and "item 0" in not_an_image.value.message()
        assert c.infer("digits", [fp32_input(DIGIT, True)], model_version="1").as_numpy("output").shape == (1, 10)


def test_api_key_on_v2() -> None:
    with running_server(NNSERVE_API_KEY="s3cret") as srv:
        assert httpx.get(f"{srv.url}/v2/health/live").status_code == 200  # probes need no key
        assert httpx.get(f"{srv.url}/v2/health/ready").status_code == 200
        r = httpx.get(f"{srv.url}/v2/models/digits")
        assert r.status_code == 401 and "API key" in r.json()["error"]
        with client(srv) as c, pytest.raises(InferenceServerException) as refused:
            c.infer("digits", [fp32_input(DIGIT, True)])
        assert refused.value.status() == "401"
        with client(srv) as c:
            result = c.infer("digits", [fp32_input(DIGIT, True)], headers={"Authorization": "Bearer s3cret"})
            assert result.as_numpy("output").shape == (1, 10)
            assert c.get_model_metadata("digits", headers={"X-API-Key": "s3cret"})["name"] == "digits"


def test_worker_mode_readiness_and_answers(server: RunningServer) -> None:
    """In worker mode the HTTP servers answer while the workers load: v2 says not ready (503), then answers
    through the workers exactly as the inline server does."""
    with running_server(wait=False, NNSERVE_EXECUTION="worker") as srv:
        seen: list[int] = []
        refused: list[httpx.Response] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(f"{srv.url}/v2/health/ready", timeout=2)
            except httpx.TransportError:
                time.sleep(0.02)
                continue
            seen.append(ready.status_code)
            if ready.status_code == 200:
                break
            assert ready.json() == {"ready": False}
            if not refused:
                refused.append(
                    httpx.post(f"{srv.url}/v2/models/digits/infer", json=fp32_json([1, 1, 28, 28], [0.0] * 784))
                )
            time.sleep(0.02)
        assert seen and seen[-1] == 200 and 503 in seen, seen[:5]
        assert refused[0].status_code in (200, 503), refused[0].text
        if refused[0].status_code == 503:  # 200 only when the workers became ready in between
            assert refused[0].headers["retry-after"] and "not ready" in refused[0].json()["error"]
        pngs = [png for png, _ in cifar_test_pngs()[:128]]
        np.testing.assert_allclose(
            v2_logits_bytes(srv, "cifar", pngs), v2_logits_bytes(server, "cifar", pngs), atol=1e-4
        )
        windows = np.stack([weather_2015()[i : i + 30] for i in range(8)])
        with client(srv) as worker, client(server) as inline:
            np.testing.assert_allclose(
                worker.infer("sequence", [fp32_input(windows, True)]).as_numpy("output"),
                inline.infer("sequence", [fp32_input(windows, True)]).as_numpy("output"),
                atol=1e-4,
            )
