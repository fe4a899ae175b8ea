"""The systems under test: how each is started, how it reports ready, and how it takes images."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.payloads import ImageEnvelope


@dataclass(frozen=True)
class System:
    name: str
    title: str
    module: str  # run as `python -m module`
    ready_path: str
    image_envelope: ImageEnvelope = "raw"
    extra_env: tuple[tuple[str, str], ...] = ()
    nnserve: bool = False  # configured only through NNSERVE_*, like nnserve itself
    routes_models: bool = False  # takes --model: it serves one route per model
    loads_artifacts: bool = False  # takes --models-dir, --device and --threads: it runs the real model
    answers_constant: bool = False  # a floor: its answers do not depend on the request

    def command(self, port: int, models: list[str], models_dir: Path, device: str, threads: int = 0) -> list[str]:
        argv = [sys.executable, "-m", self.module]
        if self.nnserve:
            return argv
        argv += ["--port", str(port)]
        if self.routes_models:
            argv += ["--model", ",".join(models)]
        if self.loads_artifacts:
            argv += ["--models-dir", str(models_dir), "--device", device, "--threads", str(threads)]
        return argv

    def environment(
        self, port: int, models: list[str], models_dir: Path, device: str, max_batch_size: int | None
    ) -> dict[str, str]:
        """The inherited environment (so NNSERVE_* set by the user reach nnserve and the LitServe floor alike)
        plus what this run fixes: address, models, device, batch size."""
        env = dict(os.environ)
        env.update(
            NNSERVE_HOST="127.0.0.1",
            NNSERVE_PORT=str(port),
            NNSERVE_MODELS=",".join(models),
            NNSERVE_MODELS_DIR=str(models_dir),
            NNSERVE_DEVICE=device,
        )
        if max_batch_size is not None:
            env["NNSERVE_MAX_BATCH_SIZE"] = str(max_batch_size)
        env.update(self.extra_env)
        return env


SYSTEMS = {
    s.name: s
    for s in (
        System("nnserve", "nnserve, dynamic batching", "service", "/ready", nnserve=True),
        System(
            "nnserve-nobatch",
            "nnserve, batching off",
            "service",
            "/ready",
            extra_env=(("NNSERVE_MAX_BATCH_SIZE", "1"),),
            nnserve=True,
        ),
        System(
            "naive",
            "naive FastAPI + PyTorch",
            "bench.apps.naive",
            "/ready",
            routes_models=True,
            loads_artifacts=True,
        ),
        System("http-floor", "FastAPI + uvicorn, constant", "bench.apps.http_floor", "/ready", answers_constant=True),
        System(
            "litserve-floor",
            "LitServe, constant",
            "bench.apps.litserve_floor",
            "/health",
            image_envelope="json-b64",
            routes_models=True,
            answers_constant=True,
        ),
    )
}
