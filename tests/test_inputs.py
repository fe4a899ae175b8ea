"""Request parsing: the decoder and series parser on their own (no HTTP), then hostile bodies against a real server."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import resource
import struct
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import IcoImagePlugin, Image
from starlette.requests import Request

import models
from bench.server import _status_kb, process_tree
from service import inputs
from service.config import Settings
from service.errors import ApiError
from service.inputs import ImageDecoder, SeriesParser
from tests.data import cifar_test_pngs, mnist_test_pngs, weather
from tests.serving import RunningServer, running_server
from tests.test_service import assert_error, assert_still_serving

DIGITS = models.load(models.DEFAULT_ROOT, "digits").manifest
CIFAR = models.load(models.DEFAULT_ROOT, "cifar").manifest
SEQUENCE = models.load(models.DEFAULT_ROOT, "sequence").manifest


# --- crafted images -------------------------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@lru_cache(maxsize=4)
def flat_png(width: int, height: int, channels: int = 4) -> bytes:
    """A valid all-zero PNG of any size, written row block by row block: 16000x16000 RGBA (1 GB of pixels) is
    995 KB, and never needs a gigabyte here."""
    row = bytes(1 + width * channels)  # filter byte 0, then the pixels
    rows_per_block = max(1, 2**24 // len(row))
    deflate = zlib.compressobj(9)
    parts = []
    for start in range(0, height, rows_per_block):
        parts.append(deflate.compress(row * min(rows_per_block, height - start)))
    parts.append(deflate.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, {1: 0, 3: 2, 4: 6}[channels], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def ico_around(png: bytes) -> bytes:
    """An ICO file whose one frame is `png` (ICO allows PNG frames; width and height bytes 0 mean 256)."""
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 6 + 16)
    return header + entry + png


def ico_bomb() -> bytes:
    return ico_around(flat_png(16000, 16000))


def encoded(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def cifar_image(i: int = 0) -> Image.Image:
    return Image.open(io.BytesIO(cifar_test_pngs()[i][0])).convert("RGB")


@lru_cache(maxsize=1)
def flat_4096() -> bytes:
    """A single-colour 4096x4096 PNG: 16.8 Mpx, the largest single image the default settings take, in 25 KB."""
    return encoded(Image.new("L", (4096, 4096), 128), "PNG", optimize=True)


# --- the decoder with no HTTP -------------------------------------------------------------------------------


def request(body: bytes, content_type: str, query: str = "") -> Request:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [(b"content-type", content_type.encode())],
        "query_string": query.encode(),
    }
    return Request(scope, receive)


def multipart_body(blobs: list[bytes]) -> tuple[bytes, str]:
    built = httpx.Request("POST", "http://x", files=[("files", (f"{i}", b, "image/png")) for i, b in enumerate(blobs)])
    return built.read(), built.headers["content-type"]


def decoder(manifest: models.Manifest = CIFAR, **settings: Any) -> ImageDecoder:
    assert manifest.preprocessing is not None and manifest.labels is not None
    return ImageDecoder(manifest.preprocessing, len(manifest.labels), Settings(**settings))


def decode(dec: ImageDecoder, body: bytes, content_type: str = "image/png", query: str = "") -> tuple[np.ndarray, int]:
    return asyncio.run(dec.parse(request(body, content_type, query), body))


def refused(call: Callable[[], object], status: int, code: str) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call()
    assert (caught.value.status, caught.value.code) == (status, code), caught.value.message
    return caught.value


def test_real_images_become_the_models_pixels() -> None:
    for i, (blob, _) in enumerate(cifar_test_pngs()[:20]):
        x, top_k = decode(decoder(), blob)
        assert x.dtype == np.uint8 and x.shape == (1, 3, 32, 32) and top_k == 3
        np.testing.assert_array_equal(x[0], np.asarray(cifar_image(i)).transpose(2, 0, 1))
    digits = [b for b, _ in mnist_test_pngs(8)]
    body, kind = multipart_body(digits)
    x, _ = decode(decoder(DIGITS), body, kind, "top_k=5")
    assert x.shape == (8, 1, 28, 28)
    for got, blob in zip(x, digits, strict=True):
        np.testing.assert_array_equal(got[0], np.asarray(Image.open(io.BytesIO(blob))))


def test_accepted_formats_decode_and_gif_gives_its_first_frame() -> None:
    image = cifar_image()
    want = np.asarray(image).transpose(2, 0, 1).astype(int)
    lossless = {"PNG": {}, "WEBP": {"lossless": True}, "BMP": {}}
    for fmt, options in lossless.items():
        x, _ = decode(decoder(), encoded(image, fmt, **options))
        np.testing.assert_array_equal(x[0], want, err_msg=fmt)
    x, _ = decode(decoder(), encoded(image, "JPEG", quality=95))
    assert np.abs(x[0] - want).mean() < 4
    frames = [Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (32, 32), (20, 20, 220))]
    gif = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(gif)).n_frames == 2
    x, _ = decode(decoder(), gif)
    assert np.abs(x[0].reshape(3, -1).mean(axis=1) - [200, 30, 30]).max() < 8


def test_other_formats_are_refused_unopened_with_the_accepted_ones_named() -> None:
    image = cifar_image()
    for blob in (encoded(image, "TIFF"), encoded(image, "ICO"), b"hello, world"):
        error = refused(lambda b=blob: decode(decoder(), b), 400, "invalid_image")
        assert "PNG, JPEG, WebP, GIF (first frame) or BMP" in error.message


def test_ico_bomb_is_refused_without_decoding() -> None:
    bomb = ico_bomb()
    assert 900_000 < len(bomb) < 1_000_000 and IcoImagePlugin._accept(bomb[:4])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    start = time.perf_counter()
    refused(lambda: decode(decoder(), bomb), 400, "invalid_image")
    assert time.perf_counter() - start < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024  # decoded, it takes 1 GB


def test_huge_png_is_refused_from_its_header() -> None:
    bomb = flat_png(16000, 16000)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    error = refused(lambda: decode(decoder(), bomb), 413, "image_too_large")
    assert "16000x16000" in error.message
    assert time.perf_counter() - start < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024


def test_every_accepted_format_is_size_checked_before_decoding() -> None:
    """Half of each file is gone: decoding would fail (400), so a 413 means the header alone decided."""
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8))
    small = decoder(max_image_pixels=100 * 100)
    for fmt in ("PNG", "JPEG", "GIF", "BMP"):
        blob = encoded(noise, fmt)
        refused(lambda b=blob: decode(small, b[: len(b) // 2]), 413, "image_too_large")
        refused(lambda b=blob: decode(decoder(), b[: len(b) // 2]), 400, "invalid_image")
    webp = encoded(noise, "WEBP")  # WebP's container is read whole when opened, so it is sent whole
    refused(lambda: decode(small, webp), 413, "image_too_large")
    # A GIF's frame may be larger than its declared screen: the size that counts is the one that will be decoded.
    screen_1x1 = bytearray(encoded(Image.new("L", (300, 300)), "GIF"))
    screen_1x1[6:10] = struct.pack("<HH", 1, 1)
    refused(lambda: decode(small, bytes(screen_1x1)), 413, "image_too_large")


def test_truncated_images_are_invalid() -> None:
    image = cifar_image()
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP"):
        blob = encoded(image, fmt)
        decode(decoder(), blob)
        refused(lambda b=blob: decode(decoder(), b[:-20]), 400, "invalid_image")
    png = encoded(image, "PNG")
    corrupt = png[:-30] + bytes([png[-30] ^ 0xFF]) + png[-29:]  # a flipped byte in the last IDAT
    refused(lambda: decode(decoder(), corrupt), 400, "invalid_image")


def test_request_pixels_are_bounded_before_decoding() -> None:
    body, kind = multipart_body([flat_4096()] * 96)  # 1.6 Gpx: decoded, some 4 s of CPU
    start = time.perf_counter()
    error = refused(lambda: decode(decoder(), body, kind), 413, "too_many_pixels")
    assert "1610612736 pixels" in error.message
    assert time.perf_counter() - start < 2.0
    blob = encoded(cifar_image(), "PNG")
    three, kind = multipart_body([blob] * 3)
    assert decode(decoder(max_request_pixels=3 * 32 * 32), three, kind)[0].shape == (3, 3, 32, 32)
    four, kind = multipart_body([blob] * 4)
    refused(lambda: decode(decoder(max_request_pixels=3 * 32 * 32), four, kind), 413, "too_many_pixels")
    pixels = json.dumps({"instances": [np.zeros((32, 32), int).tolist()] * 4}).encode()
    refused(lambda: decode(decoder(max_request_pixels=3 * 32 * 32), pixels, "application/json"), 413, "too_many_pixels")


def test_small_images_decode_on_the_loop_and_large_ones_in_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []
    real = inputs.to_pixels

    def spy(image: Image.Image, spec: models.ImagePreprocessing) -> np.ndarray:
        threads.append(threading.current_thread().name)
        return real(image, spec)

    monkeypatch.setattr(inputs, "to_pixels", spy)
    here = threading.current_thread().name
    digits = [b for b, _ in mnist_test_pngs(64)]
    decode(decoder(DIGITS), digits[0])
    body, kind = multipart_body(digits)
    decode(decoder(DIGITS), body, kind)
    assert threads == [here] * 65
    threads.clear()
    decode(decoder(DIGITS), encoded(Image.new("L", (1024, 1024), 7), "PNG"))  # 1 Mpx in 1 KB
    noise = np.random.default_rng(0).integers(0, 256, (128, 128), dtype=np.uint8)
    small, large = encoded(Image.fromarray(noise[:64, :64]), "PNG"), encoded(Image.fromarray(noise), "PNG")
    assert len(small) < inputs.INLINE_BYTES < len(large)
    decode(decoder(DIGITS), small)
    decode(decoder(DIGITS), large)
    body, kind = multipart_body([*digits, encoded(Image.new("L", (1024, 1024), 7), "PNG")])
    decode(decoder(DIGITS), body, kind)  # one large image takes the whole request to the pool
    assert threads[1] == here
    assert [t.startswith("nnserve-decode") for t in threads] == [True, False, True] + [True] * 65


def test_work_on_the_loop_lets_it_turn_every_slice() -> None:
    """Images decoded on the event loop are decoded a slice of time at a time, with a turn of the loop between."""
    events: list[str] = []

    def work(index: int, item: int) -> int:
        events.append("item")
        time.sleep(inputs.LOOP_SLICE_S / 3)
        return item * 2

    async def ticker() -> None:
        while True:
            events.append("tick")
            await asyncio.sleep(0)

    async def scenario() -> list[int]:
        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        done = await inputs._each(work, list(range(12)))
        tick.cancel()
        return done

    assert asyncio.run(scenario()) == [2 * i for i in range(12)]
    runs = "".join("i" if e == "item" else "t" for e in events).strip("t").split("t")
    assert len([r for r in runs if r]) >= 3 and all(len(r) <= 4 for r in runs), events


def test_multipart_keeps_file_parts_in_order_and_refuses_malformed_bodies() -> None:
    digits = [b for b, _ in mnist_test_pngs(3)]
    built = httpx.Request(
        "POST",
        "http://x",
        data={"note": "not a file"},
        files=[("a", ("0.png", digits[0])), ("b", ("1.png", digits[1]))],
    )
    body, kind = built.read(), built.headers["content-type"]
    assert inputs.multipart_files(body, kind, 2) == digits[:2]
    assert decode(decoder(DIGITS), body, kind)[0].shape == (2, 1, 28, 28)
    refused(lambda: decode(decoder(DIGITS, max_items_per_request=1), body, kind), 413, "too_many_items")
    refused(lambda: decode(decoder(DIGITS), body[:-10], kind), 400, "invalid_request")  # no closing boundary
    refused(lambda: decode(decoder(DIGITS), body, "multipart/form-data"), 400, "invalid_request")  # no boundary
    fields_only = httpx.Request("POST", "http://x", data={"a": "1"}, files=[("f", ("x", b""))])
    refused(
        lambda: decode(decoder(DIGITS), fields_only.read(), fields_only.headers["content-type"]), 400, "invalid_image"
    )


def test_top_k_from_json_or_query() -> None:
    blob = cifar_test_pngs()[0][0]
    b64 = {"instances": [{"b64": base64.b64encode(blob).decode()}]}
    assert decode(decoder(), blob, query="top_k=10")[1] == 10
    assert decode(decoder(), json.dumps({**b64, "top_k": 2}).encode(), "application/json", "top_k=9")[1] == 2
    assert decode(decoder(), json.dumps({**b64, "top_k": 4.0}).encode(), "application/json")[1] == 4
    assert decode(decoder(), json.dumps({**b64, "top_k": None}).encode(), "application/json", "top_k=7")[1] == 7
    for query in ("top_k=0", "top_k=11", "top_k=abc", "top_k=-1", "top_k=1e400", "top_k=" + "9" * 5000):
        refused(lambda q=query: decode(decoder(), blob, query=q), 422, "invalid_parameter")
    for value in (b"1e400", b"-1e400", b"true", b'"3"x', b"2.5", b"9" * 400, b"[3]"):
        body = b'{"instances": [{"b64": "' + b64["instances"][0]["b64"].encode() + b'"}], "top_k": ' + value + b"}"
        status = 400 if value == b'"3"x' else 422
        refused(
            lambda b=body: decode(decoder(), b, "application/json"),
            status,
            "invalid_json" if status == 400 else "invalid_parameter",
        )


def test_hostile_json_gets_a_clear_error() -> None:
    deep = b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    refused(lambda: decode(decoder(), deep, "application/json"), 400, "invalid_json")
    huge_int = b'{"instances": [[[' + b"9" * 5000 + b"]]]}"
    refused(lambda: decode(decoder(), huge_int, "application/json"), 400, "invalid_json")
    beyond_float = b'{"instances": [[[' + b"9" * 400 + b"]]]}"
    refused(lambda: decode(decoder(), beyond_float, "application/json"), 400, "invalid_request")
    deep_pixels = b'{"instances": [' + b"[" * 500 + b"1" + b"]" * 500 + b"]}"
    refused(lambda: decode(decoder(), deep_pixels, "application/json"), 400, "invalid_request")


# --- the series parser ----------------------------------------------------------------------------------------


def series(body: bytes, content_type: str = "application/json") -> list[tuple[np.ndarray, int]]:
    assert SEQUENCE.series is not None
    return asyncio.run(SeriesParser(SEQUENCE.series, Settings()).parse(request(body, content_type), body))


def test_series_are_parsed_and_long_histories_keep_their_most_recent_values() -> None:
    spec = SEQUENCE.series
    assert spec is not None
    temps = weather()[1]  # 2012-2015, four years of days
    body = json.dumps([{"series": temps[:30].tolist(), "horizon": 3}, {"series": temps.tolist()}]).encode()
    (first, h1), (second, h2) = series(body)
    assert (h1, h2) == (3, spec.horizon)
    np.testing.assert_array_equal(first, temps[:30])
    assert len(temps) > spec.max_history and second.dtype == np.float32
    np.testing.assert_array_equal(second, temps[-spec.max_history :])


def test_hostile_series_get_a_clear_error() -> None:
    cases = {
        b"[" * 100_000 + b"]" * 100_000: (400, "invalid_json"),
        b'{"series": [' + b"9" * 5000 + b"]}": (400, "invalid_json"),
        b'{"series": [' + b"1.5, " * 30 + b"9" * 400 + b"]}": (422, "invalid_series"),
        b'{"series": [' + b"1.5, " * 30 + b"1e400]}": (422, "invalid_series"),
        b'{"series": [' + b"1.5, " * 30 + b"1e300]}": (422, "invalid_series"),  # beyond float32
        b'{"series": [' + b"1.5, " * 30 + b'[1]], "horizon": 3}': (422, "invalid_series"),
        b'{"series": [' + b"1.5, " * 30 + b'1], "horizon": 1e400}': (422, "invalid_horizon"),
        b'{"series": [' + b"1.5, " * 30 + b'1], "horizon": ' + b"9" * 400 + b"}": (422, "invalid_horizon"),
        b'{"series": []}': (422, "invalid_series"),
    }
    for body, (status, code) in cases.items():
        refused(lambda b=body: series(b), status, code)
    refused(lambda: series(b"1,2,3", "text/csv"), 415, "unsupported_media_type")


# --- against a real server ----------------------------------------------------------------------------------


def tree_kb(srv: RunningServer, key: str) -> int:
    """Sum of a /proc/<pid>/status field (VmRSS, VmHWM) over the server's whole process tree."""
    return sum(_status_kb(pid, key) for pid in process_tree(srv.process.pid))


def test_image_bombs_are_refused_fast_and_memory_stays_flat(server: RunningServer) -> None:
    url = f"{server.url}/v1/cifar/predict"
    for bomb, status, code in ((ico_bomb(), 400, "invalid_image"), (flat_png(16000, 16000), 413, "image_too_large")):
        peak_before = tree_kb(server, "VmHWM")
        start = time.perf_counter()
        r = httpx.post(url, content=bomb, headers={"Content-Type": "image/png"}, timeout=30)
        assert time.perf_counter() - start < 5.0  # it took 3.4 s of decoding before: here, no decoding at all
        assert_error(r, status, code)
        # Each process's peak RSS: had the 1 GB image been decoded anywhere, one of them would have grown by it.
        assert tree_kb(server, "VmHWM") - peak_before < 200 * 1024
    assert_still_serving(server.url)


def _probe_while(busy: Callable[[], bool], url: str) -> list[float]:
    """Latencies of /health and a digits prediction, sent in turn while `busy()` holds (at least one of each)."""
    digit, label = mnist_test_pngs(1)[0]
    latencies = []
    with httpx.Client(timeout=30) as client:
        while True:
            start = time.perf_counter()
            assert client.get(f"{url}/health").status_code == 200
            r = client.post(f"{url}/v1/digits/predict", content=digit, headers={"Content-Type": "image/png"})
            assert r.status_code == 200 and r.json()["predictions"][0]["index"] == label
            latencies.append(time.perf_counter() - start)
            if not busy():
                return latencies


def _two_concurrent(url: str, blobs: list[bytes]) -> tuple[list[httpx.Response], list[float], int]:
    """Two multipart requests of `blobs` at once, probed while they run: responses, probe latencies, and how many
    probes finished while the two were still running."""
    body, kind = multipart_body(blobs)

    def send() -> httpx.Response:
        return httpx.post(f"{url}/v1/digits/predict", content=body, headers={"Content-Type": kind}, timeout=120)

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(send) for _ in range(2)]
        latencies = _probe_while(lambda: not all(f.done() for f in futures), url)
        return [f.result() for f in futures], latencies, len(latencies) - 1


def test_pixel_floods_are_refused_and_nothing_stalls(server: RunningServer) -> None:
    responses, latencies, _ = _two_concurrent(server.url, [flat_4096()] * 96)  # 1.6 MB, 1.6 Gpx each
    for r in responses:
        assert_error(r, 413, "too_many_pixels")
    assert max(latencies) < 1.0, latencies


def test_large_decodes_leave_the_event_loop_free() -> None:
    """Let 16 x 4096x4096 per request through: while two such requests decode, small ones still answer at once."""
    with running_server(NNSERVE_MAX_REQUEST_PIXELS=str(2**31), NNSERVE_API_SERVERS="1") as srv:
        responses, latencies, overlapped = _two_concurrent(srv.url, [flat_4096()] * 16)
        for r in responses:
            assert r.status_code == 200, r.text
            assert len(r.json()["predictions"]) == 16
        assert overlapped >= 1, "no probe ran while the large requests were decoding"
        assert max(latencies) < 1.0, latencies


HOSTILE_JSON = {
    "nested 100,000 deep": ("digits", b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "invalid_json"),
    "series nested 100,000 deep": ("sequence", b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json"),
    "top_k 1e400": ("digits", b'{"instances": [[[0, 0], [0, 0]]], "top_k": 1e400}', 422, "invalid_parameter"),
    "5000-digit integer in a series": ("sequence", b'{"series": [' + b"9" * 5000 + b"]}", 400, "invalid_json"),
    "400-digit integer in a series": (
        "sequence",
        b'{"series": [' + b"1.5, " * 30 + b"9" * 400 + b"]}",
        422,
        "invalid_series",
    ),
}


@pytest.mark.parametrize("case", HOSTILE_JSON, ids=list(HOSTILE_JSON))
def test_hostile_json_over_http(server: RunningServer, case: str) -> None:
    model, body, status, code = HOSTILE_JSON[case]
    r = httpx.post(
        f"{server.url}/v1/{model}/predict", content=body, headers={"Content-Type": "application/json"}, timeout=30
    )
    assert_error(r, status, code)
    assert_still_serving(server.url)
