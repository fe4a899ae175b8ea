"""Real client payloads and the request bytes built from them, once, before any load runs.

Every system under test gets the same images and series. A request shape says how many items one request
carries and in which envelope: a raw image body, a multipart form, JSON with base64 images, or series JSON.
A system that cannot take an envelope (the LitServe floor parses every non-form body as JSON) gets the JSON
form of the same images instead; `bench/README.md` says where that happens.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from models import ImagePreprocessing, Manifest, preprocess

# How a request carries its items. Another protocol (say the Open Inference Protocol's JSON tensors) is one
# more envelope here, built in `build_requests`, and, if it is not HTTP/1.1, one more client kind in loadgen.
# v2-binary: the Open Inference Protocol's infer request with a BYTES tensor of PNG files in the binary tensor
# extension, encoded by tritonclient itself (what `tritonclient.http` sends by default).
Envelope = Literal["raw", "multipart", "json-b64", "series", "v2-binary"]
BOUNDARY = "nnserve-bench-boundary"
SERIES_YEAR = "2015"


@dataclass(frozen=True)
class Shape:
    """One kind of request: `items` images (or one series) per request in `envelope`."""

    name: str
    items: int
    envelope: Envelope
    concurrency: tuple[int, ...]  # the closed-loop concurrencies a full run measures it at

    @property
    def images(self) -> bool:
        return self.envelope != "series"

    @property
    def multi(self) -> bool:
        return self.items > 1


SINGLE_CONCURRENCY = (1, 8, 32, 64, 256)
# 64 images per request at c=256 is 16,384 images in flight: an overload test, not a shape a client sends.
MULTI_CONCURRENCY = (8, 32, 64)
SHAPES = {
    s.name: s
    for s in (
        Shape("x1", 1, "raw", SINGLE_CONCURRENCY),
        Shape("x8-multipart", 8, "multipart", MULTI_CONCURRENCY),
        Shape("x8-json", 8, "json-b64", MULTI_CONCURRENCY),
        Shape("x64-multipart", 64, "multipart", MULTI_CONCURRENCY),
        Shape("x64-json", 64, "json-b64", MULTI_CONCURRENCY),
        Shape("series", 1, "series", SINGLE_CONCURRENCY),
        Shape("v2-x1", 1, "v2-binary", SINGLE_CONCURRENCY[:-1]),
        Shape("v2-x64", 64, "v2-binary", MULTI_CONCURRENCY),
    )
}
V1_SHAPES = tuple(name for name, shape in SHAPES.items() if shape.envelope != "v2-binary")


def default_data_dir() -> Path:
    """$NNSERVE_DATA_DIR, else ../shared/data beside the repository."""
    return Path(os.environ.get("NNSERVE_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format): big-endian magic with the dtype code and rank, the dims, then the data."""
    raw = path.read_bytes()
    if raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    rank = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=rank, offset=4).astype(int)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * rank).reshape(dims)


def png_bytes(pixels: np.ndarray) -> bytes:
    """uint8 pixels encoded as a PNG file, as a client would send them."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def mnist_pngs(data_dir: Path, count: int) -> list[bytes]:
    """The first `count` MNIST test digits, PNG-encoded as a client would send them."""
    images = read_idx(data_dir / "MNIST" / "raw" / "t10k-images-idx3-ubyte")
    return [png_bytes(pixels) for pixels in images[:count]]


def cifar_pngs(data_dir: Path, count: int) -> list[bytes]:
    """Up to `count` CIFAR-10 subset test images, classes interleaved so any prefix mixes classes."""
    folders = sorted(p for p in (data_dir / "cifar10-subset" / "test").iterdir() if p.is_dir())
    per_class = [sorted(f.glob("*.png")) for f in folders]
    ordered = [files[i] for i in range(max(map(len, per_class))) for files in per_class if i < len(files)]
    if not ordered:
        raise FileNotFoundError(f"no PNG under {data_dir / 'cifar10-subset' / 'test'}")
    return [p.read_bytes() for p in ordered[:count]]


def weather_windows(data_dir: Path, length: int, count: int) -> list[list[float]]:
    """Sliding windows of daily temp_max from the held-out year, the series a forecast client sends."""
    with open(data_dir / "timeseries" / "seattle-weather-daily.csv", newline="") as f:
        temps = [float(row["temp_max"]) for row in csv.DictReader(f) if row["date"].startswith(SERIES_YEAR)]
    windows = [temps[i : i + length] for i in range(len(temps) - length + 1)]
    if not windows:
        raise ValueError(f"fewer than {length} days in {SERIES_YEAR}")
    return windows[:count]


def series_length(manifest: Manifest, wanted: int = 30) -> int:
    """`wanted` days clamped to what the forecaster accepts."""
    assert manifest.series is not None
    return max(manifest.series.min_history, min(wanted, manifest.series.max_history))


def image_tensor(png: bytes, prep: ImagePreprocessing) -> np.ndarray:
    """The manifest's preprocessing of one encoded image, CHW float32, exactly as serving computes it."""
    with Image.open(io.BytesIO(png)) as image:
        return preprocess(image, prep)


def series_tensor(values: list[float], manifest: Manifest) -> np.ndarray:
    """One series shaped as the exported graph's input without its batch axis (T, or T x 1 for NTC)."""
    x = np.asarray(values, dtype=np.float32)
    return x[:, None] if len(manifest.input.shape) == 3 else x


def model_inputs(manifest: Manifest, images: list[bytes], series: list[list[float]]) -> np.ndarray:
    """The payloads as one float32 array of model inputs (N, ...), for the raw-model compute limit."""
    if manifest.preprocessing is not None:
        return np.stack([image_tensor(png, manifest.preprocessing) for png in images])
    return np.stack([series_tensor(s, manifest) for s in series])


def _http(path: str, port: int, content_type: str, body: bytes, extra: str = "") -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode("ascii") + body


def _json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _b64_instances(images: list[bytes]) -> bytes:
    return _json({"instances": [{"b64": base64.b64encode(png).decode("ascii")} for png in images]})


def _multipart(images: list[bytes]) -> bytes:
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename="{i}.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode("ascii")
        + png
        + b"\r\n"
        for i, png in enumerate(images)
    ]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode("ascii")


def build_requests(
    model: str, shape: Shape, images: list[bytes], series: list[list[float]], port: int, json_only: bool = False
) -> list[bytes]:
    """Complete HTTP/1.1 requests of one shape, cycling through the payloads; `json_only` sends images as JSON
    with base64 whatever the shape's envelope."""
    path = f"/v1/{model}/predict"
    if shape.envelope == "v2-binary":
        return [_v2_infer(model, group, port) for group in _groups(images, shape.items)]
    if shape.envelope == "series":
        return [_http(path, port, "application/json", _json({"series": w})) for w in series]
    groups = _groups(images, shape.items)
    envelope = "json-b64" if json_only else shape.envelope
    if envelope == "json-b64":
        return [_http(path, port, "application/json", _b64_instances(g)) for g in groups]
    if envelope == "raw":
        return [_http(path, port, "image/png", g[0]) for g in groups]
    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    return [_http(path, port, content_type, _multipart(g)) for g in groups]


def _groups(images: list[bytes], n: int) -> list[list[bytes]]:
    return [[images[(i + j) % len(images)] for j in range(n)] for i in range(0, len(images), n)]


def _v2_infer(model: str, images: list[bytes], port: int) -> bytes:
    from tritonclient.http import InferenceServerClient, InferInput, InferRequestedOutput

    tensor = InferInput("input", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=object), binary_data=True)
    body, json_size = InferenceServerClient.generate_request_body(
        [tensor], outputs=[InferRequestedOutput("output", binary_data=True)]
    )
    extra = f"Inference-Header-Content-Length: {json_size}\r\n" if json_size is not None else ""
    return _http(f"/v2/models/{model}/infer", port, "application/octet-stream", body, extra)


def v2_outputs(body: bytes, header_length: str) -> int:
    """How many rows the answer to a v2 infer request holds (read with tritonclient's own parser)."""
    from tritonclient.http import InferenceServerClient

    result = InferenceServerClient.parse_response_body(body, header_length=int(header_length))
    return len(result.as_numpy("output"))
