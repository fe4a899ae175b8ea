"""The Python SDK: pure logic against httpx.MockTransport, then end to end against a real server."""

from __future__ import annotations

import asyncio
import base64
import builtins
import io
import json
import math
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import nnserve_client as nc
from nnserve_client import _core
from nnserve_client._images import as_image_list, encode_image
from tests.data import cifar_test_pngs, mnist_test, mnist_test_pngs, weather
from tests.serving import running_server

# Pure logic ------------------------------------------------------------------------------------------------


def test_sdk_imports_without_torch() -> None:
    code = "import sys, nnserve_client; print('torch' in sys.modules, 'service' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def _decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.fixture
def gray() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)


def test_encode_every_input_type_keeps_pixels(tmp_path: Path, gray: np.ndarray) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    rgba = np.random.default_rng(2).integers(0, 256, (8, 8, 4), dtype=np.uint8)
    png = encode_image(gray)
    path = tmp_path / "digit.png"
    path.write_bytes(png)

    assert png.startswith(b"\x89PNG")
    assert encode_image(path) == png and encode_image(str(path)) == png
    assert encode_image(bytearray(png)) == png and encode_image(memoryview(png)) == png
    np.testing.assert_array_equal(_decoded(encode_image(Image.fromarray(gray))), gray)
    np.testing.assert_array_equal(_decoded(encode_image(gray[:, :, None])), gray)
    np.testing.assert_array_equal(_decoded(encode_image(rgb)), rgb)
    np.testing.assert_array_equal(_decoded(encode_image(rgba)), rgba)
    cmyk = Image.fromarray(rgb).convert("CMYK")  # PNG cannot hold CMYK: sent as RGB
    assert _decoded(encode_image(cmyk)).shape == (32, 32, 3)


def test_float_and_integer_arrays_become_the_same_pixels(gray: np.ndarray) -> None:
    png = encode_image(gray)
    assert encode_image(gray / 255.0) == png  # float64 in [0, 1], as ToTensor-style code holds images
    assert encode_image((gray / 255.0).astype(np.float32)) == png
    assert encode_image(gray.astype(np.int64)) == png


def test_encode_rejects_what_is_not_an_image(gray: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        encode_image(gray.astype(np.float32))  # 0..255 as floats: ambiguous, refused with the fix in the message
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        encode_image(np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match=r"0\.\.255"):
        encode_image(np.full((4, 4), 300, np.int32))
    with pytest.raises(ValueError, match="uint8"):
        encode_image(np.zeros((4, 4), np.complex64))
    with pytest.raises(ValueError, match="H x W"):
        encode_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(TypeError, match="not an image"):
        encode_image(42)  # type: ignore[arg-type]


def test_one_image_or_many(gray: np.ndarray) -> None:
    images, single = as_image_list(gray)
    assert single and len(images) == 1 and images[0] is gray
    assert as_image_list(b"png") == ([b"png"], True)
    assert as_image_list("a.png") == (["a.png"], True)
    assert as_image_list(Path("a.png")) == ([Path("a.png")], True)
    assert as_image_list([b"a", b"b"]) == ([b"a", b"b"], False)
    assert as_image_list(iter([b"a"])) == ([b"a"], False)
    assert as_image_list(np.zeros((32, 32, 3), np.uint8))[1]  # H x W x C is one image
    images, single = as_image_list(np.zeros((5, 28, 28, 1), np.uint8))  # N x H x W x C is a batch
    assert not single and len(images) == 5
    images, single = as_image_list(np.zeros((5, 28, 28), np.uint8))  # N x H x W too: MNIST's own shape
    assert not single and len(images) == 5 and images[0].shape == (28, 28)
    assert as_image_list(np.zeros((28, 28, 1), np.uint8))[1]  # a last axis of 1, 3 or 4 is channels


def test_one_series_or_many() -> None:
    assert _core.as_series_list([1.0, 2, 3]) == ([[1.0, 2, 3]], True)
    assert _core.as_series_list([[1.0], [2.0]]) == ([[1.0], [2.0]], False)
    one, single = _core.as_series_list(np.arange(5.0))
    assert single and len(one) == 1
    many, single = _core.as_series_list(np.zeros((3, 5)))
    assert not single and len(many) == 3


def test_non_finite_series_is_refused_before_sending() -> None:
    with pytest.raises(ValueError, match="finite"):
        _core.forecast_call([[1.0, math.nan, 2.0]], None)


def test_parse_retry_after() -> None:
    now = datetime(2025, 1, 1, tzinfo=UTC)
    assert nc._core.parse_retry_after("3") == 3.0
    assert nc._core.parse_retry_after(" 0.5 ") == 0.5
    assert nc._core.parse_retry_after("-4") == 0.0
    assert nc._core.parse_retry_after(None) is None
    assert nc._core.parse_retry_after("soon") is None
    date = format_datetime(now + timedelta(seconds=7), usegmt=True)
    assert nc._core.parse_retry_after(date, now=now.timestamp()) == pytest.approx(7.0)


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    policy = _core.RetryPolicy(retries=10, backoff=0.2, max_delay=1.0)
    for attempt, ceiling in [(0, 0.2), (1, 0.4), (2, 0.8), (5, 1.0)]:
        delays = {policy.backoff_delay(attempt) for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1  # jittered


class Scripted:
    """A MockTransport handler answering from a script, counting attempts."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers[min(len(self.requests), len(self.answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        # A fresh response each time: a client binds the one it receives to its own stream type.
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)


def _error(status: int, code: str, message: str = "nope", **headers: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message}}, headers=headers)


OK_HEALTH = httpx.Response(200, json={"status": "ok"})


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record instead of waiting, for both clients."""
    slept: list[float] = []

    async def no_async_sleep(delay: float) -> None:
        slept.append(delay)

    monkeypatch.setattr(nc._client.time, "sleep", slept.append)
    monkeypatch.setattr(nc._client.asyncio, "sleep", no_async_sleep)
    return slept


def _call_sync(handler: Scripted, method: Callable[[nc.Client], object], **options: object) -> object:
    with nc.Client("http://test", transport=httpx.MockTransport(handler), **options) as client:
        return method(client)


def _call_async(handler: Scripted, method: Callable[[nc.AsyncClient], object], **options: object) -> object:
    async def go() -> object:
        async with nc.AsyncClient("http://test", transport=httpx.MockTransport(handler), **options) as client:
            return await method(client)  # type: ignore[misc]

    return asyncio.run(go())


BOTH = pytest.mark.parametrize("call", [_call_sync, _call_async], ids=["sync", "async"])


@BOTH
@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, "invalid_image", nc.BadRequestError),
        (401, "unauthorized", nc.AuthenticationError),
        (404, "not_found", nc.NotFoundError),
        (413, "too_many_items", nc.PayloadTooLargeError),
        (415, "unsupported_media_type", nc.UnsupportedMediaTypeError),
        (422, "invalid_horizon", nc.UnprocessableError),
        (504, "timeout", nc.RequestTimeoutError),
        (500, "internal", nc.ServerError),
        (409, "conflict", nc.APIError),
    ],
)
def test_errors_are_typed_and_never_retried(call, status: int, code: str, cls: type, sleeps: list[float]) -> None:
    handler = Scripted(_error(status, code, "what went wrong", **{"X-Request-ID": "rid-1"}))
    with pytest.raises(cls) as info:
        call(handler, lambda c: c.health())
    err = info.value
    assert (err.status_code, err.code, err.message, err.request_id) == (status, code, "what went wrong", "rid-1")
    assert isinstance(err, nc.APIError) and isinstance(err, nc.NNServeError)
    assert type(err) is cls
    assert len(handler.requests) == 1 and sleeps == []


def test_504_is_a_timeout_and_5xx_are_server_errors() -> None:
    assert issubclass(nc.RequestTimeoutError, builtins.TimeoutError)
    assert issubclass(nc.OverloadedError, nc.ServerError) and issubclass(nc.RequestTimeoutError, nc.ServerError)
    assert issubclass(nc.ConnectionError, builtins.ConnectionError)


def test_error_without_json_body_keeps_the_text(sleeps: list[float]) -> None:
    handler = Scripted(httpx.Response(502, text="bad gateway from a proxy"))
    with pytest.raises(nc.ServerError) as info:
        _call_sync(handler, lambda c: c.health())
    assert info.value.code == "http_502" and "proxy" in info.value.message


@BOTH
def test_503_is_retried_honouring_retry_after(call, sleeps: list[float]) -> None:
    handler = Scripted(_error(503, "overloaded", **{"Retry-After": "2"}), _error(503, "not_ready"), OK_HEALTH)
    assert call(handler, lambda c: c.health(), backoff=0.1).status == "ok"
    assert len(handler.requests) == 3
    assert 2.0 <= sleeps[0] <= 2.1 and 0.05 <= sleeps[1] <= 0.2  # Retry-After (+ jitter), then backoff
    ids = {r.headers["X-Request-ID"] for r in handler.requests}
    assert len(ids) == 1  # one logical call, one id across its attempts


@BOTH
def test_retry_after_is_capped(call, sleeps: list[float]) -> None:
    handler = Scripted(_error(503, "overloaded", **{"Retry-After": "3600"}), OK_HEALTH)
    call(handler, lambda c: c.health())
    assert sleeps == [_core.RetryPolicy().max_delay]


@BOTH
def test_503_gives_up_after_the_retries(call, sleeps: list[float]) -> None:
    handler = Scripted(_error(503, "overloaded", "busy"))
    with pytest.raises(nc.OverloadedError, match="busy"):
        call(handler, lambda c: c.health(), retries=2)
    assert len(handler.requests) == 3 and len(sleeps) == 2


@BOTH
def test_connection_errors_are_retried_then_raised(call, sleeps: list[float]) -> None:
    handler = Scripted(httpx.ConnectError("refused"))
    with pytest.raises(nc.ConnectionError, match="refused"):
        call(handler, lambda c: c.health(), retries=3)
    assert len(handler.requests) == 4 and len(sleeps) == 3

    flaky = Scripted(httpx.RemoteProtocolError("dropped"), OK_HEALTH)
    assert call(flaky, lambda c: c.health()).status == "ok"
    assert len(flaky.requests) == 2


@BOTH
def test_read_timeout_is_not_retried(call, sleeps: list[float]) -> None:
    handler = Scripted(httpx.ReadTimeout("slow"))
    with pytest.raises(nc.ClientTimeoutError) as info:
        call(handler, lambda c: c.health())
    assert isinstance(info.value, builtins.TimeoutError) and isinstance(info.value, nc.ConnectionError)
    assert len(handler.requests) == 1


@BOTH
def test_ready_is_false_while_loading_without_retrying(call, sleeps: list[float]) -> None:
    loading = Scripted(httpx.Response(503, json={"status": "loading"}))
    assert call(loading, lambda c: c.ready()) is False
    assert len(loading.requests) == 1
    assert call(Scripted(httpx.Response(200, json={"status": "ready"})), lambda c: c.ready()) is True


def test_url_and_key_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NNSERVE_URL", "http://elsewhere:9000/prefix")
    monkeypatch.setenv("NNSERVE_API_KEY", "s3cret")
    handler = Scripted(OK_HEALTH)
    with nc.Client(transport=httpx.MockTransport(handler)) as client:
        client.health()
    request = handler.requests[0]
    assert str(request.url) == "http://elsewhere:9000/prefix/health"
    assert request.headers["Authorization"] == "Bearer s3cret"
    monkeypatch.delenv("NNSERVE_URL")
    monkeypatch.delenv("NNSERVE_API_KEY")
    with nc.Client(transport=httpx.MockTransport(handler)) as client:
        client.health()
    assert str(handler.requests[1].url) == "http://127.0.0.1:8000/health"
    assert "Authorization" not in handler.requests[1].headers


def _built(call: _core.Call) -> httpx.Request:
    with httpx.Client(base_url="http://test") as http:
        return call.build(http)


def test_one_image_is_a_raw_body_and_several_are_base64_json(gray: np.ndarray) -> None:
    one = _built(_core.predict_call("digits", gray, top_k=2))
    assert one.headers["Content-Type"] == "image/png" and one.url.params["top_k"] == "2"
    assert _decoded(one.read()).shape == (28, 28)
    assert _built(_core.predict_call("digits", b"\xff\xd8\xff rest", 1)).headers["Content-Type"] == "image/jpeg"
    many = _built(_core.predict_call("digits", [gray, gray[::-1]], top_k=2))
    assert many.headers["Content-Type"] == "application/json" and many.url.params["top_k"] == "2"
    instances = json.loads(many.read())["instances"]
    decoded = [_decoded(base64.b64decode(instance["b64"])) for instance in instances]
    np.testing.assert_array_equal(decoded, [gray, gray[::-1]])


def test_series_are_sent_as_json() -> None:
    request = _built(_core.forecast_call([[1, 2], [3, 4]], 2))
    assert json.loads(request.read()) == [{"series": [1.0, 2.0], "horizon": 2}, {"series": [3.0, 4.0], "horizon": 2}]
    assert request.url.path == "/v1/sequence/predict" and request.headers["Content-Type"] == "application/json"
    assert json.loads(_built(_core.forecast_call([np.arange(3)], None)).read()) == [{"series": [0.0, 1.0, 2.0]}]


def test_empty_inputs_are_refused_locally() -> None:
    with pytest.raises(ValueError, match="no images"):
        _core.predict_call("digits", [], top_k=3)
    with pytest.raises(ValueError, match="no series"):
        _core.forecast_call([], None)
    with pytest.raises(ValueError, match="at least 1"):
        _core.batches([1, 2], batch_size=0, concurrency=1)
    handler = Scripted(OK_HEALTH)
    assert _call_sync(handler, lambda c: c.predict_many("digits", [])) == []
    assert _call_async(handler, lambda c: c.forecast_many([])) == []
    assert handler.requests == []


class FakeForecaster:
    """A MockTransport handler for the sequence model: refuses a request holding the value 13 (422, naming the
    item's place in that request, as the server does) and forecasts the rest as their last value."""

    def __init__(self, status: int | None = None, max_history: int = 20) -> None:
        self.status, self.max_history = status, max_history
        self.requests: list[list[list[float]]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models/sequence":
            series = {"min_history": 1, "max_history": self.max_history, "horizon": 2, "target": "x"}
            info = {"name": "sequence", "version": "1", "task": "forecast", "manifest": {"series": series}}
            return httpx.Response(200, json=info)
        sent = [item["series"] for item in json.loads(request.content)]
        self.requests.append(sent)
        if self.status is not None:
            return _error(self.status, "refused", "not today")
        for index, values in enumerate(sent):
            if 13.0 in values:
                return _error(422, "invalid_series", f"item {index}: unlucky")
        predictions = [{"forecast": [values[-1]] * 2} for values in sent]
        return httpx.Response(200, json={"model": "sequence", "version": "1", "predictions": predictions})


@BOTH
def test_many_gives_each_failed_item_its_own_error_and_goes_on(call, sleeps: list[float]) -> None:
    series = [[float(i)] for i in range(10)]
    series[3] = series[7] = [13.0]
    series[5] = [math.nan]  # refused before sending
    handler = FakeForecaster()
    results = call(handler, lambda c: c.forecast_many(series, batch_size=10))
    failed = {r.index: r for r in results if isinstance(r, nc.ItemError)}
    assert sorted(failed) == [3, 5, 7]
    assert failed[3].code == "invalid_series" and failed[3].message == "unlucky"  # its place in a request: gone
    assert isinstance(failed[3].error, nc.UnprocessableError) and str(failed[3]) == "item 3: invalid_series: unlucky"
    assert isinstance(failed[5].error, ValueError) and failed[5].code == "ValueError" and "finite" in failed[5].message
    assert [r.values for r in results if isinstance(r, nc.Forecast)] == [[i, i] for i in (0, 1, 2, 4, 6, 8, 9)]
    # The refused request is halved until the bad items stand alone, not resent one item at a time.
    sent = [len(request) for request in handler.requests]
    assert sent[0] == 9 and len(sent) < 2 * 9 and [13.0] not in [r for r in handler.requests if len(r) > 1]
    assert sleeps == []


@BOTH
def test_fail_fast_raises_the_first_failure_naming_the_item(call) -> None:
    series = [[1.0], [2.0], [13.0], [4.0]]
    with pytest.raises(nc.UnprocessableError) as info:
        call(FakeForecaster(), lambda c: c.forecast_many(series, batch_size=4, fail_fast=True))
    assert info.value.__notes__ == ["item 2"]
    with pytest.raises(ValueError, match="finite") as local:
        call(FakeForecaster(), lambda c: c.forecast_many([[1.0], [math.inf]], fail_fast=True))
    assert local.value.__notes__ == ["item 1"]


@BOTH
def test_a_failed_request_fails_its_items_without_splitting(call, sleeps: list[float]) -> None:
    handler = FakeForecaster(status=503)
    results = call(handler, lambda c: c.forecast_many([[1.0]] * 6, batch_size=3), retries=1)
    assert all(isinstance(r, nc.ItemError) and isinstance(r.error, nc.OverloadedError) for r in results)
    assert [r.index for r in results] == list(range(6))
    assert len(handler.requests) == 4  # two batches, each tried twice; never split


@BOTH
def test_errors_no_item_can_escape_end_the_whole_call(call) -> None:
    for status, error in [(401, nc.AuthenticationError), (404, nc.NotFoundError)]:
        handler = FakeForecaster(status=status)
        with pytest.raises(error):
            call(handler, lambda c: c.forecast_many([[1.0]] * 6, batch_size=3, concurrency=1))
        assert len(handler.requests) <= 2


@BOTH
def test_a_history_longer_than_the_model_reads_is_cut_with_a_warning(call) -> None:
    handler = FakeForecaster(max_history=20)
    long, short = [float(i) for i in range(100, 130)], [1.0, 2.0]
    with pytest.warns(UserWarning, match="most recent 20 values"):
        one = call(handler, lambda c: c.forecast(long))
    assert handler.requests[-1] == [long[-20:]] and one.history_used == 20 and one.values == [129.0, 129.0]
    with pytest.warns(UserWarning, match="max_history"):
        many = call(handler, lambda c: c.forecast_many([short, long]))
    assert handler.requests[-1] == [short, long[-20:]] and [f.history_used for f in many] == [2, 20]


def test_the_server_figure_for_history_used_wins() -> None:
    predictions = [{"forecast": [1.0], "history_used": 5}]
    response = httpx.Response(200, json={"model": "m", "version": "1", "predictions": predictions})
    assert _core._parse_forecasts(response, [9])[0].history_used == 5


# End to end against a real server -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> list[tuple[bytes, int]]:
    return mnist_test_pngs(200)


@pytest.fixture(scope="module")
def client(server) -> Iterator[nc.Client]:
    with nc.Client(server.url) as c:
        yield c


def test_health_ready_and_models(client: nc.Client) -> None:
    assert client.health().status == "ok"
    assert client.ready() is True
    infos = {m.name: m for m in client.models()}
    assert {"digits", "cifar", "sequence"} <= set(infos)
    digits = client.model("digits")
    assert isinstance(digits, nc.ModelInfo) and digits == infos["digits"]
    assert digits.task == "classification" and digits.labels == [str(i) for i in range(10)]
    assert len(client.model("cifar").labels or []) == 10
    series = client.model("sequence").series
    assert series is not None and 1 <= series["min_history"] <= series["max_history"] and series["horizon"] >= 1


def test_predict_digits_from_every_input_type(client: nc.Client, digits, tmp_path: Path) -> None:
    png, label = digits[0]
    path = tmp_path / "digit.png"
    path.write_bytes(png)
    pixels = np.asarray(Image.open(io.BytesIO(png)))
    inputs = [path, str(path), png, Image.open(io.BytesIO(png)), pixels, pixels[:, :, None], np.stack([pixels] * 3, -1)]
    results = [client.predict_digits(image) for image in inputs]
    assert all(isinstance(r, nc.Prediction) for r in results)
    assert {r.index for r in results} == {label}
    assert all(r.probability == pytest.approx(results[0].probability, abs=1e-4) for r in results)


def test_predictions_are_typed_and_consistent(client: nc.Client, digits) -> None:
    p = client.predict_digits(digits[0][0], top_k=5)
    info = client.model("digits")
    assert (p.model, p.version) == ("digits", info.version)
    assert len(p.top_k) == 5 and all(isinstance(s, nc.ClassScore) for s in p.top_k)
    assert (p.top_k[0].index, p.top_k[0].label) == (p.index, p.label)
    assert p.probability == p.top_k[0].probability
    probabilities = [s.probability for s in p.top_k]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-5


def test_one_image_gives_one_result_and_a_list_gives_a_list(client: nc.Client, digits) -> None:
    pngs = [png for png, _ in digits[:10]]
    many = client.predict_digits(pngs)
    assert isinstance(many, list) and len(many) == 10
    assert [p.index for p in many] == [client.predict_digits(png).index for png in pngs]
    single_list = client.predict_digits(pngs[:1])
    assert isinstance(single_list, list) and len(single_list) == 1
    accuracy = np.mean([p.index == label for p, (_, label) in zip(many, digits, strict=False)])
    assert accuracy >= 0.8


def test_predict_cifar(client: nc.Client) -> None:
    samples = cifar_test_pngs()[::9]  # stored class by class: every 9th spans all ten
    labels = client.model("cifar").labels
    predictions = client.predict_cifar([png for png, _ in samples], top_k=2)
    assert [len(p.top_k) for p in predictions] == [2] * len(samples)
    assert all(p.label == labels[p.index] for p in predictions)
    accuracy = np.mean([p.index == label for p, (_, label) in zip(predictions, samples, strict=True)])
    assert accuracy > 0.25  # chance is 0.1


def test_generic_predict_matches_the_named_shortcut(client: nc.Client, digits) -> None:
    assert client.predict("digits", digits[3][0]) == client.predict_digits(digits[3][0])


class CountingTransport(httpx.BaseTransport):
    """Real HTTP, holding each request a moment so overlapping requests are visible and counted."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.lock = threading.Lock()
        self.in_flight = self.peak = self.requests = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.in_flight += 1
            self.requests += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            time.sleep(0.05)
            response = self.inner.handle_request(request)
            response.read()
            return response
        finally:
            with self.lock:
                self.in_flight -= 1


class AsyncCountingTransport(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.in_flight = self.peak = self.requests = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.in_flight += 1
        self.requests += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(0.05)
            response = await self.inner.handle_async_request(request)
            await response.aread()
            return response
        finally:
            self.in_flight -= 1


def test_predict_many_keeps_order_and_bounds_concurrency(server, client: nc.Client, digits) -> None:
    pngs = [png for png, _ in digits]
    expected = [p.index for p in client.predict_digits(pngs)]
    transport = CountingTransport()
    with nc.Client(server.url, transport=transport) as counted:
        results = counted.predict_many("digits", pngs, batch_size=16, concurrency=3)
    assert [p.index for p in results] == expected
    assert transport.requests == math.ceil(len(pngs) / 16)
    assert 2 <= transport.peak <= 3


def test_predict_many_progress_needs_nothing_beyond_the_plain_install(
    client: nc.Client, digits, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` now fails, as without the package
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    images = [png for png, _ in digits[:20]] + [b"junk"]
    results = client.predict_many("digits", images, batch_size=8, progress=True)
    assert len(results) == 21
    assert capsys.readouterr().err.splitlines()[-1].startswith("21/21 items, 1 failed")
    assert client.predict_many("digits", images[:3]) and capsys.readouterr().err == ""  # off by default


def test_predict_numpy_batches_as_mnist_holds_them(client: nc.Client) -> None:
    images, labels = mnist_test()
    batch = images[:32]  # (32, 28, 28) uint8
    assert batch.shape == (32, 28, 28) and batch.dtype == np.uint8
    from_uint8 = client.predict_digits(batch)
    from_float = client.predict_digits(batch.astype(np.float32) / 255.0)  # what ToTensor() gives, in [0, 1]
    assert [p.index for p in from_float] == [p.index for p in from_uint8]
    assert np.mean([p.index for p in from_uint8] == labels[:32]) >= 0.9
    assert [p.index for p in client.predict_many("digits", batch, batch_size=10)] == [p.index for p in from_uint8]


def test_forecast_uses_the_most_recent_history_the_model_reads(client: nc.Client) -> None:
    spec = client.model("sequence").series
    assert spec is not None
    _, temps = weather()
    assert len(temps) > spec["max_history"]
    with pytest.warns(UserWarning, match=f"most recent {spec['max_history']} values"):
        whole = client.forecast(temps)
    recent = client.forecast(temps[-spec["max_history"] :])
    assert whole.history_used == recent.history_used == spec["max_history"]
    assert whole.values == pytest.approx(recent.values, abs=1e-5)


def test_forecast(client: nc.Client) -> None:
    spec = client.model("sequence").series
    assert spec is not None
    history = [10.0 + 5 * math.sin(i / 5) for i in range(spec["max_history"])]
    one = client.forecast(history)
    assert isinstance(one, nc.Forecast) and one.model == "sequence"
    assert len(one.values) == spec["horizon"] and all(math.isfinite(v) for v in one.values)
    assert len(client.forecast(np.asarray(history), horizon=1).values) == 1
    several = client.forecast([history, history[: spec["min_history"]]], horizon=2)
    assert [len(f.values) for f in several] == [2, 2]
    assert several[0].values == pytest.approx(one.values[:2], abs=1e-4)


def test_forecast_many_keeps_order(client: nc.Client) -> None:
    spec = client.model("sequence").series
    assert spec is not None
    histories = [[float(level)] * spec["min_history"] for level in range(0, 40, 4)]
    expected = client.forecast(histories)
    got = client.forecast_many(histories, batch_size=3, concurrency=2)
    np.testing.assert_allclose([f.values for f in got], [f.values for f in expected], atol=1e-4)
    assert got[-1].values[0] > got[0].values[0]  # a warmer history forecasts warmer


def test_server_errors_are_typed(client: nc.Client, digits) -> None:
    with pytest.raises(nc.BadRequestError) as info:
        client.predict_digits(b"this is not a png")
    assert info.value.code == "invalid_image" and info.value.message and info.value.request_id
    with pytest.raises(nc.BadRequestError) as info:
        client.predict_digits(b"")
    assert info.value.code in {"empty_body", "invalid_image"}
    with pytest.raises(nc.BadRequestError, match="invalid_image"):
        client.predict_digits([digits[0][0], digits[0][0][:40]])  # a truncated PNG among good ones
    with pytest.raises(nc.NotFoundError) as info:
        client.model("no-such-model")
    assert info.value.status_code == 404 and info.value.code == "not_found"
    with pytest.raises(nc.NotFoundError):
        client.predict("no-such-model", digits[0][0])
    with pytest.raises(nc.UnprocessableError) as info:
        client.predict_digits(digits[0][0], top_k=11)
    assert info.value.code == "invalid_parameter"
    with pytest.raises(nc.PayloadTooLargeError) as info:
        client.predict_digits([digits[0][0]] * 257)
    assert info.value.code == "too_many_items"
    with pytest.raises(nc.BadRequestError, match="invalid_image") as info:  # the old way: the first error ends it
        client.predict_many("digits", [png for png, _ in digits[:10]] + [b"junk"], batch_size=4, fail_fast=True)
    assert info.value.__notes__ == ["item 10"]


def test_predict_many_gives_each_bad_image_its_error_and_classifies_the_rest(
    client: nc.Client, digits, tmp_path: Path
) -> None:
    pngs = [png for png, _ in digits[:12]]
    truncated, missing = tmp_path / "truncated.png", tmp_path / "missing.png"
    truncated.write_bytes(pngs[0][:40])
    images: list[object] = [*pngs[:5], truncated, *pngs[5:9], b"junk", missing, *pngs[9:]]
    results = client.predict_many("digits", images, batch_size=4, concurrency=2)
    failed = {r.index: r for r in results if isinstance(r, nc.ItemError)}
    assert sorted(failed) == [5, 10, 11]
    assert failed[5].source == str(truncated) and failed[5].code == "invalid_image"
    assert failed[10].source is None and isinstance(failed[10].error, nc.BadRequestError)
    assert failed[11].source == str(missing) and isinstance(failed[11].error, FileNotFoundError)
    assert not failed[5].message.startswith("item")  # the position inside one request means nothing here
    good = [r for r in results if isinstance(r, nc.Prediction)]
    assert [p.index for p in good] == [p.index for p in client.predict_digits(pngs)]


def test_predict_many_splits_a_batch_larger_than_the_server_takes(client: nc.Client, digits) -> None:
    pngs = [png for png, _ in digits] * 2  # 400 in one batch; the server takes 256 per request (413 above)
    results = client.predict_many("digits", pngs, batch_size=len(pngs))
    assert all(isinstance(r, nc.Prediction) for r in results) and len(results) == 400
    assert [r.index for r in results[:200]] == [r.index for r in results[200:]]


def test_forecast_errors_are_typed(client: nc.Client) -> None:
    spec = client.model("sequence").series
    assert spec is not None
    history = [12.0] * spec["max_history"]
    with pytest.raises(nc.UnprocessableError) as info:
        client.forecast(history, horizon=spec["horizon"] + 1)
    assert info.value.code == "invalid_horizon" and str(spec["horizon"]) in info.value.message
    with pytest.raises(nc.UnprocessableError) as info:
        client.forecast([*history[:-1], 1e39])  # beyond float32
    assert info.value.code == "invalid_series"
    if spec["min_history"] > 1:
        with pytest.raises(nc.UnprocessableError, match="invalid_series"):
            client.forecast(history[: spec["min_history"] - 1])


def test_unreachable_server_raises_connection_error() -> None:
    with nc.Client("http://127.0.0.1:9", retries=1, backoff=0.01) as c, pytest.raises(nc.ConnectionError):
        c.health()


def test_async_client_gives_the_same_answers(server, client: nc.Client, digits) -> None:
    pngs = [png for png, _ in digits[:40]]
    history = [float(i % 7) for i in range(client.model("sequence").series["max_history"])]  # type: ignore[index]

    async def go() -> tuple:
        transport = AsyncCountingTransport()
        async with nc.AsyncClient(server.url, transport=transport) as ac:
            out = (
                await ac.health(),
                await ac.ready(),
                await ac.models(),
                await ac.model("digits"),
                await ac.predict_digits(pngs[0]),
                await ac.predict("digits", pngs[:5]),
                await ac.predict_many("digits", pngs, batch_size=4, concurrency=2),
                transport.peak,
                await ac.forecast(history, horizon=3),
                await ac.forecast_many([history] * 3, batch_size=1),
            )
            with pytest.raises(nc.NotFoundError):
                await ac.model("no-such-model")
            with pytest.raises(nc.BadRequestError):
                await ac.predict_cifar(b"garbage")
        return out

    health, ready, models, info, one, five, many, peak, forecast, forecasts = asyncio.run(go())
    assert health == client.health() and ready is True
    assert models == client.models() and info == client.model("digits")
    assert one == client.predict_digits(pngs[0])
    assert [p.index for p in five] == [p.index for p in client.predict_digits(pngs[:5])]
    assert [p.index for p in many] == [p.index for p in client.predict_digits(pngs)]
    assert forecast.values == pytest.approx(client.forecast(history, horizon=3).values, abs=1e-4)
    assert len(forecasts) == 3 and all(f.values == pytest.approx(forecasts[0].values) for f in forecasts)
    assert peak == 2  # predict_many's semaphore: 10 requests, 2 at a time


def test_sync_and_async_clients_have_the_same_methods() -> None:
    import inspect

    public = {n for n in dir(nc.Client) if not n.startswith("_")} - {"close"}
    assert public == {n for n in dir(nc.AsyncClient) if not n.startswith("_")} - {"aclose"}
    for name in public - {"base_url"}:
        sync, asynchronous = getattr(nc.Client, name), getattr(nc.AsyncClient, name)
        assert inspect.signature(sync) == inspect.signature(asynchronous), name
        assert inspect.iscoroutinefunction(asynchronous), name


# API key ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_server():
    # /ready needs the key as well, so wait for it here, with the key, rather than in running_server.
    with running_server(wait=False, NNSERVE_API_KEY="k-123") as srv, nc.Client(srv.url, api_key="k-123") as c:
        deadline = time.monotonic() + 120
        while True:
            with suppress(nc.ConnectionError):
                if c.ready():
                    break
            assert time.monotonic() < deadline, f"server with an API key not ready:\n{srv.output()}"
            time.sleep(0.2)
        yield srv


def test_api_key(keyed_server, digits, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NNSERVE_API_KEY", raising=False)
    with nc.Client(keyed_server.url) as anonymous:
        assert anonymous.health().status == "ok"  # needs no key
        with pytest.raises(nc.AuthenticationError) as info:
            anonymous.models()
        assert info.value.status_code == 401 and info.value.code == "unauthorized"
        with pytest.raises(nc.AuthenticationError):
            anonymous.predict_digits(digits[0][0])
    with nc.Client(keyed_server.url, api_key="wrong") as wrong, pytest.raises(nc.AuthenticationError):
        wrong.models()
    with nc.Client(keyed_server.url, api_key="k-123") as keyed:
        assert keyed.predict_digits(digits[0][0]).index == digits[0][1]
    monkeypatch.setenv("NNSERVE_API_KEY", "k-123")
    with nc.Client(keyed_server.url) as from_env:
        assert {m.name for m in from_env.models()} >= {"digits"}

    async def go() -> None:
        async with nc.AsyncClient(keyed_server.url, api_key="wrong") as ac:
            assert await ac.ready() is True  # probes need no key
            with pytest.raises(nc.AuthenticationError):
                await ac.models()

    asyncio.run(go())


# Retries against a real overloaded server ------------------------------------------------------------------


class StatusLog(httpx.HTTPTransport):
    """Real HTTP, remembering the status of every attempt."""

    def __init__(self) -> None:
        super().__init__()
        self.statuses: list[int] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        self.statuses.append(response.status_code)
        return response


@pytest.fixture(scope="module")
def one_at_a_time():
    """A server that takes one request at a time: one HTTP process, one item in flight per model."""
    with running_server(NNSERVE_MODELS="cifar", NNSERVE_API_SERVERS="1", NNSERVE_MAX_IN_FLIGHT="1") as srv:
        yield srv


def _burst(url: str, clients: int, call: Callable[[nc.Client], object], **options: object) -> list[object]:
    """`call` from `clients` threads released together: what each got back or raised, and its transport."""
    start = threading.Barrier(clients)

    def one(_: int) -> object:
        transport = StatusLog()
        with nc.Client(url, transport=transport, **options) as c:
            start.wait()
            try:
                return call(c), transport
            except nc.NNServeError as exc:
                return exc, transport

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, range(clients)))


def test_retries_ride_out_a_real_overload(one_at_a_time) -> None:
    samples = cifar_test_pngs()[:32]
    pngs = [png for png, _ in samples]
    with nc.Client(one_at_a_time.url) as alone:
        expected = [p.index for p in alone.predict_cifar(pngs)]
    # Without retries, requests that arrive while another is in flight get the server's 503 at once.
    refused: list[nc.OverloadedError] = []
    for _ in range(10):  # bursts until one collides: 6 clients released together nearly always do at once
        outcomes = _burst(one_at_a_time.url, 6, lambda c: c.predict_cifar(pngs), retries=0)
        refused += [out for out, _ in outcomes if isinstance(out, nc.OverloadedError)]
        assert all(isinstance(out, list | nc.OverloadedError) for out, _ in outcomes), outcomes
        if refused:
            break
    assert refused, "no request was ever refused: the overload did not happen"
    assert refused[0].status_code == 503 and refused[0].code == "overloaded" and refused[0].request_id
    # With retries, each 503 waits for Retry-After (1 s) and tries again, until every client is answered.
    statuses: list[int] = []
    for _ in range(10):
        outcomes = _burst(one_at_a_time.url, 6, lambda c: c.predict_cifar(pngs), retries=20)
        for out, transport in outcomes:
            assert isinstance(out, list) and [p.index for p in out] == expected, out
            assert transport.statuses[-1] == 200
            statuses += transport.statuses
        if 503 in statuses:
            break
    assert statuses.count(503) >= 1, statuses  # some were refused first and got through by retrying
