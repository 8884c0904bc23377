"""Issue 11, defect 2 on the real Kafka broker and Elasticsearch node: "/" in tenant, user and
conversation names, and two users in one conversation.

The stages run as their plain steps (lightmem.streams.ingest.stages) over records read back
from real topics, not inside a worker, so the test does not depend on how the worker drives
them. What
it checks is what the broker and the index do with the keys: every record of a conversation
(turns, segments, flush markers) carries the same key bytes and lands in one partition, every
entry is keyed by its own scope, and a search in one (tenant, user) scope never returns
another's memory.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("confluent_kafka", reason="confluent-kafka (the stream extra) is missing")
pytest.importorskip("elasticsearch", reason="elasticsearch (the stream extra) is missing")

from lightmem.processors.compress import IdentityBackend, SensoryCompressor  # noqa: E402
from lightmem.processors.segment import SensoryBuffer, cut_at, group_exchanges  # noqa: E402
from lightmem.processors.summarize import Summarizer, TopicBuffer  # noqa: E402
from lightmem.schemas import (  # noqa: E402
    MemoryEntry,
    Segment,
    TurnEvent,
    conversation_key,
    scope_key,
)
from lightmem.settings import Settings  # noqa: E402
from lightmem.streams.elastic.store import ElasticsearchStore  # noqa: E402
from lightmem.streams.ingest.stages import (  # noqa: E402
    Inbound,
    IndexSink,
    SensoryStage,
    ShortTermStage,
    StepResult,
)
from lightmem.streams.kafka.flush_commands import FlushCommand, control_kind  # noqa: E402
from lightmem.streams.kafka.producer import RecordProducer  # noqa: E402
from lightmem.streams.kafka.topics import Topics, create_topics, delete_topics, kafka_config  # noqa: E402

pytestmark = pytest.mark.integration

DIM = 16
T0 = datetime(2024, 4, 2, 8, 0, tzinfo=UTC)
NOW = datetime(2025, 1, 1, tzinfo=UTC)


class CutEveryThree:
    """Segmenter stand-in: a boundary before every 3rd exchange (no model)."""

    def cut(self, state: Any, *, flush: bool) -> Any:
        units = group_exchanges(state.turns)
        return cut_at(state, units, list(range(3, len(units), 3)), flush=flush)


class HashEmbedder:
    """Deterministic unit vectors from the fact text (no model)."""

    def embed_entries(self, entries: Sequence[MemoryEntry]) -> list[MemoryEntry]:
        return [e.model_copy(update={"embedding": vector(e.fact)}) for e in entries]


def vector(text: str) -> list[float]:
    raw = [b / 255 + 0.01 for b in hashlib.sha256(text.encode()).digest()[:DIM]]
    norm = sum(x * x for x in raw) ** 0.5
    return [x / norm for x in raw]


def components() -> Any:
    def words(text: str) -> int:
        return len(text.split())

    return SimpleNamespace(
        compressor=SensoryCompressor(IdentityBackend(), rate=0.6),
        sensory_buffer=SensoryBuffer(words, 60), segmenter=CutEveryThree(),
        topic_buffer=TopicBuffer(words, 10_000), summarizer=Summarizer(None),
        idle_timeout=timedelta(hours=1), embedder=HashEmbedder())


@pytest.fixture
def deployment(kafka_bootstrap: str, unique_id: Callable[[str], str]
               ) -> Iterator[tuple[Settings, Topics]]:
    """Private topics (4 partitions) of one test, deleted after it."""
    settings = Settings(kafka_bootstrap=kafka_bootstrap, kafka_partitions=4)
    topics = Topics(prefix=unique_id("lmtest-keys") + ".")
    created = create_topics(settings, topics).created
    try:
        yield settings, topics
    finally:
        delete_topics(settings, created)


@pytest.fixture
def es_store(es_client, unique_id: Callable[[str], str]) -> Iterator[ElasticsearchStore]:  # noqa: ANN001
    alias = unique_id("lightmem-test-keys")
    store = ElasticsearchStore(es_client, alias=alias, dim=DIM, refresh=True)
    store.ensure_index()
    try:
        yield store
    finally:
        for name in es_client.indices.get(index=f"{alias}-*", expand_wildcards="all"):
            es_client.indices.delete(index=name, ignore_unavailable=True)
        es_client.options(ignore_status=404).indices.delete_index_template(
            name=f"{alias}-template")


def read_all(settings: Settings, topic: str, after: dict[int, int] | None = None
             ) -> dict[int, list[Inbound]]:
    """Every record of ``topic`` (past ``after[p]`` per partition), by partition, in order."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(kafka_config(settings, **{"group.id": "lmtest-keys-unused",
                                                  "enable.auto.commit": False}))
    out: dict[int, list[Inbound]] = {}
    try:
        for p in consumer.list_topics(topic, timeout=30).topics[topic].partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)
            low = max(low, (after or {}).get(p, -1) + 1)
            records: list[Inbound] = []
            if high > low:
                consumer.assign([TopicPartition(topic, p, low)])
                while len(records) < high - low:
                    msg = consumer.poll(10)
                    assert msg is not None, f"{topic}[{p}]: nothing read before offset {high}"
                    assert msg.error() is None, msg.error()
                    records.append(Inbound(topic, p, msg.offset(), msg.key(), msg.value(),
                                           tuple(msg.headers() or ())))
            out[p] = records
    finally:
        consumer.close()
    return out


def produce(settings: Settings, topics: Topics, results: Sequence[StepResult], topic: str
            ) -> None:
    """The stage outputs bound for ``topic``, produced with their keys (as a worker would)."""
    with RecordProducer(settings, topics) as producer:
        for result in results:
            for o in result.out:
                if o.topic == topic:
                    producer.produce(o.topic, o.value, key=o.key, headers=list(o.headers))


def turn(i: int, tenant: str, user: str, conversation: str, text: str) -> TurnEvent:
    return TurnEvent(tenant=tenant, user=user, conversation=conversation, session="s1",
                     turn_id=f"t{i:03d}", role="user", speaker=user, text=text,
                     event_time=T0 + timedelta(minutes=i))


def test_slash_names_and_two_users_stay_in_their_own_scopes_on_kafka_and_es(
    deployment: tuple[Settings, Topics], es_store: ElasticsearchStore
) -> None:
    settings, topics = deployment
    turns = []
    for i in range(6):  # interleaved: two tenants whose "/"-joined keys were one
        turns.append(turn(i, "a", "b/u", "b/c", f"tenant a note {i}: the vault code is 47{i}"))
        turns.append(turn(i, "a/b", "u", "c", f"tenant a/b note {i}: tulips bed {i}"))
    for i in range(6):  # one conversation, two users
        user = ("u1", "u2")[i % 2]
        turns.append(turn(100 + i, "acme", user, "family", f"{user} says private thing {i}"))
    with RecordProducer(settings, topics) as producer:
        producer.add_turns(turns)

    # Turns: one key per conversation, every record of a conversation in one partition.
    turn_recs = read_all(settings, topics.turns)
    where: dict[bytes, set[int]] = defaultdict(set)
    for p, records in turn_recs.items():
        for r in records:
            t = TurnEvent.parse(r.value)
            assert r.key == conversation_key(t.tenant, t.conversation).encode()
            where[r.key].add(p)
    assert len(where) == 3 and all(len(ps) == 1 for ps in where.values())

    # Sensory stage per partition, then an explicit flush of everything (real records).
    comps = components()
    sensory = SensoryStage(settings, comps, topics, clock=lambda: NOW)
    slots: dict[bytes, bytes] = {}
    results = []
    for records in turn_recs.values():
        result = sensory.step(records, slots)
        assert result.dead_letters == 0
        slots.update({k: v for k, (_, v) in result.slots.items()})
        results.append(result)
    assert len(slots) == 3
    ends = {p: max((r.offset for r in rs), default=-1) for p, rs in turn_recs.items()}
    with RecordProducer(settings, topics) as producer:
        producer.send_flush(FlushCommand(issued_at=NOW))
    for records in read_all(settings, topics.turns, after=ends).values():
        result = sensory.step(records, slots)
        slots.update({k: v for k, (_, v) in result.slots.items()})
        results.append(result)
    produce(settings, topics, results, topics.segments)

    # Segments and flush markers: the conversation's key, the conversation's partition.
    seg_recs = read_all(settings, topics.segments)
    for p, records in seg_recs.items():
        for r in records:
            assert p in where[r.key]
            if control_kind(r.headers) is None:
                s = Segment.parse(r.value)
                assert r.key == conversation_key(s.tenant, s.conversation).encode()
    short = ShortTermStage(settings, comps, topics, clock=lambda: NOW)
    entry_results = [short.step(records, {}) for records in seg_recs.values()]
    assert all(r.dead_letters == 0 for r in entry_results)
    produce(settings, topics, entry_results, topics.entries)

    # Entries: each under its own source turn's (tenant, user), keyed by that scope.
    source = {(t.tenant, t.conversation, t.turn_id): t for t in turns}
    entry_recs = read_all(settings, topics.entries)
    scope_partitions: dict[bytes, set[int]] = defaultdict(set)
    count = 0
    for p, records in entry_recs.items():
        for r in records:
            e = MemoryEntry.parse(r.value)
            src = source[(e.tenant, e.conversation, e.source_turn_ids[0])]
            assert (e.tenant, e.user) == (src.tenant, src.user)
            assert r.key == scope_key(e.tenant, e.user).encode()
            scope_partitions[r.key].add(p)
            count += 1
    assert count == len(turns)
    assert len(scope_partitions) == 4 and all(len(ps) == 1 for ps in scope_partitions.values())

    # The index: a search in one scope returns that scope's memories only.
    sink = IndexSink(settings, comps, topics, es_store, clock=lambda: NOW)
    for records in entry_recs.values():
        assert sink.step(records).dead_letters == 0
    q = vector("anything")
    expect = {("a", "b/u"): "tenant a note", ("a/b", "u"): "tenant a/b note",
              ("acme", "u1"): "u1 says", ("acme", "u2"): "u2 says"}
    for (tenant, user), prefix in expect.items():
        hits = es_store.search(tenant, user, q, k=50)
        assert len(hits) == (6 if tenant != "acme" else 3), (tenant, user)
        assert all(h.entry.original_text.startswith(prefix) for h in hits), (tenant, user)
