"""Prometheus metrics shared by every feature, and the `/metrics` exposition.

Each process keeps its own registry and is scraped on its own (`/metrics` on the API,
the worker's metrics port): prometheus-client's multiprocess mode leaves files of dead
workers behind and uvicorn offers no hook to clean them.
"""

from __future__ import annotations

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response

log = structlog.get_logger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)

HTTP_REQUESTS = Counter(
    "koinonia_http_requests_total", "HTTP requests answered", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "koinonia_http_request_duration_seconds",
    "HTTP request latency by route template",
    ["method", "route"],
    buckets=LATENCY_BUCKETS,
)
HTTP_IN_FLIGHT = Gauge("koinonia_http_requests_in_flight", "HTTP requests being served")
DB_POOL_IN_USE = Gauge(
    "koinonia_db_pool_connections_in_use", "Database connections checked out", ["pool"]
)
DB_QUERY_LATENCY = Histogram(
    "koinonia_db_query_duration_seconds", "Database statement latency", buckets=LATENCY_BUCKETS
)
DB_SLOW_QUERIES = Counter("koinonia_db_slow_queries_total", "Statements slower than the threshold")
DEPENDENCY_UP = Gauge(
    "koinonia_dependency_up", "1 when a dependency answered its health check", ["dependency"]
)
RETRIES = Counter(
    "koinonia_retries_total", "Retries made by the shared retry policy", ["operation"]
)


async def metrics_endpoint(request: Request) -> Response:
    # Gauges computed from the database (sending pauses, stalled broadcasts) are refreshed
    # on scrape; a failing refresher leaves its last values and never fails the scrape.
    for refresh in getattr(request.app.state, "metrics_refreshers", []):
        try:
            await refresh()
        except Exception as error:
            log.warning("metrics_refresh_failed", error=type(error).__name__)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
