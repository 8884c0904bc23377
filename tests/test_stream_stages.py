"""The stream stages without Kafka: parsing and dead letters, redelivery, flushes, poison
messages, transient errors (lightmem.streams.ingest.stages). Models are replaced by small fakes."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("confluent_kafka", reason="confluent-kafka (the stream extra) is missing")

from lightmem.processors.compress import IdentityBackend, SensoryCompressor  # noqa: E402
from lightmem.processors.llm import LLMTransientError  # noqa: E402
from lightmem.processors.segment import SensoryBuffer, cut_at, group_exchanges  # noqa: E402
from lightmem.processors.summarize import Summarizer, TopicBuffer  # noqa: E402
from lightmem.schemas import (  # noqa: E402
    DeadLetter,
    MemoryChange,
    MemoryEntry,
    Segment,
    TurnEvent,
    conversation_key,
    decode_conversation_key,
    scope_key,
)
from lightmem.settings import Settings  # noqa: E402
from lightmem.streams.ingest.stages import (  # noqa: E402
    Inbound,
    IndexSink,
    SensorySlot,
    SensoryStage,
    ShortTermStage,
    is_transient,
)
from lightmem.streams.kafka.flush_commands import FlushCommand, control_kind, flush_headers  # noqa: E402
from lightmem.streams.kafka.topics import Topics  # noqa: E402

T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
TOPICS = Topics(prefix="t.")
NOW = datetime(2025, 1, 1, tzinfo=UTC)
#: Record keys of the conversations acme/c1, acme/c2 and of the scope acme/u1.
K1 = conversation_key("acme", "c1").encode()
K2 = conversation_key("acme", "c2").encode()
S1 = scope_key("acme", "u1").encode()


class CutEveryFour:
    """Segmenter fake: a boundary before every 4th exchange."""

    def cut(self, state: Any, *, flush: bool) -> Any:
        units = group_exchanges(state.turns)
        return cut_at(state, units, list(range(4, len(units), 4)), flush=flush)


class Exploding:
    def __init__(self, inner: Any, bad_text: str) -> None:
        self.inner, self.bad_text = inner, bad_text
        self.calls = 0

    def compress(self, texts: list[str]) -> Any:
        if any(self.bad_text in t for t in texts):
            self.calls += 1
            raise RuntimeError("model blew up")
        return self.inner.compress(texts)


def words(text: str) -> int:
    return len(text.split())


def components(**overrides: Any) -> Any:
    base = dict(
        compressor=SensoryCompressor(IdentityBackend(), rate=0.6),
        sensory_buffer=SensoryBuffer(words, 40),
        segmenter=CutEveryFour(),
        topic_buffer=TopicBuffer(words, 64),
        summarizer=Summarizer(None),
        idle_timeout=timedelta(hours=1),
    )
    base.update(overrides)
    return SimpleNamespace(**base)


def settings() -> Settings:
    return Settings(max_event_bytes=2048, poison_attempts=3)


def turn(i: int, conv: str = "c1", session: str = "s0", text: str | None = None) -> TurnEvent:
    return TurnEvent(tenant="acme", user="u1", conversation=conv, session=session,
                     turn_id=f"{conv}-t{i:03d}", role="user" if i % 2 == 0 else "assistant",
                     speaker="u1" if i % 2 == 0 else "assistant",
                     text=text or f"message number {i} about something", event_time=T0 +
                     timedelta(minutes=i))


def rec(offset: int, value: bytes | None, key: bytes | None = K1, partition: int = 0,
        headers: tuple = (), topic: str = TOPICS.turns) -> Inbound:
    return Inbound(topic, partition, offset, key, value, headers)


def turn_recs(turns: list[TurnEvent], start: int = 0) -> list[Inbound]:
    return [rec(start + i, t.to_bytes(), t.conversation_key.encode())
            for i, t in enumerate(turns)]


def sensory(comp: Any = None) -> SensoryStage:
    return SensoryStage(settings(), comp or components(), TOPICS, clock=lambda: NOW,
                        sleep=lambda s: None)


def segments_of(result: Any) -> list[Segment]:
    return [Segment.parse(o.value) for o in result.out
            if o.topic == TOPICS.segments and control_kind(o.headers) is None]


def letters_of(result: Any) -> list[DeadLetter]:
    return [DeadLetter.parse(o.value) for o in result.out if o.topic == TOPICS.dlq]


def slots_of(result: Any) -> dict[bytes, bytes]:
    return {k: v for k, (_, v) in result.slots.items()}


def test_bad_records_are_dead_lettered_with_coordinates_and_the_rest_applied() -> None:
    good = [turn(i) for i in range(3)]
    bad_json = rec(10, b"{not json")
    too_big = rec(11, turn(9, text="x" * 3000).to_bytes())
    wrong_key = rec(12, turn(8).to_bytes(), key=b"acme/other")
    tombstone = rec(13, None)
    result = sensory().step([*turn_recs(good), bad_json, too_big, wrong_key, tombstone], {})
    letters = letters_of(result)
    assert [(x.step, x.offset, x.partition, x.source) for x in letters] == [
        ("parse", o, 0, TOPICS.turns) for o in (10, 11, 12, 13)]
    assert "max_event_bytes" in letters[1].reason and "key: must be" in letters[2].reason
    assert "tombstone" in letters[3].reason
    slot = SensorySlot.model_validate_json(slots_of(result)[K1])
    assert [t.turn_id for t in slot.buffer.turns] == [t.turn_id for t in good]
    assert result.applied == 3 and result.dead_letters == 4


def test_redelivered_and_duplicate_turns_are_skipped() -> None:
    stage = sensory()
    turns = [turn(i) for i in range(6)]
    first = stage.step(turn_recs(turns[:4]), {})
    # Redelivery of offsets 0..3 plus two new turns, plus a duplicate turn id at a new offset.
    again = stage.step([*turn_recs(turns), rec(6, turns[5].to_bytes())], slots_of(first))
    assert again.applied == 2 and again.skipped == 5
    slot = SensorySlot.model_validate_json(slots_of(again)[K1])
    buffered = [t.turn_id for t in slot.buffer.turns]
    emitted = [t.turn_id for s in segments_of(first) + segments_of(again) for t in s.turns]
    assert emitted + buffered == [t.turn_id for t in turns]
    assert slot.offset == 6


def test_flush_command_closes_the_buffer_and_tells_the_next_stage() -> None:
    stage = sensory()
    turns = [turn(i) for i in range(3)]
    other = [turn(i, conv="c2") for i in range(2)]
    applied = stage.step([*turn_recs(turns), *[rec(10 + i, t.to_bytes(), K2)
                                                for i, t in enumerate(other)]], {})
    flush_all = rec(20, FlushCommand().to_bytes(), key=None, headers=tuple(flush_headers()))
    flushed = stage.step([flush_all], slots_of(applied))
    segs = segments_of(flushed)
    assert {s.conversation for s in segs} == {"c1", "c2"}
    assert all(s.closed_by == "flush" for s in segs)
    markers = [o for o in flushed.out if control_kind(o.headers) is not None]
    assert sorted(o.key for o in markers) == sorted([K1, K2])
    # Applying the same flush again (redelivery) changes nothing.
    again = stage.step([flush_all], {**slots_of(applied), **slots_of(flushed)})
    assert again.out == []


def test_a_new_session_cuts_and_the_order_is_kept() -> None:
    stage = sensory()
    turns = [turn(i) for i in range(3)] + [turn(i, session="s1") for i in range(3, 5)]
    result = stage.step(turn_recs(turns), {})
    assert [t.turn_id for s in segments_of(result) for t in s.turns] == [
        t.turn_id for t in turns[:3]]


def test_a_poison_turn_is_dead_lettered_after_the_configured_attempts() -> None:
    inner = SensoryCompressor(IdentityBackend(), rate=0.6)
    exploding = Exploding(inner, "POISON")
    stage = sensory(components(compressor=exploding))
    turns = [turn(0), turn(1, text="POISON pill"), turn(2)]
    result = stage.step(turn_recs(turns), {})
    [letter] = letters_of(result)
    assert letter.step == "compress" and letter.offset == 1
    assert "failed 3 times" in letter.reason and letter.error_type == "RuntimeError"
    assert exploding.calls == 1 + 3  # the batch, then three tries of the poison turn alone
    slot = SensorySlot.model_validate_json(slots_of(result)[K1])
    assert [t.turn_id for t in slot.buffer.turns] == ["c1-t000", "c1-t002"]
    assert slot.offset == 2 and "c1-t001" not in slot.recent  # `dlq replay` may bring it back


def test_a_transient_error_fails_the_whole_step() -> None:
    class Down:
        def compress(self, texts: list[str]) -> Any:
            raise LLMTransientError("endpoint down")

    with pytest.raises(LLMTransientError):
        sensory(components(compressor=Down())).step(turn_recs([turn(0)]), {})


def segment(i: int, n: int = 4) -> Segment:
    turns = [turn(j) for j in range(i * n, i * n + n)]
    from lightmem.processors.segment import SensoryBufferState, to_segment_turn

    state = SensoryBufferState.open(turns[0]).model_copy(
        update={"turns": [to_segment_turn(t) for t in turns]})
    [seg], _ = cut_at(state, group_exchanges(state.turns), [], flush=True)
    return seg


def test_short_term_summarizes_on_flush_and_skips_a_segment_cut_twice() -> None:
    stage = ShortTermStage(settings(), components(topic_buffer=TopicBuffer(words, 10_000)),
                           TOPICS, clock=lambda: NOW, sleep=lambda s: None)
    segs = [segment(0), segment(1)]
    recs = [rec(i, s.to_bytes(), topic=TOPICS.segments) for i, s in enumerate(segs)]
    first = stage.step(recs, {})
    assert first.out == []  # buffered below the threshold
    dup = rec(2, segs[1].to_bytes(), topic=TOPICS.segments)  # the same segment, cut again
    flush = rec(3, b"{}", topic=TOPICS.segments, headers=tuple(flush_headers()))
    result = stage.step([dup, flush], slots_of(first))
    entries = [MemoryEntry.parse(o.value) for o in result.out if o.topic == TOPICS.entries]
    assert [e.source_turn_ids[0] for e in entries] == [f"c1-t{j:03d}" for j in range(8)]
    assert all(o.key == S1 for o in result.out)


class FakeStore:
    def __init__(self, fail: list[Exception] | None = None) -> None:
        self.docs: dict[str, MemoryEntry] = {}
        self.fail = list(fail or [])

    def bulk_create(self, entries: list[MemoryEntry]) -> list[str]:
        """Like the Elasticsearch store: ids already present are left as they are."""
        if self.fail:
            raise self.fail.pop(0)
        for e in entries:
            if "REJECT" in e.fact:
                raise ValueError(f"{e.id}: mapping rejects it")
        created = [e.id for e in entries if e.id not in self.docs]
        self.docs.update({e.id: e for e in entries if e.id in created})
        return created


class FakeEmbedder:
    def embed_entries(self, entries: list[MemoryEntry]) -> list[MemoryEntry]:
        return [e.model_copy(update={"embedding": [0.1] * 4}) for e in entries]


def entry_recs(texts: list[str]) -> list[Inbound]:
    seg = segment(0, n=len(texts))
    seg = seg.model_copy(update={"turns": [t.model_copy(update={"compressed_text": x})
                                           for t, x in zip(seg.turns, texts, strict=True)]})
    entries = Summarizer(None).summarize([seg], now=NOW).entries
    return [rec(i, e.to_bytes(), key=e.scope.encode(), topic=TOPICS.entries)
            for i, e in enumerate(entries)]


def test_index_sink_writes_once_and_dead_letters_a_rejected_entry() -> None:
    store = FakeStore()
    sink = IndexSink(settings(), components(embedder=FakeEmbedder()), TOPICS, store,
                     clock=lambda: NOW, sleep=lambda s: None)
    recs = entry_recs(["alpha fact", "REJECT me", "gamma fact"])
    result = sink.step([*recs, recs[0]])  # a redelivered entry in the same batch
    assert len(store.docs) == 2
    [letter] = letters_of(result)
    assert letter.step == "index" and letter.offset == 1
    changes = [MemoryChange.parse(o.value) for o in result.out if o.topic ==
               TOPICS.memory_changes]
    assert {c.memory_id for c in changes} == set(store.docs) and {c.op for c in changes} == {"add"}
    # A redelivery (its first attempt's transaction was aborted, so its `add` was lost)
    # after the sleep-time stage updated the memory: the update stays, and the `add` goes
    # out again with the same change id (a consumer can tell it is the same change).
    first = MemoryEntry.parse(recs[0].value)
    store.docs[first.id] = store.docs[first.id].model_copy(update={"version": 2,
                                                                   "fact": "updated"})
    again = sink.step(recs[:1])
    [resent] = [MemoryChange.parse(o.value) for o in again.out]
    [original] = [c for c in changes if c.memory_id == first.id]
    assert again.applied == 1 and resent.change_id == original.change_id
    assert store.docs[first.id].version == 2 and store.docs[first.id].fact == "updated"


def test_transient_store_errors_are_recognised() -> None:
    import elasticsearch
    from elastic_transport import ApiResponseMeta, HttpHeaders, NodeConfig

    from lightmem.streams.elastic.store import BulkWriteError

    def api_error(status: int) -> elasticsearch.ApiError:
        meta = ApiResponseMeta(status=status, http_version="1.1", headers=HttpHeaders(),
                               duration=0.0, node=NodeConfig("http", "localhost", 9200))
        return elasticsearch.ApiError("boom", meta=meta, body={})

    assert is_transient(api_error(429)) and is_transient(api_error(503))
    assert not is_transient(api_error(400))
    assert is_transient(BulkWriteError({"a": "429 es_rejected_execution_exception: busy"}))
    assert not is_transient(BulkWriteError({"a": "400 mapper_parsing_exception: bad"}))
    assert is_transient(LLMTransientError("down")) and not is_transient(ValueError("bad"))
    store = FakeStore(fail=[api_error(503)])
    sink = IndexSink(settings(), components(embedder=FakeEmbedder()), TOPICS, store)
    with pytest.raises(elasticsearch.ApiError):
        sink.step(entry_recs(["alpha"]))
    assert sink.step(entry_recs(["alpha"])).applied == 1


def test_dead_letter_of_an_oversized_event_stays_small_but_exact() -> None:
    big = turn(0, text="y" * 5000).to_bytes()
    result = SensoryStage(Settings(max_event_bytes=1024), components(), TOPICS,
                          clock=lambda: NOW).step([rec(0, big)], {})
    [letter] = letters_of(result)
    assert len(letter.raw) < 4200 and "see raw_b64" in letter.raw
    import base64

    assert base64.b64decode(letter.raw_b64) == big
    assert json.loads(result.out[0].value)["step"] == "parse"


# -- defect 2: scope keys (`/` in names, several users in one conversation) ------------------


def named_turn(i: int, *, tenant: str, conversation: str, user: str,
               text: str | None = None) -> TurnEvent:
    return TurnEvent(tenant=tenant, user=user, conversation=conversation, session="s0",
                     turn_id=f"t{i:03d}", role="user", speaker=user,
                     text=text or f"{tenant} {user} says message {i}",
                     event_time=T0 + timedelta(minutes=i))


def through_both_stages(turns: list[TurnEvent]) -> tuple[Any, list[MemoryEntry]]:
    """Turns (keyed by their own conversation keys) -> sensory -> flush all -> short-term:
    the sensory result and the entries the short-term stage produced."""
    stage = sensory()
    applied = stage.step(turn_recs(turns), {})
    flush_all = rec(len(turns), FlushCommand().to_bytes(), key=None,
                    headers=tuple(flush_headers()))
    flushed = stage.step([flush_all], slots_of(applied))
    out = [o for r in (applied, flushed) for o in r.out if o.topic == TOPICS.segments]
    short = ShortTermStage(settings(), components(topic_buffer=TopicBuffer(words, 10_000)),
                           TOPICS, clock=lambda: NOW, sleep=lambda s: None)
    result = short.step([rec(i, o.value, key=o.key, headers=o.headers, topic=TOPICS.segments)
                         for i, o in enumerate(out)], {})
    assert not letters_of(result)
    entries = [MemoryEntry.parse(o.value) for o in result.out if o.topic == TOPICS.entries]
    for o in result.out:  # entries keyed by their own scope: one scope, one partition
        assert o.key == MemoryEntry.parse(o.value).scope.encode()
    return applied, entries


def test_slash_in_names_cannot_merge_two_tenants_conversations() -> None:
    # Joined with "/", (a, b/c) and (a/b, c) were one key, one slot, one buffer.
    turns = [named_turn(0, tenant="a", conversation="b/c", user="u", text="secret of a"),
             named_turn(1, tenant="a/b", conversation="c", user="u", text="secret of a/b")]
    assert turns[0].conversation_key != turns[1].conversation_key
    applied, entries = through_both_stages(turns)
    assert len(applied.slots) == 2 and not letters_of(applied)
    for key, (_, raw) in applied.slots.items():
        slot = SensorySlot.model_validate_json(raw)
        assert decode_conversation_key(key) == (slot.tenant, slot.conversation)
        assert {t.original_text for t in slot.buffer.turns} == {f"secret of {slot.tenant}"}
    assert sorted((e.tenant, e.conversation, e.original_text) for e in entries) == [
        ("a", "b/c", "secret of a"), ("a/b", "c", "secret of a/b")]
    assert len({e.id for e in entries}) == 2


def test_each_memory_is_filed_under_its_own_turns_user() -> None:
    turns = [named_turn(i, tenant="acme", conversation="shared", user=f"u{1 + i % 2}")
             for i in range(6)]
    _, entries = through_both_stages(turns)
    assert len(entries) == 6
    by_turn = {t.turn_id: t.user for t in turns}
    for e in entries:
        [source] = e.source_turn_ids
        assert e.user == by_turn[source], (e.fact, e.user)
    assert {e.user for e in entries} == {"u1", "u2"}


def test_a_turn_keyed_tenant_slash_conversation_is_dead_lettered() -> None:
    # The old key spelling would put the conversation in another partition than its
    # canonical key: refused, with the key it must have.
    result = sensory().step([rec(0, turn(0).to_bytes(), key=b"acme/c1")], {})
    [letter] = letters_of(result)
    assert letter.step == "parse" and '["acme","c1"]' in letter.reason


def test_an_idle_flush_decodes_its_key_whatever_the_names() -> None:
    key = conversation_key("a/b", "c/d").encode()
    command = FlushCommand.for_key(key, issued_at=NOW, issued_by="idle-timer")
    assert (command.tenant, command.conversation) == ("a/b", "c/d")
    assert command.key == key and command.matches("a/b", "c/d")
    assert not command.matches("a", "b/c/d")


def test_a_quiet_conversation_is_idle_by_wall_clock_without_newer_event_times() -> None:
    """Event-time idleness needs a newer event to compare with; when the stream goes quiet
    the wall clock since the conversation's last turn arrived flushes it anyway."""
    clock = [NOW]
    stage = SensoryStage(settings(), components(), TOPICS, clock=lambda: clock[0],
                         sleep=lambda s: None)
    result = stage.step(turn_recs([turn(0), turn(1)]), {})
    slots = slots_of(result)
    assert result.stream_time is not None
    # The newest event time seen is the conversation's own: never idle by event time.
    assert stage.idle_keys(slots, result.stream_time, {0}) == []
    assert stage.idle_keys(slots, result.stream_time, {0}, now=NOW + timedelta(minutes=59)
                           ) == []
    [key] = stage.idle_keys(slots, result.stream_time, {0}, now=NOW + timedelta(minutes=61))
    assert stage.idle_keys(slots, None, {0}, now=NOW + timedelta(minutes=61)) == [key]
    assert stage.idle_keys(slots, None, {1}, now=NOW + timedelta(minutes=61)) == []
    command = stage.idle_flush_command(slots[key])
    assert (command.tenant, command.conversation) == ("acme", "c1")
    assert command.key == key


# -- provisional events (freshness) --------------------------------------------------------------


class FakeEvents:
    """The events index: id -> event."""

    def __init__(self) -> None:
        self.docs: dict[str, MemoryEntry] = {}

    def write(self, events: list[MemoryEntry]) -> int:
        assert all(e.embedding is not None for e in events)
        self.docs.update({e.id: e for e in events})
        return len(events)

    def retire(self, ids: list[str]) -> int:
        return sum(self.docs.pop(i, None) is not None for i in ids)


class RefreshingStore(FakeStore):
    def __init__(self, events: FakeEvents) -> None:
        super().__init__()
        self.events = events
        self.visible_when_retiring: list[set[str]] = []

    def refresh(self) -> None:
        # What the events index holds when the memories become visible: nothing retired yet.
        self.visible_when_retiring.append(set(self.events.docs))


def _through_short_term(stage: ShortTermStage, sensory_result: Any) -> Any:
    recs = [rec(i, o.value, key=o.key, topic=TOPICS.segments, headers=o.headers)
            for i, o in enumerate(o for o in sensory_result.out if o.topic == TOPICS.segments)]
    return stage.step(recs, {})


def test_buffered_turns_become_events_that_their_memories_retire() -> None:
    from lightmem.processors.events import event_id

    events = FakeEvents()
    comp = components(embedder=FakeEmbedder(), topic_buffer=TopicBuffer(words, 10_000))
    stage = sensory(comp)
    stage.events = events
    turns = [turn(i) for i in range(3)]
    applied = stage.step(turn_recs(turns), {})
    assert sorted(events.docs) == sorted(event_id(K1.decode(), t.turn_id) for t in turns)
    first = events.docs[event_id(K1.decode(), turns[0].turn_id)]
    assert (first.tenant, first.user, first.conversation) == ("acme", "u1", "c1")
    assert first.source_turn_ids == [turns[0].turn_id] and first.event_time == turns[0].event_time
    assert first.fact == f"u1: {turns[0].text}" and first.ingest_time == NOW
    # Redelivered: applied once, no new event.
    assert stage.step(turn_recs(turns), slots_of(applied)).events == []

    flush_all = rec(20, FlushCommand().to_bytes(), key=None, headers=tuple(flush_headers()))
    flushed = stage.step([flush_all], slots_of(applied))
    short = ShortTermStage(settings(), comp, TOPICS, clock=lambda: NOW, sleep=lambda s: None)
    short.events = events
    summarized = _through_short_term(short, flushed)
    entry_recs_ = [rec(i, o.value, key=o.key, topic=TOPICS.entries)
                   for i, o in enumerate(o for o in summarized.out if o.topic == TOPICS.entries)]
    assert len(entry_recs_) == 3 and len(events.docs) == 3  # every turn has its memory
    store = RefreshingStore(events)
    sink = IndexSink(settings(), comp, TOPICS, store, clock=lambda: NOW, sleep=lambda s: None)
    sink.events = events
    sink.step(entry_recs_)
    # The memories were made visible (refresh) while their events were still there, then
    # the events were retired: a search finds each turn somewhere at every moment.
    assert len(store.docs) == 3 and events.docs == {}
    assert len(store.visible_when_retiring) == 1 and len(store.visible_when_retiring[0]) == 3


def test_turns_a_summary_found_nothing_in_are_retired_at_once() -> None:
    class FindsNothing:
        def summarize(self, segments: Any, *, now: Any) -> Any:
            return SimpleNamespace(entries=[], dead_letter=None)

    events = FakeEvents()
    comp = components(embedder=FakeEmbedder(), topic_buffer=TopicBuffer(words, 10_000),
                      summarizer=FindsNothing())
    stage = sensory(comp)
    stage.events = events
    applied = stage.step(turn_recs([turn(i) for i in range(2)]), {})
    assert len(events.docs) == 2
    flush_all = rec(20, FlushCommand().to_bytes(), key=None, headers=tuple(flush_headers()))
    short = ShortTermStage(settings(), comp, TOPICS, clock=lambda: NOW, sleep=lambda s: None)
    short.events = events
    result = _through_short_term(short, stage.step([flush_all], slots_of(applied)))
    assert len(result.retired_events) == 2 and events.docs == {}
