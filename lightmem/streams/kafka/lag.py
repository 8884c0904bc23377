"""Consumer-group lag: records on a topic that a group has not committed past yet.

One reader for ``lightmem stats``, ``lightmem bench stream`` and the workers' lag gauge, so
that "lag" means the same thing everywhere: per partition, the high watermark minus the
group's committed offset (minus the low watermark when the group has committed nothing:
records deleted by retention are not lag).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lightmem.settings import Settings
from lightmem.streams.kafka.topics import kafka_config

__all__ = ["LagReader", "PartitionLag", "by_topic", "committed_offsets", "group_reader"]


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    #: Next offset the group will read (None: the group never committed here).
    committed: int | None
    high: int
    lag: int


def group_reader(settings: Settings, group: str) -> Any:
    """A consumer bound to ``group`` that never subscribes: it only reads the group's committed
    offsets (and watermarks), so it neither joins the group nor commits.

    Why not ``AdminClient.list_consumer_group_offsets``: librdkafka (2.16 and earlier) can
    crash the process with SIGSEGV in it when the group coordinator is still loading on a
    fresh cluster (OffsetFetch answered NOT_COORDINATOR to a client without a consumer
    group; confluent-kafka-python#1982). A consumer with the ``group.id`` takes the sound path.
    """
    from confluent_kafka import Consumer

    return Consumer(kafka_config(settings, **{"group.id": group, "enable.auto.commit": False}))


def committed_offsets(reader: Any, partitions: list[Any], *, timeout_s: float = 15.0
                      ) -> dict[tuple[str, int], int]:
    """The committed offset of each of ``partitions`` (TopicPartitions) in the group of
    ``reader`` (:func:`group_reader`); partitions without one are left out.

    Raises:
        confluent_kafka.KafkaException: the cluster did not answer in time.
    """
    out: dict[tuple[str, int], int] = {}
    for tp in reader.committed(partitions, timeout=timeout_s):
        if tp.error is None and tp.offset >= 0:
            out[(tp.topic, tp.partition)] = tp.offset
    return out


class LagReader:
    """Reads one consumer group's lag; keep it open while sampling repeatedly.

    Args:
        settings: Kafka connection (security settings included).
        group: The consumer group whose committed offsets count.
        timeout_s: Per-request timeout.
    """

    def __init__(self, settings: Settings, group: str, *, timeout_s: float = 15.0) -> None:
        self.group = group
        self.timeout_s = timeout_s
        self._consumer = group_reader(settings, group)
        self._partitions: dict[str, list[int]] = {}

    def _parts(self, topic: str) -> list[int]:
        if topic not in self._partitions:
            meta = self._consumer.list_topics(topic, timeout=self.timeout_s).topics.get(topic)
            if meta is None or meta.error is not None:
                return []
            self._partitions[topic] = sorted(meta.partitions)
        return self._partitions[topic]

    def read(self, topics: Iterable[str]) -> list[PartitionLag]:
        """Lag of every partition of ``topics`` (missing topics are left out).

        Raises:
            confluent_kafka.KafkaException: the cluster did not answer in time.
        """
        from confluent_kafka import TopicPartition

        tps = [TopicPartition(t, p) for t in topics for p in self._parts(t)]
        if not tps:
            return []
        committed = committed_offsets(self._consumer, tps, timeout_s=self.timeout_s)
        out = []
        for tp in tps:
            low, high = self._consumer.get_watermark_offsets(tp, timeout=self.timeout_s)
            at = committed.get((tp.topic, tp.partition))
            lag = max(0, high - max(low, at if at is not None else low))
            out.append(PartitionLag(tp.topic, tp.partition, at, high, lag))
        return out

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> LagReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def by_topic(lags: Iterable[PartitionLag], names: Mapping[str, str] | None = None
             ) -> dict[str, int]:
    """Total lag per topic (keyed by ``names[topic]`` when given, e.g. the stage name)."""
    out: dict[str, int] = {}
    for p in lags:
        key = (names or {}).get(p.topic, p.topic)
        out[key] = out.get(key, 0) + p.lag
    return out
