"""LitServe APIs: one per model, each a thin layer between parsed requests and a runtime.

`parse` runs in the HTTP server process (decode and validate, so bad input never joins a batch); the LitServe
hooks `setup`, `predict` and `encode_response` run in the inference worker, where LitServe's
dynamic batching groups requests. Responses leave the worker as finished JSON bytes.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
from typing import Any

import litserve as ls
import numpy as np
from starlette.requests import Request

from models import ModelVersion
from service import logs, metrics
from service.batching import DrainingLoop
from service.config import Settings
from service.inputs import ImageDecoder, SeriesParser
from service.runtime import Runtime, load_runtime, planned_providers

logger = logging.getLogger("nnserve")

# Largest single model call; bigger batches run in slices. Past 64 items a CPU gains nothing per item,
# while activation memory keeps growing with the batch.
MAX_MODEL_BATCH = 64


class ModelAPI(ls.LitAPI):
    """What every served model shares: loading, warm-up, readiness and per-request failure isolation."""

    def __init__(self, model: ModelVersion, settings: Settings, device: str, threads: int) -> None:
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
        self.workers = settings.workers_per_device
        self.log_level = settings.log_level
        # Counts warmed-up workers; shared with the HTTP servers, which answer /ready from it.
        self.ready_workers = mp.get_context("spawn").Value("i", 0)
        self.runtime: Runtime | None = None

    @property
    def name(self) -> str:
        return self.manifest.name

    def planned_providers(self) -> list[str]:
        return planned_providers(self.backend, self.device_kind)

    def is_ready(self) -> bool:
        return self.ready_workers.value >= self.workers

    async def parse(self, request: Request, body: bytes) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def items(payload: dict[str, Any]) -> int:
        return len(payload["x"])

    # --- inference worker -------------------------------------------------------------------------------
    def setup(self, device: str) -> None:
        logs.configure(self.log_level)
        artifact = "torchscript" if self.backend == "torchscript" else "onnx"
        self.runtime = load_runtime(self.backend, self.model.artifact_path(artifact), device, self.threads)
        # First calls allocate and pick kernels (on both the one-thread and the wide session): pay before ready.
        for n in (1, 8, 64):
            self.run(self.warmup_batch(n))
        logger.info(
            "model %s v%s ready: %s on %s via %s (%d threads)",
            self.name,
            self.manifest.version,
            self.backend,
            device,
            ",".join(self.runtime.providers),
            self.threads,
        )
        with self.ready_workers.get_lock():
            self.ready_workers.value += 1

    def warmup_batch(self, n: int) -> np.ndarray:
        raise NotImplementedError

    def run(self, x: np.ndarray) -> np.ndarray:
        assert self.runtime is not None
        if len(x) <= MAX_MODEL_BATCH:
            return self.runtime.run(x)
        return np.concatenate([self.runtime.run(x[i : i + MAX_MODEL_BATCH]) for i in range(0, len(x), MAX_MODEL_BATCH)])

    def predict(self, requests: list[dict[str, Any]]) -> list[Any]:
        """Run all requests' items in one model call; if that fails, run each alone so one cannot sink the rest."""
        metrics.observe_batch(self.name, len(requests), sum(self.items(r) for r in requests))
        try:
            return self.predict_batch(requests)
        except Exception:
            logger.exception("batched call of %s failed; retrying its %d requests one by one", self.name, len(requests))
        results: list[Any] = []
        for r in requests:
            try:
                results.extend(self.predict_batch([r]))
            except Exception as e:
                logger.exception("request %s to %s failed", r.get("request_id"), self.name)
                results.append(e)
        return results

    def predict_batch(self, requests: list[dict[str, Any]]) -> list[Any]:
        raise NotImplementedError

    def encode_response(self, output: Any) -> bytes | tuple[int, str, str]:
        if isinstance(output, Exception):
            return 500, "internal", f"the model failed on this request ({type(output).__name__})"
        body = {"model": self.name, "version": self.manifest.version, "predictions": output}
        return json.dumps(body, separators=(",", ":")).encode()


class ClassifierAPI(ModelAPI):
    def __init__(self, model: ModelVersion, settings: Settings, device: str, threads: int) -> None:
        super().__init__(model, settings, device, threads)
        spec = self.manifest.preprocessing
        assert spec is not None and self.manifest.labels is not None
        self.decoder = ImageDecoder(spec, len(self.manifest.labels), settings)
        self.labels = self.manifest.labels
        # (x / 255 - mean) / std folded into one multiply-add per channel
        std = np.asarray(spec.std, dtype=np.float32)[None, :, None, None]
        self.scale = 1.0 / (255.0 * std)
        self.shift = -np.asarray(spec.mean, dtype=np.float32)[None, :, None, None] / std

    async def parse(self, request: Request, body: bytes) -> dict[str, Any]:
        x, top_k = await self.decoder.parse(request, body)
        return {"x": x, "top_k": top_k}

    def warmup_batch(self, n: int) -> np.ndarray:
        spec = self.manifest.preprocessing
        assert spec is not None
        return np.zeros((n, self.decoder.channels, spec.height, spec.width), dtype=np.float32)

    def predict_batch(self, requests: list[dict[str, Any]]) -> list[Any]:
        pixels = np.concatenate([r["x"] for r in requests]) if len(requests) > 1 else requests[0]["x"]
        logits = self.run(pixels.astype(np.float32) * self.scale + self.shift)
        logits = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        out, start = [], 0
        for r in requests:
            n = len(r["x"])
            out.append(self._top_k(probs[start : start + n], r["top_k"]))
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
    def __init__(self, model: ModelVersion, settings: Settings, device: str, threads: int) -> None:
        super().__init__(model, settings, device, threads)
        assert self.manifest.series is not None
        self.parser = SeriesParser(self.manifest.series, settings)

    async def parse(self, request: Request, body: bytes) -> dict[str, Any]:
        items = await self.parser.parse(request, body)
        return {"x": [s for s, _ in items], "horizon": [h for _, h in items]}

    def warmup_batch(self, n: int) -> np.ndarray:
        assert self.manifest.series is not None
        t = np.arange(self.manifest.series.min_history * 2, dtype=np.float32)
        return np.tile(np.sin(t / 3.0), (n, 1))

    def predict_batch(self, requests: list[dict[str, Any]]) -> list[Any]:
        """Series of equal length share one model call; the model normalizes each window itself."""
        series = [s for r in requests for s in r["x"]]
        forecasts: list[np.ndarray | None] = [None] * len(series)
        by_length: dict[int, list[int]] = {}
        for i, s in enumerate(series):
            by_length.setdefault(len(s), []).append(i)
        for indices in by_length.values():
            for i, y in zip(indices, self.run(np.stack([series[i] for i in indices])), strict=True):
                forecasts[i] = y
        out, start = [], 0
        for r in requests:
            out.append(
                [
                    {"forecast": [round(float(v), 4) for v in forecasts[start + j][:h]]}  # type: ignore[index]
                    for j, h in enumerate(r["horizon"])
                ]
            )
            start += len(r["x"])
        return out


def build_api(model: ModelVersion, settings: Settings, device: str, threads: int) -> ModelAPI:
    cls = ClassifierAPI if model.manifest.task == "classification" else ForecastAPI
    return cls(model, settings, device, threads)
