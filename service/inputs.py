"""Turn HTTP bodies into model-ready arrays, rejecting bad input with a precise 4xx before it reaches a batch.

This runs in the HTTP server processes, so one broken request never shares a model call with good ones. The
usual bodies (small images, up to a few hundred KB of JSON or multipart) are handled on the event loop, image by
image with a turn of the loop every `LOOP_SLICE_S`; large ones (big images, big bodies) in a small thread pool, so
that no single step holds the loop long. All of it is bounded before it starts: image sizes are read from the
headers and refused above the limits, and only formats whose header carries the size that will be decoded are
opened at all.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import os
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from models import ImagePreprocessing, SeriesSpec
from models.preprocessing import to_pixels
from service.config import Settings
from service.dataplane import LOOP_SLICE_S
from service.errors import ApiError

T = TypeVar("T")

# PIL's own bomb guard warns, then raises at twice its limit; nnserve checks its configured limits itself, from
# the header, before anything is decoded.
Image.MAX_IMAGE_PIXELS = None

# Formats whose header gives the size that will be decoded, and whose opening decodes nothing. Others are refused
# unopened: ICO, for one, decodes its frame while opening, so a 995 KB ICO around a 16000x16000 PNG took 3.4 s
# and 1.5 GB before any size check could run.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
ACCEPTED_NAMES = "PNG, JPEG, WebP, GIF (first frame) or BMP"

IMAGE_TYPES = ("image/", "application/octet-stream")

# What decoders raise on broken data (Pillow's own errors are OSError, SyntaxError or ValueError subclasses).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError)

# Images this small are opened and decoded on the event loop: a thread hop costs more than the work, and the GIL
# passed between the loop and the pool costs more still (see `LOOP_SLICE_S` for what the loop gained). 8 KB holds
# a CIFAR-10 PNG three times over, and opening it costs at most a few ms even when crafted (PNG text chunks, which
# Pillow inflates while opening, up to 1 MB per KB); 64 Kpx decode in about 0.5 ms (RGB, 130 Mpx/s measured). A
# request holding a larger image goes to the pool whole.
INLINE_BYTES = 8 * 1024
INLINE_PIXELS = 256 * 256
# JSON and multipart bodies up to this size are parsed on the loop: 64 CIFAR-10 PNGs took 0.13 ms as JSON (197
# KB; their base64 0.42 ms more) and 0.86 ms as multipart (155 KB). Larger ones cost more: Starlette's own form
# parser spent 46 ms on the loop for one 9 MB part.
INLINE_PARSE_BYTES = 512 * 1024

_pool: ThreadPoolExecutor | None = None
_pool_pid = 0


def _executor(threads: int) -> ThreadPoolExecutor:
    """This process's decode pool, made on first use.

    The HTTP server processes are forked from the main one, and a pool made before a fork has no threads in the
    child: each process makes its own. Pillow releases the GIL while it decodes and resizes, so the event loop
    keeps answering while the pool works.
    """
    global _pool, _pool_pid
    if _pool is None or _pool_pid != os.getpid():
        _pool = ThreadPoolExecutor(threads, thread_name_prefix="nnserve-decode")
        _pool_pid = os.getpid()
    return _pool


async def _run(work: Callable[[], T], threads: int, inline: bool) -> T:
    if inline:
        return work()
    return await asyncio.get_running_loop().run_in_executor(_executor(threads), work)


async def _each(work: Callable[[int, Any], T], items: list[Any]) -> list[T]:
    """`work(index, item)` for every item, on the event loop, with a turn of the loop every `LOOP_SLICE_S`."""
    done = []
    start = time.perf_counter()
    for i, item in enumerate(items):
        done.append(work(i, item))
        if time.perf_counter() - start > LOOP_SLICE_S:
            await asyncio.sleep(0)
            start = time.perf_counter()
    return done


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
    if not body:
        raise ApiError(400, "empty_body", "the request body is empty")
    return body


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except RecursionError:
        raise ApiError(400, "invalid_json", "the JSON body is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:  # ValueError: also integers of more than 4300 digits
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {e}") from None


def _check_count(n: int, limit: int) -> None:
    if n == 0:
        raise ApiError(400, "invalid_request", "the request holds no items")
    if n > limit:
        raise ApiError(413, "too_many_items", f"{n} items in one request; the limit is {limit}")


def multipart_files(body: bytes, content_type: str, max_items: int) -> list[bytes]:
    """The contents of a multipart/form-data body's file parts, in order; parts without a filename are skipped.

    Parsed in one pass over the bytes already read, with python-multipart (the parser Starlette uses), minus
    Starlette's copying into temporary files and its event-loop round trips.
    """
    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise ApiError(400, "invalid_request", "malformed multipart body: the Content-Type names no boundary")
    files: list[bytes] = []
    fields = 0
    chunks: list[bytes] = []
    header: dict[str, bytearray] = {"field": bytearray(), "value": bytearray()}
    state = {"file": False, "ended": False}

    def on_part_begin() -> None:
        chunks.clear()
        state["file"] = False

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["file"]:
            chunks.append(data[start:end])

    def on_header_end() -> None:
        if header["field"].lower() == b"content-disposition":
            state["file"] = b"filename" in parse_options_header(bytes(header["value"]))[1]
        header["field"].clear()
        header["value"].clear()

    def on_part_end() -> None:
        nonlocal fields
        if state["file"]:
            files.append(b"".join(chunks))
        else:
            fields += 1
        if len(files) > max_items or fields > max_items:
            raise ApiError(413, "too_many_items", f"more than {max_items} items in one request")

    def on_end() -> None:
        state["ended"] = True

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": lambda data, start, end: header["field"].extend(data[start:end]),
            "on_header_value": lambda data, start, end: header["value"].extend(data[start:end]),
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_end": on_end,
        },
    )
    try:
        parser.write(body)
    except MultipartParseError as e:
        raise ApiError(400, "invalid_request", f"malformed multipart body: {e}") from None
    if not state["ended"]:
        raise ApiError(400, "invalid_request", "malformed multipart body: it ends before its closing boundary")
    _check_count(len(files), max_items)
    return files


# An item before decoding: encoded image bytes, or validated uint8 pixels (HxW or HxWxC) from a JSON array.
Item = bytes | np.ndarray


class ImageDecoder:
    """All images of a request as the manifest's uint8 pixels, plus the validated top_k."""

    def __init__(self, spec: ImagePreprocessing, labels: int, settings: Settings) -> None:
        self.spec = spec
        self.labels = labels
        self.channels = 1 if spec.color_mode == "L" else 3
        self.max_items = settings.max_items_per_request
        self.max_image_pixels = settings.max_image_pixels
        self.max_request_pixels = settings.max_request_pixels
        self.threads = settings.decode_threads

    async def parse(self, request: Request, body: bytes) -> tuple[np.ndarray, int]:
        """uint8 [N, C, H, W] and top_k (the JSON body's option, else `?top_k=`, else 3)."""
        top_k: Any = request.query_params.get("top_k", min(3, self.labels))
        kind = media_type(request)
        if kind.startswith(IMAGE_TYPES):
            items: list[Item] = [body]
        elif kind == "multipart/form-data":
            split = partial(multipart_files, body, request.headers["content-type"], self.max_items)
            items = list(await _run(split, self.threads, inline=len(body) <= INLINE_PARSE_BYTES))
        elif kind == "application/json":
            doc = await _run(lambda: parse_json(body), self.threads, inline=len(body) <= INLINE_PARSE_BYTES)
            if not isinstance(doc, dict) or not isinstance(doc.get("instances"), list):
                raise ApiError(400, "invalid_request", 'expected a JSON object {"instances": [...]}')
            _check_count(len(doc["instances"]), self.max_items)
            if doc.get("top_k") is not None:
                top_k = doc["top_k"]
            instances = doc["instances"]
            items = await _run(lambda: self._instances(instances), self.threads, inline=len(body) <= INLINE_PARSE_BYTES)
        else:
            raise ApiError(
                415,
                "unsupported_media_type",
                f"content type {kind or '(none)'!r} is not accepted: send image/*, multipart/form-data or "
                "application/json",
            )
        top_k = self._top_k(top_k)  # before decoding: a wrong parameter costs nothing
        return await self.decode(items), top_k

    async def decode(self, items: list[Item]) -> np.ndarray:
        """Open every item's header, refuse what is over the limits, then decode: on the loop when every image is
        small, else in the pool."""
        _check_count(len(items), self.max_items)
        if any(isinstance(i, bytes) and len(i) > INLINE_BYTES for i in items):
            return await _run(lambda: self._load_all(self._open_all(items)), self.threads, inline=False)
        opened = list(zip(items, await _each(lambda i, item: self._open(item, i), items), strict=True))
        self._check_total(opened)
        if all(_pixels(image) <= INLINE_PIXELS for _, image in opened):
            return np.stack(await _each(lambda i, pair: self._load(*pair, i), opened))
        return await _run(lambda: self._load_all(opened), self.threads, inline=False)

    def _open_all(self, items: list[Item]) -> list[tuple[Item, Image.Image | np.ndarray]]:
        opened = [(item, self._open(item, i)) for i, item in enumerate(items)]
        self._check_total(opened)
        return opened

    def _check_total(self, opened: list[tuple[Item, Image.Image | np.ndarray]]) -> None:
        total = sum(_pixels(i) for _, i in opened)
        if total > self.max_request_pixels:
            raise ApiError(
                413,
                "too_many_pixels",
                f"the request's images hold {total} pixels; the limit is {self.max_request_pixels} per request",
            )

    def _open(self, item: Item, index: int) -> Image.Image | np.ndarray:
        """The item with only its header read; its size checked against the per-image limit."""
        if isinstance(item, np.ndarray):
            self._check_size(item.shape[1], item.shape[0], index)
            return item
        if not item:
            raise ApiError(400, "invalid_image", f"item {index}: the image is empty")
        try:
            image = Image.open(io.BytesIO(item), formats=ACCEPTED_FORMATS)
        except UnidentifiedImageError:
            raise ApiError(400, "invalid_image", f"item {index}: not a {ACCEPTED_NAMES} image") from None
        except DECODE_ERRORS as e:
            raise ApiError(400, "invalid_image", f"item {index}: not a readable image ({e})") from None
        self._check_size(image.width, image.height, index)
        return image

    def _check_size(self, width: int, height: int, index: int) -> None:
        if width * height > self.max_image_pixels:
            raise ApiError(
                413,
                "image_too_large",
                f"item {index}: {width}x{height} pixels exceeds the limit of {self.max_image_pixels} pixels",
            )

    def _load_all(self, opened: list[tuple[Item, Image.Image | np.ndarray]]) -> np.ndarray:
        return np.stack([self._load(item, image, i) for i, (item, image) in enumerate(opened)])

    def _load(self, item: Item, image: Image.Image | np.ndarray, index: int) -> np.ndarray:
        if isinstance(image, np.ndarray):
            return to_pixels(Image.fromarray(image), self.spec)
        try:
            if image.format == "PNG":
                _check_png_chunks(item)
            return to_pixels(image, self.spec)
        except DECODE_ERRORS as e:
            raise ApiError(400, "invalid_image", f"item {index}: not a decodable image ({e})") from None

    def _instances(self, instances: list[Any]) -> list[Item]:
        return [self._instance(i, x) for i, x in enumerate(instances)]

    def _instance(self, index: int, item: Any) -> Item:
        if isinstance(item, dict) and isinstance(item.get("b64"), str):
            try:
                return base64.b64decode(item["b64"], validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, "invalid_image", f"instance {index}: b64 is not valid base64") from None
        if isinstance(item, list):
            return self._pixels(index, item)
        raise ApiError(400, "invalid_request", f'instance {index}: expected {{"b64": "..."}} or a pixel array')

    @staticmethod
    def _pixels(index: int, rows: list) -> np.ndarray:
        try:
            pixels = np.asarray(rows, dtype=np.float64)
        except (ValueError, TypeError, OverflowError, RecursionError):
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
        if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 255:
            raise ApiError(400, "invalid_request", f"instance {index}: pixel values must be finite numbers in 0..255")
        return pixels.round().astype(np.uint8)

    def _top_k(self, value: Any) -> int:
        digits = isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 9  # ?top_k=5
        whole = isinstance(value, float) and value.is_integer()  # 3.0, never inf or NaN
        if digits or whole:
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= self.labels:
            raise ApiError(422, "invalid_parameter", f"top_k must be an integer from 1 to {self.labels}")
        return value


def _check_png_chunks(png: bytes) -> None:
    """Every chunk whole, its CRC right, up to IEND. Pillow stops once every row is decoded, so a PNG missing its
    end (the last IDAT's checksum, IEND) or with a flipped byte in its data would pass. Pillow's own verify()
    does this walk too, but opens the file again first: 11-14 us per image against 1.5-2 us here, measured on
    MNIST and CIFAR-10 PNGs (whose decoding costs 21 and 61 us)."""
    view, pos, end = memoryview(png), 8, len(png)
    while pos + 12 <= end:
        length = int.from_bytes(view[pos : pos + 4])
        data_end = pos + 8 + length
        if data_end + 4 > end:
            raise SyntaxError(f"PNG chunk at byte {pos} runs past the end of the file (truncated)")
        if zlib.crc32(view[pos + 4 : data_end]) != int.from_bytes(view[data_end : data_end + 4]):
            raise SyntaxError(f"PNG chunk {bytes(view[pos + 4 : pos + 8])!r} at byte {pos} fails its CRC")
        if view[pos + 4 : pos + 8] == b"IEND":
            return
        pos = data_end + 4
    raise SyntaxError("PNG ends before its IEND chunk (truncated)")


def _pixels(image: Image.Image | np.ndarray) -> int:
    if isinstance(image, np.ndarray):
        return image.shape[0] * image.shape[1]
    return image.width * image.height


class SeriesParser:
    """Validate `{"series": [...], "horizon": H}` objects (one or a list) against the model's contract."""

    def __init__(self, spec: SeriesSpec, settings: Settings) -> None:
        self.spec = spec
        self.max_items = settings.max_items_per_request
        self.threads = settings.decode_threads

    async def parse(self, request: Request, body: bytes) -> list[tuple[np.ndarray, int]]:
        """(float32 history, horizon) per series; a history over `max_history` keeps its most recent values."""
        if media_type(request) not in ("application/json", ""):
            raise ApiError(415, "unsupported_media_type", "send application/json")
        return await _run(lambda: self._parse(body), self.threads, inline=len(body) <= INLINE_PARSE_BYTES)

    def _parse(self, body: bytes) -> list[tuple[np.ndarray, int]]:
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
        try:
            series = np.asarray(values, dtype=np.float64)
        except OverflowError:
            raise ApiError(422, "invalid_series", f"item {index}: series holds an integer beyond float range") from None
        if not np.isfinite(series).all():
            raise ApiError(422, "invalid_series", f"item {index}: series holds NaN or Infinity")
        if len(series) < spec.min_history:
            raise ApiError(
                422,
                "invalid_series",
                f"item {index}: series of {len(series)} values; this model needs at least {spec.min_history}",
            )
        horizon = obj.get("horizon", spec.horizon)
        if not isinstance(horizon, int) or isinstance(horizon, bool) or not 1 <= horizon <= spec.horizon:
            raise ApiError(422, "invalid_horizon", f"item {index}: horizon must be an integer from 1 to {spec.horizon}")
        recent = series[-spec.max_history :]  # the model looks back max_history values at most
        if np.abs(recent).max() > np.finfo(np.float32).max:
            raise ApiError(422, "invalid_series", f"item {index}: series values overflow float32")
        return recent.astype(np.float32), horizon
