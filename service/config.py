"""Service configuration: every knob is an environment variable prefixed `NNSERVE_`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from models import DEFAULT_ROOT


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NNSERVE_", extra="ignore")

    host: Literal["0.0.0.0", "127.0.0.1", "::"] = Field("0.0.0.0", description="Interface to listen on.")
    port: int = Field(8000, ge=1024, le=65535, description="TCP port.")
    models_dir: Path = Field(DEFAULT_ROOT, description="Model repository: <name>/<version>/manifest.json.")
    models: str = Field("", description="Comma-separated model names to serve; empty serves all.")
    backend: Literal["onnx", "torchscript"] = Field("onnx", description="ONNX Runtime or TorchScript (needs torch).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto uses a GPU when one is usable.")
    max_batch_size: int = Field(32, ge=1, description="Most requests LitServe batches into one model call.")
    batch_timeout: float = Field(
        0.0, ge=0, description="Extra seconds a non-full batch waits for more; 0 batches what is already queued."
    )
    workers_per_device: int = Field(1, ge=1, description="Inference processes per model and device.")
    api_servers: int = Field(2, ge=1, description="HTTP server processes (decode and validate run there).")
    intra_op_threads: int = Field(
        0, ge=0, description="Threads for batches of 8+ (smaller use one); 0 splits the cores among a model's workers."
    )
    api_key: str | None = Field(None, description="When set, every route except /health needs this key.")
    max_request_bytes: int = Field(10 * 2**20, ge=1024, description="Largest accepted request body (413 above).")
    max_items_per_request: int = Field(256, ge=1, description="Most images or series in one request (413 above).")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="Largest decoded image, width x height (413 above).")
    max_in_flight: int = Field(2048, ge=1, description="Items in flight per model before 503 + Retry-After.")
    request_timeout: float = Field(30.0, gt=0, description="Seconds before a request is answered 504.")
    header_timeout: float = Field(
        10.0, gt=0, description="Seconds a connection has to send a complete request head (408 and close after)."
    )
    body_timeout: float = Field(10.0, gt=0, description="Seconds a request body may stop arriving (408 and close).")
    keep_alive_timeout: float = Field(5.0, gt=0, description="Seconds an idle keep-alive connection stays open.")
    max_header_bytes: int = Field(
        16 * 2**10, ge=1024, description="Largest request line and headers together (431 above)."
    )
    max_connections: int = Field(
        1000, ge=1, description="Open connections per HTTP server process; the oldest idle one makes room, else 503."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log verbosity.")
    access_log: bool = Field(True, description="One info line per request, with its request id.")

    def model_list(self) -> list[str]:
        return [m.strip() for m in self.models.split(",") if m.strip()]
