"""``lightmem stats --stream``: per tenant, memories, LLM spend and lag of a deployment.

Where each number comes from:

- **memories**: Elasticsearch, counted per (tenant, user) through the alias
  (:meth:`~lightmem.streams.elastic.store.ElasticsearchStore.count_entries`);
- **LLM spend** (calls, prompt/completion tokens, errors per purpose and tenant): the workers'
  ``/metrics`` endpoints, scraped and summed (counters since each worker started; a
  Prometheus server keeps the long-run totals);
- **lag**: Kafka, per stage topic and partition, the high watermark minus the worker group's
  committed offset (:mod:`lightmem.streams.kafka.lag`). Per tenant: the keys of the records not
  yet committed (every key starts with ``tenant/``), read up to ``max_scan`` records per
  partition; beyond that the tenant split is marked partial.

Exceptions: none of its own; Kafka/Elasticsearch/HTTP errors propagate (the CLI reports
them).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightmem.processors.llm import UsageTotals
from lightmem.schemas import KeyFormatError, decode_key
from lightmem.settings import Settings
from lightmem.streams.kafka.lag import PartitionLag
from lightmem.streams.kafka.topics import Topics, kafka_config

__all__ = ["StreamStats", "TenantStats", "usage_from_metrics", "stream_stats", "NO_TENANT"]

#: Tenant of records without a key (partition-wide flush commands).
NO_TENANT = "(none)"


@dataclass
class TenantStats:
    tenant: str
    users: int = 0
    memories: int = 0
    llm_calls: int = 0
    llm_errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: stage -> records of this tenant not yet committed by the workers.
    lag: dict[str, int] = field(default_factory=dict)


@dataclass
class StreamStats:
    """What ``lightmem stats --stream`` reports (see the module docstring)."""

    index: str
    group: str
    memories: dict[tuple[str, str], int]
    usage: dict[tuple[str, str], UsageTotals]
    #: (stage, partition lag), in pipeline order.
    lag: list[tuple[str, PartitionLag]]
    #: (stage, tenant) -> uncommitted records.
    tenant_lag: dict[tuple[str, str], int]
    #: Whether the per-tenant lag covers every uncommitted record (else: the first
    #: ``max_scan`` per partition).
    tenant_lag_complete: bool
    metrics_sources: list[str]

    def lag_by_stage(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for stage, p in self.lag:
            out[stage] = out.get(stage, 0) + p.lag
        return out

    def tenants(self) -> list[TenantStats]:
        """One row per tenant seen anywhere (memories, LLM usage or lag), sorted."""
        rows: dict[str, TenantStats] = {}

        def row(tenant: str) -> TenantStats:
            return rows.setdefault(tenant, TenantStats(tenant))

        for (tenant, _), n in self.memories.items():
            r = row(tenant)
            r.users += 1
            r.memories += n
        for (_, tenant), t in self.usage.items():
            r = row(tenant)
            r.llm_calls += t.calls
            r.llm_errors += t.errors
            r.prompt_tokens += t.prompt_tokens
            r.completion_tokens += t.completion_tokens
        for (stage, tenant), n in self.tenant_lag.items():
            r = row(tenant)
            r.lag[stage] = r.lag.get(stage, 0) + n
        return [rows[t] for t in sorted(rows)]

    def as_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "group": self.group,
            "tenants": [{**vars(t), "lag_total": sum(t.lag.values())} for t in self.tenants()],
            "memories": [{"tenant": t, "user": u, "count": n}
                         for (t, u), n in sorted(self.memories.items())],
            "llm_usage": [{"purpose": s, "tenant": t, **vars(v)}
                          for (s, t), v in sorted(self.usage.items())],
            "lag": [{"stage": s, "topic": p.topic, "partition": p.partition,
                     "committed": p.committed, "end": p.high, "lag": p.lag}
                    for s, p in self.lag],
            "lag_by_stage": self.lag_by_stage(),
            "tenant_lag_complete": self.tenant_lag_complete,
            "metrics_sources": self.metrics_sources,
        }


def usage_from_metrics(texts: Iterable[str]) -> dict[tuple[str, str], UsageTotals]:
    """LLM usage per (purpose, tenant), summed over Prometheus text expositions (one per
    worker): ``lightmem_llm_calls_total``, ``lightmem_llm_errors_total`` and
    ``lightmem_llm_tokens_total`` (latency is labelled per purpose only: not included)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, str], UsageTotals] = {}

    def totals(purpose: str, tenant: str) -> UsageTotals:
        return out.setdefault((purpose, tenant), UsageTotals())

    for text in texts:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = s.labels
                purpose, tenant = labels.get("purpose", ""), labels.get("tenant", "")
                if s.name == "lightmem_llm_calls_total":
                    totals(purpose, tenant).calls += int(s.value)
                elif s.name == "lightmem_llm_errors_total":
                    totals(purpose, tenant).errors += int(s.value)
                elif s.name == "lightmem_llm_tokens_total":
                    t = totals(purpose, tenant)
                    if labels.get("kind") == "prompt":
                        t.prompt_tokens += int(s.value)
                    else:
                        t.completion_tokens += int(s.value)
    return out


def _fetch(url: str, timeout_s: float) -> str:
    import httpx

    resp = httpx.get(url, timeout=timeout_s)
    resp.raise_for_status()
    return resp.text


def _tenant_of(key: bytes | None) -> str:
    # Every pipeline key is a (tenant, name) key (lightmem.schemas.keys); anything else
    # (a foreign producer's key) is shown as it is.
    if not key:
        return NO_TENANT
    try:
        return decode_key(key, 2)[0]
    except KeyFormatError:
        return key.decode("utf-8", "replace")


def _scan_tenants(settings: Settings, lags: Sequence[tuple[str, PartitionLag]], max_scan: int,
                  timeout_s: float) -> tuple[dict[tuple[str, str], int], bool]:
    """Count the uncommitted records of every lagging partition by the tenant in their key."""
    from confluent_kafka import Consumer, TopicPartition

    todo = {(p.topic, p.partition): (stage, p) for stage, p in lags if p.lag > 0}
    out: dict[tuple[str, str], int] = {}
    if not todo:
        return out, True
    complete = True
    consumer = Consumer(kafka_config(settings, **{
        "group.id": "lightmem-stats", "enable.auto.commit": False,
        "enable.partition.eof": True}))
    try:
        starts = []
        ends: dict[tuple[str, int], int] = {}
        for (topic, partition), (_, p) in todo.items():
            start = p.high - p.lag
            if p.lag > max_scan:
                complete = False
            ends[(topic, partition)] = min(p.high, start + max_scan)
            starts.append(TopicPartition(topic, partition, start))
        consumer.assign(starts)
        pending = set(ends)
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            tp = (msg.topic(), msg.partition())
            if tp not in pending:
                continue
            if msg.error() is not None:  # end of partition (or an error): stop reading it
                pending.discard(tp)
                continue
            if msg.offset() >= ends[tp]:
                pending.discard(tp)
                continue
            stage = todo[tp][0]
            key = (stage, _tenant_of(msg.key()))
            out[key] = out.get(key, 0) + 1
            if msg.offset() >= ends[tp] - 1:
                pending.discard(tp)
        complete = complete and not pending
    finally:
        consumer.close()
    return out, complete


def stream_stats(
    settings: Settings,
    topics: Topics,
    *,
    group: str | None = None,
    metrics_urls: Sequence[str] = (),
    max_scan: int = 100_000,
    timeout_s: float = 30.0,
    es: Any = None,
) -> StreamStats:
    """Collect :class:`StreamStats` of the deployment ``settings`` and ``topics`` describe.

    Args:
        settings: Kafka and Elasticsearch connections; ``es_alias`` is the index read.
        topics: The pipeline's topics.
        group: The workers' consumer group (default ``settings.ingest_group``).
        metrics_urls: The workers' ``/metrics`` URLs (LLM usage is summed over them; none =
            no LLM usage reported).
        max_scan: Uncommitted records read per partition for the per-tenant lag.
        timeout_s: Per request (and for the per-tenant scan as a whole).
        es: An Elasticsearch client (default: one from ``settings``, closed afterwards).
    """
    from elasticsearch import NotFoundError

    from lightmem.streams.elastic.store import ElasticsearchStore, es_client
    from lightmem.streams.kafka.lag import LagReader

    group = group or settings.ingest_group
    own_es = es is None
    client = es if es is not None else es_client(settings)
    try:
        store = ElasticsearchStore(client, alias=settings.es_alias)
        try:
            memories = store.count_entries()
        except NotFoundError:  # no index yet: nothing indexed
            memories = {}
    finally:
        if own_es:
            client.close()
    usage = usage_from_metrics(_fetch(u, timeout_s) for u in metrics_urls)
    stages: Mapping[str, str] = {topics.turns: "sensory", topics.segments: "short-term",
                                 topics.entries: "index"}
    with LagReader(settings, group, timeout_s=timeout_s) as reader:
        lags = [(stages[p.topic], p) for p in reader.read(list(stages))]
    tenant_lag, complete = _scan_tenants(settings, lags, max_scan, timeout_s)
    return StreamStats(index=settings.es_alias, group=group, memories=memories, usage=usage,
                       lag=lags, tenant_lag=tenant_lag, tenant_lag_complete=complete,
                       metrics_sources=list(metrics_urls))
