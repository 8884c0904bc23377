"""Erasure and the sleep-time workers on the real Kafka and Elasticsearch (issue 14): a sleep
window opened after an erasure makes no LLM call about the erased scope, and consolidates
the other scopes as usual."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("confluent_kafka", reason="confluent-kafka (the stream extra) is missing")

from lightmem.ops.bench.sleep import synthetic_pairs  # noqa: E402
from lightmem.streams.erasure.forget import forget_stream, new_request  # noqa: E402
from lightmem.streams.kafka.producer import RecordProducer  # noqa: E402

from . import test_sleep  # noqa: E402
from .test_sleep import SleepEnv, wait_for  # noqa: E402

sleep_env = test_sleep.sleep_env

pytestmark = pytest.mark.integration


def _calls_about(senv: SleepEnv, needle: str) -> list[Any]:
    return [r for r in senv.stub.chat_requests if needle in str(r["messages"])]


def test_a_sleep_window_after_an_erasure_never_asks_about_the_scope(sleep_env: SleepEnv
                                                                    ) -> None:
    senv = sleep_env
    pairs = synthetic_pairs(3, 3)  # user000, user001, user002
    want = senv.expect(pairs)
    senv.seed(pairs)
    erased_ids = {e.id for p in pairs if p.target.user == "user000"
                  for e in (p.target, p.newer)}
    before = senv.state()
    # Only the ledger record (the index still holds user000's memories): the sleep worker
    # itself must leave them alone.
    request = new_request("acme", "user000")
    with RecordProducer(senv.settings, senv.topics) as producer:
        producer.produce(senv.topics.erasures, request.to_bytes(), key=request.key.encode())
    want.update({i: before[i] for i in erased_ids})
    w = senv.start_worker("w1")
    senv.sleep_cli("open", "--for", "30m")
    wait_for(lambda: senv.state() == want, what="the other scopes consolidated", workers=[w])
    wait_for(lambda: senv.committed() == senv.ends(), what="offsets committed", workers=[w])
    assert senv.stub.chat_requests and not _calls_about(senv, "user000")
    assert not [c for c in senv.changes() if c.user == "user000"]
    # Then the full erasure removes the memories (no ingest worker here: its buffers are
    # reported pending, Elasticsearch confirms).
    report = forget_stream(senv.settings, new_request("acme", "user000"), topics=senv.topics,
                           store=senv.store, wait_s=2.0)
    assert report.sink("elasticsearch").confirmed and report.sink("elasticsearch").found == 6
    senv.store.refresh()
    assert not list(senv.store.iter_entries("acme", "user000"))
    assert list(senv.store.iter_entries("acme", "user001"))
    w.stop()


def test_the_sleep_outbox_keeps_nothing_of_an_erased_scope(sleep_env: SleepEnv) -> None:
    """Pending changes in the sleep workers' outbox hold the memory's text: a successor
    worker never produces those of an erased scope, and ``forget`` deletes them."""
    from datetime import timedelta

    from lightmem.processors.erasure import ErasureLedger
    from lightmem.schemas import ChangeOp, MemoryChange, MemoryEntry, stable_id, utc_now
    from lightmem.streams.erasure.forget import erasure_status
    from lightmem.streams.kafka.changes import read_changes
    from lightmem.streams.sleep.outbox import Outbox, outbox_index

    senv = sleep_env
    outbox = Outbox(senv.es, outbox_index(senv.settings.es_alias))
    outbox.ensure()

    def pending_delete(entry: MemoryEntry, at: Any) -> MemoryChange:
        before = entry.model_copy(update={"embedding": None})
        return MemoryChange(change_id=stable_id(entry.id, "delete", entry.version + 1),
                            op=ChangeOp.delete, memory_id=entry.id, tenant=entry.tenant,
                            user=entry.user, before=before, reason="test", at=at)

    def raw_changes() -> list[Any]:  # the topic as it is, not filtered by the ledger
        return [r.change for r in read_changes(senv.settings, senv.topics,
                                               erasures=ErasureLedger())]

    # As if a worker died after deleting three targets in the index, before producing their
    # change records (the targets are not in the index: the deletes "reached" it).
    targets = [p.target for p in synthetic_pairs(3, 1)]  # user000, user001, user002
    for t in targets:
        outbox.put(pending_delete(t, utc_now()), topic=senv.topics.entries, partition=0)
    request = new_request("acme", "user000")  # the ledger record only: the outbox stays
    with RecordProducer(senv.settings, senv.topics) as producer:
        producer.produce(senv.topics.erasures, request.to_bytes(), key=request.key.encode())
    w = senv.start_worker("w1")
    wait_for(lambda: {c.user for c in raw_changes()} == {"user001", "user002"},
             what="the other scopes' pending changes produced", workers=[w])
    wait_for(lambda: not outbox.pending(senv.topics.entries, [0]), what="the outbox settled",
             workers=[w])
    assert w.stop() == 0
    assert not [c for c in raw_changes() if c.user == "user000"]

    # forget deletes the scope's pending changes from before it, and only those
    later = utc_now() + timedelta(hours=1)  # a change of a memory made after the erasure
    outbox.put(pending_delete(targets[0], utc_now()), topic=senv.topics.entries, partition=1)
    outbox.put(pending_delete(targets[1], utc_now()), topic=senv.topics.entries, partition=1)
    after = pending_delete(targets[0].model_copy(update={"id": "fresh"}), later)
    outbox.put(after, topic=senv.topics.entries, partition=1)
    report = forget_stream(senv.settings, new_request("acme", "user000"), topics=senv.topics,
                           store=senv.store, wait_s=2.0)
    es = report.sink("elasticsearch")
    assert es.confirmed and es.removed["sleep outbox changes"] == 1, report.as_json()
    assert outbox.of_scope("acme", "user000") == ["fresh"]
    assert outbox.of_scope("acme", "user001") == [targets[1].id]
    status = erasure_status(senv.settings, "acme", "user000", stream=True, topics=senv.topics,
                            store=senv.store)
    assert status is not None and status.sink("elasticsearch").confirmed
