"""Service configuration: every knob is an environment variable prefixed `NNSERVE_`."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models import DEFAULT_ROOT


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NNSERVE_", extra="ignore")

    host: str = Field("0.0.0.0", description="Interface to listen on: an address or a host name of this machine.")
    port: int = Field(8000, ge=1024, le=65535, description="TCP port.")
    models_dir: Path = Field(DEFAULT_ROOT, description="Model repository: <name>/<version>/manifest.json.")
    models: str = Field("", description="Comma-separated model names to serve; empty serves all.")
    backend: Literal["onnx", "torchscript"] = Field("onnx", description="ONNX Runtime or TorchScript (needs torch).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto uses a GPU when one is usable.")
    max_batch_size: int = Field(32, ge=1, description="Most requests LitServe batches into one model call.")
    batch_timeout: float = Field(
        0.0, ge=0, description="Extra seconds a non-full batch waits for more; 0 batches what is already queued."
    )
    execution: Literal["auto", "inline", "worker"] = Field(
        "auto",
        description="Where models run: inline in the HTTP processes, or in LitServe inference workers; "
        "auto is inline on a CPU and worker on a GPU.",
    )
    workers_per_device: int = Field(
        0,
        ge=0,
        description="Inference processes per model and device (worker mode); 0: 2 on a GPU host of 8+ CPUs, else 1.",
    )
    api_servers: int = Field(
        0,
        ge=0,
        description="HTTP server processes (decode and validate run there); 0: one per CPU on a CPU (at least 2), "
        "half the CPUs on a GPU (2 to 8).",
    )
    intra_op_threads: int = Field(
        0, ge=0, description="Threads for batches of 8+ (smaller use one); 0 splits the cores among a model's workers."
    )
    cpu_memory_arena: bool = Field(
        False,
        description="ONNX Runtime's CPU memory arena: faster model calls, and each process keeps the buffers of the "
        "largest batch it has run.",
    )
    api_key: str | None = Field(
        None, description="When set, every route but the probes, the web page and the API docs needs this key."
    )
    max_request_bytes: int = Field(10 * 2**20, ge=1024, description="Largest accepted request body (413 above).")
    max_items_per_request: int = Field(256, ge=1, description="Most images or series in one request (413 above).")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="Largest decoded image, width x height (413 above).")
    # 128 Mpx: 256 photos of 800x600 fit, and so does a 10 MiB body of real JPEG photos (some 0.1 byte per pixel
    # at the least); only flat, synthetic images pack more pixels into the body limit. 96 flat 4096x4096 PNGs
    # (1.6 Gpx in 1.6 MB, 12x over) stalled a server for 11.7 s before this bound; a request at the bound costs
    # at most about 1 s of decoding (RGB PNG, 130 Mpx/s), on a pool thread.
    max_request_pixels: int = Field(
        2**27, ge=1, description="Most decoded pixels in one request, all images together (413 above)."
    )
    decode_threads: int = Field(
        2, ge=1, description="Threads per HTTP process that decode large images and parse large bodies."
    )
    max_in_flight: int = Field(
        16384, ge=1, description="Items in flight per model, whole server, before 503 + Retry-After (a memory bound)."
    )
    max_queue_delay: float | None = Field(
        None, gt=0, description="Expected wait beyond which new work is refused 503; default half the request timeout."
    )
    request_timeout: float = Field(30.0, gt=0, description="Seconds before a request is answered 504.")
    shutdown_grace: float = Field(
        30.0, ge=0, description="Seconds in-flight requests get to finish after SIGTERM before the server exits."
    )
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
    cors_origins: str = Field(
        "", description="Comma-separated origins allowed to call the API from a browser (`*` for any); empty: off."
    )

    @field_validator("host")
    @classmethod
    def _resolvable(cls, host: str) -> str:
        try:
            socket.getaddrinfo(host, None)
        except (socket.gaierror, UnicodeError):
            raise ValueError("not an address or a host name this machine resolves") from None
        return host

    def for_host(self, device: str, cpus: int) -> Settings:
        """These settings with the process counts left at 0 chosen for a host of `cpus` CPUs serving on `device`.

        On a CPU the models run in the HTTP processes, one thread each, so one process per CPU uses every core (2 at
        the least, so that one dying leaves another serving). On a GPU the HTTP processes decode and the workers feed
        the device; on one H100 with 16 CPUs, 8 HTTP servers with 2 workers per model served 1.7-2.1x the single
        images and 2.1-4.0x the images in 64-image requests of 2 servers with 1 worker; 4 workers or 16 servers
        served fewer single images (3,317-4,390 against 4,425-4,686 requests/s) for a gain on one 64-image line
        each (bench/README.md)."""
        on_gpu = device != "cpu"
        api_servers = self.api_servers or (min(8, max(2, cpus // 2)) if on_gpu else max(2, cpus))
        workers = self.workers_per_device or (2 if on_gpu and cpus >= 8 else 1)
        return self.model_copy(update={"api_servers": api_servers, "workers_per_device": workers})

    def queue_delay_limit(self) -> float:
        return self.max_queue_delay if self.max_queue_delay is not None else self.request_timeout / 2

    def model_list(self) -> list[str]:
        return [m.strip() for m in self.models.split(",") if m.strip()]

    def cors_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]


def settings_problems(error: ValidationError) -> list[str]:
    """One line per bad setting: the variable, the value given, and what is allowed."""
    lines = []
    for problem in error.errors():
        name = "NNSERVE_" + "_".join(str(part) for part in problem["loc"]).upper()
        lines.append(f"{name}={problem.get('input')!r}: {problem['msg'].removeprefix('Value error, ')}")
    return lines
