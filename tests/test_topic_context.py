"""Topic context: a hit brings its nearest neighbours of the same topic segment, marked as
context, each memory once, never another hit, never another scope's memory; and the LoCoMo
bench charges context lines at a budget without crediting them at k."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from lightmem.ops.bench.locomo import Retrieved, top_k, within_budget
from lightmem.processors.store import ScoredEntry
from lightmem.processors.topic_context import with_topic_context
from lightmem.schemas import EntryMode, MemoryEntry

T0 = datetime(2023, 5, 8, 14, 0, tzinfo=UTC)


def mem(seq: int, topic: str = "A", *, user: str = "u1") -> MemoryEntry:
    return MemoryEntry(
        id=f"{topic}{seq}-{user}", tenant="acme", user=user, conversation="c1", topic_id=topic,
        speaker="Mel", fact=f"turn {seq}", event_time=T0 + timedelta(minutes=seq),
        ingest_time=T0, source_turn_ids=[f"D1:{seq}"], turn_seq=seq, original_text=f"t{seq}",
        compressed_text=f"t{seq}", mode=EntryMode.extractive)


# Segment A holds turns 1..6, segment B turns 7..9.
SEGMENTS = {"A": [mem(i) for i in range(1, 7)], "B": [mem(i, "B") for i in range(7, 10)]}


def lookup(entry: MemoryEntry) -> list[MemoryEntry]:
    return SEGMENTS.get(entry.topic_id, [])


def hits(*entries: MemoryEntry) -> list[ScoredEntry]:
    return [ScoredEntry(entry=e, score=1.0 - i / 10) for i, e in enumerate(entries)]


def listed(lines: list) -> list[tuple[str, bool]]:
    return [(line.hit.entry.id, line.context) for line in lines]


def test_nearest_neighbours_of_the_segment_follow_each_hit() -> None:
    lines = with_topic_context(hits(mem(4), mem(8, "B")), lookup, neighbours=2)
    # Turn 4's nearest: 3 and 5 (at equal distance the earlier first); turn 8's: 7 and 9.
    assert listed(lines) == [("A4-u1", False), ("A3-u1", True), ("A5-u1", True),
                             ("B8-u1", False), ("B7-u1", True), ("B9-u1", True)]
    # A context line carries the score of the hit that brought it.
    assert lines[1].hit.score == lines[0].hit.score


def test_each_memory_once_and_a_hit_is_never_context() -> None:
    # Turn 5 is a hit of its own: turn 4 does not bring it, and it keeps its rank.
    lines = with_topic_context(hits(mem(4), mem(5), mem(3)), lookup, neighbours=2)
    ids = [i for i, _ in listed(lines)]
    assert len(ids) == len(set(ids))
    assert [i for i, ctx in listed(lines) if not ctx] == ["A4-u1", "A5-u1", "A3-u1"]
    assert ("A6-u1", True) in listed(lines) and ("A2-u1", True) in listed(lines)


def test_only_the_best_hits_bring_context_and_zero_means_none() -> None:
    lines = with_topic_context(hits(mem(2), mem(8, "B")), lookup, neighbours=1,
                               hits_with_context=1)
    assert listed(lines) == [("A2-u1", False), ("A1-u1", True), ("B8-u1", False)]
    assert listed(with_topic_context(hits(mem(2)), lookup, neighbours=0)) == [("A2-u1", False)]
    with pytest.raises(ValueError):
        with_topic_context([], lookup, neighbours=-1)


def test_context_never_crosses_the_scope_or_the_segment() -> None:
    def leaky(entry: MemoryEntry) -> list[MemoryEntry]:
        # A lookup that returns too much: another user's and another segment's memories.
        return [mem(3, user="u2"), mem(7, "B"), mem(5)]

    lines = with_topic_context(hits(mem(4)), leaky, neighbours=3)
    assert listed(lines) == [("A4-u1", False), ("A5-u1", True)]


def test_the_bench_charges_context_at_a_budget_but_not_at_k() -> None:
    lines = with_topic_context(hits(mem(4), mem(8, "B")), lookup, neighbours=1)
    retrieved = [Retrieved.from_hit(line.hit, context=line.context) for line in lines]
    assert [r.context for r in retrieved] == [False, True, False, True]
    assert [set(r.turn_ids) for r in top_k(retrieved, 2)] == [{"D1:4"}, {"D1:8"}]
    # At a budget the context line of hit 1 takes words before hit 2.
    words = retrieved[0].words + retrieved[1].words
    assert within_budget(retrieved, words) == retrieved[:2]
