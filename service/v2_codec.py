"""The Open Inference Protocol (v2) codec: request bytes to tensors, output tensors to response bytes.

Pure functions, no HTTP: `service/v2.py` calls them. What it speaks:

- the protocol's JSON tensors (`data` flat or nested, row-major), for FP32 and BYTES;
- Triton's binary tensor data extension: the JSON header is the first `Inference-Header-Content-Length` bytes of
  the body, then each input with a `binary_data_size` parameter takes that many bytes, in input order (BYTES
  elements are a 4-byte little-endian length, then the bytes); outputs go binary when asked for with `binary_data`
  on the output or `binary_data_output` on the request;
- Triton's classification extension: `{"classification": k}` on an output answers BYTES `"value:index:label"`
  strings, the k largest values of each row, largest first.

JSON BYTES elements are base64 strings: images are binary, and JSON strings cannot carry arbitrary bytes.

Every violation raises `ProtocolError` with a sentence for the client, before anything reaches a batch.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models import Manifest

FP32 = "FP32"
BYTES = "BYTES"
# The binary tensor data extension's parameter names.
BINARY_SIZE = "binary_data_size"
BINARY_OUTPUT = "binary_data"
BINARY_ALL_OUTPUTS = "binary_data_output"
CLASSIFICATION = "classification"
HORIZON = "horizon"


class ProtocolError(ValueError):
    """A request the protocol or the model cannot take: 400, or `status` where a limit was passed (413)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class InputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | list[bytes]  # FP32: float32 array of `shape`; BYTES: the elements, row-major


@dataclass(frozen=True)
class OutputRequest:
    name: str
    binary: bool | None = None  # None: as the request's `binary_data_output` says
    classification: int = 0


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    inputs: list[InputTensor]
    outputs: list[OutputRequest]  # empty: every output, as `binary_output` says
    parameters: dict[str, Any] = field(default_factory=dict)
    binary_output: bool = False


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | list[bytes]
    binary: bool


# --- request ------------------------------------------------------------------------------------------
def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary tail of a request body."""
    if header_length is None:
        return body, b""
    length = header_length.strip()
    if not length.isdigit() or not 0 < int(length) <= len(body):
        raise ProtocolError(
            f"Inference-Header-Content-Length is {header_length!r}; it must be an integer from 1 to the body's "
            f"{len(body)} bytes"
        )
    return body[: int(length)], body[int(length) :]


def parse_request(body: bytes, header_length: str | None = None) -> InferRequest:
    """Parse an inference request: its JSON object and, with the binary extension, the tensors that follow it."""
    header, tail = split_body(body, header_length)
    try:
        doc = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        hint = "" if header_length else " (binary tensor data needs the Inference-Header-Content-Length header)"
        raise ProtocolError(f"the inference request is not valid JSON: {e}{hint}") from None
    if not isinstance(doc, dict):
        raise ProtocolError("the inference request must be a JSON object")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError('the inference request needs "inputs": a non-empty list of tensors')
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError('"id" must be a string')
    parameters = _parameters(doc, "the request")
    offset = 0
    names = [item.get("name") if isinstance(item, dict) else None for item in inputs]
    if len(set(names)) != len(names):
        raise ProtocolError(f"each input may be given once; got {names}")
    tensors = []
    for i, item in enumerate(inputs):
        tensor, offset = _input(i, item, tail, offset)
        tensors.append(tensor)
    if offset != len(tail):
        raise ProtocolError(
            f"{len(tail)} bytes of binary tensor data follow the JSON header but the inputs' binary_data_size "
            f"parameters account for {offset}"
        )
    outputs = doc.get("outputs", [])
    if not isinstance(outputs, list):
        raise ProtocolError('"outputs" must be a list')
    requested = [_output_request(i, o) for i, o in enumerate(outputs)]
    names = [o.name for o in requested]
    if len(set(names)) != len(names):
        raise ProtocolError(f"each output may be requested once; got {names}")
    binary_output = parameters.get(BINARY_ALL_OUTPUTS, False)
    if not isinstance(binary_output, bool):
        raise ProtocolError(f'the request parameter "{BINARY_ALL_OUTPUTS}" must be true or false')
    return InferRequest(
        id=request_id,
        inputs=tensors,
        outputs=requested,
        parameters=parameters,
        binary_output=binary_output,
    )


def _parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    parameters = obj.get("parameters", {})
    if not isinstance(parameters, dict):
        raise ProtocolError(f'"parameters" of {where} must be a JSON object')
    return parameters


def _shape(where: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ProtocolError(f'{where}: "shape" must be a list of non-negative integers')
    return tuple(shape)


def _input(index: int, item: Any, tail: bytes, offset: int) -> tuple[InputTensor, int]:
    """One request input, and where the next input's binary data starts in `tail`."""
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise ProtocolError(f'input {index}: expected {{"name", "shape", "datatype", "data"}}')
    name = item["name"]
    where = f"input {name!r}"
    datatype = item.get("datatype")
    if datatype not in (FP32, BYTES):
        raise ProtocolError(f"{where}: datatype {datatype!r} is not accepted; send FP32 or BYTES")
    shape = _shape(where, item.get("shape"))
    count = math.prod(shape)
    size = _parameters(item, where).get(BINARY_SIZE)
    if size is not None:
        if "data" in item:
            raise ProtocolError(f'{where}: give either "data" or the {BINARY_SIZE} parameter, not both')
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ProtocolError(f"{where}: {BINARY_SIZE} must be a non-negative integer")
        if offset + size > len(tail):
            raise ProtocolError(
                f"{where}: {BINARY_SIZE} {size} runs past the {len(tail)} bytes of binary data after the JSON header"
            )
        raw = tail[offset : offset + size]
        data = _binary_fp32(where, raw, shape) if datatype == FP32 else deserialize_bytes(raw, count, where)
        return InputTensor(name, datatype, shape, data), offset + size
    if "data" not in item:
        raise ProtocolError(f'{where}: no "data" and no {BINARY_SIZE} parameter')
    data = _json_fp32(where, item["data"], shape) if datatype == FP32 else _json_bytes(where, item["data"], count)
    return InputTensor(name, datatype, shape, data), offset


def _binary_fp32(where: str, raw: bytes, shape: tuple[int, ...]) -> np.ndarray:
    if len(raw) != 4 * math.prod(shape):
        raise ProtocolError(
            f"{where}: {len(raw)} bytes of FP32 data for shape {list(shape)}, which needs {4 * math.prod(shape)}"
        )
    return np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32, copy=False)


def _json_fp32(where: str, data: Any, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(data, list):
        raise ProtocolError(f'{where}: "data" must be a list of numbers')
    try:
        array = np.asarray(data, dtype=np.float32)
    except (ValueError, TypeError):
        raise ProtocolError(f'{where}: "data" must hold numbers only, in equal-length rows if nested') from None
    if array.size != math.prod(shape):
        raise ProtocolError(f"{where}: {array.size} values for shape {list(shape)}, which needs {math.prod(shape)}")
    return array.reshape(shape)


def _json_bytes(where: str, data: Any, count: int) -> list[bytes]:
    flat = list(_flatten(data)) if isinstance(data, list) else None
    if flat is None or not all(isinstance(s, str) for s in flat):
        raise ProtocolError(f'{where}: BYTES "data" must be a list of base64 strings')
    if len(flat) != count:
        raise ProtocolError(f"{where}: {len(flat)} elements for a shape of {count}")
    blobs = []
    for i, s in enumerate(flat):
        try:
            blobs.append(base64.b64decode(s, validate=True))
        except (binascii.Error, ValueError):
            raise ProtocolError(f"{where}: element {i} is not valid base64") from None
    return blobs


def _flatten(data: list[Any]) -> Any:
    for item in data:
        if isinstance(item, list):
            yield from _flatten(item)
        else:
            yield item


def deserialize_bytes(raw: bytes, count: int, where: str = "BYTES tensor") -> list[bytes]:
    """`count` elements, each a 4-byte little-endian length then that many bytes, filling `raw` exactly."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise ProtocolError(f"{where}: element {len(items)} has a truncated 4-byte length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise ProtocolError(f"{where}: element {len(items)} claims {length} bytes, past the end of its data")
        items.append(raw[offset : offset + length])
        offset += length
    if len(items) != count:
        raise ProtocolError(f"{where}: {len(items)} elements in the binary data for a shape of {count}")
    return items


def serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _output_request(index: int, item: Any) -> OutputRequest:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise ProtocolError(f'output {index}: expected {{"name": ..., "parameters": {{...}}}}')
    where = f"output {item['name']!r}"
    parameters = _parameters(item, where)
    binary = parameters.get(BINARY_OUTPUT)
    if binary is not None and not isinstance(binary, bool):
        raise ProtocolError(f"{where}: {BINARY_OUTPUT} must be true or false")
    k = parameters.get(CLASSIFICATION, 0)
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ProtocolError(f"{where}: {CLASSIFICATION} must be a non-negative integer")
    return OutputRequest(item["name"], binary, k)


# --- the model's contract -----------------------------------------------------------------------------
def tensor_shape(dims: list[int | str]) -> list[int]:
    """A manifest shape in the protocol's terms: named (dynamic) axes are -1."""
    return [d if isinstance(d, int) else -1 for d in dims]


def the_input(request: InferRequest, manifest: Manifest) -> InputTensor:
    """The one input the model takes, under the manifest's name."""
    expected = manifest.input.name
    names = [t.name for t in request.inputs]
    if names != [expected]:
        raise ProtocolError(f"model {manifest.name} takes one input named {expected!r}; got {names}")
    return request.inputs[0]


def _check_items(n: int, max_items: int) -> None:
    if n == 0:
        raise ProtocolError("the request holds no items (batch size 0)")
    if n > max_items:
        raise ProtocolError(f"{n} items in one request; the limit is {max_items}", status=413)


def classifier_input(request: InferRequest, manifest: Manifest, max_items: int) -> np.ndarray | list[bytes]:
    """A preprocessed FP32 batch exactly as the manifest's input, or BYTES encoded images (shape [N] or [N, 1])."""
    tensor = the_input(request, manifest)
    where = f"input {tensor.name!r}"
    if tensor.datatype == BYTES:
        if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
            raise ProtocolError(f"{where}: BYTES images need shape [N] or [N, 1]; got {list(tensor.shape)}")
        _check_items(tensor.shape[0], max_items)
        return tensor.data  # type: ignore[return-value]
    wanted = tensor_shape(manifest.input.shape)
    shape = list(tensor.shape)
    if len(shape) != len(wanted) or any(w != -1 and s != w for s, w in zip(shape, wanted, strict=True)):
        raise ProtocolError(f"{where}: FP32 shape {shape} does not match the model's input {wanted}")
    _check_items(shape[0], max_items)
    return _finite(where, tensor.data)  # type: ignore[arg-type]


def forecast_input(request: InferRequest, manifest: Manifest, max_items: int) -> tuple[np.ndarray, int]:
    """FP32 histories [N, T] (oldest first) and the horizon (request parameter, default the model's)."""
    spec = manifest.series
    assert spec is not None
    tensor = the_input(request, manifest)
    where = f"input {tensor.name!r}"
    if tensor.datatype != FP32 or len(tensor.shape) != 2:
        raise ProtocolError(f"{where}: model {manifest.name} takes FP32 histories of shape [N, T]")
    n, t = tensor.shape
    _check_items(n, max_items)
    if not spec.min_history <= t <= spec.max_history:
        raise ProtocolError(
            f"{where}: histories of {t} values; this model needs {spec.min_history} to {spec.max_history}"
        )
    horizon = request.parameters.get(HORIZON, spec.horizon)
    if not isinstance(horizon, int) or isinstance(horizon, bool) or not 1 <= horizon <= spec.horizon:
        raise ProtocolError(f'the request parameter "{HORIZON}" must be an integer from 1 to {spec.horizon}')
    return _finite(where, tensor.data), horizon  # type: ignore[arg-type]


def _finite(where: str, x: np.ndarray) -> np.ndarray:
    if not np.isfinite(x).all():
        raise ProtocolError(f"{where}: the tensor holds NaN or Infinity")
    return x


def check_outputs(request: InferRequest, manifest: Manifest) -> None:
    """Requested outputs exist, and classification is asked of a classifier with a count it can give."""
    for out in request.outputs:
        if out.name != manifest.output.name:
            raise ProtocolError(f"model {manifest.name} has one output, {manifest.output.name!r}; not {out.name!r}")
        if out.classification:
            if manifest.labels is None:
                raise ProtocolError(f"model {manifest.name} is not a classifier: it has no classification output")
            if out.classification > len(manifest.labels):
                raise ProtocolError(f"{CLASSIFICATION} must be from 1 to {len(manifest.labels)} for {manifest.name}")


# --- response -----------------------------------------------------------------------------------------
def classify(values: np.ndarray, k: int, labels: list[str]) -> list[bytes]:
    """The classification extension: per row the k largest values as b"value:index:label", largest first."""
    order = np.argsort(-values, axis=1, kind="stable")[:, :k]
    return [
        f"{float(row[i]):f}:{int(i)}:{labels[i]}".encode() for row, top in zip(values, order, strict=True) for i in top
    ]


def outputs_for(request: InferRequest, manifest: Manifest, result: np.ndarray) -> list[OutputTensor]:
    """The output tensors the request asked for (all of them, by default), from the model's answer."""
    asked = request.outputs or [OutputRequest(manifest.output.name)]
    tensors = []
    for out in asked:
        binary = request.binary_output if out.binary is None else out.binary
        if out.classification:
            assert manifest.labels is not None
            strings = classify(result, out.classification, manifest.labels)
            tensors.append(OutputTensor(out.name, BYTES, (len(result), out.classification), strings, binary))
        else:
            tensors.append(OutputTensor(out.name, FP32, tuple(result.shape), result.astype("<f4"), binary))
    return tensors


def encode_response(
    model: str, version: str, request_id: str | None, outputs: list[OutputTensor]
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary tensors follow it (else None)."""
    header: dict[str, Any] = {"model_name": model, "model_version": version}
    if request_id is not None:
        header["id"] = request_id
    docs, blobs = [], []
    for out in outputs:
        doc: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": list(out.shape)}
        if out.binary:
            raw = out.data.tobytes() if isinstance(out.data, np.ndarray) else serialize_bytes(out.data)
            doc["parameters"] = {BINARY_SIZE: len(raw)}
            blobs.append(raw)
        elif isinstance(out.data, np.ndarray):
            doc["data"] = out.data.ravel().tolist()
        else:
            doc["data"] = [b.decode() for b in out.data]
        docs.append(doc)
    header["outputs"] = docs
    text = json.dumps(header, separators=(",", ":")).encode()
    if not blobs:
        return text, None
    return text + b"".join(blobs), len(text)
