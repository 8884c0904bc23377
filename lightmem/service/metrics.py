"""Prometheus metrics of the memory service, in the workers' registry and naming.

======================================  ==========  ======================================
metric                                  type        labels
======================================  ==========  ======================================
lightmem_http_requests_total            counter     route, method, status
lightmem_http_request_seconds           histogram   route, method
======================================  ==========  ======================================

``route`` is the route's path template (``/v1/memories/{memory_id}``), never a concrete path,
so label values stay bounded; requests that match no route count as ``<unmatched>``. Served
at ``GET /metrics`` together with everything else in
:data:`lightmem.streams.observe.metrics.REGISTRY` (LLM calls of answers, process collectors).
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from lightmem.streams.observe.metrics import REGISTRY, scrape

__all__ = ["HTTP_REQUESTS", "HTTP_SECONDS", "METRIC_NAMES", "record_request", "scrape"]

_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

HTTP_REQUESTS = Counter("lightmem_http_requests", "HTTP requests answered by the memory "
                        "service.", ["route", "method", "status"], registry=REGISTRY)
HTTP_SECONDS = Histogram("lightmem_http_request_seconds", "Seconds to answer one HTTP "
                         "request.", ["route", "method"], buckets=_HTTP_BUCKETS,
                         registry=REGISTRY)

METRIC_NAMES = frozenset({"lightmem_http_requests_total", "lightmem_http_request_seconds"})


def record_request(route: str, method: str, status: int, seconds: float) -> None:
    """Count one answered request."""
    HTTP_REQUESTS.labels(route, method, str(status)).inc()
    HTTP_SECONDS.labels(route, method).observe(seconds)
