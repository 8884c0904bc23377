"""The erasable memory-changes topic's keys, partitions and order (issue 14), without Kafka.

The broker side (the producers' partitioner agrees with :func:`scope_partition`, tombstones,
compaction, the migration) is in ``tests/integration/test_changes_erasure.py``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from lightmem.processors.erasure import ErasureLedger
from lightmem.schemas import ChangeOp, EntryMode, ErasureRequest, MemoryChange, MemoryEntry
from lightmem.streams.kafka.change_log import (
    change_erased,
    change_key,
    change_order,
    decode_change_key,
    murmur2,
    scope_partition,
)

T0 = datetime(2024, 3, 4, 18, 0, tzinfo=UTC)


def entry(user: str = "alice", version: int = 1, written: datetime = T0) -> MemoryEntry:
    return MemoryEntry(id=f"m-{user}", tenant="acme", user=user, conversation="c1",
                       topic_id="t1", speaker=user, fact="I adopted a dog named Pepper.",
                       event_time=T0, ingest_time=written, source_turn_ids=["turn-1"],
                       original_text="x", compressed_text="x", mode=EntryMode.extractive,
                       version=version)


def change(op: ChangeOp, at: datetime, *, before: MemoryEntry | None = None,
           after: MemoryEntry | None = None, user: str = "alice") -> MemoryChange:
    return MemoryChange(change_id=f"{op}-{at.isoformat()}", op=op, memory_id=f"m-{user}",
                        tenant="acme", user=user, before=before, after=after, at=at)


def test_murmur2_is_the_java_clients_hash() -> None:
    # Kafka's UtilsTest.testMurmur2 vectors (signed 32-bit in Java).
    cases = {b"21": -973932308, b"foobar": -790332482,
             b"a-little-bit-long-string": -985981536,
             b"a-little-bit-longer-string": -1486304829,
             b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
             b"abc": 479470107}
    for data, signed in cases.items():
        assert murmur2(data) == signed & 0xFFFFFFFF, data


def test_scope_partition_is_stable_and_in_range() -> None:
    parts = {scope_partition("acme", f"user-{i}", 6) for i in range(200)}
    assert parts == set(range(6))
    assert scope_partition("acme", "alice", 6) == scope_partition("acme", "alice", 6)
    with pytest.raises(ValueError):
        scope_partition("acme", "alice", 0)


def test_a_change_key_names_its_scope_memory_and_change() -> None:
    c = change(ChangeOp.add, T0, after=entry())
    key = change_key(c)
    assert decode_change_key(key) == ("acme", "alice", "m-alice", c.change_id)
    # a v1 key (the scope) and no key are not v2 keys
    assert decode_change_key(b'["acme","alice"]') is None and decode_change_key(None) is None
    # names with separators cannot collide
    a = c.model_copy(update={"tenant": "a/b", "user": "c"})
    b = c.model_copy(update={"tenant": "a", "user": "b/c"})
    assert change_key(a) != change_key(b)


def test_changes_order_by_version_then_time_not_by_arrival() -> None:
    add = change(ChangeOp.add, T0, after=entry())
    upd = change(ChangeOp.update, T0 + timedelta(hours=1), before=entry(),
                 after=entry(version=2, written=T0 + timedelta(hours=1)))
    dele = change(ChangeOp.delete, T0 + timedelta(hours=2), before=entry(version=2))
    arrived = [dele, add, upd]  # e.g. a migration appended the old ones after the new
    assert sorted(arrived, key=change_order) == [add, upd, dele]


def test_which_changes_an_erasure_covers() -> None:
    erased_at = T0 + timedelta(days=1)
    ledger = ErasureLedger([ErasureRequest(erasure_id="e1", tenant="acme", user="alice",
                                           requested_at=erased_at)])
    before = change(ChangeOp.add, T0, after=entry())
    # made after the erasure, about a memory written before it: still the erased text
    late_update = change(ChangeOp.update, erased_at + timedelta(hours=1), before=entry(),
                         after=entry(version=2, written=erased_at + timedelta(hours=1)))
    new_beginning = change(ChangeOp.add, erased_at + timedelta(hours=2),
                           after=entry(written=erased_at + timedelta(hours=2)))
    other = change(ChangeOp.add, T0, after=entry("bob"), user="bob")
    audit = change(ChangeOp.erase, erased_at)
    assert change_erased(before, ledger) and change_erased(late_update, ledger)
    assert not change_erased(new_beginning, ledger)
    assert not change_erased(other, ledger) and not change_erased(audit, ledger)
    assert not change_erased(before, ErasureLedger())
