"""The systems under test: how each is started, how it reports ready, and which request shapes it is sent."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.loadgen import HOST
from bench.payloads import SHAPES, V1_SHAPES

EVERY_SHAPE = tuple(SHAPES)
SINGLE_AND_SERIES = ("x1", "series")


@dataclass(frozen=True)
class System:
    name: str
    title: str
    module: str  # run as `python -m module`, or with `workers` as `python -m uvicorn module:create_app --factory`
    ready_path: str = "/ready"
    shapes: tuple[str, ...] = V1_SHAPES  # the request shapes a full run sends it (only nnserve speaks v2)
    extra_env: tuple[tuple[str, str], ...] = ()
    nnserve: bool = False  # configured only through NNSERVE_*, like nnserve itself
    routes_models: bool = False  # takes --model: it serves one route per model
    loads_artifacts: bool = False  # takes --models-dir and --device: it runs the real model
    workers: int = 0  # a uvicorn app run by uvicorn's command line with this many worker processes
    torch_threads: bool = False  # takes --threads: torch's intra-op threads
    json_only: bool = False  # images must come as JSON with base64, whatever the shape's envelope
    answers_constant: bool = False  # a floor: its answers do not depend on the request

    def command(self, port: int, models: list[str], models_dir: Path, device: str, threads: int = 0) -> list[str]:
        """How to start it; the uvicorn apps take what to load from the NNSERVE_* environment instead."""
        if self.workers:
            return [
                *(sys.executable, "-m", "uvicorn", f"{self.module}:create_app", "--factory"),
                *("--host", HOST, "--port", str(port), "--workers", str(self.workers)),
                *("--log-level", "warning", "--no-access-log"),
            ]
        argv = [sys.executable, "-m", self.module]
        if self.nnserve:
            return argv
        argv += ["--port", str(port)]
        if self.routes_models:
            argv += ["--model", ",".join(models)]
        if self.loads_artifacts:
            argv += ["--models-dir", str(models_dir), "--device", device]
        if self.torch_threads:
            argv += ["--threads", str(threads)]
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


def peer_name(processes: int) -> str:
    return f"peer-ort-{processes}"


def catalog(api_servers: int) -> dict[str, System]:
    """Every system, in the order a full run measures them. The strong peer runs as many processes as nnserve
    runs HTTP servers (`api_servers`), so both use the same cores; it is also measured with one."""
    peers = [
        System(
            peer_name(n),
            f"FastAPI + ONNX Runtime, 1 thread, {n} uvicorn process{'es' if n > 1 else ''}",
            "bench.apps.peer_ort",
            workers=n,
        )
        for n in dict.fromkeys((api_servers, 1))
    ]
    systems = [
        System("nnserve", "nnserve, dynamic batching", "service", shapes=EVERY_SHAPE, nnserve=True),
        *peers,
        System(
            "tutorial",
            "tutorial FastAPI + PyTorch, 1 process",
            "bench.apps.tutorial",
            shapes=SINGLE_AND_SERIES,
            routes_models=True,
            loads_artifacts=True,
            torch_threads=True,
        ),
        System(
            "nnserve-nobatch",
            "nnserve, batching off",
            "service",
            shapes=SINGLE_AND_SERIES,
            extra_env=(("NNSERVE_MAX_BATCH_SIZE", "1"),),
            nnserve=True,
        ),
        System(
            "http-floor",
            "FastAPI + uvicorn, constant",
            "bench.apps.http_floor",
            shapes=("x1",),
            workers=api_servers,
            answers_constant=True,
        ),
        System(
            "litserve-floor",
            "LitServe, constant",
            "bench.apps.litserve_floor",
            ready_path="/health",
            shapes=("x1",),
            routes_models=True,
            json_only=True,
            answers_constant=True,
        ),
    ]
    return {s.name: s for s in systems}
