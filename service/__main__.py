"""`python -m service`: serve every model of the repository, configured by NNSERVE_* variables."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import sys
import tempfile

from service.config import Settings


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # LitServe shuts its workers down gracefully on an interrupt


def main() -> None:
    settings = Settings()
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
    signal.signal(signal.SIGTERM, _interrupt)
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
