"""Consumer-group lag: records on a topic that a group has not committed past yet.

One reader for ``lightmem stats``, ``lightmem bench stream`` and the workers' lag gauge, so
that "lag" means the same thing everywhere: per partition, the high watermark minus the
group's committed offset (minus the low watermark when the group has committed nothing:
records deleted by retention are not lag).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from lightmem.settings import Settings

from .topics import kafka_config

__all__ = ["LagReader", "PartitionLag", "by_topic"]


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    #: Next offset the group will read (None: the group never committed here).
    committed: int | None
    high: int
    lag: int


class LagReader:
    """Reads one consumer group's lag; keep it open while sampling repeatedly.

    Args:
        settings: Kafka connection (security settings included).
        group: The consumer group whose committed offsets count.
        timeout_s: Per-request timeout.
    """

    def __init__(self, settings: Settings, group: str, *, timeout_s: float = 15.0) -> None:
        from confluent_kafka import Consumer
        from confluent_kafka.admin import AdminClient

        self.group = group
        self.timeout_s = timeout_s
        self._admin = AdminClient(kafka_config(settings))
        # A throwaway group id: this consumer only reads watermarks, never joins or commits.
        self._consumer = Consumer(kafka_config(
            settings, **{"group.id": f"{group}-lag-reader", "enable.auto.commit": False}))
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
        from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition

        tps = [TopicPartition(t, p) for t in topics for p in self._parts(t)]
        if not tps:
            return []
        futures = self._admin.list_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(self.group, tps)], request_timeout=self.timeout_s)
        committed: dict[tuple[str, int], int] = {}
        for future in futures.values():
            for tp in future.result(timeout=self.timeout_s).topic_partitions:
                if tp.error is None and tp.offset >= 0:
                    committed[(tp.topic, tp.partition)] = tp.offset
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
