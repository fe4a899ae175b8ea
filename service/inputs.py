"""Turn HTTP bodies into model-ready arrays, rejecting bad input with a precise 4xx before it reaches a batch.

This runs in the HTTP server processes, so one broken request never shares a model call with good ones.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from models import ImagePreprocessing, SeriesSpec
from service.errors import ApiError

# PIL's own bomb guard warns, then raises at twice its limit; nnserve checks its configured limit itself.
Image.MAX_IMAGE_PIXELS = None

IMAGE_TYPES = ("image/", "application/octet-stream")


async def read_body(request: Request, limit: int) -> bytes:
    """Read the whole body, refusing more than `limit` bytes even when no Content-Length was sent."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "payload_too_large", f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "payload_too_large", f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # lets Starlette parse a form from the bytes already read
    if not body:
        raise ApiError(400, "empty_body", "the request body is empty")
    return body


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {e}") from None


def _check_count(n: int, limit: int) -> None:
    if n == 0:
        raise ApiError(400, "invalid_request", "the request holds no items")
    if n > limit:
        raise ApiError(413, "too_many_items", f"{n} items in one request; the limit is {limit}")


class ImageDecoder:
    """Decode any image to the manifest's color mode and size, as uint8 CHW."""

    def __init__(self, spec: ImagePreprocessing, max_pixels: int, max_items: int) -> None:
        self.spec = spec
        self.max_pixels = max_pixels
        self.max_items = max_items
        self.channels = 1 if spec.color_mode == "L" else 3

    async def parse(self, request: Request, body: bytes) -> tuple[np.ndarray, dict[str, Any]]:
        """All images of one request as a uint8 [n, C, H, W] array, plus JSON options if any."""
        kind = media_type(request)
        if kind.startswith(IMAGE_TYPES):
            return self.decode_many([body]), {}
        if kind == "multipart/form-data":
            try:
                form = await request.form(max_files=self.max_items, max_fields=self.max_items)
            except HTTPException as e:  # Starlette's verdict on the multipart body
                if str(e.detail).startswith("Too many"):
                    raise ApiError(413, "too_many_items", f"more than {self.max_items} items in one request") from None
                raise ApiError(400, "invalid_request", f"malformed multipart body: {e.detail}") from None
            files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
            _check_count(len(files), self.max_items)
            return self.decode_many([await f.read() for f in files]), {}
        if kind == "application/json":
            doc = parse_json(body)
            if not isinstance(doc, dict) or not isinstance(doc.get("instances"), list):
                raise ApiError(400, "invalid_request", 'expected a JSON object {"instances": [...]}')
            instances = doc["instances"]
            _check_count(len(instances), self.max_items)
            options = {k: v for k, v in doc.items() if k != "instances"}
            return np.stack([self._instance(i, x) for i, x in enumerate(instances)]), options
        raise ApiError(
            415,
            "unsupported_media_type",
            f"content type {kind or '(none)'!r} is not accepted: send image/*, multipart/form-data or application/json",
        )

    def decode_many(self, blobs: list[bytes]) -> np.ndarray:
        _check_count(len(blobs), self.max_items)
        return np.stack([self.decode(b, i) for i, b in enumerate(blobs)])

    def decode(self, blob: bytes, index: int = 0) -> np.ndarray:
        if not blob:
            raise ApiError(400, "invalid_image", f"item {index}: the image is empty")
        try:
            image = Image.open(io.BytesIO(blob))
            self._check_size(image.width, image.height, index)
            image.draft(self.spec.color_mode, (self.spec.width, self.spec.height))  # cheap JPEG downscale
            image.load()
        except ApiError:
            raise
        except UnidentifiedImageError:
            raise ApiError(400, "invalid_image", f"item {index}: not an image in a format nnserve reads") from None
        except (OSError, ValueError, SyntaxError) as e:
            raise ApiError(400, "invalid_image", f"item {index}: not a decodable image ({e})") from None
        return self._to_array(image)

    def _instance(self, index: int, item: Any) -> np.ndarray:
        if isinstance(item, dict) and isinstance(item.get("b64"), str):
            try:
                blob = base64.b64decode(item["b64"], validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, "invalid_image", f"instance {index}: b64 is not valid base64") from None
            return self.decode(blob, index)
        if isinstance(item, list):
            return self._pixels(index, item)
        raise ApiError(400, "invalid_request", f'instance {index}: expected {{"b64": "..."}} or a pixel array')

    def _pixels(self, index: int, rows: list) -> np.ndarray:
        try:
            pixels = np.asarray(rows, dtype=np.float64)
        except (ValueError, TypeError):
            raise ApiError(
                400, "invalid_request", f"instance {index}: pixel rows must be equal-length numbers"
            ) from None
        if pixels.ndim == 3 and pixels.shape[2] == 1:
            pixels = pixels[:, :, 0]
        if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (3, 4)) or 0 in pixels.shape:
            raise ApiError(
                400,
                "invalid_request",
                f"instance {index}: pixel array of shape {list(pixels.shape)}; expected HxW or HxWxC, C in 1,3,4",
            )
        self._check_size(pixels.shape[1], pixels.shape[0], index)
        if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 255:
            raise ApiError(400, "invalid_request", f"instance {index}: pixel values must be finite numbers in 0..255")
        return self._to_array(Image.fromarray(pixels.round().astype(np.uint8)))

    def _check_size(self, width: int, height: int, index: int) -> None:
        if width * height > self.max_pixels:
            raise ApiError(
                413,
                "image_too_large",
                f"item {index}: {width}x{height} pixels exceeds the limit of {self.max_pixels} pixels",
            )

    def _to_array(self, image: Image.Image) -> np.ndarray:
        if image.mode != self.spec.color_mode:
            image = image.convert(self.spec.color_mode)
        size = (self.spec.width, self.spec.height)
        if image.size != size:
            image = image.resize(size, Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
        return array[None] if self.channels == 1 else array.transpose(2, 0, 1)


class SeriesParser:
    """Validate `{"series": [...], "horizon": H}` objects (one or a list) against the model's contract."""

    def __init__(self, spec: SeriesSpec, max_items: int) -> None:
        self.spec = spec
        self.max_items = max_items

    def parse(self, request: Request, body: bytes) -> list[tuple[np.ndarray, int]]:
        if media_type(request) not in ("application/json", ""):
            raise ApiError(415, "unsupported_media_type", "send application/json")
        doc = parse_json(body)
        objects = doc if isinstance(doc, list) else [doc]
        _check_count(len(objects), self.max_items)
        return [self._one(i, obj) for i, obj in enumerate(objects)]

    def _one(self, index: int, obj: Any) -> tuple[np.ndarray, int]:
        spec = self.spec
        if not isinstance(obj, dict) or not isinstance(obj.get("series"), list):
            raise ApiError(400, "invalid_request", f'item {index}: expected {{"series": [numbers], "horizon": int}}')
        values = obj["series"]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            raise ApiError(422, "invalid_series", f"item {index}: series values must be numbers")
        if not all(math.isfinite(v) for v in values):
            raise ApiError(422, "invalid_series", f"item {index}: series holds NaN or Infinity")
        if not spec.min_history <= len(values) <= spec.max_history:
            raise ApiError(
                422,
                "invalid_series",
                f"item {index}: series of {len(values)} values; this model needs "
                f"{spec.min_history} to {spec.max_history}",
            )
        horizon = obj.get("horizon", spec.horizon)
        if not isinstance(horizon, int) or isinstance(horizon, bool) or not 1 <= horizon <= spec.horizon:
            raise ApiError(422, "invalid_horizon", f"item {index}: horizon must be an integer from 1 to {spec.horizon}")
        series = np.asarray(values, dtype=np.float32)
        if not np.isfinite(series).all():
            raise ApiError(422, "invalid_series", f"item {index}: series values overflow float32")
        return series, horizon
