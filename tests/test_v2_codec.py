"""The v2 codec alone, no HTTP: bodies built and read by tritonclient's own functions, and every refusal."""

from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest
import tritonclient.http as triton

import models
from service import v2_codec as codec
from service.v2_codec import ProtocolError

DIGITS = models.load(models.DEFAULT_ROOT, "digits").manifest
CIFAR = models.load(models.DEFAULT_ROOT, "cifar").manifest
SEQUENCE = models.load(models.DEFAULT_ROOT, "sequence").manifest


def triton_body(x: np.ndarray, datatype: str, binary: bool, **kwargs: object) -> tuple[bytes, str | None]:
    """A request body exactly as tritonclient.http sends it, and its Inference-Header-Content-Length."""
    tensor = triton.InferInput("input", list(x.shape), datatype)
    tensor.set_data_from_numpy(x, binary_data=binary)
    body, header_length = triton.InferenceServerClient.generate_request_body([tensor], **kwargs)
    return body, None if header_length is None else str(header_length)


def json_request(inputs: list[dict], **extra: object) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


def fp32_input(shape: list[int], data: object = None, **extra: object) -> dict:
    return {"name": "input", "datatype": "FP32", "shape": shape, "data": data if data is not None else [0.0], **extra}


def classes(strings: np.ndarray) -> list[list[tuple[float, int, str]]]:
    """Classification strings "value:index:label" as tuples, row by row (JSON gives str, binary gives bytes)."""
    rows = []
    for row in strings:
        parts = [(s.decode() if isinstance(s, bytes) else s).split(":", 2) for s in row]
        rows.append([(float(v), int(i), label) for v, i, label in parts])
    return rows


# --- requests -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_fp32_tensor_from_tritonclient(binary: bool) -> None:
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    body, header_length = triton_body(x, "FP32", binary)
    assert (header_length is not None) == binary
    request = codec.parse_request(body, header_length)
    got = codec.classifier_input(request, DIGITS, max_items=256)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    np.testing.assert_array_equal(got, x)
    assert request.binary_output  # tritonclient asks for binary outputs when it names none


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "base64-json"])
def test_bytes_tensor_of_images(binary: bool) -> None:
    blobs = [b"\x89PNG first", b"\xff\xd8 second \x00 with a zero", b""]
    if binary:
        body, header_length = triton_body(np.array(blobs, dtype=object), "BYTES", True)
    else:  # JSON carries BYTES elements as base64 (tritonclient would send raw UTF-8, which images are not)
        data = [base64.b64encode(b).decode() for b in blobs]
        body, header_length = json_request([{"name": "input", "datatype": "BYTES", "shape": [3], "data": data}]), None
    request = codec.parse_request(body, header_length)
    assert codec.classifier_input(request, CIFAR, max_items=256) == blobs


def test_nested_json_data_is_read_row_major() -> None:
    flat = codec.parse_request(json_request([fp32_input([2, 3], [1, 2, 3, 4, 5, 6])]))
    nested = codec.parse_request(json_request([fp32_input([2, 3], [[1, 2, 3], [4, 5, 6]])]))
    np.testing.assert_array_equal(flat.inputs[0].data, nested.inputs[0].data)
    assert flat.inputs[0].data.shape == (2, 3)  # type: ignore[union-attr]


def test_request_id_outputs_and_parameters() -> None:
    x = np.zeros((1, 30), dtype=np.float32)
    outputs = [triton.InferRequestedOutput("output", binary_data=False, class_count=2)]
    body, header_length = triton_body(x, "FP32", True, outputs=outputs, request_id="r-7", parameters={"horizon": 3})
    request = codec.parse_request(body, header_length)
    assert request.id == "r-7"
    assert request.outputs == [codec.OutputRequest("output", binary=False, classification=2)]
    assert codec.forecast_input(request, SEQUENCE, 256)[1] == 3


def test_bytes_serialization_round_trip() -> None:
    items = [b"", b"a", b"\x00\x01\x02" * 100]
    assert codec.deserialize_bytes(codec.serialize_bytes(items), 3) == items


BAD_BYTES = {
    "truncated length": (struct.pack("<I", 1) + b"a" + b"\x01\x00", 2, "truncated 4-byte length"),
    "length past the end": (struct.pack("<I", 10) + b"abc", 1, "past the end"),
    "count mismatch": (codec.serialize_bytes([b"a", b"b"]), 3, "2 elements"),
}


@pytest.mark.parametrize("case", BAD_BYTES, ids=list(BAD_BYTES))
def test_malformed_binary_bytes(case: str) -> None:
    raw, count, message = BAD_BYTES[case]
    with pytest.raises(ProtocolError, match=message):
        codec.deserialize_bytes(raw, count)


X = np.zeros((2, 1, 28, 28), dtype=np.float32)
BINARY_BODY, BINARY_HEADER = triton_body(X, "FP32", True)
BAD_REQUESTS: dict[str, tuple[bytes, str | None, str]] = {
    "not json": (b"{", None, "not valid JSON"),
    "binary without the header": (BINARY_BODY, None, "needs the Inference-Header-Content-Length header"),
    "header length not a number": (BINARY_BODY, "ten", "must be an integer"),
    "header length zero": (BINARY_BODY, "0", "must be an integer from 1"),
    "header length past the body": (BINARY_BODY, str(len(BINARY_BODY) + 1), "must be an integer from 1"),
    "header length inside the JSON": (BINARY_BODY, str(int(BINARY_HEADER) - 3), "not valid JSON"),  # type: ignore[arg-type]
    "extra binary bytes": (BINARY_BODY + b"\0\0\0\0", BINARY_HEADER, "account for"),
    "binary size past the data": (BINARY_BODY[:-4], BINARY_HEADER, "runs past"),
    "no inputs": (json_request([]), None, "non-empty list"),
    "not an object": (b"[1, 2]", None, "must be a JSON object"),
    "datatype INT64": (json_request([{**fp32_input([1]), "datatype": "INT64"}]), None, "datatype 'INT64'"),
    "shape of strings": (json_request([fp32_input(["1"])]), None, "non-negative integers"),  # type: ignore[list-item]
    "negative shape": (json_request([fp32_input([-1])]), None, "non-negative integers"),
    "size mismatch": (json_request([fp32_input([2, 2], [1.0, 2.0, 3.0])]), None, "3 values for shape"),
    "ragged data": (json_request([fp32_input([2, 2], [[1.0, 2.0], [3.0]])]), None, "numbers only"),
    "strings as FP32": (json_request([fp32_input([1], ["a"])]), None, "numbers only"),
    "no data": (json_request([{"name": "input", "datatype": "FP32", "shape": [1]}]), None, 'no "data"'),
    "data and binary size": (
        json_request([fp32_input([1], [1.0], parameters={"binary_data_size": 4})]),
        None,
        "not both",
    ),
    "bad base64": (
        json_request([{"name": "input", "datatype": "BYTES", "shape": [1], "data": ["%%"]}]),
        None,
        "not valid base64",
    ),
    "duplicate inputs": (json_request([fp32_input([1], [1.0]), fp32_input([1], [1.0])]), None, "once"),
    "duplicate outputs": (
        json_request([fp32_input([1], [1.0])], outputs=[{"name": "output"}, {"name": "output"}]),
        None,
        "once",
    ),
    "classification not a count": (
        json_request([fp32_input([1], [1.0])], outputs=[{"name": "output", "parameters": {"classification": "3"}}]),
        None,
        "non-negative integer",
    ),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_malformed_requests(case: str) -> None:
    body, header_length, message = BAD_REQUESTS[case]
    with pytest.raises(ProtocolError, match=message) as raised:
        codec.parse_request(body, header_length)
    assert raised.value.status == 400


def parsed(inputs: list[dict], **extra: object) -> codec.InferRequest:
    return codec.parse_request(json_request(inputs, **extra))


def test_model_contract_refusals() -> None:
    refusals = [
        (lambda: codec.classifier_input(parsed([{**fp32_input([1]), "name": "pixels"}]), DIGITS, 256), "'input'"),
        (lambda: codec.classifier_input(parsed([fp32_input([1, 28, 28], [0.0] * 784)]), DIGITS, 256), "shape"),
        (lambda: codec.classifier_input(parsed([fp32_input([1, 1, 28, 28], [0.0] * 784)]), CIFAR, 256), "shape"),
        (lambda: codec.classifier_input(parsed([fp32_input([0, 1, 28, 28], [])]), DIGITS, 256), "no items"),
        (
            lambda: codec.classifier_input(parsed([fp32_input([1, 1, 28, 28], [float("nan")] * 784)]), DIGITS, 256),
            "NaN",
        ),
        (
            lambda: codec.classifier_input(
                parsed([{"name": "input", "datatype": "BYTES", "shape": [1, 2], "data": ["", ""]}]), DIGITS, 256
            ),
            r"\[N\] or \[N, 1\]",
        ),
        (lambda: codec.forecast_input(parsed([fp32_input([1, 3], [1.0] * 3)]), SEQUENCE, 256), "14 to 365"),
        (lambda: codec.forecast_input(parsed([fp32_input([30], [1.0] * 30)]), SEQUENCE, 256), r"\[N, T\]"),
        (
            lambda: codec.forecast_input(
                parsed([fp32_input([1, 30], [1.0] * 30)], parameters={"horizon": 8}), SEQUENCE, 256
            ),
            "from 1 to 7",
        ),
        (lambda: codec.check_outputs(parsed([fp32_input([1])], outputs=[{"name": "logits"}]), DIGITS), "'logits'"),
        (
            lambda: codec.check_outputs(
                parsed([fp32_input([1])], outputs=[{"name": "output", "parameters": {"classification": 2}}]), SEQUENCE
            ),
            "not a classifier",
        ),
        (
            lambda: codec.check_outputs(
                parsed([fp32_input([1])], outputs=[{"name": "output", "parameters": {"classification": 11}}]), DIGITS
            ),
            "from 1 to 10",
        ),
    ]
    for call, message in refusals:
        with pytest.raises(ProtocolError, match=message):
            call()


def test_too_many_items_is_413() -> None:
    with pytest.raises(ProtocolError) as raised:
        codec.classifier_input(parsed([fp32_input([3, 1, 28, 28], [0.0] * 3 * 784)]), DIGITS, max_items=2)
    assert raised.value.status == 413


# --- responses ----------------------------------------------------------------------------------------------


def test_classification_strings() -> None:
    """The classification extension's own example: [1.1, 3.3, 0.5, 2.4], top 2, with labels."""
    values = np.array([[1.1, 3.3, 0.5, 2.4], [0.0, -1.0, 2.0, 1.0]], dtype=np.float32)
    got = classes(np.array(codec.classify(values, 2, ["a", "b", "c", "d"]), dtype=object).reshape(2, 2))
    assert [[(i, label) for _, i, label in row] for row in got] == [[(1, "b"), (3, "d")], [(2, "c"), (3, "d")]]
    assert got[0][0][0] == pytest.approx(3.3, abs=1e-6)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_response_read_by_tritonclient(binary: bool) -> None:
    logits = np.random.default_rng(1).standard_normal((4, 10)).astype(np.float32)
    request = codec.InferRequest(
        id="abc",
        inputs=[],
        outputs=[codec.OutputRequest("output", binary=binary)],
        binary_output=not binary,  # the output's own parameter wins
    )
    body, header_length = codec.encode_response("digits", "1", "abc", codec.outputs_for(request, DIGITS, logits))
    assert (header_length is not None) == binary
    result = triton.InferenceServerClient.parse_response_body(body, header_length=header_length)
    np.testing.assert_array_equal(result.as_numpy("output"), logits)
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == ("digits", "1", "abc")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_classification_response_read_by_tritonclient(binary: bool) -> None:
    logits = np.random.default_rng(2).standard_normal((3, 10)).astype(np.float32)
    request = codec.InferRequest(id=None, inputs=[], outputs=[codec.OutputRequest("output", binary, classification=3)])
    body, header_length = codec.encode_response("digits", "1", None, codec.outputs_for(request, DIGITS, logits))
    strings = triton.InferenceServerClient.parse_response_body(body, header_length=header_length).as_numpy("output")
    assert strings.shape == (3, 3)
    got = classes(strings)
    assert [[i for _, i, _ in row] for row in got] == np.argsort(-logits, axis=1)[:, :3].tolist()
    assert all(label == DIGITS.labels[i] for row in got for _, i, label in row)  # type: ignore[index]
    assert all(v == pytest.approx(float(logits[r, i]), abs=1e-6) for r, row in enumerate(got) for v, i, _ in row)
