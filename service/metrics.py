"""Prometheus metrics, aggregated over the HTTP server and inference worker processes.

LitServe runs several processes, so the metrics use prometheus_client's multiprocess mode: every process
writes to files under PROMETHEUS_MULTIPROC_DIR, which `python -m service` sets before anything imports this.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

REQUESTS = Counter("nnserve_requests_total", "HTTP requests answered, by route and status.", ["endpoint", "status"])
LATENCY = Histogram(
    "nnserve_request_duration_seconds",
    "Time from request to response, by route.",
    ["endpoint"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24),
)
BATCH_ITEMS = Histogram(
    "nnserve_batch_size",
    "Items per model call after dynamic batching.",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
)
BATCH_REQUESTS = Histogram(
    "nnserve_batch_requests",
    "Requests per model call after dynamic batching.",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
IN_FLIGHT = Gauge(
    "nnserve_items_in_flight", "Items accepted and not yet answered.", ["model"], multiprocess_mode="livesum"
)
OVERLOADED = Counter(
    "nnserve_overload_rejections_total", "Requests refused with 503 because too much was in flight.", ["model"]
)

OPEN_CONNECTIONS = Gauge(
    "nnserve_open_connections", "Client connections open in the HTTP servers.", multiprocess_mode="livesum"
)
CONNECTIONS_CUT = Counter(
    "nnserve_connections_cut_total",
    "Connections the HTTP servers answered with a protocol-level error or closed early, by reason.",
    ["reason"],
)


def observe_batch(model: str, requests: int, items: int) -> None:
    BATCH_REQUESTS.labels(model).observe(requests)
    BATCH_ITEMS.labels(model).observe(items)


def render() -> bytes:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry)
