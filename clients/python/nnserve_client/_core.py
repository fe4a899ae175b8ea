"""Everything Client and AsyncClient share: request building, response parsing, error mapping, retries.

The two clients differ only in how they wait (blocking vs `await`); each public method is one line that hands
a `Call` from here to its own send loop, so the behaviour cannot drift between them.
"""

from __future__ import annotations

import base64
import json
import math
import os
import random
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any, Generic, TypeAlias, TypeVar
from urllib.parse import quote

import httpx
import numpy as np

from nnserve_client import _errors
from nnserve_client._images import ImageInput, as_image_list, content_type, encode_image
from nnserve_client._types import Forecast, Health, ItemError, ModelInfo, Prediction
from nnserve_client._version import __version__

T = TypeVar("T")

DEFAULT_URL = "http://127.0.0.1:8000"
USER_AGENT = f"nnserve-client/{__version__}"
JSON_HEADERS = {"Content-Type": "application/json"}

Series: TypeAlias = Sequence[float] | np.ndarray
"""One history of numbers, oldest first."""


@dataclass(frozen=True)
class Call(Generic[T]):
    """One logical API call: what to send and how to read the answer. Retries replay it unchanged."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: dict[str, Any] | None = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    answers: frozenset[int] = frozenset()
    """Error statuses that are an answer for this call (handed to `parse`, never retried), e.g. 503 for /ready."""
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def build(self, http: httpx.Client | httpx.AsyncClient) -> httpx.Request:
        """The httpx request for one attempt; every attempt carries the same X-Request-ID."""
        headers = {"X-Request-ID": self.request_id, **self.headers}
        return http.build_request(self.method, self.path, params=self.params, content=self.content, headers=headers)

    def finish(self, response: httpx.Response) -> T:
        """The parsed answer, or the typed exception for an HTTP error."""
        if response.is_success or response.status_code in self.answers:
            return self.parse(response)
        raise error_from_response(response)


# Configuration -------------------------------------------------------------------------------------------


def http_options(
    base_url: str | None, api_key: str | None, timeout: float | httpx.Timeout, transport: Any
) -> dict[str, Any]:
    """Keyword arguments for httpx.Client / AsyncClient, falling back to NNSERVE_URL and NNSERVE_API_KEY."""
    key = api_key if api_key is not None else os.environ.get("NNSERVE_API_KEY")
    headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return {
        "base_url": base_url or os.environ.get("NNSERVE_URL") or DEFAULT_URL,
        "headers": headers,
        "timeout": timeout,
        "transport": transport,
    }


# Calls ---------------------------------------------------------------------------------------------------


def health_call() -> Call[Health]:
    return Call("GET", "/health", lambda r: Health.model_validate(_json(r)))


def ready_call() -> Call[bool]:
    return Call("GET", "/ready", lambda r: r.status_code == 200, answers=frozenset({503}))


def models_call() -> Call[list[ModelInfo]]:
    return Call("GET", "/v1/models", lambda r: [ModelInfo.model_validate(m) for m in _json(r)["models"]])


def model_call(name: str) -> Call[ModelInfo]:
    return Call("GET", f"/v1/models/{quote(name, safe='')}", lambda r: ModelInfo.model_validate(_json(r)))


def predict_call(model: str, images: ImageInput | Iterable[ImageInput], top_k: int) -> Call[Any]:
    """One image goes as a raw body, several as JSON `{"instances": [{"b64": ...}]}`.

    The server parses JSON with base64 inside 2.5 to 15 times faster than multipart (C code instead of a form
    parser that handles each part in Python), and it does so on its HTTP process, ahead of the model. The
    base64 third is about what multipart's per-part headers add for small images like digits.
    """
    items, single = as_image_list(images)
    if not items:
        raise ValueError("no images given")
    encoded = [encode_image(image) for image in items]
    path, params = f"/v1/{quote(model, safe='')}/predict", {"top_k": top_k}
    parse = _one_or_all(_parse_predictions, single)
    if len(encoded) == 1:
        data = encoded[0]
        return Call("POST", path, parse, params, content=data, headers={"Content-Type": content_type(data)})
    instances = [{"b64": base64.b64encode(data).decode("ascii")} for data in encoded]
    return Call("POST", path, parse, params, content=_json_body({"instances": instances}), headers=JSON_HEADERS)


def forecast_call(items: Sequence[Series], horizon: int | None, single: bool = False) -> Call[Any]:
    """Series go as one JSON list; `single` gives back one `Forecast` instead of a list of one."""
    if not items:
        raise ValueError("no series given")
    bodies = [_series_body(s, horizon) for s in items]
    sent = [len(body["series"]) for body in bodies]
    parse = _one_or_all(lambda response: _parse_forecasts(response, sent), single)
    return Call("POST", "/v1/sequence/predict", parse, content=_json_body(bodies), headers=JSON_HEADERS)


def series_values(series: Series) -> list[float]:
    """One history as the JSON-ready floats the server reads; JSON has no NaN or infinity."""
    values = [float(v) for v in np.asarray(series, dtype=float).ravel()]
    if not all(math.isfinite(v) for v in values):
        raise ValueError("series values must be finite numbers (JSON has no NaN or infinity)")
    return values


def _series_body(series: Series, horizon: int | None) -> dict[str, Any]:
    values = series_values(series)
    return {"series": values} if horizon is None else {"series": values, "horizon": horizon}


def _json_body(body: object) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def _one_or_all(parse: Callable[[httpx.Response], list[T]], single: bool) -> Callable[[httpx.Response], Any]:
    """One input gives one result, a collection gives a list: the caller gets back the shape it sent."""
    return (lambda response: parse(response)[0]) if single else parse


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise _errors.NNServeError(f"expected JSON from {response.request.url}, got: {response.text[:200]!r}") from exc


def _parse_predictions(response: httpx.Response) -> list[Prediction]:
    body = _json(response)
    meta = {"model": body["model"], "version": body["version"]}
    return [Prediction.model_validate({**p, **meta}) for p in body["predictions"]]


def _parse_forecasts(response: httpx.Response, sent: list[int]) -> list[Forecast]:
    """Forecasts; `history_used` is the server's figure when it gives one, else all that was sent."""
    body = _json(response)
    meta = {"model": body["model"], "version": body["version"]}
    predictions = body["predictions"]
    return [Forecast.model_validate({"history_used": n, **p, **meta}) for p, n in zip(predictions, sent, strict=True)]


# Inputs --------------------------------------------------------------------------------------------------


def as_series_list(series: Series | Iterable[Series]) -> tuple[list[Series], bool]:
    """The series as a list, and whether the caller passed one (a flat sequence of numbers or a 1-D array)."""
    if isinstance(series, np.ndarray):
        return ([series], True) if series.ndim == 1 else (list(series), False)
    items = list(series)  # type: ignore[arg-type]
    if items and all(isinstance(v, int | float | np.number) for v in items):
        return [items], True  # type: ignore[list-item]
    return items, False  # type: ignore[return-value]


def recent_histories(items: list[Series], max_history: int | None) -> list[Series]:
    """Each series cut to its most recent `max_history` values, the most the model reads, with one warning.

    Python shows the warning once per call site (its default filter), not once per call.
    """
    if max_history is None or all(len(s) <= max_history for s in items):
        return items
    warnings.warn(
        f"a series is longer than the model's max_history: only its most recent {max_history} values are sent",
        UserWarning,
        stacklevel=3,  # the caller of Client.forecast / forecast_many
    )
    return [s[-max_history:] if len(s) > max_history else s for s in items]


def batches(items: Sequence[T], batch_size: int, concurrency: int) -> list[tuple[int, Sequence[T]]]:
    """`items` cut into requests of at most `batch_size`, in order, each with the position of its first item."""
    if batch_size < 1 or concurrency < 1:
        raise ValueError("batch_size and concurrency must be at least 1")
    return [(i, items[i : i + batch_size]) for i in range(0, len(items), batch_size)]


LOCAL_ERRORS = (OSError, ValueError, TypeError)
"""What reading or encoding one input can raise: a missing file, an array that is not an image, a NaN."""

ITEM_STATUSES = frozenset({400, 413, 415, 422})
"""Statuses that blame the request's content: splitting the request finds the items at fault."""


def source_name(item: object) -> str | None:
    return os.fspath(item) if isinstance(item, str | os.PathLike) else None


class Batch(Generic[T]):
    """One batch of a `*_many` call, resolved into one result or `ItemError` per input.

    Inputs that cannot be read fail alone, before anything is sent. A request refused for its content (400, 413,
    415, 422) is halved until the refused items stand alone, so each good item still gets its result and each
    bad one its own error: a batch of 64 with one bad image costs 12 more requests. A request the server failed
    (5xx, or no answer within the client's timeout) fails its items without a retry of the halves, which would
    fail alike. Anything else (401, 404, an unreachable server) ends the whole call: no other item can succeed.
    With `fail_fast`, the first failed item's error is raised, with a note naming the item.
    """

    def __init__(self, start: int, inputs: Sequence[Any], prepare: Callable[[Any], Any], fail_fast: bool) -> None:
        self.start, self.inputs, self.fail_fast = start, inputs, fail_fast
        self.results: list[T | ItemError | None] = [None] * len(inputs)
        self.payloads: dict[int, Any] = {}
        for offset, item in enumerate(inputs):
            try:
                self.payloads[offset] = prepare(item)
            except LOCAL_ERRORS as exc:
                self._fail(offset, exc)
        self.groups: list[list[int]] = [list(self.payloads)] if self.payloads else []

    def next_group(self) -> list[int] | None:
        """Offsets of the inputs that the next request carries, or None when every input has its result."""
        return self.groups.pop() if self.groups else None

    def payload(self, group: list[int]) -> list[Any]:
        return [self.payloads[offset] for offset in group]

    def answered(self, group: list[int], results: list[T]) -> None:
        for offset, result in zip(group, results, strict=True):
            self.results[offset] = result

    def refused(self, group: list[int], exc: _errors.NNServeError) -> None:
        """Record a failed request, or raise when the whole call must stop."""
        if isinstance(exc, _errors.APIError) and exc.status_code in ITEM_STATUSES:
            if len(group) > 1:
                half = len(group) // 2
                self.groups += [group[half:], group[:half]]  # popped from the end: the first half goes first
                return
        elif not isinstance(exc, _errors.ServerError | _errors.ClientTimeoutError):
            raise exc
        for offset in group:
            self._fail(offset, exc)

    def _fail(self, offset: int, exc: Exception) -> None:
        failure = ItemError(self.start + offset, source_name(self.inputs[offset]), exc)
        if self.fail_fast:
            exc.add_note(f"item {failure.index}" + (f": {failure.source}" if failure.source else ""))
            raise exc
        self.results[offset] = failure

    @property
    def failures(self) -> int:
        return sum(isinstance(r, ItemError) for r in self.results)

    def done(self) -> list[T | ItemError]:
        assert all(r is not None for r in self.results), "a batch ended with inputs unanswered"
        return self.results  # type: ignore[return-value]


class Progress:
    """`done/total items` on stderr while `*_many` runs, from the standard library alone.

    On a terminal the line is rewritten in place up to 10 times a second; elsewhere (a log, a CI run) a new line
    is written at most every 5 s, so logs stay short.
    """

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.done = self.failed = 0
        self._stream = sys.stderr
        self._tty = enabled and self._stream.isatty()
        self._every = 0.1 if self._tty else 5.0
        self._started = self._shown = time.monotonic()
        self._lock = threading.Lock()

    def update(self, n: int, failed: int = 0) -> None:
        if not self.enabled:
            return
        with self._lock:
            self.done += n
            self.failed += failed
            now = time.monotonic()
            if now - self._shown >= self._every:
                self._shown = now
                self._write()

    def _write(self, end: str = "") -> None:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        failed = f", {self.failed} failed" if self.failed else ""
        line = f"{self.done}/{self.total} items{failed} ({self.done / elapsed:.0f}/s)"
        self._stream.write(f"\r{line}\x1b[K{end}" if self._tty else f"{line}\n")
        self._stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.enabled:
            with self._lock:
                self._write(end="\n")


# Errors --------------------------------------------------------------------------------------------------


def error_from_response(response: httpx.Response) -> _errors.APIError:
    """The typed exception for an HTTP error, carrying the server's own code and message."""
    code, message = f"http_{response.status_code}", response.reason_phrase or "HTTP error"
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict):
        code, message = str(error.get("code", code)), str(error.get("message", message))
    elif response.text:
        message = response.text[:500]
    cls = _errors.error_class(response.status_code)
    return cls(
        message,
        status_code=response.status_code,
        code=code,
        request_id=response.headers.get("X-Request-ID"),
        response=response,
    )


def error_from_transport(exc: httpx.TransportError, request_id: str) -> _errors.ConnectionError:
    cls = _errors.ClientTimeoutError if isinstance(exc, httpx.TimeoutException) else _errors.ConnectionError
    return cls(f"{type(exc).__name__} on {exc.request.method} {exc.request.url}: {exc} [request {request_id}]")


# Retries -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, on transport failures and 503 only.

    4xx and other 5xx are answers, not accidents: repeating them gives the same answer. A read timeout is not
    retried either: the server may still be working, and waiting again only multiplies the delay.
    """

    retries: int = 3
    backoff: float = 0.2
    max_delay: float = 10.0

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff < 0 or self.max_delay < 0:
            raise ValueError("retries, backoff and max_delay must not be negative")

    def backoff_delay(self, attempt: int) -> float:
        """`backoff * 2**attempt`, drawn from its upper half so that clients retrying together spread out."""
        delay = min(self.max_delay, self.backoff * 2**attempt)
        return random.uniform(delay / 2, delay)

    def after_response(self, attempt: int, response: httpx.Response, call: Call[Any]) -> float | None:
        """Seconds to wait before trying again, or None when this response is final."""
        if response.status_code != 503 or 503 in call.answers or attempt >= self.retries:
            return None
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        if retry_after is None:
            return self.backoff_delay(attempt)
        # Up to one `backoff` more than asked: clients refused together and told the same Retry-After would
        # otherwise all come back in the same instant and be refused together again.
        return min(self.max_delay, retry_after + random.uniform(0, self.backoff))

    def after_error(self, attempt: int, exc: httpx.TransportError, call: Call[Any]) -> float:
        """Seconds to wait before trying again; raises the typed error when the failure is final."""
        retryable = isinstance(exc, httpx.ConnectTimeout | httpx.NetworkError | httpx.RemoteProtocolError)
        if not retryable or attempt >= self.retries:
            raise error_from_transport(exc, call.request_id) from exc
        return self.backoff_delay(attempt)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), or None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000": RFC 9110 dates are always GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
