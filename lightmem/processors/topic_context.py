"""Topic context: a hit brings its neighbouring memories from the same topic segment.

LightMem cuts a conversation into topic segments and tags every memory with its segment
(:attr:`MemoryEntry.topic_id`). The retrieval unit is the memory (the turn or the fact); the
segment is context: after each of the best ``hits_with_context`` hits come up to
``neighbours`` other memories of its segment, nearest in conversation order first
(:attr:`MemoryEntry.turn_seq`, then event time), each marked ``context``. A memory already
listed is not listed again, and a hit is never brought as context by another (it keeps its
own rank).

The caller fills its word budget from the returned lines best first, context lines charged
like hits. Context lines are not hits: a metric at k entries ignores them.

It does not pay on the LoCoMo dev file, so search does not use it (measure again with
``lightmem bench locomo --topic-context 0,2 --context-hits 3``): two neighbours after each
of the best 3 hits lowered the content-aware recall at 512 words from 0.711 to 0.675
(LightMem extractive, hybrid, original text shown) and from 0.611 to 0.604 (LightMem on the
stub LLM), at 256 words from 0.612 to 0.494; at 2048 words it gained 0.005 at most. The
neighbours take budget from better-ranked hits of other segments.

Pure: the segment lookup comes in as a callable; no I/O of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lightmem.processors.store import ScoredEntry
from lightmem.schemas import MemoryEntry

__all__ = ["ContextLine", "with_topic_context", "segment_order"]


@dataclass(frozen=True)
class ContextLine:
    """A line of retrieved context: a hit, or a memory its topic segment brought."""

    hit: ScoredEntry
    #: True: brought as topic context by the hit before it (its score is that hit's).
    context: bool = False


def segment_order(entry: MemoryEntry) -> tuple[int, float, str]:
    """Conversation order of a memory inside its segment: turn sequence where known, then
    event time, then id (deterministic)."""
    seq = entry.turn_seq if entry.turn_seq is not None else -1
    return (seq, entry.event_time.timestamp(), entry.id)


def _nearest(hit: MemoryEntry, members: Sequence[MemoryEntry], n: int) -> list[MemoryEntry]:
    ordered = sorted(members, key=segment_order)
    ids = [m.id for m in ordered]
    if hit.id in ids:
        at = ids.index(hit.id)
        others = [(abs(i - at), i, m) for i, m in enumerate(ordered) if i != at]
    else:
        # The hit is not among the lookup's members (e.g. a stale index): order by time.
        key = segment_order(hit)
        others = [(0 if segment_order(m) < key else 1, i, m) for i, m in enumerate(ordered)]
    # Nearest first; at equal distance the earlier turn first (it sets up the hit).
    return [m for _, _, m in sorted(others, key=lambda t: (t[0], t[1]))][:n]


def with_topic_context(
    hits: Sequence[ScoredEntry],
    segment: Callable[[MemoryEntry], Sequence[MemoryEntry]],
    *,
    neighbours: int,
    hits_with_context: int | None = None,
) -> list[ContextLine]:
    """The hits, best first, each of the first ``hits_with_context`` followed by up to
    ``neighbours`` memories of its topic segment.

    Args:
        hits: Search hits, best first.
        segment: The memories of a hit's topic segment (in any order; the hit itself may be
            among them). Only called for hits that get context.
        neighbours: Context memories per hit (0: the hits alone).
        hits_with_context: How many of the best hits bring context (None: all).

    Returns:
        One :class:`ContextLine` per memory, each memory once.

    Raises:
        ValueError: ``neighbours`` or ``hits_with_context`` is negative.
    """
    if neighbours < 0:
        raise ValueError(f"neighbours: must be >= 0 (got {neighbours!r})")
    if hits_with_context is not None and hits_with_context < 0:
        raise ValueError(f"hits_with_context: must be >= 0 (got {hits_with_context!r})")
    limit = len(hits) if hits_with_context is None else hits_with_context
    hit_ids = {h.entry.id for h in hits}
    listed: set[str] = set()
    lines: list[ContextLine] = []
    for rank, hit in enumerate(hits):
        if hit.entry.id in listed:
            continue
        listed.add(hit.entry.id)
        lines.append(ContextLine(hit))
        if neighbours == 0 or rank >= limit or not hit.entry.topic_id:
            continue
        members = [m for m in segment(hit.entry)
                   if m.topic_id == hit.entry.topic_id and m.tenant == hit.entry.tenant
                   and m.user == hit.entry.user]
        # A later hit stays a hit (it is listed at its own rank, with its own context).
        candidates = [m for m in _nearest(hit.entry, members, len(members))
                      if m.id not in listed and m.id not in hit_ids]
        for member in candidates[:neighbours]:
            listed.add(member.id)
            lines.append(ContextLine(ScoredEntry(entry=member, score=hit.score), context=True))
    return lines
