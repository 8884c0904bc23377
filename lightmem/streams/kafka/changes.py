"""Reading the memory-changes topic (``lightmem history`` on the streaming deployment).

The topic is keyed ``scope_key(tenant, user)``; a memory id does not say its scope, so the
reader scans every partition from the beginning to its current end with a consumer that
*assigns* the partitions (no group joined, nothing committed). Records are at-least-once: the same
``change_id`` may appear more than once (a replayed batch, a settled outbox entry); the
first copy is kept.

Erased scopes (:mod:`lightmem.streams.erasure.forget`): the changes of a scope erased after
they were made are not returned (they stay in the topic until its retention deletes them);
the content-free ``erase`` changes are.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightmem.processors.erasure import ErasureLedger, to_ms
from lightmem.schemas import ChangeOp, MemoryChange, SchemaError
from lightmem.settings import Settings
from lightmem.streams.kafka.topic_reader import read_to_end
from lightmem.streams.kafka.topics import Topics

__all__ = ["ChangeRecord", "read_changes", "memory_history"]


@dataclass(frozen=True)
class ChangeRecord:
    partition: int
    offset: int
    change: MemoryChange


def read_changes(settings: Settings, topics: Topics | None = None, *,
                 memory_id: str | None = None, timeout_s: float = 60.0,
                 erasures: ErasureLedger | None = None) -> list[ChangeRecord]:
    """Every change record (of ``memory_id`` only, if given), oldest first per partition.

    Records that do not decode are skipped (the producers validate what they write), and
    so are the changes of erased scopes made before their erasure.

    Args:
        erasures: The erasure ledger (default: read from the erasures topic; pass an empty
            one to see every record).

    Raises:
        LookupError: the topic does not exist.
        TimeoutError: its end was not reached within ``timeout_s``.
    """
    topics = topics or Topics.from_settings(settings)
    if erasures is None:
        from lightmem.streams.erasure.forget import read_ledger

        erasures = read_ledger(settings, topics)
    needle = memory_id.encode() if memory_id is not None else None
    out: list[ChangeRecord] = []
    for msg in read_to_end(settings, topics.memory_changes, timeout_s=timeout_s,
                           purpose="history"):
        value = msg.value() or b""
        # Cheap pre-filter before validating: the id is in the record's JSON.
        if needle is not None and needle not in value:
            continue
        try:
            change = MemoryChange.parse(value)
        except SchemaError:
            continue
        if change.op is not ChangeOp.erase and erasures.drops(change.tenant, change.user,
                                                              to_ms(change.at)):
            continue
        if memory_id is None or change.memory_id == memory_id:
            out.append(ChangeRecord(msg.partition(), msg.offset(), change))
    return sorted(out, key=lambda r: (r.partition, r.offset))


def memory_history(settings: Settings, memory_id: str, topics: Topics | None = None
                   ) -> list[MemoryChange]:
    """Every change of one memory, oldest first, one record per ``change_id``.

    One memory lives in one partition, so partition order is its change order.
    """
    seen: set[str] = set()
    out = []
    for rec in read_changes(settings, topics, memory_id=memory_id):
        if rec.change.change_id not in seen:
            seen.add(rec.change.change_id)
            out.append(rec.change)
    return out
