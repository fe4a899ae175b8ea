"""Logging with the request id on every line written while a request is handled."""

from __future__ import annotations

import logging
from contextvars import ContextVar

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="-")


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = getattr(record, "request_id", None) or REQUEST_ID.get()
        return True


def configure(level: str) -> None:
    """Set up the `nnserve` logger once per process (inference workers are spawned and start bare)."""
    logger = logging.getLogger("nnserve")
    logger.setLevel(level.upper())
    if logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s nnserve [%(request_id)s] %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
