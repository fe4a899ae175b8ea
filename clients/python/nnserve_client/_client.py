"""`Client` and `AsyncClient`: the same methods with the same signatures, blocking or awaitable.

Each method builds a `Call` in `_core` and hands it to its client's send loop; only the waiting differs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, Self, TypeVar, overload

import httpx

from nnserve_client import _core
from nnserve_client._core import Batch, Call, Progress, RetryPolicy, Series
from nnserve_client._errors import NNServeError
from nnserve_client._images import ImageInput, as_image_list, encode_image
from nnserve_client._types import Forecast, Health, ItemError, ModelInfo, Prediction

T = TypeVar("T")


class Client:
    """A blocking client; thread-safe, so one instance can serve a whole program.

    `base_url` defaults to $NNSERVE_URL or http://127.0.0.1:8000 and `api_key` to $NNSERVE_API_KEY.
    Connection failures and 503s are retried `retries` times with exponential backoff starting at `backoff` s.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = 30.0,
        retries: int = 3,
        backoff: float = 0.2,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._retry = RetryPolicy(retries, backoff)
        self._http = httpx.Client(**_core.http_options(base_url, api_key, timeout, transport))
        self._max_history: dict[str, int | None] = {}

    @property
    def base_url(self) -> str:
        return str(self._http.base_url)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _send(self, call: Call[T]) -> T:
        attempt = 0
        while True:
            try:
                response = self._http.send(call.build(self._http))
            except httpx.TransportError as exc:
                delay = self._retry.after_error(attempt, exc, call)
            else:
                delay = self._retry.after_response(attempt, response, call)
                if delay is None:
                    return call.finish(response)
            time.sleep(delay)
            attempt += 1

    def _map(
        self,
        make_call: Callable[[list[Any]], Call[list[T]]],
        prepare: Callable[[Any], Any],
        items: Sequence[Any],
        batch_size: int,
        concurrency: int,
        progress: bool,
        fail_fast: bool,
    ) -> list[T | ItemError]:
        """One result or `ItemError` per item, in order: `batch_size` per request, `concurrency` in flight."""
        work = _core.batches(items, batch_size, concurrency)
        with Progress(len(items), progress) as bar, ThreadPoolExecutor(max_workers=concurrency) as pool:

            def run(start: int, inputs: Sequence[Any]) -> list[T | ItemError]:
                batch: Batch[T] = Batch(start, inputs, prepare, fail_fast)
                while (group := batch.next_group()) is not None:
                    try:
                        batch.answered(group, self._send(make_call(batch.payload(group))))
                    except NNServeError as exc:
                        batch.refused(group, exc)
                bar.update(len(inputs), batch.failures)
                return batch.done()

            futures = [pool.submit(run, start, inputs) for start, inputs in work]
            try:
                return [result for future in futures for result in future.result()]
            except BaseException:
                for future in futures:
                    future.cancel()
                raise

    def _history_limit(self) -> int | None:
        """The forecaster's max_history, asked of the server once per client."""
        if "sequence" not in self._max_history:
            spec = self.model("sequence").series
            self._max_history["sequence"] = spec["max_history"] if spec else None
        return self._max_history["sequence"]

    def health(self) -> Health:
        """Whether the server process is up (needs no API key)."""
        return self._send(_core.health_call())

    def ready(self) -> bool:
        """Whether every model is loaded and warmed up; False while the server is still loading."""
        return self._send(_core.ready_call())

    def models(self) -> list[ModelInfo]:
        return self._send(_core.models_call())

    def model(self, name: str) -> ModelInfo:
        return self._send(_core.model_call(name))

    @overload
    def predict(self, model: str, images: ImageInput, top_k: int = 3) -> Prediction: ...
    @overload
    def predict(self, model: str, images: Iterable[ImageInput], top_k: int = 3) -> list[Prediction]: ...
    def predict(self, model: str, images: ImageInput | Iterable[ImageInput], top_k: int = 3) -> Any:
        """Classify one image (one `Prediction`) or several in one request (a list, in order)."""
        return self._send(_core.predict_call(model, images, top_k))

    @overload
    def predict_digits(self, images: ImageInput, top_k: int = 3) -> Prediction: ...
    @overload
    def predict_digits(self, images: Iterable[ImageInput], top_k: int = 3) -> list[Prediction]: ...
    def predict_digits(self, images: ImageInput | Iterable[ImageInput], top_k: int = 3) -> Any:
        return self.predict("digits", images, top_k)

    @overload
    def predict_cifar(self, images: ImageInput, top_k: int = 3) -> Prediction: ...
    @overload
    def predict_cifar(self, images: Iterable[ImageInput], top_k: int = 3) -> list[Prediction]: ...
    def predict_cifar(self, images: ImageInput | Iterable[ImageInput], top_k: int = 3) -> Any:
        return self.predict("cifar", images, top_k)

    @overload
    def forecast(self, series: Series, horizon: int | None = None) -> Forecast: ...
    @overload
    def forecast(self, series: Iterable[Series], horizon: int | None = None) -> list[Forecast]: ...
    def forecast(self, series: Series | Iterable[Series], horizon: int | None = None) -> Any:
        """Forecast one series (one `Forecast`) or several in one request; `horizon` defaults to the model's.

        A series longer than the model's `max_history` is cut to its most recent values, with a warning.
        """
        items, single = _core.as_series_list(series)
        if items:
            items = _core.recent_histories(items, self._history_limit())
        return self._send(_core.forecast_call(items, horizon, single))

    def predict_many(
        self,
        model: str,
        images: Iterable[ImageInput],
        batch_size: int = 64,
        concurrency: int = 4,
        progress: bool = False,
        top_k: int = 3,
        fail_fast: bool = False,
    ) -> list[Prediction | ItemError]:
        """Classify any number of images: requests of `batch_size`, `concurrency` at a time, results in order.

        An image that fails (unreadable file, undecodable image) gets an `ItemError` in its place and the rest
        go on; `fail_fast=True` raises the first failure instead. `progress=True` shows a count on stderr.
        """
        items, _ = as_image_list(images)
        return self._map(
            lambda batch: _core.predict_call(model, batch, top_k),
            encode_image,
            items,
            batch_size,
            concurrency,
            progress,
            fail_fast,
        )

    def forecast_many(
        self,
        series: Iterable[Series],
        horizon: int | None = None,
        batch_size: int = 64,
        concurrency: int = 4,
        progress: bool = False,
        fail_fast: bool = False,
    ) -> list[Forecast | ItemError]:
        """Forecast any number of series, batched and concurrent like `predict_many`, failures in place."""
        items, _ = _core.as_series_list(series)
        if items:
            items = _core.recent_histories(items, self._history_limit())
        return self._map(
            lambda batch: _core.forecast_call(batch, horizon),
            _core.series_values,
            items,
            batch_size,
            concurrency,
            progress,
            fail_fast,
        )


class AsyncClient:
    """The asyncio twin of `Client`: the same methods and arguments, each awaitable."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = 30.0,
        retries: int = 3,
        backoff: float = 0.2,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._retry = RetryPolicy(retries, backoff)
        self._http = httpx.AsyncClient(**_core.http_options(base_url, api_key, timeout, transport))
        self._max_history: dict[str, int | None] = {}

    @property
    def base_url(self) -> str:
        return str(self._http.base_url)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _send(self, call: Call[T]) -> T:
        attempt = 0
        while True:
            try:
                response = await self._http.send(call.build(self._http))
            except httpx.TransportError as exc:
                delay = self._retry.after_error(attempt, exc, call)
            else:
                delay = self._retry.after_response(attempt, response, call)
                if delay is None:
                    return call.finish(response)
            await asyncio.sleep(delay)
            attempt += 1

    async def _map(
        self,
        make_call: Callable[[list[Any]], Call[list[T]]],
        prepare: Callable[[Any], Any],
        items: Sequence[Any],
        batch_size: int,
        concurrency: int,
        progress: bool,
        fail_fast: bool,
    ) -> list[T | ItemError]:
        """One result or `ItemError` per item, in order: `batch_size` per request, `concurrency` in flight."""
        work = _core.batches(items, batch_size, concurrency)
        gate = asyncio.Semaphore(concurrency)
        with Progress(len(items), progress) as bar:

            async def run(start: int, inputs: Sequence[Any]) -> list[T | ItemError]:
                async with gate:
                    batch: Batch[T] = Batch(start, inputs, prepare, fail_fast)
                    while (group := batch.next_group()) is not None:
                        try:
                            batch.answered(group, await self._send(make_call(batch.payload(group))))
                        except NNServeError as exc:
                            batch.refused(group, exc)
                bar.update(len(inputs), batch.failures)
                return batch.done()

            tasks = [asyncio.ensure_future(run(start, inputs)) for start, inputs in work]
            try:
                done = await asyncio.gather(*tasks)
            except BaseException:
                for task in tasks:
                    task.cancel()
                raise
        return [result for batch_results in done for result in batch_results]

    async def _history_limit(self) -> int | None:
        """The forecaster's max_history, asked of the server once per client."""
        if "sequence" not in self._max_history:
            spec = (await self.model("sequence")).series
            self._max_history["sequence"] = spec["max_history"] if spec else None
        return self._max_history["sequence"]

    async def health(self) -> Health:
        """Whether the server process is up (needs no API key)."""
        return await self._send(_core.health_call())

    async def ready(self) -> bool:
        """Whether every model is loaded and warmed up; False while the server is still loading."""
        return await self._send(_core.ready_call())

    async def models(self) -> list[ModelInfo]:
        return await self._send(_core.models_call())

    async def model(self, name: str) -> ModelInfo:
        return await self._send(_core.model_call(name))

    @overload
    async def predict(self, model: str, images: ImageInput, top_k: int = 3) -> Prediction: ...
    @overload
    async def predict(self, model: str, images: Iterable[ImageInput], top_k: int = 3) -> list[Prediction]: ...
    async def predict(self, model: str, images: ImageInput | Iterable[ImageInput], top_k: int = 3) -> Any:
        """Classify one image (one `Prediction`) or several in one request (a list, in order)."""
        return await self._send(_core.predict_call(model, images, top_k))

    @overload
    async def predict_digits(self, images: ImageInput, top_k: int = 3) -> Prediction: ...
    @overload
    async def predict_digits(self, images: Iterable[ImageInput], top_k: int = 3) -> list[Prediction]: ...
    async def predict_digits(self, images: ImageInput | Iterable[ImageInput], top_k: int = 3) -> Any:
        return await self.predict("digits", images, top_k)

    @overload
    async def predict_cifar(self, images: ImageInput, top_k: int = 3) -> Prediction: ...
    @overload
    async def predict_cifar(self, images: Iterable[ImageInput], top_k: int = 3) -> list[Prediction]: ...
    async def predict_cifar(self, images: ImageInput | Iterable[ImageInput], top_k: int = 3) -> Any:
        return await self.predict("cifar", images, top_k)

    @overload
    async def forecast(self, series: Series, horizon: int | None = None) -> Forecast: ...
    @overload
    async def forecast(self, series: Iterable[Series], horizon: int | None = None) -> list[Forecast]: ...
    async def forecast(self, series: Series | Iterable[Series], horizon: int | None = None) -> Any:
        """Forecast one series (one `Forecast`) or several in one request; `horizon` defaults to the model's.

        A series longer than the model's `max_history` is cut to its most recent values, with a warning.
        """
        items, single = _core.as_series_list(series)
        if items:
            items = _core.recent_histories(items, await self._history_limit())
        return await self._send(_core.forecast_call(items, horizon, single))

    async def predict_many(
        self,
        model: str,
        images: Iterable[ImageInput],
        batch_size: int = 64,
        concurrency: int = 4,
        progress: bool = False,
        top_k: int = 3,
        fail_fast: bool = False,
    ) -> list[Prediction | ItemError]:
        """Classify any number of images: requests of `batch_size`, `concurrency` at a time, results in order.

        An image that fails (unreadable file, undecodable image) gets an `ItemError` in its place and the rest
        go on; `fail_fast=True` raises the first failure instead. `progress=True` shows a count on stderr.
        """
        items, _ = as_image_list(images)
        return await self._map(
            lambda batch: _core.predict_call(model, batch, top_k),
            encode_image,
            items,
            batch_size,
            concurrency,
            progress,
            fail_fast,
        )

    async def forecast_many(
        self,
        series: Iterable[Series],
        horizon: int | None = None,
        batch_size: int = 64,
        concurrency: int = 4,
        progress: bool = False,
        fail_fast: bool = False,
    ) -> list[Forecast | ItemError]:
        """Forecast any number of series, batched and concurrent like `predict_many`, failures in place."""
        items, _ = _core.as_series_list(series)
        if items:
            items = _core.recent_histories(items, await self._history_limit())
        return await self._map(
            lambda batch: _core.forecast_call(batch, horizon),
            _core.series_values,
            items,
            batch_size,
            concurrency,
            progress,
            fail_fast,
        )
