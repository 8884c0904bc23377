"""The memory-changes topic is erasable (issue 14, item 2), on the real Kafka broker.

v2 of the topic keys every change by itself, is compacted, and keeps a scope in one
partition (:mod:`lightmem.streams.kafka.change_log`). ``forget`` produces one tombstone per
change of the erased scope: a consumer reading the topic finds the tombstones, history and
the readers return nothing of the scope, the log cleaner removes the bytes (forced here with
a small ``segment.ms``), and every other scope's records stay byte for byte. The migration
copies v1's changes that no erasure covers into v2, in their scope's partition, once.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from typer.testing import CliRunner

pytest.importorskip("confluent_kafka", reason="confluent-kafka (the stream extra) is missing")

from lightmem.ops.cli import app as cli_app  # noqa: E402
from lightmem.processors.erasure import ErasureLedger  # noqa: E402
from lightmem.schemas import (  # noqa: E402
    ChangeOp,
    EntryMode,
    MemoryChange,
    MemoryEntry,
    scope_key,
)
from lightmem.streams.erasure.forget import (  # noqa: E402
    erasure_status,
    forget_stream,
    new_request,
)
from lightmem.streams.kafka.change_log import (  # noqa: E402
    ChangeRouter,
    change_key,
    decode_change_key,
    migrate_changes,
    produce_change,
    scope_partition,
)
from lightmem.streams.kafka.changes import memory_history, read_changes  # noqa: E402
from lightmem.streams.kafka.producer import RecordProducer  # noqa: E402
from lightmem.streams.kafka.topics import kafka_config  # noqa: E402

from . import test_streaming  # noqa: E402
from .test_streaming import T0, StreamEnv, wait_for  # noqa: E402

stream_env = test_streaming.stream_env

pytestmark = pytest.mark.integration


def entry(tenant: str, user: str, n: int, version: int = 1, fact: str = "") -> MemoryEntry:
    when = T0 + timedelta(minutes=n)
    fact = fact or f"{user} of {tenant}: secret fact number {n}"
    return MemoryEntry(id=f"{tenant}-{user}-m{n}", tenant=tenant, user=user, conversation="c1",
                       topic_id="t1", speaker=user, fact=fact, event_time=when,
                       ingest_time=when, source_turn_ids=[f"{tenant}-{user}-t{n}"],
                       original_text=fact, compressed_text=fact, mode=EntryMode.extractive,
                       version=version)


def history_of(tenant: str, user: str, n: int) -> list[MemoryChange]:
    """add, update, delete of one memory (each a minute after the other)."""
    e1 = entry(tenant, user, n)
    e2 = entry(tenant, user, n, version=2, fact=f"{user} of {tenant}: updated secret {n}")
    at = T0 + timedelta(minutes=n)
    return [
        MemoryChange(change_id=f"{e1.id}-add", op=ChangeOp.add, memory_id=e1.id, tenant=tenant,
                     user=user, after=e1, reason="ingest", at=at),
        MemoryChange(change_id=f"{e1.id}-update", op=ChangeOp.update, memory_id=e1.id,
                     tenant=tenant, user=user, before=e1, after=e2, reason="newer",
                     at=at + timedelta(minutes=1)),
        MemoryChange(change_id=f"{e1.id}-delete", op=ChangeOp.delete, memory_id=e1.id,
                     tenant=tenant, user=user, before=e2, reason="gone",
                     at=at + timedelta(minutes=2)),
    ]


def raw_records(settings: Any, topic: str, partitions: list[int] | None = None
                ) -> list[tuple[int, int, bytes | None, bytes | None]]:
    """Every record of the topic as a consumer sees it: (partition, offset, key, value)."""
    from lightmem.streams.kafka.topic_reader import read_to_end

    return [(m.partition(), m.offset(), m.key(), m.value())
            for m in read_to_end(settings, topic, partitions=partitions)]


def test_the_producers_partitioner_and_scope_partition_agree(kafka_bootstrap: str,
                                                             new_topic: Any) -> None:
    """A record keyed by the scope (v1) lands where v2 puts the scope's changes."""
    from lightmem.settings import Settings

    settings = Settings(kafka_bootstrap=kafka_bootstrap)
    topic = new_topic(6)
    scopes = [(f"tenant-{i % 3}", f"user/{i}") for i in range(60)]
    with RecordProducer(settings) as producer:
        for tenant, user in scopes:
            producer.produce(topic, b"x", key=scope_key(tenant, user).encode())
    got = raw_records(settings, topic)
    assert len(got) == len(scopes)
    for partition, _, key, _ in got:
        tenant, user = json.loads(key)
        assert partition == scope_partition(tenant, user, 6), (tenant, user)
    assert len({p for p, *_ in got}) > 1


def set_segment_ms(settings: Any, topic: str, ms: int) -> None:
    """Roll the topic's segments at the first write after ``ms`` (so the cleaner can work
    on them in a test)."""
    from confluent_kafka.admin import (
        AdminClient,
        AlterConfigOpType,
        ConfigEntry,
        ConfigResource,
    )

    admin = AdminClient(kafka_config(settings))
    res = ConfigResource(ConfigResource.Type.TOPIC, topic, incremental_configs=[
        ConfigEntry("segment.ms", str(ms), incremental_operation=AlterConfigOpType.SET)])
    admin.incremental_alter_configs([res])[res].result(timeout=30)


def test_forget_tombstones_the_scopes_changes_and_compaction_removes_them(
        stream_env: StreamEnv) -> None:
    senv = stream_env
    settings, topics = senv.settings, senv.topics
    topic = topics.memory_changes
    set_segment_ms(settings, topic, 200)
    alice = history_of("acme", "alice", 1) + history_of("acme", "alice", 5)[:1]
    bob = history_of("acme", "bob", 3)
    galice = history_of("globex", "alice", 4)  # the same user name in another tenant
    router = ChangeRouter(settings)
    with RecordProducer(settings, topics) as producer:
        # bob's arrive out of order (update first): history orders them by version/time
        for c in [bob[1], bob[0], bob[2], *alice, alice[0], *galice]:  # alice[0] twice
            produce_change(producer, topic, c, router)
        producer.flush()
    before = raw_records(settings, topic)
    others = {k: v for _, _, k, v in before
              if decode_change_key(k)[:2] != ("acme", "alice")}
    assert len(others) == len(bob) + len(galice)
    # one scope, one partition: reading the scope reads only that partition
    p_alice = scope_partition("acme", "alice", settings.kafka_partitions)
    assert {p for p, _, k, _ in before if decode_change_key(k)[:2] == ("acme", "alice")} == {
        p_alice}
    assert [c.op for c in memory_history(settings, "acme-bob-m3", topics)] == [
        "add", "update", "delete"]
    assert [r.change.change_id for r in read_changes(settings, topics, tenant="acme",
                                                     user="alice")] == [
        c.change_id for c in alice]

    report = forget_stream(settings, new_request("acme", "alice", reason="test"),
                           topics=topics, store=senv.store(), wait_s=30)
    sink = report.sink("memory-changes")
    assert sink.confirmed and report.confirmed, report.as_json()
    assert sink.found == len(alice)
    assert sink.removed["change records tombstoned"] == len(alice)
    assert any("log cleaner" in note for note in sink.pending), sink.pending

    # A consumer of the topic finds a tombstone after each of alice's records ...
    after = raw_records(settings, topic)
    tombstones = {k for p, _, k, v in after if v is None}
    assert tombstones == {change_key(c) for c in alice}
    assert {p for p, _, k, v in after if v is None} == {p_alice}
    # ... the readers return nothing of her, even without the ledger's filter ...
    assert not [r for r in read_changes(settings, topics, erasures=ErasureLedger())
                if (r.change.tenant, r.change.user) == ("acme", "alice")
                and r.change.op is not ChangeOp.erase]
    assert memory_history(settings, "acme-alice-m1", topics) == []
    [audit] = [r.change for r in read_changes(settings, topics, tenant="acme", user="alice")]
    assert audit.op is ChangeOp.erase and audit.counts["changes_tombstoned"] == len(alice)
    # ... and every other record is byte for byte what it was.
    assert {k: v for _, _, k, v in after if k in others} == others
    status = erasure_status(settings, "acme", "alice", stream=True, topics=topics,
                            store=senv.store())
    assert status is not None and status.sink("memory-changes").confirmed
    assert status.sink("memory-changes").found == 0

    # A lagging writer (e.g. a sleep worker's late update of her memory) after the
    # tombstones: hidden from readers by the ledger, and --status says to erase again.
    late = history_of("acme", "alice", 5)[1]
    with RecordProducer(settings, topics) as producer:
        produce_change(producer, topic, late, router)
    assert not [r for r in read_changes(settings, topics, tenant="acme", user="alice")
                if r.change.op is not ChangeOp.erase]
    status = erasure_status(settings, "acme", "alice", stream=True, topics=topics,
                            store=senv.store())
    hist = status.sink("memory-changes")
    assert not hist.confirmed and hist.found == 1
    assert any("forget` again" in note for note in hist.pending), hist.pending
    again = forget_stream(settings, new_request("acme", "alice"), topics=topics,
                          store=senv.store(), wait_s=30)
    assert again.sink("memory-changes").removed["change records tombstoned"] == 1
    assert erasure_status(settings, "acme", "alice", stream=True, topics=topics,
                          store=senv.store()).sink("memory-changes").confirmed
    alice.append(late)

    # The log cleaner removes the bytes: a segment rolls at the first write after
    # segment.ms, so keep writing (a record of another key) until it has.
    texts = [c.to_bytes() for c in alice]

    def compacted() -> bool:
        with RecordProducer(settings, topics) as producer:
            producer.produce(topic, b"{}", key=b"filler", partition=p_alice)
        values = [v for _, _, _, v in raw_records(settings, topic, [p_alice])]
        return not any(v in values for v in texts)

    wait_for(compacted, timeout=120, interval=1.0, what="the log cleaner to compact")
    final = raw_records(settings, topic)
    assert not any(b"secret" in (v or b"") and b'"alice"' in (v or b"")
                   and b'"acme"' in (v or b"") for _, _, _, v in final)
    assert {k: v for _, _, k, v in final if k in others} == others
    assert {r.change.op for r in read_changes(settings, topics, tenant="acme",
                                              user="alice")} == {ChangeOp.erase}


def test_the_migration_copies_v1_without_erased_scopes_once(stream_env: StreamEnv) -> None:
    senv = stream_env
    settings, topics = senv.settings, senv.topics
    v1 = topics.memory_changes_v1
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(kafka_config(settings))
    for future in admin.create_topics([NewTopic(v1, settings.kafka_partitions, 1)]).values():
        future.result(timeout=60)
    alice = history_of("acme", "alice", 1)
    bob = history_of("acme", "bob", 2)
    carol = history_of("globex", "carol", 3)
    with RecordProducer(settings, topics) as producer:
        # v1: keyed by the scope, placed by the partitioner
        for c in [*alice, *bob, bob[0], *carol]:
            producer.produce(v1, c.to_bytes(), key=scope_key(c.tenant, c.user).encode())
        producer.produce(v1, b"not a change", key=b"junk")
        # a worker of this version already wrote bob's add to v2
        produce_change(producer, topics.memory_changes, bob[0], ChangeRouter(settings))
        # alice was erased after her changes were made
        producer.produce(topics.erasures, new_request(
            "acme", "alice", now=T0 + timedelta(days=1)).to_bytes(),
            key=scope_key("acme", "alice").encode())
    v1_partition = {json.loads(k)[1]: p for p, _, k, v in raw_records(settings, v1)
                    if k != b"junk"}

    dry = migrate_changes(settings, topics, dry_run=True)
    assert (dry.read, dry.copied, dry.already, dry.erased, dry.duplicates,
            dry.undecodable) == (11, 5, 1, 3, 1, 1)
    assert len(raw_records(settings, topics.memory_changes)) == 1  # nothing produced

    env = {"LIGHTMEM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
           "LIGHTMEM_KAFKA_PARTITIONS": str(settings.kafka_partitions)}
    result = CliRunner().invoke(cli_app, ["topics", "migrate-changes", "--topic-prefix",
                                          topics.prefix, "--json"], env=env)
    assert result.exit_code == 0, result.output
    done = json.loads(result.stdout)
    assert (done["copied"], done["already"], done["erased"]) == (5, 1, 3)
    copied = raw_records(settings, topics.memory_changes)
    assert len(copied) == 6
    for p, _, key, value in copied:
        tenant, user, memory_id, change_id = decode_change_key(key)
        assert p == v1_partition[user]  # the scope stays in its partition
        assert MemoryChange.parse(value).change_id == change_id
    assert not [k for _, _, k, _ in copied if decode_change_key(k)[1] == "alice"]
    assert [c.op for c in memory_history(settings, "acme-bob-m2", topics)] == [
        "add", "update", "delete"]

    again = migrate_changes(settings, topics, delete_source=True)
    assert (again.copied, again.already, again.deleted_source) == (0, 6, True)
    assert v1 not in admin.list_topics(timeout=30).topics
    gone = migrate_changes(settings, topics)
    assert not gone.source_exists and gone.copied == 0
