"""Strong peer: FastAPI + ONNX Runtime, what a user who skips nnserve would more likely deploy.

One ONNX Runtime session per model on the same `model.onnx` nnserve serves, with one intra-op and one inter-op
thread, so `--workers N` uvicorn processes use N cores without oversubscribing them. Each request is decoded
with the manifest's preprocessing and run right in the async handler: no batching across requests, while the
images of one request go through the model as one batch. Routes, bodies (raw image, multipart form, JSON
`{"instances": [{"b64": ...}]}`, series JSON) and answers are nnserve's /v1 ones.

Run it as its user would deploy it, with uvicorn's command line; it serves the models nnserve would be given:

    NNSERVE_MODELS=digits,cifar python -m uvicorn bench.apps.peer_ort:create_app --factory --workers 2
"""

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, Request, Response
from starlette.datastructures import UploadFile  # what form parts are; fastapi's UploadFile subclasses it

import models
from bench.apps import top_k
from bench.payloads import image_tensor, series_tensor


@dataclass
class Loaded:
    manifest: models.Manifest
    session: ort.InferenceSession

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.manifest.input.name: x})[0]


def _session(path: Path, device: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    if device == "cuda":
        ort.preload_dlls()  # what ONNX Runtime's install guide says to do with NVIDIA's pip wheels
    return ort.InferenceSession(str(path), options, providers=providers)


def _error(status: int, code: str, message: str) -> Response:
    body = json.dumps({"error": {"code": code, "message": message}})
    return Response(body, status_code=status, media_type="application/json")


async def _images(request: Request, body: bytes) -> list[bytes]:
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
        form = await request.form()
        return [await part.read() for _, part in form.multi_items() if isinstance(part, UploadFile)]
    if kind.startswith("application/json"):
        return [base64.b64decode(item["b64"]) for item in json.loads(body)["instances"]]
    return [body]


def create_app() -> FastAPI:
    """The app of one worker process, built from nnserve's settings in the environment (uvicorn starts each
    worker from an import string, so that is where it learns what to load): NNSERVE_MODELS (default: every
    model in the repository), NNSERVE_MODELS_DIR and NNSERVE_DEVICE (cpu or cuda)."""
    root = Path(os.environ.get("NNSERVE_MODELS_DIR") or models.DEFAULT_ROOT)
    device = "cuda" if os.environ.get("NNSERVE_DEVICE") == "cuda" else "cpu"
    names = [n for n in os.environ.get("NNSERVE_MODELS", "").split(",") if n] or models.model_names(root)
    loaded = {}
    for name in names:
        version = models.load(root, name)
        loaded[name] = Loaded(version.manifest, _session(version.artifact_path("onnx"), device))
    app = FastAPI()

    @app.post("/v1/{name}/predict")
    async def predict(name: str, request: Request) -> Response:
        if name not in loaded:
            return _error(404, "not_found", f"no model {name}")
        model, body = loaded[name], await request.body()
        manifest = model.manifest
        try:
            if manifest.series is not None:
                doc = json.loads(body)
                x = series_tensor(doc["series"], manifest)[None]
                horizon = doc.get("horizon") or manifest.series.horizon
                predictions = [{"forecast": [round(float(v), 4) for v in model.run(x)[0, :horizon]]}]
            else:
                assert manifest.preprocessing is not None and manifest.labels is not None
                blobs = await _images(request, body)
                x = np.stack([image_tensor(blob, manifest.preprocessing) for blob in blobs])
                logits = model.run(x)
                probs = np.exp(logits - logits.max(axis=1, keepdims=True))
                predictions = top_k(probs / probs.sum(axis=1, keepdims=True), manifest.labels)
        except (ValueError, KeyError, TypeError, OSError) as e:  # bad JSON, base64 or image
            return _error(400, "invalid_request", f"{type(e).__name__}: {e}")
        reply = {"model": manifest.name, "version": manifest.version, "predictions": predictions}
        return Response(json.dumps(reply, separators=(",", ":")), media_type="application/json")

    @app.get("/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    return app
