"""The erasable memory-changes topic (``lightmem.memory-changes.v2``): keys, partitions,
tombstones and the migration from v1.

Why a v2: ``lightmem.memory-changes.v1`` is keyed by the scope and keeps its records forever,
so one user's change cannot be removed without removing every change of the scope, and
an erasure could only hide them on read. v2 makes a change removable:

- **one key per change**: :func:`change_key` is the canonical key of
  ``(tenant, user, memory_id, change_id)`` (:func:`~lightmem.schemas.encode_key`). Two copies
  of one change (at-least-once) share the key, so compaction also drops duplicates; a key
  says its scope, so a reader or an erasure selects a scope's records without decoding
  their values;
- **compacted** (``cleanup.policy=compact``, see :func:`changes_topic_configs`): a tombstone
  (a record with the key and no value) removes every earlier record of its key once the log
  cleaner has run, and the tombstone itself goes ``delete.retention.ms`` later;
- **one scope per partition, as in v1**: the partition is chosen explicitly from the scope
  (:func:`scope_partition`: the Java client's murmur2 of the scope key, the hash every
  producer here uses), so a scope's changes still share a partition, where v1 had them, and a
  tombstone lands beside the records it removes. Reading one scope reads one partition.

Order: readers order a memory's changes by :func:`change_order` (version, time, op), not by
offsets: the migration appends v1's records after changes new workers already wrote.

Migration of an existing deployment (:func:`migrate_changes`, ``lightmem topics
migrate-changes``): ``lightmem topics create`` creates v2; the migration copies every change
of v1 that no erasure covers into v2 (with v2 keys and partitions, skipping changes v2
already holds, so running it twice copies nothing twice); workers of this version write v2
only. v1 is read by nothing after that; ``--delete-old`` deletes it (it still holds the text
of erased scopes, which can only go with the whole topic).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from lightmem.processors.erasure import ErasureLedger, to_ms
from lightmem.schemas import (
    ChangeOp,
    KeyFormatError,
    MemoryChange,
    SchemaError,
    decode_key,
    encode_key,
    scope_key,
)
from lightmem.settings import Settings
from lightmem.streams.kafka.topics import Topics, changes_topic_configs, kafka_config

__all__ = [
    "changes_topic_configs",
    "murmur2",
    "scope_partition",
    "change_key",
    "decode_change_key",
    "change_order",
    "change_erased",
    "topic_partitions",
    "ChangeRouter",
    "produce_change",
    "tombstone",
    "ScopeScan",
    "scan_scope",
    "compaction_terms",
    "legacy_changes_topic",
    "MigrationReport",
    "migrate_changes",
]

log = logging.getLogger(__name__)

#: The order of ops that share a version and a time.
_OP_RANK = {ChangeOp.add: 0, ChangeOp.update: 1, ChangeOp.delete: 2, ChangeOp.erase: 3}


# -- keys and partitions --------------------------------------------------------------------


def murmur2(data: bytes) -> int:
    """The Java client's murmur2 hash (``Utils.murmur2``), as an unsigned 32-bit int.

    librdkafka's ``murmur2_random`` partitioner (every producer here, :mod:`.producer`) puts
    a keyed record in ``(murmur2(key) & 0x7fffffff) % partitions``.
    """
    m, r = 0x5BD1E995, 24
    n = len(data)
    h = (0x9747B28C ^ n) & 0xFFFFFFFF
    for i in range(0, n - n % 4, 4):
        k = int.from_bytes(data[i:i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail = n - n % 4
    rest = n % 4
    if rest == 3:
        h ^= data[tail + 2] << 16
    if rest >= 2:
        h ^= data[tail + 1] << 8
    if rest >= 1:
        h ^= data[tail]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


def scope_partition(tenant: str, user: str, partitions: int) -> int:
    """The partition of the scope's changes: where the producers' partitioner puts a record
    keyed by the scope key (v1's key), so v1 and v2 hold a scope in the same partition."""
    if partitions < 1:
        raise ValueError(f"partitions: must be >= 1 (got {partitions!r})")
    return (murmur2(scope_key(tenant, user).encode()) & 0x7FFFFFFF) % partitions


def change_key(change: MemoryChange) -> bytes:
    """The v2 record key of a change: ``[tenant, user, memory_id, change_id]``."""
    return encode_key(change.tenant, change.user, change.memory_id,
                      change.change_id).encode()


def decode_change_key(key: bytes | None) -> tuple[str, str, str, str] | None:
    """``(tenant, user, memory_id, change_id)`` of a v2 key; None for any other key (a v1
    scope key, none)."""
    if key is None:
        return None
    try:
        tenant, user, memory_id, change_id = decode_key(key, 4)
    except KeyFormatError:
        return None
    return tenant, user, memory_id, change_id


def change_version(change: MemoryChange) -> int:
    """The memory version a change made (add/update: the new one; delete: the last one)."""
    entry = change.after or change.before
    return entry.version if entry is not None else 0


def change_order(change: MemoryChange) -> tuple[int, Any, int]:
    """Sort key of one memory's changes: (version, time, op)."""
    return change_version(change), change.at, _OP_RANK.get(change.op, 9)


def change_erased(change: MemoryChange, ledger: ErasureLedger) -> bool:
    """Whether an erasure covers ``change``: a change of an erased scope made, or about a
    memory written, at or before the erasure (a change made later about an erased memory is
    erased too; the ``erase`` audit changes never are)."""
    if change.op is ChangeOp.erase or not ledger:
        return False
    # The earliest of the change and the memory's versions it shows: an update made after
    # the erasure of a memory written before it still holds the erased memory's text.
    made = min([to_ms(change.at)] + [to_ms(e.ingest_time) for e in (change.before, change.after)
                                      if e is not None])
    return ledger.drops(change.tenant, change.user, made)


def topic_partitions(client: Any, topic: str, timeout_s: float = 30.0) -> int:
    """The partition count of ``topic`` (``client``: a confluent-kafka Producer, Consumer or
    AdminClient).

    Raises:
        LookupError: the topic does not exist.
    """
    meta = client.list_topics(topic, timeout=timeout_s).topics.get(topic)
    if meta is None or meta.error is not None or not meta.partitions:
        raise LookupError(f"topic {topic!r} does not exist: run `lightmem topics create`")
    return len(meta.partitions)


class ChangeRouter:
    """The partition of a scope's changes on a topic, from the topic's partition count
    (read once per topic).

    Args:
        settings: Kafka connection (an admin client is made when first needed).
        client: Or any confluent-kafka client with ``list_topics`` (a worker's producer).
    """

    def __init__(self, settings: Settings | None = None, *, client: Any = None) -> None:
        if settings is None and client is None:
            raise ValueError("ChangeRouter: pass settings or a client")
        self._settings = settings
        self._client = client
        self._counts: dict[str, int] = {}

    def partition(self, topic: str, tenant: str, user: str) -> int:
        """Raises: LookupError: the topic does not exist."""
        n = self._counts.get(topic)
        if n is None:
            if self._client is None:
                from confluent_kafka.admin import AdminClient

                assert self._settings is not None
                self._client = AdminClient(kafka_config(self._settings))
            n = self._counts[topic] = topic_partitions(self._client, topic)
        return scope_partition(tenant, user, n)


def produce_change(producer: Any, topic: str, change: MemoryChange, router: ChangeRouter,
                   *, label: str | None = None) -> None:
    """Queue one change on the v2 topic: its own key, its scope's partition (``producer``:
    a :class:`~lightmem.streams.kafka.producer.RecordProducer`)."""
    producer.produce(topic, change.to_bytes(), key=change_key(change),
                     partition=router.partition(topic, change.tenant, change.user),
                     label=label)


# -- tombstones -----------------------------------------------------------------------------


def tombstone(settings: Settings, topic: str, records: Iterable[tuple[int, bytes]],
              topics: Topics | None = None) -> int:
    """Produce one tombstone per ``(partition, key)`` (each in the partition its records are
    in) and wait for delivery; returns how many were produced.

    Raises:
        DeliveryError: some tombstones were not delivered (every failure is listed).
    """
    from lightmem.streams.kafka.producer import RecordProducer

    unique = sorted(set(records))
    if not unique:
        return 0
    with RecordProducer(settings, topics) as producer:
        for partition, key in unique:
            producer.produce(topic, None, key=key, partition=partition,
                             label=f"tombstone {key.decode(errors='replace')}")
        producer.flush()
    return len(unique)


@dataclass
class ScopeScan:
    """What one changes topic holds of an erased scope (:func:`scan_scope`)."""

    topic: str
    #: The topic exists.
    exists: bool = True
    #: Live changes the erasure covers, by v2 key: (partition, change id); each needs a
    #: tombstone.
    live: dict[bytes, tuple[int, str]] = field(default_factory=dict)
    #: Value records already tombstoned whose bytes are still in the log (the log cleaner
    #: has not compacted them yet).
    awaiting_compaction: int = 0
    #: Records of the scope the erasure covers that have no v2 key (a v1 topic): they can
    #: only go with the whole topic.
    unkeyed: int = 0

    def users(self) -> set[str]:
        """The users of the live changes (a whole tenant's erasure finds several)."""
        return {named[1] for key in self.live if (named := decode_change_key(key))}


def scan_scope(settings: Settings, topic: str, tenant: str, user: str | None,
               ledger: ErasureLedger, *, timeout_s: float = 120.0) -> ScopeScan:
    """Read ``topic`` to its end and sort out the records of (tenant, user) (``user`` None:
    the whole tenant) that ``ledger`` erases: live ones, tombstoned ones not yet compacted,
    ones without a v2 key.

    Every partition is read, also for one user: a record is found wherever it is (a topic
    whose partition count was changed keeps a scope's older records elsewhere).
    """
    from lightmem.streams.kafka.topic_reader import read_to_end

    scan = ScopeScan(topic)
    values: dict[bytes, int] = {}
    try:
        for msg in read_to_end(settings, topic, timeout_s=timeout_s, purpose="erasure"):
            key, value = msg.key(), msg.value()
            named = decode_change_key(key)
            if named is not None and (named[0] != tenant
                                      or (user is not None and named[1] != user)):
                continue
            if value is None:
                if key is not None and scan.live.pop(key, None) is not None:
                    scan.awaiting_compaction += values.pop(key, 0)
                continue
            try:
                change = MemoryChange.parse(value)
            except SchemaError:
                continue
            if (change.tenant != tenant or (user is not None and change.user != user)
                    or not change_erased(change, ledger)):
                continue
            if named is None or key is None:
                scan.unkeyed += 1
                continue
            scan.live[key] = (msg.partition(), change.change_id)
            values[key] = values.get(key, 0) + 1
    except LookupError:
        scan.exists = False
    return scan


def compaction_terms(settings: Settings, topic: str) -> tuple[bool, str]:
    """Whether ``topic`` is compacted, and when its cleaner removes tombstoned records, in
    words (from the topic's own configuration)."""
    from confluent_kafka.admin import AdminClient, ConfigResource

    names = ("cleanup.policy", "segment.ms", "min.cleanable.dirty.ratio",
             "max.compaction.lag.ms", "delete.retention.ms")
    try:
        admin = AdminClient(kafka_config(settings))
        res = ConfigResource(ConfigResource.Type.TOPIC, topic)
        conf = admin.describe_configs([res])[res].result(timeout=30)
        got = {n: conf[n].value for n in names}
    except Exception as exc:  # noqa: BLE001 - the report says it is unknown
        return True, f"the topic's compaction settings are unknown ({exc!r})"
    if "compact" not in (got["cleanup.policy"] or ""):
        return False, (f"cleanup.policy={got['cleanup.policy']}: the topic is not compacted, "
                       f"so its tombstones remove nothing (set cleanup.policy=compact)")
    return True, (f"their bytes stay in the log until the log cleaner compacts the segments "
                  f"holding them: a segment is closed at the first write after segment.ms="
                  f"{got['segment.ms']}, then cleaned once min.cleanable.dirty.ratio="
                  f"{got['min.cleanable.dirty.ratio']} of the log is dirty, within "
                  f"max.compaction.lag.ms={got['max.compaction.lag.ms']} at the latest; the "
                  f"tombstones go delete.retention.ms={got['delete.retention.ms']} after that")


def legacy_changes_topic(settings: Settings, topics: Topics) -> str | None:
    """The legacy changes topic v1's name when it exists (else None)."""
    from confluent_kafka.admin import AdminClient

    name = topics.memory_changes_v1
    listed = AdminClient(kafka_config(settings)).list_topics(timeout=30).topics
    return name if name in listed else None


# -- migration ------------------------------------------------------------------------------


@dataclass
class MigrationReport:
    """What :func:`migrate_changes` did (or, with ``dry_run``, would do)."""

    source: str
    target: str
    #: The source topic exists.
    source_exists: bool = True
    #: Records read from the source.
    read: int = 0
    #: Changes produced to the target.
    copied: int = 0
    #: Changes the target already held (an earlier migration, a worker).
    already: int = 0
    #: Changes not copied because an erasure covers them.
    erased: int = 0
    #: Further copies of a change id already seen (at-least-once duplicates).
    duplicates: int = 0
    #: Records that are not memory changes (not copied).
    undecodable: int = 0
    dry_run: bool = False
    #: The source topic was deleted after the copy.
    deleted_source: bool = False
    #: Copied changes per target partition.
    partitions: dict[int, int] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (
            "source", "target", "source_exists", "read", "copied", "already", "erased",
            "duplicates", "undecodable", "dry_run", "deleted_source", "partitions")}


def migrate_changes(settings: Settings, topics: Topics | None = None, *,
                    dry_run: bool = False, delete_source: bool = False,
                    timeout_s: float = 120.0) -> MigrationReport:
    """Copy the memory-changes topic v1's changes that no erasure covers into v2.

    Reads the erasure ledger and the change ids v2 holds first; copies v1's changes in v1
    order with v2 keys and partitions (:func:`change_key`, :func:`scope_partition`), skips
    the erased ones, duplicates and ids v2 already has, and waits for delivery.

    Args:
        settings: Kafka connection.
        topics: The deployment's topics (``topics.memory_changes_v1`` -> ``memory_changes``).
        dry_run: Count only; produce and delete nothing.
        delete_source: After a complete copy, delete v1 (the only way to remove the text
            of erased scopes it still holds).
        timeout_s: Deadline for reading each topic to its end.

    Raises:
        LookupError: the target topic does not exist (run ``lightmem topics create``).
        DeliveryError: some changes were not delivered (nothing is deleted then).
    """
    from lightmem.streams.erasure.ledger import read_ledger
    from lightmem.streams.kafka.producer import RecordProducer
    from lightmem.streams.kafka.topic_reader import read_to_end
    from lightmem.streams.kafka.topics import delete_topics

    topics = topics or Topics.from_settings(settings)
    source, target = topics.memory_changes_v1, topics.memory_changes
    report = MigrationReport(source, target, dry_run=dry_run)
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(kafka_config(settings))
    n = topic_partitions(admin, target)
    try:
        topic_partitions(admin, source)
    except LookupError:
        report.source_exists = False
        return report
    ledger = read_ledger(settings, topics)
    present: set[str] = set()
    for msg in read_to_end(settings, target, timeout_s=timeout_s, purpose="migrate"):
        decoded = decode_change_key(msg.key())
        if decoded is not None:
            present.add(decoded[3])
    seen: set[str] = set()
    out: list[tuple[int, bytes, bytes]] = []
    for msg in read_to_end(settings, source, timeout_s=timeout_s, purpose="migrate"):
        report.read += 1
        value = msg.value()
        try:
            change = MemoryChange.parse(value or b"")
        except SchemaError:
            report.undecodable += 1
            continue
        if change.change_id in seen:
            report.duplicates += 1
            continue
        seen.add(change.change_id)
        if change_erased(change, ledger):
            report.erased += 1
            continue
        if change.change_id in present:
            report.already += 1
            continue
        p = scope_partition(change.tenant, change.user, n)
        out.append((p, change_key(change), value or b""))
        report.partitions[p] = report.partitions.get(p, 0) + 1
    report.copied = len(out)
    if dry_run:
        return report
    if out:
        with RecordProducer(settings, topics) as producer:
            for p, key, value in out:
                producer.produce(target, value, key=key, partition=p)
            producer.flush()
    if delete_source:
        delete_topics(settings, [source])
        report.deleted_source = True
    log.info("migrated %s -> %s: %d copied, %d already there, %d erased, %d duplicates, "
             "%d undecodable", source, target, report.copied, report.already, report.erased,
             report.duplicates, report.undecodable)
    return report
