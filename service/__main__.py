"""`python -m service`: serve every model of the repository, configured by NNSERVE_* variables."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import sys
import tempfile

from service.config import Settings


def _graceful_sigterm() -> None:
    """SIGTERM (docker stop, Kubernetes) takes LitServe's graceful path, like Ctrl-C."""
    main_pid = os.getpid()

    def handler(signum: int, frame: object) -> None:
        if os.getpid() != main_pid:  # a forked HTTP server, re-raising what uvicorn already handled
            raise SystemExit(0)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _limit_malloc_arenas() -> None:
    """glibc gives busy threads malloc arenas of their own and keeps what is freed in them, so a server's memory
    creeps up under load. Two arenas per process keep it flat (and measured no slower)."""
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")  # read at start by the spawned inference workers
    with contextlib.suppress(OSError, AttributeError, ValueError):  # not glibc
        ctypes.CDLL("libc.so.6").mallopt(-8, int(os.environ["MALLOC_ARENA_MAX"]))  # M_ARENA_MAX: this process, forks


def main() -> None:
    settings = Settings()
    _limit_malloc_arenas()
    # Metrics from all processes meet in one folder; it must be known before prometheus_client is imported.
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        folder = tempfile.mkdtemp(prefix="nnserve-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
        atexit.register(shutil.rmtree, folder, ignore_errors=True)

    from models import RepositoryError
    from service import logs
    from service.runtime import DeviceError
    from service.server import build_server

    logs.configure(settings.log_level)
    try:
        server = build_server(settings)
    except (DeviceError, RepositoryError, OSError, ValueError) as e:
        sys.exit(f"nnserve: {e}")
    _graceful_sigterm()
    server.run(
        host=settings.host,
        port=settings.port,
        num_api_servers=settings.api_servers,
        log_level=settings.log_level,
        generate_client_file=False,
        access_log=False,  # the gateway logs each request with its id
    )


if __name__ == "__main__":
    main()
