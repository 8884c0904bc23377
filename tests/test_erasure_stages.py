"""Erasure in the stream stage steps and the slot sweep, without Kafka (issue 14): records of
an erased scope produced before the erasure are dropped at every stage, also when they were
turned into segments and entries before the stage knew of it; later turns go through."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from lightmem.processors.compress import IdentityBackend, SensoryCompressor
from lightmem.processors.erasure import ErasureLedger, to_ms
from lightmem.processors.segment import SensoryBuffer, cut_at, group_exchanges
from lightmem.processors.summarize import Summarizer, TopicBuffer
from lightmem.schemas import ErasureRequest, MemoryEntry, Segment, TurnEvent
from lightmem.settings import Settings
from lightmem.streams.erasure.forget import sweep_slot
from lightmem.streams.ingest.stages import (
    ORIGIN_HEADER,
    ORIGINS_HEADER,
    Inbound,
    IndexSink,
    SensorySlot,
    SensoryStage,
    ShortTermStage,
)
from lightmem.streams.kafka.flush_commands import control_kind
from lightmem.streams.kafka.topics import Topics

T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
NOW = datetime(2025, 1, 1, tzinfo=UTC)
ERASED = NOW
BEFORE = to_ms(ERASED) - 60_000
AFTER = to_ms(ERASED) + 60_000
TOPICS = Topics(prefix="t.")


class CutEveryTwo:
    def cut(self, state: Any, *, flush: bool) -> Any:
        units = group_exchanges(state.turns)
        return cut_at(state, units, list(range(2, len(units), 2)), flush=flush)


def words(text: str) -> int:
    return len(text.split())


def components() -> Any:
    return SimpleNamespace(
        compressor=SensoryCompressor(IdentityBackend(), rate=0.6),
        sensory_buffer=SensoryBuffer(words, 30), segmenter=CutEveryTwo(),
        topic_buffer=TopicBuffer(words, 20), summarizer=Summarizer(None),
        idle_timeout=timedelta(hours=1), embedder=FakeEmbedder())


class FakeEmbedder:
    def embed_entries(self, entries: list[MemoryEntry]) -> list[MemoryEntry]:
        return [e.model_copy(update={"embedding": [0.1] * 4}) for e in entries]


class FakeStore:
    def __init__(self) -> None:
        self.docs: dict[str, MemoryEntry] = {}

    def bulk_create(self, entries: list[MemoryEntry]) -> list[str]:
        self.docs.update({e.id: e for e in entries})
        return [e.id for e in entries]


def turn(i: int, user: str = "u1", conv: str = "c1") -> TurnEvent:
    return TurnEvent(tenant="acme", user=user, conversation=conv, session="s0",
                     turn_id=f"{conv}-{user}-{i:03d}", role="user" if i % 2 == 0 else "assistant",
                     speaker=user if i % 2 == 0 else "assistant",
                     text=f"message number {i} about the dog and the beach",
                     event_time=T0 + timedelta(minutes=i))


def recs(turns: list[TurnEvent], ts: int, start: int = 0) -> list[Inbound]:
    return [Inbound(TOPICS.turns, 0, start + i, t.conversation_key.encode(), t.to_bytes(),
                    (), ts) for i, t in enumerate(turns)]


def ledger() -> ErasureLedger:
    return ErasureLedger([ErasureRequest(erasure_id="e1", tenant="acme", user="u1",
                                         requested_at=ERASED)])


def stage(cls: type, erasures: ErasureLedger | None = None, **kw: Any) -> Any:
    s = cls(Settings(max_event_bytes=4096), components(), TOPICS, clock=lambda: NOW,
            sleep=lambda _: None, **kw)
    if erasures is not None:
        s.erasures = erasures
    return s


def outs(result: Any, topic: str) -> list[Any]:
    return [o for o in result.out if o.topic == topic and control_kind(o.headers) is None]


def test_sensory_drops_turns_produced_before_the_erasure_and_keeps_later_ones() -> None:
    s = stage(SensoryStage, ledger())
    old = s.step(recs([turn(i) for i in range(12)], BEFORE), {})
    assert old.erased == 12 and not outs(old, TOPICS.segments) and not old.slots
    new = s.step(recs([turn(i) for i in range(12, 24)], AFTER, start=12), {})
    assert new.erased == 0 and outs(new, TOPICS.segments)
    other = s.step(recs([turn(i, user="u2", conv="c2") for i in range(12)], BEFORE), {})
    assert other.erased == 0 and outs(other, TOPICS.segments)


def test_segments_and_entries_made_before_the_stage_knew_are_dropped_downstream() -> None:
    """A batch processed just before the erasure arrived: its segments carry the turns'
    times, so the next stage drops them although the segment records are newer."""
    sensory = stage(SensoryStage)  # does not know of the erasure yet
    result = sensory.step(recs([turn(i) for i in range(12)], BEFORE), {})
    segments = outs(result, TOPICS.segments)
    assert segments and all(dict(o.headers).get(ORIGINS_HEADER) for o in segments)
    # the erasure arrives; the segments are read afterwards (record time after it)
    short = stage(ShortTermStage, ledger())
    seg_recs = [Inbound(TOPICS.segments, 0, i, o.key, o.value, o.headers, AFTER)
                for i, o in enumerate(segments)]
    short_result = short.step(seg_recs, {})
    assert short_result.erased == len(segments) and not outs(short_result, TOPICS.entries)
    # the sensory slot still holds the erased turns: the sweep deletes it
    [(key, (_, raw))] = result.slots.items()
    assert SensorySlot.model_validate_json(raw).buffer is not None
    assert sweep_slot("sensory", raw, ledger()) is None
    assert sweep_slot("sensory", raw, ErasureLedger()) is raw
    # entries summarized before the erasure: dropped by the index sink, nothing written
    unaware = stage(ShortTermStage)
    entries = outs(unaware.step(seg_recs, {}), TOPICS.entries)
    assert entries and all(dict(o.headers).get(ORIGIN_HEADER) for o in entries)
    store = FakeStore()
    sink = stage(IndexSink, ledger(), store=store)
    sink_result = sink.step([Inbound(TOPICS.entries, 0, i, o.key, o.value, o.headers, AFTER)
                             for i, o in enumerate(entries)])
    assert sink_result.erased == len(entries) and store.docs == {}


def test_sweep_keeps_the_other_users_turns_of_a_shared_conversation() -> None:
    turns = sorted([turn(i, "u1", "c9") for i in range(2)] + [turn(i, "u2", "c9")
                                                              for i in range(2)],
                   key=lambda t: t.event_time)
    sensory = stage(SensoryStage)
    result = sensory.step(recs(turns, BEFORE), {})
    [(_, (_, raw))] = result.slots.items()
    swept = sweep_slot("sensory", raw, ledger())
    assert swept is not None and swept is not raw
    slot = SensorySlot.model_validate_json(swept)
    assert slot.buffer is not None
    assert {t.user for t in slot.buffer.turns} == {"u2"} and slot.user == "u2"
    assert b'"u1"' not in swept and b"c9-u1" not in swept  # neither the name nor its turns
    # a segment of both users: the short-term stage keeps u2's turns only
    seg = Segment(tenant="acme", user="u1", conversation="c9", session="s0",
                  segment_id="seg", turns=[*slot.buffer.turns], closed_by="flush")
    both = Segment(tenant="acme", user="u1", conversation="c9", session="s0",
                   segment_id="seg2",
                   turns=[*SensorySlot.model_validate_json(raw).buffer.turns],
                   closed_by="flush")
    short = stage(ShortTermStage, ledger())
    out = short.step([Inbound(TOPICS.segments, 0, 0, seg.conversation_key.encode(),
                              both.to_bytes(), (), BEFORE)], {})
    [(_, (_, topic_raw))] = out.slots.items()
    assert b'"u1"' not in topic_raw and out.erased == 1


def test_a_bad_record_of_an_erased_scope_is_dropped_not_dead_lettered() -> None:
    bad = turn(0).model_dump(mode="json", exclude={"text"})
    raw = __import__("json").dumps(bad).encode()
    key = turn(0).conversation_key.encode()
    erased = stage(SensoryStage, ledger()).step(
        [Inbound(TOPICS.turns, 0, 0, key, raw, (), BEFORE)], {})
    assert erased.erased == 1 and erased.dead_letters == 0 and not erased.out
    later = stage(SensoryStage, ledger()).step(
        [Inbound(TOPICS.turns, 0, 0, key, raw, (), AFTER)], {})
    assert later.dead_letters == 1


def test_the_index_sink_names_its_writes_an_erasure_arriving_later_covers() -> None:
    sensory, short = stage(SensoryStage), stage(ShortTermStage)
    segs = outs(sensory.step(recs([turn(i) for i in range(12)], BEFORE), {}), TOPICS.segments)
    entries = outs(short.step([Inbound(TOPICS.segments, 0, i, o.key, o.value, o.headers, AFTER)
                               for i, o in enumerate(segs)], {}), TOPICS.entries)
    sink = stage(IndexSink, store=FakeStore())
    sink.step([Inbound(TOPICS.entries, 0, i, o.key, o.value, o.headers, AFTER)
               for i, o in enumerate(entries)])
    assert sink.erased_writes() == []
    sink.erasures.apply(ErasureRequest(erasure_id="e1", tenant="acme", user="u1",
                                       requested_at=ERASED))
    ids = sink.erased_writes()
    assert len(ids) == len(entries)
    sink.unremember(ids)
    assert sink.erased_writes() == []
