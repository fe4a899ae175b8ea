"""LitServe APIs: one per model, each a thin layer between parsed requests and a runtime.

`parse` runs in the HTTP server process (decode and validate, so bad input never joins a batch); the LitServe
hooks `setup`, `predict` and `encode_response` run wherever the model runs (see `service/dataplane.py`): in the
HTTP server process itself, or in a LitServe inference worker. Responses leave them as finished JSON bytes.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any, TypeVar

import litserve as ls
import numpy as np
from starlette.requests import Request

from models import ModelVersion, normalize
from service import logs, metrics, process
from service.config import Settings
from service.dataplane import ModelState
from service.inputs import ImageDecoder, SeriesParser
from service.litserve_adapter import DrainingLoop
from service.runtime import Runtime, load_runtime, planned_providers

logger = logging.getLogger("nnserve")

# Largest single model call on a CPU; bigger batches run in slices. Past 32 items a CPU gains nothing per item
# (one ONNX Runtime thread, items/s at batch 8/32/64: cifar 604/593/586, digits 4,923/4,914/4,987, sequence
# 53k/59k/59k), while activation memory keeps growing with the batch.
MAX_MODEL_BATCH = 32
# A GPU still gains past 64 (ONNX Runtime CUDA on one H200: 314k digits/s at batch 64, 433k at 128). There every
# call is padded up to one of a few sizes, each run once before the worker reports ready, because a new input
# shape makes a runtime pick kernels again (cuDNN times every convolution algorithm). TorchScript takes powers of
# two (batching gained 3.8x on digits and 4.3x on cifar at c=64 on one H200). ONNX Runtime takes one size: on one
# H200 a call whose shape differs from the previous call's took 38 ms (digits) and 210 ms (cifar) even when that
# shape had run before, against 0.33 and 1.45 ms at 128 rows repeated; padded to 128 alone, batching gained 3.0x
# and 7.7x at c=64, where sizes that varied had made it 0.21-0.67x of batching off. A lone request, the usual call
# at low load, would then pay for 128 rows, so ONNX Runtime on a GPU keeps two sessions of each model, one that only
# ever sees GPU_SMALL_BATCH rows and one that only sees 128 (`service.runtime.OnnxRuntime`: calls under WIDE_BATCH
# rows take the first).
GPU_MODEL_BATCH = 128
GPU_SMALL_BATCH = 4
GPU_BATCH_SIZES = tuple(2**i for i in range(GPU_MODEL_BATCH.bit_length()))

T = TypeVar("T")
# A model's work in steps: it yields between model calls, so whoever drives it may do other work there (the
# inline executor answers other requests on its event loop), and returns the result.
Steps = Generator[None, None, T]


def finish(steps: Steps[T]) -> T:
    """Drive `steps` to the end at once: for a caller with nothing else to do between model calls."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def padded_sizes(backend: str, on_gpu: bool) -> tuple[int, ...]:
    """The batch sizes a model call is padded to, smallest first; none: calls go as they come (a CPU)."""
    if not on_gpu:
        return ()
    return (GPU_SMALL_BATCH, GPU_MODEL_BATCH) if backend == "onnx" else GPU_BATCH_SIZES


def _slices(parts: list[np.ndarray], step: int) -> Iterator[list[np.ndarray]]:
    """The rows of `parts`, in order, as lists of views holding `step` rows together (the last may hold fewer)."""
    pieces: list[np.ndarray] = []
    held = 0
    for part in parts:
        start = 0
        while start < len(part):
            take = min(step - held, len(part) - start)
            pieces.append(part[start : start + take])
            held, start = held + take, start + take
            if held == step:
                yield pieces
                pieces, held = [], 0
    if pieces:
        yield pieces


NOT_FINITE = "the model's output is not finite for this input: its values are far outside what the model takes"


class ModelAPI(ls.LitAPI):
    """What every served model shares: loading, warm-up, readiness and per-request failure isolation."""

    def __init__(self, model: ModelVersion, settings: Settings, device: str, threads: int, state: ModelState) -> None:
        super().__init__(
            max_batch_size=settings.max_batch_size,
            batch_timeout=settings.batch_timeout,
            api_path=f"/v1/{model.manifest.name}/predict",
            loop=DrainingLoop(),
        )
        self.model = model
        self.manifest = model.manifest
        self.backend = settings.backend
        self.device_kind = device
        self.threads = threads
        self.arena = settings.cpu_memory_arena
        self.workers = settings.workers_per_device
        self.log_level = settings.log_level
        self.state = state
        self.errors: Any = None  # where a failed setup says why (set by the server, shared with the supervisor)
        self.runtime: Runtime | None = None
        self.on_gpu = False  # set by setup, in the process that runs the model
        self.sizes: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        return self.manifest.name

    def planned_providers(self) -> list[str]:
        return planned_providers(self.backend, self.device_kind)

    async def parse(self, request: Request, body: bytes) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def items(payload: dict[str, Any]) -> int:
        return len(payload["x"])

    # --- inference worker -------------------------------------------------------------------------------
    def setup(self, device: str) -> None:
        logs.configure(self.log_level)
        artifact = "torchscript" if self.backend == "torchscript" else "onnx"
        try:
            path = self.model.artifact_path(artifact)
            self.runtime = load_runtime(self.backend, path, device, self.threads, self.arena)
            self.check_input(self.runtime.input_shape)
        except Exception as e:
            if self.errors is not None:
                self.errors.put(f"model {self.name} could not be loaded: {e}")
            raise
        self.on_gpu = device.startswith("cuda")
        self.sizes = padded_sizes(self.backend, self.on_gpu)
        # First calls allocate and pick kernels (on both the one-thread and the wide session; on a GPU for every
        # padded size): pay before ready.
        for n in self.sizes or (1, 8, MAX_MODEL_BATCH):
            self.run(self.warmup_batch(n))
        # A warm call of the largest size seeds the measured cost per item, so that the first batches are sliced
        # and admitted on a measurement rather than on none.
        n = self.max_rows()
        start = time.perf_counter()
        self.run(self.warmup_batch(n))
        self.state.observe(n, time.perf_counter() - start)
        logger.info(
            "model %s v%s ready: %s on %s via %s (%d threads)",
            self.name,
            self.manifest.version,
            self.backend,
            device,
            ",".join(self.runtime.providers),
            self.threads,
        )

    def worker_started(self, worker_id: int) -> None:
        """An inference worker finished `setup`: count it as ready (worker mode)."""
        process.name_process(f"worker-{self.name}-{worker_id}")
        process.end_with_parent(signal.SIGKILL)  # nothing of a worker's is worth finishing without the server
        self.state.ready[worker_id] = 1

    def check_input(self, shape: list[int | str | None] | None) -> None:
        """The graph takes what the manifest promises: same rank, same fixed sizes (named axes are dynamic)."""
        expected = self.manifest.input.shape
        if shape is None:
            return
        fixed = [d if isinstance(d, int) else None for d in shape]
        wanted = [d if isinstance(d, int) and d > 0 else None for d in expected]
        clash = len(fixed) != len(wanted) or any(
            f is not None and w is not None and f != w for f, w in zip(fixed, wanted, strict=True)
        )
        if clash:
            raise ValueError(f"the graph's input shape {shape} does not match the manifest's input.shape {expected}")

    def warmup_batch(self, n: int) -> np.ndarray:
        raise NotImplementedError

    def run(
        self, x: np.ndarray | list[np.ndarray], prepare: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> np.ndarray:
        """The model's output for `x` in one go (see `run_steps`)."""
        return finish(self.run_steps(x, prepare, self.max_rows()))

    def max_rows(self) -> int:
        return GPU_MODEL_BATCH if self.on_gpu else MAX_MODEL_BATCH

    def run_steps(
        self, x: np.ndarray | list[np.ndarray], prepare: Callable[[np.ndarray], np.ndarray] | None, rows: int
    ) -> Steps[np.ndarray]:
        """The model's output for `x`, or for the rows of several arrays in order, in calls of at most `rows` rows,
        yielding between calls; `prepare` turns each slice into model input just before its call.

        Arrays are sliced as they come, never joined or prepared whole first: a batch of 32 requests of 64 CIFAR-10
        images would otherwise hold 25 MB more per HTTP process for calls that take 393 KB at a time (peak RSS
        of the server tree under 64-image requests at c=64, slices of 64: 438 MB joined and prepared whole, 344 MB
        by slice)."""
        outputs = []
        for pieces in _slices(x if isinstance(x, list) else [x], rows):
            if outputs:
                yield
            ready = [prepare(piece) for piece in pieces] if prepare else pieces
            outputs.append(self._call(ready[0] if len(ready) == 1 else np.concatenate(ready)))
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)

    def _call(self, x: np.ndarray) -> np.ndarray:
        assert self.runtime is not None
        n = len(x)
        size = next((s for s in self.sizes if s >= n), n)
        if size == n:
            return self.runtime.run(x)
        padded = np.zeros((size, *x.shape[1:]), dtype=x.dtype)
        padded[:n] = x
        return self.runtime.run(padded)[:n]

    def predict(self, requests: list[dict[str, Any]]) -> list[Any]:
        """LitServe's hook: all requests' items at once (see `predict_steps`)."""
        return finish(self.predict_steps(requests, self.max_rows()))

    def predict_steps(self, requests: list[dict[str, Any]], rows: int) -> Steps[list[Any]]:
        """Run all requests' items in model calls of at most `rows` rows; if that fails, run each request alone so
        one cannot sink the rest."""
        items = sum(self.items(r) for r in requests)
        metrics.observe_batch(self.name, len(requests), items)
        try:
            return (yield from self._timed(self.predict_batch(requests, rows), items))
        except Exception:
            logger.exception("batched call of %s failed; retrying its %d requests one by one", self.name, len(requests))
        results: list[Any] = []
        for r in requests:
            try:
                results.extend((yield from self.predict_batch([r], rows)))
            except Exception as e:
                logger.exception("request %s to %s failed", r.get("request_id"), self.name)
                results.append(e)
        return results

    def _timed(self, steps: Steps[T], items: int) -> Steps[T]:
        """`steps`, counting only the time spent in them (not what the driver did between them) as the cost of
        `items`, for admission and slicing."""
        busy = 0.0
        while True:
            start = time.perf_counter()
            try:
                next(steps)
            except StopIteration as done:
                self.state.observe(items, busy + time.perf_counter() - start)
                return done.value
            busy += time.perf_counter() - start
            yield

    def predict_batch(self, requests: list[dict[str, Any]], rows: int) -> Steps[list[Any]]:
        raise NotImplementedError

    def encode_response(self, output: Any) -> bytes | np.ndarray | tuple[int, str, str]:
        """v1 answers leave as finished JSON bytes; v2 answers as the output tensor, which the v2 layer encodes."""
        if isinstance(output, Exception):
            return 500, "internal", f"the model failed on this request ({type(output).__name__})"
        # Finite inputs far beyond what a model was trained on (a series of +-3e38) overflow inside it; JSON has
        # no NaN or Infinity, so such an answer is refused (400 under /v2, as its bad input; 422 under /v1).
        if isinstance(output, np.ndarray):
            return output if np.isfinite(output).all() else (400, "bad_request", NOT_FINITE)
        body = {"model": self.name, "version": self.manifest.version, "predictions": output}
        try:
            return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
        except ValueError:
            return 422, "invalid_input", NOT_FINITE


class ClassifierAPI(ModelAPI):
    def __init__(self, model: ModelVersion, settings: Settings, device: str, threads: int, state: ModelState) -> None:
        super().__init__(model, settings, device, threads, state)
        spec = self.manifest.preprocessing
        assert spec is not None and self.manifest.labels is not None
        self.decoder = ImageDecoder(spec, len(self.manifest.labels), settings)
        self.preprocessing = spec  # not `spec`: LitAPI keeps its API spec (OpenAI, ...) there
        self.labels = self.manifest.labels

    async def parse(self, request: Request, body: bytes) -> dict[str, Any]:
        x, top_k = await self.decoder.parse(request, body)
        return {"x": x, "top_k": top_k}

    def check_input(self, shape: list[int | str | None] | None) -> None:
        super().check_input(shape)
        spec = self.manifest.preprocessing
        assert spec is not None
        made = [self.decoder.channels, spec.height, spec.width]
        if shape is not None and [d if isinstance(d, int) else None for d in shape[1:]] != made:
            raise ValueError(f"preprocessing makes {made} images ({spec.color_mode}) but the graph takes {shape}")

    def warmup_batch(self, n: int) -> np.ndarray:
        spec = self.manifest.preprocessing
        assert spec is not None
        return np.zeros((n, self.decoder.channels, spec.height, spec.width), dtype=np.float32)

    def model_input(self, x: np.ndarray) -> np.ndarray:
        """uint8 pixels are preprocessed here; float32 tensors arrive preprocessed (the v2 protocol's form)."""
        return x if x.dtype == np.float32 else normalize(x, self.preprocessing)

    def predict_batch(self, requests: list[dict[str, Any]], rows: int) -> Steps[list[Any]]:
        logits = yield from self.run_steps([r["x"] for r in requests], self.model_input, rows)
        shifted = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(shifted)
        probs /= probs.sum(axis=1, keepdims=True)
        out, start = [], 0
        for r in requests:
            n = len(r["x"])
            rows = slice(start, start + n)
            out.append(logits[rows] if r.get("protocol") == "v2" else self._top_k(probs[rows], r["top_k"]))
            start += n
        return out

    def _top_k(self, probs: np.ndarray, k: int) -> list[dict[str, Any]]:
        order = np.argsort(-probs, axis=1)[:, :k]
        predictions = []
        for row, idx in zip(probs, order, strict=True):
            scores = [{"index": int(i), "label": self.labels[i], "probability": round(float(row[i]), 6)} for i in idx]
            predictions.append({**scores[0], "top_k": scores})
        return predictions


class ForecastAPI(ModelAPI):
    def __init__(self, model: ModelVersion, settings: Settings, device: str, threads: int, state: ModelState) -> None:
        super().__init__(model, settings, device, threads, state)
        assert self.manifest.series is not None
        self.parser = SeriesParser(self.manifest.series, settings)

    async def parse(self, request: Request, body: bytes) -> dict[str, Any]:
        items = await self.parser.parse(request, body)
        return {"x": [s for s, _ in items], "horizon": [h for _, h in items]}

    def warmup_batch(self, n: int) -> np.ndarray:
        assert self.manifest.series is not None
        t = np.arange(self.manifest.series.min_history * 2, dtype=np.float32)
        return np.tile(np.sin(t / 3.0), (n, 1))

    def predict_batch(self, requests: list[dict[str, Any]], rows: int) -> Steps[list[Any]]:
        """Series of equal length share model calls; the model normalizes each window itself."""
        series = [s for r in requests for s in r["x"]]
        forecasts: list[np.ndarray | None] = [None] * len(series)
        by_length: dict[int, list[int]] = {}
        for i, s in enumerate(series):
            by_length.setdefault(len(s), []).append(i)
        for group, indices in enumerate(by_length.values()):
            if group:
                yield
            ys = yield from self.run_steps(np.stack([series[i] for i in indices]), None, rows)
            for i, y in zip(indices, ys, strict=True):
                forecasts[i] = y
        out, start = [], 0
        for r in requests:
            mine = forecasts[start : start + len(r["x"])]
            start += len(r["x"])
            if r.get("protocol") == "v2":
                out.append(np.stack(mine)[:, : max(r["horizon"])])  # type: ignore[arg-type]
            else:
                out.append(
                    [
                        {"forecast": [round(float(v), 4) for v in y[:h]], "history_used": len(x)}  # type: ignore[index]
                        for y, h, x in zip(mine, r["horizon"], r["x"], strict=True)
                    ]
                )
        return out


def build_api(model: ModelVersion, settings: Settings, device: str, threads: int, state: ModelState) -> ModelAPI:
    cls = ClassifierAPI if model.manifest.task == "classification" else ForecastAPI
    return cls(model, settings, device, threads, state)
