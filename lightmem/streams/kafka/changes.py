"""Reading the memory-changes topic (``lightmem history`` on the streaming deployment).

The topic (v2, :mod:`lightmem.streams.kafka.change_log`) keys every change by
``[tenant, user, memory_id, change_id]``, keeps a scope in one partition and is compacted:
an erasure tombstones the scope's changes. The reader *assigns* partitions (no group joined,
nothing committed) and reads them from the beginning to their current end:

- one scope (``tenant`` and ``user``): only the scope's partition;
- otherwise every partition; records are selected by their key before their value is
  decoded.

A tombstone removes its change from what is returned, also before the log cleaner has
compacted the record away. Records are at-least-once: the same ``change_id`` may appear more
than once (a replayed batch, a settled outbox entry); the first copy is kept. The order is
the changes' own (:func:`~lightmem.streams.kafka.change_log.change_order`: version, time,
op), never the offsets: a migration appends old changes after new ones.

Erased scopes (:mod:`lightmem.streams.erasure.forget`): besides the tombstones, the changes
an erasure covers are not returned (one written by a lagging worker after the erasure's
tombstones, until ``forget`` runs again); the content-free ``erase`` changes are.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightmem.processors.erasure import ErasureLedger
from lightmem.schemas import MemoryChange, SchemaError
from lightmem.settings import Settings
from lightmem.streams.kafka.change_log import (
    ChangeRouter,
    change_erased,
    change_order,
    decode_change_key,
)
from lightmem.streams.kafka.topic_reader import read_to_end
from lightmem.streams.kafka.topics import Topics

__all__ = ["ChangeRecord", "read_changes", "memory_history"]


@dataclass(frozen=True)
class ChangeRecord:
    partition: int
    offset: int
    change: MemoryChange
    #: The record key (v2: the change's own key; a tombstone names it).
    key: bytes | None = None


def read_changes(settings: Settings, topics: Topics | None = None, *,
                 memory_id: str | None = None, tenant: str | None = None,
                 user: str | None = None, timeout_s: float = 60.0,
                 erasures: ErasureLedger | None = None, topic: str | None = None
                 ) -> list[ChangeRecord]:
    """The live change records (of ``memory_id``, ``tenant``, ``user`` if given), in time
    order (time, then :func:`~lightmem.streams.kafka.change_log.change_order`).

    Records that do not decode are skipped (the producers validate what they write), and
    so are tombstoned changes and the changes an erasure covers.

    Args:
        erasures: The erasure ledger (default: read from the erasures topic; pass an empty
            one to see every record not tombstoned).
        topic: Another changes topic (default ``topics.memory_changes``; the legacy v1 one
            for the erasure's check).

    Raises:
        LookupError: the topic does not exist.
        TimeoutError: its end was not reached within ``timeout_s``.
    """
    topics = topics or Topics.from_settings(settings)
    topic = topic or topics.memory_changes
    if erasures is None:
        from lightmem.streams.erasure.ledger import read_ledger

        erasures = read_ledger(settings, topics)
    partitions = None
    if tenant is not None and user is not None:
        partitions = [ChangeRouter(settings).partition(topic, tenant, user)]
    needle = memory_id.encode() if memory_id is not None else None
    live: dict[str, ChangeRecord] = {}
    for msg in read_to_end(settings, topic, timeout_s=timeout_s, purpose="history",
                           partitions=partitions):
        value = msg.value()
        named = decode_change_key(msg.key())
        if named is not None:
            # A v2 key names the change: select (and apply tombstones) without decoding.
            if ((tenant is not None and named[0] != tenant)
                    or (user is not None and named[1] != user)
                    or (memory_id is not None and named[2] != memory_id)):
                continue
            if value is None:
                live.pop(named[3], None)
                continue
        elif value is None or (needle is not None and needle not in value):
            continue  # cheap pre-filter: the id is in the record's JSON
        try:
            change = MemoryChange.parse(value)
        except SchemaError:
            continue
        if ((tenant is not None and change.tenant != tenant)
                or (user is not None and change.user != user)
                or (memory_id is not None and change.memory_id != memory_id)):
            continue
        if change_erased(change, erasures) or change.change_id in live:
            continue
        live[change.change_id] = ChangeRecord(msg.partition(), msg.offset(), change,
                                              msg.key())
    return sorted(live.values(), key=lambda r: (r.change.at, change_order(r.change)))


def memory_history(settings: Settings, memory_id: str, topics: Topics | None = None, *,
                   tenant: str | None = None, user: str | None = None
                   ) -> list[MemoryChange]:
    """Every change of one memory in its order (version, time, op), one per ``change_id``.

    With its scope (``tenant`` and ``user``) only the scope's partition is read; a memory
    id alone does not say its scope, so without it every partition is (keys select).
    """
    recs = read_changes(settings, topics, memory_id=memory_id, tenant=tenant, user=user)
    return sorted((r.change for r in recs), key=change_order)
