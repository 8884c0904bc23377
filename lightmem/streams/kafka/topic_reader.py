"""Read a whole topic up to its end as of now: the one reader behind ``dlq list``,
``history --stream`` and the tests.

Why one helper: the stage topics are written in Kafka transactions, whose commit markers
take offsets of their own, so "the last record is at end - 1" no longer holds; the end is
reached when the consumer's *position* gets to the end offset. ``read_committed`` hides
records of aborted transactions (a killed worker's half batch).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection, Iterator
from typing import Any

from lightmem.settings import Settings
from lightmem.streams.kafka.topics import kafka_config

__all__ = ["read_to_end"]


def read_to_end(settings: Settings, topic: str, *, timeout_s: float = 60.0,
                purpose: str = "read", partitions: Collection[int] | None = None
                ) -> Iterator[Any]:
    """Every committed record of ``topic``, from the beginning to the end offsets read at the
    start, in partition order (confluent-kafka ``Message`` objects, errors never yielded).

    Args:
        settings: Kafka connection.
        topic: The topic.
        timeout_s: Deadline for reaching the end of every partition.
        purpose: Part of the throwaway group id (never joined, never committed).
        partitions: Read only these partitions (default every one; e.g. the partition
            of one scope).

    Raises:
        LookupError: the topic does not exist.
        TimeoutError: the end was not reached within ``timeout_s``.
        KafkaException: a consumer error.
    """
    from confluent_kafka import (
        OFFSET_BEGINNING,
        Consumer,
        KafkaError,
        KafkaException,
        TopicPartition,
    )

    consumer = Consumer(kafka_config(settings, **{
        # Required by the client even with assign(); never joins or commits.
        "group.id": f"lightmem-{purpose}-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
        "enable.partition.eof": True,
    }))
    try:
        meta = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if meta is None or meta.error is not None:
            raise LookupError(f"topic {topic!r} does not exist: run `lightmem topics create`")
        ends: dict[int, int] = {}
        for p in meta.partitions:
            if partitions is not None and p not in partitions:
                continue
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p),
                                                       timeout=timeout_s)
            if high > low:
                ends[p] = high
        if not ends:
            return
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        pending = set(ends)
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: end not reached within {timeout_s:.0f}s")
            for msg in consumer.consume(500, timeout=0.5):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise KafkaException(err)
                if msg.offset() < ends.get(msg.partition(), 0):
                    yield msg
            for tp in consumer.position([TopicPartition(topic, p) for p in pending]):
                if tp.offset >= ends[tp.partition]:
                    pending.discard(tp.partition)
    finally:
        consumer.close()
