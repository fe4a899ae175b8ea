"""`python -m service`: serve every model of the repository, configured by NNSERVE_* variables."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import sys
import tempfile

from pydantic import ValidationError

from service.config import Settings, settings_problems

# glibc's own knobs (mallopt) and the environment variables that set them in a newly started process.
_MALLOC = {"MALLOC_ARENA_MAX": (-8, "2"), "MALLOC_MMAP_THRESHOLD_": (-3, "131072")}


def _tune_malloc() -> None:
    """Keep the server's memory flat under load.

    By default glibc gives busy threads arenas of their own, and raises its mmap threshold after the first large
    free, so that a model's activation buffers come from the heap and are never returned. Two arenas and a fixed
    128 KiB threshold (large buffers are mapped and unmapped) kept each worker some 50 MB smaller after a burst of
    64-image batches, at no measurable cost.
    """
    libc = None
    with contextlib.suppress(OSError):
        libc = ctypes.CDLL("libc.so.6")
    for name, (option, value) in _MALLOC.items():
        os.environ.setdefault(name, value)  # read at start by the spawned inference workers
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(option, int(os.environ[name]))  # this process and the HTTP servers forked from it


def main() -> None:
    try:
        settings = Settings()
    except ValidationError as e:
        print("\n".join(f"nnserve: {line}" for line in settings_problems(e)), file=sys.stderr)
        sys.exit(2)
    _tune_malloc()
    # Metrics from all processes meet in one folder; it must be known before prometheus_client is imported.
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        folder = tempfile.mkdtemp(prefix="nnserve-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
        atexit.register(shutil.rmtree, folder, ignore_errors=True)

    from models import RepositoryError
    from service import logs
    from service.http import uvicorn_options
    from service.runtime import DeviceError
    from service.server import build_server
    from service.supervisor import Supervisor

    logs.configure(settings.log_level)
    try:
        server = build_server(settings)
    except (DeviceError, RepositoryError, OSError, ValueError) as e:
        sys.exit(f"nnserve: {e}")
    sys.exit(Supervisor(server, uvicorn_options=uvicorn_options(settings)).run())


if __name__ == "__main__":
    main()
