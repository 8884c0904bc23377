"""Stage state of the ingest worker: one table per stage, backed by a compacted changelog.

A table maps a conversation key to its serialized slot. Every write goes to the changelog
topic *inside the worker's Kafka transaction* (the same transaction that produces the batch's
output and commits its input offsets), to the changelog partition of the conversation's
source partition. So the changelog holds exactly the state that belongs to the committed
offsets: a worker that takes a partition over reads its changelog partition from the
beginning (``read_committed``: aborted writes of a killed worker are invisible) and continues
exactly where the previous owner's last committed batch ended.

Changelog topic names carry the deployment's topic prefix *and* the ingest group, so two
deployments never share state (:func:`changelog_topic`).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from lightmem.settings import Settings
from lightmem.streams.kafka.topics import Topics, kafka_config

__all__ = ["ChangelogTable", "changelog_topic", "RecoveryError"]

log = logging.getLogger(__name__)


class RecoveryError(RuntimeError):
    """A changelog partition could not be read to its end in time."""


def changelog_topic(topics: Topics, ingest_group: str, table: str) -> str:
    """``<prefix><stage prefix><ingest group>-<table>-changelog``: unique per deployment, run and
    table (the old faust tables were named after the ingest group alone, so two deployments with
    one ingest group shared their buffers)."""
    return f"{topics.prefix}{topics.stage_prefix}{ingest_group}-{table}-changelog"


class ChangelogTable:
    """Slots of the partitions this worker owns, rebuilt from the changelog on assignment.

    Args:
        name: Table name (``sensory``, ``topic-buffers``).
        topic: Its changelog topic (compacted, one partition per source partition).
    """

    def __init__(self, name: str, topic: str) -> None:
        self.name = name
        self.topic = topic
        #: source partition -> key -> slot
        self._parts: dict[int, dict[bytes, bytes]] = {}

    @property
    def partitions(self) -> set[int]:
        """The source partitions whose state is loaded."""
        return set(self._parts)

    def get(self, key: bytes) -> bytes | None:
        """The slot of ``key`` in any loaded partition."""
        for slots in self._parts.values():
            value = slots.get(key)
            if value is not None:
                return value
        return None

    def items(self, partitions: Iterable[int] | None = None) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, slot) of ``partitions`` (default: all loaded)."""
        wanted = self._parts.keys() if partitions is None else partitions
        for p in list(wanted):
            yield from self._parts.get(p, {}).items()

    def apply(self, writes: Mapping[bytes, tuple[int, bytes | None]]) -> None:
        """Apply committed writes (key -> (partition, slot; None deletes)) to the loaded
        state."""
        for key, (partition, value) in writes.items():
            slots = self._parts.get(partition)
            if slots is not None:
                if value is None:
                    slots.pop(key, None)
                else:
                    slots[key] = value

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget the state of partitions this worker no longer owns."""
        for p in partitions:
            self._parts.pop(p, None)

    def recover(self, settings: Settings, partitions: Iterable[int], *,
                timeout_s: float = 120.0) -> int:
        """Load ``partitions`` from the changelog (committed records only); returns the
        number of slots loaded.

        Raises:
            RecoveryError: the end was not reached within ``timeout_s`` (an open transaction
                of a dead worker stays open for up to ``transaction.timeout.ms``).
        """
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        wanted = sorted(set(partitions))
        if not wanted:
            return 0
        consumer = Consumer(kafka_config(settings, **{
            "group.id": f"lightmem-recovery-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }))
        loaded: dict[int, dict[bytes, bytes]] = {p: {} for p in wanted}
        try:
            ends: dict[int, int] = {}
            for p in wanted:
                low, high = consumer.get_watermark_offsets(TopicPartition(self.topic, p),
                                                           timeout=30)
                if high > low:
                    ends[p] = high
            consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in ends])
            pending = set(ends)
            deadline = time.monotonic() + timeout_s
            while pending:
                if time.monotonic() > deadline:
                    raise RecoveryError(
                        f"{self.topic}: partitions {sorted(pending)} not read to their end "
                        f"within {timeout_s:.0f}s")
                for msg in consumer.consume(500, timeout=0.5):
                    err = msg.error()
                    if err is not None and not _is_eof(err):
                        log.warning("%s: recovery read error: %s", self.topic, err)
                        continue
                    if err is None:
                        slots = loaded[msg.partition()]
                        if msg.value() is None:
                            slots.pop(msg.key(), None)  # tombstone
                        else:
                            slots[msg.key()] = msg.value()
                # Control records (transaction markers) advance the position without a
                # message: the position, not the last message, says where we are.
                for tp in consumer.position([TopicPartition(self.topic, p) for p in pending]):
                    if tp.offset >= ends[tp.partition]:
                        pending.discard(tp.partition)
        finally:
            consumer.close()
        for p in wanted:
            self._parts[p] = loaded[p]
        count = sum(len(v) for v in loaded.values())
        log.info("%s: recovered %d slot(s) of partition(s) %s from %s", self.name, count,
                 wanted, self.topic)
        return count


def _is_eof(err: Any) -> bool:
    from confluent_kafka import KafkaError

    return err.code() == KafkaError._PARTITION_EOF
