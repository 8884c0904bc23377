"""Prometheus metrics of a LightMem process: one registry, served on ``127.0.0.1``.

Every worker (the stream worker, the sleep worker, a backfill worker) counts what it does
in :data:`REGISTRY` and, when ``metrics_port`` is set, serves it at
``http://<metrics_addr>:<metrics_port>/metrics`` (:func:`start_metrics_server`). Counters
are per process and start at zero: Prometheus' ``rate()``/``increase()`` handle restarts.

Names start with ``lightmem_``; labels use the pipeline's stage names (``sensory``,
``short-term``, ``index``, ``sleep``) and the real topic names. Label values are bounded:
stages, topics, partitions, dead-letter reasons and tenants; never conversations or users.

======================================  ==========  ======================================
metric                                  type        labels
======================================  ==========  ======================================
lightmem_events_in_total                counter     stage, topic (records consumed)
lightmem_events_out_total               counter     stage, topic (records produced, acked)
lightmem_events_applied_total           counter     stage
lightmem_events_skipped_total           counter     stage (already applied: redelivery)
lightmem_stage_errors_total             counter     stage, kind (transient | bug)
lightmem_dead_letters_total             counter     stage, reason (parse, compress, ...)
lightmem_batch_seconds                  histogram   stage (one step, delivery included)
lightmem_partition_rereads_total        counter     stage (held batches left to be re-read)
lightmem_llm_calls_total                counter     purpose, tenant
lightmem_llm_errors_total               counter     purpose, tenant
lightmem_llm_tokens_total               counter     purpose, tenant, kind (prompt | completion)
lightmem_llm_latency_seconds            histogram   purpose
lightmem_es_bulk_seconds                histogram   (one bulk upsert call)
lightmem_es_docs_total                  counter     outcome (written|failed), kind (memories|events)
lightmem_consumer_lag                   gauge       topic, partition
lightmem_sleep_window_open              gauge       tenant ("*" = every tenant)
lightmem_sleep_yielding                 gauge       (1 while an open window waits for ingest)
======================================  ==========  ======================================

The LLM metrics are observed through :class:`PrometheusUsageMeter`, a
:class:`~lightmem.processors.llm.UsageMeter` that also feeds this registry, so that the
processors stay free of any metrics library.

Exceptions: :class:`MetricsServerError` (the endpoint could not be bound).
"""

from __future__ import annotations

import threading
from collections import Counter as _Tally
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    start_http_server,
)

from lightmem.processors.llm import Completion, UsageMeter
from lightmem.schemas import Stage

__all__ = [
    "REGISTRY",
    "STAGES",
    "METRIC_NAMES",
    "MetricsServerError",
    "MetricsServer",
    "PrometheusUsageMeter",
    "start_metrics_server",
    "record_events_in",
    "record_events_out",
    "record_step",
    "record_stage_error",
    "record_reread",
    "record_es_bulk",
    "set_consumer_lag",
    "set_sleep_window",
    "scrape",
]

#: The pipeline's stage names, as label values.
STAGES: tuple[Stage, ...] = tuple(Stage)
#: ``tenant`` label of a sleep window that covers every tenant.
ALL_TENANTS = "*"

#: The one registry of this process (not prometheus_client's global default registry, so
#: that only LightMem's metrics and the process collectors are served).
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

#: Batch steps run from milliseconds (index, no model) to minutes (a summarization).
_STEP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_LLM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0)
_ES_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

EVENTS_IN = Counter("lightmem_events_in", "Records a stage consumed.", ["stage", "topic"],
                    registry=REGISTRY)
EVENTS_OUT = Counter("lightmem_events_out", "Records a stage produced (broker-acknowledged).",
                     ["stage", "topic"], registry=REGISTRY)
EVENTS_APPLIED = Counter("lightmem_events_applied", "Records a stage applied.", ["stage"],
                         registry=REGISTRY)
EVENTS_SKIPPED = Counter("lightmem_events_skipped",
                         "Records a stage skipped as already applied (redelivery, duplicates).",
                         ["stage"], registry=REGISTRY)
STAGE_ERRORS = Counter("lightmem_stage_errors",
                       "Failed batch steps: transient (retried) or bug (the worker stops).",
                       ["stage", "kind"], registry=REGISTRY)
DEAD_LETTERS = Counter("lightmem_dead_letters",
                       "Dead letters written, by stage and reason class (the failed step).",
                       ["stage", "reason"], registry=REGISTRY)
BATCH_SECONDS = Histogram("lightmem_batch_seconds",
                          "Seconds of one successful batch step, delivery included.",
                          ["stage"], buckets=_STEP_BUCKETS, registry=REGISTRY)
REREADS = Counter("lightmem_partition_rereads",
                  "Batches held for a retry and dropped by a rebalance (re-read from the "
                  "committed offset).", ["stage"],
                  registry=REGISTRY)
LLM_CALLS = Counter("lightmem_llm_calls", "Successful LLM calls.", ["purpose", "tenant"],
                    registry=REGISTRY)
LLM_ERRORS = Counter("lightmem_llm_errors", "Failed LLM calls (after the client's retries).",
                     ["purpose", "tenant"], registry=REGISTRY)
LLM_TOKENS = Counter("lightmem_llm_tokens", "LLM tokens billed, as reported by the endpoint.",
                     ["purpose", "tenant", "kind"], registry=REGISTRY)
LLM_LATENCY = Histogram("lightmem_llm_latency_seconds",
                        "Seconds per LLM call (client retries included).", ["purpose"],
                        buckets=_LLM_BUCKETS, registry=REGISTRY)
ES_BULK_SECONDS = Histogram("lightmem_es_bulk_seconds",
                            "Seconds per Elasticsearch bulk upsert call (retries included).",
                            buckets=_ES_BUCKETS, registry=REGISTRY)
ES_DOCS = Counter("lightmem_es_docs", "Documents sent to Elasticsearch bulk upserts.",
                  ["outcome", "kind"], registry=REGISTRY)
CONSUMER_LAG = Gauge("lightmem_consumer_lag",
                     "Records of a partition not yet committed by this worker's group "
                     "(high watermark minus committed offset).", ["topic", "partition"],
                     registry=REGISTRY)
SLEEP_WINDOW_OPEN = Gauge("lightmem_sleep_window_open",
                          "1 while a sleep window is open for the tenant ('*' = all).",
                          ["tenant"], registry=REGISTRY)
SLEEP_YIELDING = Gauge("lightmem_sleep_yielding",
                       "1 while a sleep worker with an open window starts no new target "
                       "because the ingest pipeline has a backlog (LIGHTMEM_SLEEP_YIELD_LAG).",
                       registry=REGISTRY)

#: Every sample family this module defines (the Grafana dashboard test checks against it).
METRIC_NAMES = frozenset({
    "lightmem_events_in_total", "lightmem_events_out_total", "lightmem_events_applied_total",
    "lightmem_events_skipped_total", "lightmem_stage_errors_total",
    "lightmem_dead_letters_total", "lightmem_batch_seconds", "lightmem_partition_rereads_total",
    "lightmem_llm_calls_total", "lightmem_llm_errors_total", "lightmem_llm_tokens_total",
    "lightmem_llm_latency_seconds", "lightmem_es_bulk_seconds", "lightmem_es_docs_total",
    "lightmem_consumer_lag", "lightmem_sleep_window_open", "lightmem_sleep_yielding",
})

_lag_lock = threading.Lock()
_lag_series: set[tuple[str, str]] = set()


class MetricsServerError(Exception):
    """The metrics endpoint could not be bound (address in use, bad address)."""


# -- recording ---------------------------------------------------------------------------------


def record_events_in(stage: str, topic: str, n: int = 1) -> None:
    """Count ``n`` records of ``topic`` consumed by ``stage``."""
    if n:
        EVENTS_IN.labels(stage, topic).inc(n)


def record_events_out(stage: str, topic: str, n: int = 1) -> None:
    """Count ``n`` records ``stage`` produced to ``topic`` outside a batch step."""
    if n:
        EVENTS_OUT.labels(stage, topic).inc(n)


def record_step(
    stage: str,
    *,
    seconds: float,
    applied: int = 0,
    skipped: int = 0,
    out_topics: Iterable[str] = (),
    dead_letter_reasons: Mapping[str, int] | None = None,
) -> None:
    """Count one successful batch step of ``stage``.

    Args:
        stage: Pipeline stage name.
        seconds: Duration of the step, delivery of its output included.
        applied: Records applied.
        skipped: Records skipped as already applied.
        out_topics: The topic of every record produced (one item per record).
        dead_letter_reasons: reason class (the failed step: ``parse``, ``compress``, ...)
            -> dead letters written.
    """
    BATCH_SECONDS.labels(stage).observe(seconds)
    if applied:
        EVENTS_APPLIED.labels(stage).inc(applied)
    if skipped:
        EVENTS_SKIPPED.labels(stage).inc(skipped)
    for topic, n in _Tally(out_topics).items():
        EVENTS_OUT.labels(stage, topic).inc(n)
    for reason, n in (dead_letter_reasons or {}).items():
        if n:
            DEAD_LETTERS.labels(stage, reason).inc(n)


def record_stage_error(stage: str, kind: str) -> None:
    """Count one failed step: ``kind`` is ``transient`` (retried) or ``bug``."""
    STAGE_ERRORS.labels(stage, kind).inc()


def record_reread(stage: str) -> None:
    """Count one held batch dropped by a rebalance (its records are re-read by their next
    owner from the committed offset)."""
    REREADS.labels(stage).inc()


def record_es_bulk(seconds: float, *, written: int, failed: int, kind: str = "memories"
                   ) -> None:
    """Count one Elasticsearch bulk upsert call of ``kind`` documents (memories | events)."""
    ES_BULK_SECONDS.observe(seconds)
    if written:
        ES_DOCS.labels("written", kind).inc(written)
    if failed:
        ES_DOCS.labels("failed", kind).inc(failed)


def set_consumer_lag(lags: Mapping[tuple[str, int], int]) -> None:
    """Replace the lag gauges with ``(topic, partition) -> lag``; partitions no longer in
    ``lags`` (revoked in a rebalance) lose their series."""
    series = {(topic, str(partition)): lag for (topic, partition), lag in lags.items()}
    with _lag_lock:
        for gone in _lag_series - set(series):
            try:
                CONSUMER_LAG.remove(*gone)
            except KeyError:  # pragma: no cover - removed elsewhere
                pass
        for (topic, partition), lag in series.items():
            CONSUMER_LAG.labels(topic, partition).set(max(0, lag))
        _lag_series.clear()
        _lag_series.update(series)


def set_sleep_window(tenant: str | None, is_open: bool) -> None:
    """Record that the sleep window of ``tenant`` (None = every tenant) opened or closed."""
    SLEEP_WINDOW_OPEN.labels(ALL_TENANTS if tenant is None else tenant).set(1 if is_open else 0)


def set_sleep_yielding(yielding: bool) -> None:
    """Record whether the sleep worker is holding work back for ingest."""
    SLEEP_YIELDING.set(1 if yielding else 0)


class PrometheusUsageMeter(UsageMeter):
    """A :class:`UsageMeter` that also counts every call in :data:`REGISTRY`.

    Calls, errors, prompt/completion tokens per (purpose, tenant); latency per purpose.
    """

    def record(self, purpose: str, tenant: str, completion: Completion) -> None:
        super().record(purpose, tenant, completion)
        LLM_CALLS.labels(purpose, tenant).inc()
        LLM_TOKENS.labels(purpose, tenant, "prompt").inc(completion.prompt_tokens)
        LLM_TOKENS.labels(purpose, tenant, "completion").inc(completion.completion_tokens)
        LLM_LATENCY.labels(purpose).observe(completion.latency_s)

    def record_error(self, purpose: str, tenant: str, latency_s: float = 0.0) -> None:
        super().record_error(purpose, tenant, latency_s)
        LLM_ERRORS.labels(purpose, tenant).inc()
        LLM_LATENCY.labels(purpose).observe(latency_s)


# -- serving -----------------------------------------------------------------------------------


@dataclass
class MetricsServer:
    """A running metrics endpoint (stop it with :meth:`close`)."""

    addr: str
    port: int
    _server: Any = field(repr=False)
    _thread: Any = field(repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(port: int, addr: str = "127.0.0.1") -> MetricsServer:
    """Serve :data:`REGISTRY` at ``http://addr:port/metrics`` from a daemon thread.

    Args:
        port: TCP port (> 0).
        addr: Address to bind (default ``127.0.0.1``: only this host can scrape; bind
            ``0.0.0.0`` deliberately, behind a firewall, for a remote Prometheus).

    Raises:
        MetricsServerError: the address cannot be bound (in use, not local).
    """
    if port <= 0:
        raise ValueError(f"port: must be > 0 (got {port!r})")
    try:
        server, thread = start_http_server(port, addr=addr, registry=REGISTRY)
    except OSError as exc:
        raise MetricsServerError(f"metrics endpoint {addr}:{port}: {exc.strerror or exc}"
                                 ) from exc
    return MetricsServer(addr, int(server.server_address[1]), server, thread)


def scrape() -> str:
    """The text exposition of :data:`REGISTRY` (what ``/metrics`` answers)."""
    return generate_latest(REGISTRY).decode()
