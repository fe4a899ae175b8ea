"""The nnserve server: a LitServer whose routes, data plane and process life are nnserve's own.

LitServe builds the FastAPI app, registers routes through its hooks, and (in worker mode) runs the inference
workers with their batching loop. nnserve answers HTTP in `service/routes.py`, decides admission, readiness and
where a model runs in `service/dataplane.py`, and starts and watches the processes in `service/supervisor.py`.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from models import load, model_names
from service import openapi, routes, v2, web
from service.api import ModelAPI, build_api
from service.config import Settings
from service.dataplane import DataPlane, Mode, SharedState
from service.errors import install_handlers
from service.gateway import ASGIApp, Gateway
from service.litserve_adapter import AdaptedServer
from service.runtime import available_cpus, resolve_device, threads_per_worker

logger = logging.getLogger("nnserve")


def execution_mode(setting: str, device: str) -> Mode:
    """auto: inline on a CPU (no hand-off costs more than these models' calls), workers own a GPU."""
    if setting == "auto":
        return "inline" if device == "cpu" else "worker"
    return setting  # type: ignore[return-value]


class NNServer(AdaptedServer):
    def __init__(self, apis: list[ModelAPI], settings: Settings, device: str, mode: Mode, state: SharedState) -> None:
        self.settings = settings
        self.device_kind = device
        self.mode = mode
        self.state = state
        self.plane = DataPlane(apis, settings, state, mode, device)
        super().__init__(
            apis,
            accelerator=device,
            devices=1 if device == "cpu" else "auto",
            workers_per_device=settings.workers_per_device,
            timeout=settings.request_timeout,
            disable_openapi_url=False,
        )
        routes.register_unknown_model(self.app, self.plane)
        install_handlers(self.app)
        openapi.install(self.app, settings, {api.name: api.manifest.version for api in apis})

    def register_routes(self) -> None:
        web.mount(self.app, "nnserve")
        routes.register_operations(self.app, self.plane)
        v2.register_v2(self.app, self.plane)

    def register_predict_route(self, lit_api: Any) -> None:
        routes.register_predict(self.app, self.plane, lit_api)

    @asynccontextmanager
    async def lifespan(self, app: FastAPI):  # type: ignore[override]
        """Per HTTP server process: make the data plane ready, and in worker mode read the workers' answers."""
        await self.plane.start(app.response_queue_id, self.exchange)
        try:
            if self.mode == "worker":
                async with super().lifespan(app):
                    yield
            else:
                yield
        finally:
            await self.plane.stop()

    def asgi_app(self) -> ASGIApp:
        """The application each HTTP server process serves: the gateway around LitServe's FastAPI app, and CORS
        around both when configured (a browser's preflight carries no API key)."""
        paths = {route.path for route in self.app.routes if hasattr(route, "path")}
        app: ASGIApp = Gateway(
            self.app,
            api_key=self.settings.api_key,
            routes=paths,
            is_open=routes.is_open,
            access_log=self.settings.access_log,
        )
        if origins := self.settings.cors_list():
            app = CORSMiddleware(
                app,
                allow_origins=origins,
                allow_methods=["GET", "HEAD", "POST"],
                allow_headers=["Authorization", "X-API-Key", "Content-Type", "X-Request-ID"],
                expose_headers=["X-Request-ID", "Retry-After"],
            )
        return app


def build_server(settings: Settings) -> NNServer:
    """Load every manifest, pick the device and execution mode, and wire one LitServe API per model."""
    names = settings.model_list() or model_names(settings.models_dir)
    if not names:
        raise SystemExit(f"no models found under {settings.models_dir.resolve()}")
    models = []
    for name in names:
        model = load(settings.models_dir, name)
        model.verify([settings.backend])  # a serving image holds only the artifact it runs
        models.append(model)
    probe = models[0].artifact_path("torchscript" if settings.backend == "torchscript" else "onnx")
    device = resolve_device(settings.device, settings.backend, probe)
    settings = settings.for_host(device, available_cpus())
    mode = execution_mode(settings.execution, device)
    if mode == "inline":
        slots, threads = settings.api_servers, 1  # one thread per HTTP process: the processes share the cores
    else:
        slots = settings.workers_per_device
        threads = threads_per_worker(settings.intra_op_threads, settings.workers_per_device)
    state = SharedState(names, slots, settings.api_servers)
    apis = [build_api(m, settings, device, threads, state.models[m.manifest.name]) for m in models]
    for api in apis:
        api.errors = state.errors
    logger.info(
        "serving %s with %s on %s, %s mode, %d thread(s) per model call",
        ", ".join(names),
        settings.backend,
        device,
        mode,
        threads,
    )
    return NNServer(apis, settings, device, mode, state)
