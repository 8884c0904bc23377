"""Turn order reaches the memories (issue 11, defect 8): every path that buffers a turn
stamps its arrival position (``SegmentTurn.seq``) and every memory carries its source turn's
(``MemoryEntry.turn_seq``), so consolidation can order facts of turns that share an event
time by the turns, not by hash ids. Fakes stand in for the models."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lightmem.processors.compress import IdentityBackend, SensoryCompressor
from lightmem.processors.segment import SensoryBuffer, cut_at, group_exchanges, to_segment_turn
from lightmem.processors.summarize import Summarizer
from lightmem.schemas import Segment, TurnEvent
from lightmem.settings import load_settings

T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)


def words(text: str) -> int:
    return len(text.split())


class NeverCut:
    """Segmenter fake: keeps every turn in the buffer (no boundary, no flush)."""

    def cut(self, state: Any, *, flush: bool) -> Any:
        return cut_at(state, group_exchanges(state.turns), [], flush=flush)


def turn(i: int) -> TurnEvent:
    # One session, one timestamp for every turn (as LoCoMo dates a session).
    return TurnEvent(tenant="acme", user="u1", conversation="c1", session="s1",
                     turn_id=f"t{i}", role="user" if i % 2 == 0 else "assistant",
                     speaker="Ann" if i % 2 == 0 else "assistant", text=f"message {i}",
                     event_time=T0)


def test_summarized_memories_carry_their_turns_seq() -> None:
    turns = [to_segment_turn(turn(i), seq=100 + i) for i in range(4)]
    segment = Segment(tenant="acme", user="u1", conversation="c1", session="s1",
                      segment_id="seg", turns=turns, closed_by="flush")
    entries = Summarizer(None).summarize([segment], now=T0 + timedelta(days=1)).entries
    assert {e.source_turn_ids[0]: e.turn_seq for e in entries} == {
        f"t{i}": 100 + i for i in range(4)}


def test_sensory_stage_stamps_the_turns_topic_offset() -> None:
    pytest.importorskip("confluent_kafka", reason="the stream extra is missing")
    from lightmem.streams.ingest.stages import Inbound, SensorySlot, SensoryStage
    from lightmem.streams.kafka.topics import Topics

    topics = Topics(prefix="t.")
    comps = SimpleNamespace(
        compressor=SensoryCompressor(IdentityBackend(), rate=0.6),
        sensory_buffer=SensoryBuffer(words, 1000), segmenter=NeverCut(),
        idle_timeout=timedelta(hours=1),
    )
    stage = SensoryStage(load_settings(), comps, topics, clock=lambda: T0 + timedelta(days=1),
                         sleep=lambda s: None)
    turns = [turn(i) for i in range(3)]
    key = turns[0].conversation_key.encode()
    result = stage.step([Inbound(topics.turns, 0, 40 + i, key, t.to_bytes())
                         for i, t in enumerate(turns)], {})
    slot = SensorySlot.model_validate_json(result.slots[key][1])
    assert slot.buffer is not None
    assert [(t.turn_id, t.seq) for t in slot.buffer.turns] == [("t0", 40), ("t1", 41), ("t2", 42)]


def test_embedded_ingest_numbers_turns_across_runs(tmp_path: Path) -> None:
    from lightmem.streams.embedded.runtime import EmbeddedRuntime

    rt = EmbeddedRuntime(load_settings(data_dir=tmp_path / "data", compressor="none"),
                         clock=lambda: T0 + timedelta(days=1))
    # Model-free parts: no boundaries, a word budget no turn reaches.
    rt.__dict__.update(sensory_buffer=SensoryBuffer(words, 1000), segmenter=NeverCut())
    first = [(i + 1, turn(i).to_bytes()) for i in range(3)]
    second = [(i + 1, turn(i).to_bytes()) for i in range(3, 5)]
    rt.ingest_lines(first, source="a.jsonl", flush=False)
    rt.ingest_lines(second, source="b.jsonl", flush=False)
    state = rt._load_sensory(turn(0).conversation_key)
    assert state is not None
    assert [(t.turn_id, t.seq) for t in state.turns] == [(f"t{i}", i) for i in range(5)]
