"""Provisional *events*: turns searchable before their memories exist (freshness).

A turn that entered a sensory buffer is shown to searches as an event: its compressed text,
its own (tenant, user) scope, its event time and its turn id, in the shape of a
:class:`~lightmem.schemas.MemoryEntry` whose id starts with :data:`EVENT_PREFIX`. When the
turn's topic buffer is summarized, the memories that cover it retire the event (and the
turns the summary found nothing in are retired with it). Ids are deterministic
(conversation key, turn id), so writing an event again overwrites it and retiring it is
idempotent. Pure: no clock, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from lightmem.schemas import EntryMode, MemoryEntry, TurnEvent, conversation_key, stable_id

__all__ = ["EVENT_PREFIX", "event_id", "event_entry", "covering_event_ids", "is_event"]

#: Ids of provisional events (turns not summarized yet) start with this.
EVENT_PREFIX = "event:"


def event_id(conv_key: str, turn_id: str) -> str:
    """The event id of turn ``turn_id`` of the conversation keyed ``conv_key``."""
    return EVENT_PREFIX + stable_id(conv_key, turn_id)


def is_event(entry_id: str) -> bool:
    """Whether ``entry_id`` names a provisional event (not a memory)."""
    return entry_id.startswith(EVENT_PREFIX)


def event_entry(turn: TurnEvent, compressed: str, *, seq: int | None, written_at: datetime
                ) -> MemoryEntry:
    """The event of ``turn`` (compressed to ``compressed``).

    Args:
        turn: The turn, as it entered its sensory buffer.
        compressed: Its compressed text (what its memory would say in extractive mode).
        seq: Its place in the conversation (the record's offset on the stream).
        written_at: The event's ``ingest_time``: when the turn was produced (its record's
            time) where known, else when the event is made. An erasure deletes the events
            whose ``ingest_time`` is at or before it, i.e. of the turns produced before it,
            whenever a worker wrote them.
    """
    text = " ".join((compressed or turn.text).split())
    return MemoryEntry(
        id=event_id(turn.conversation_key, turn.turn_id), tenant=turn.tenant, user=turn.user,
        conversation=turn.conversation, topic_id="", speaker=turn.speaker,
        fact=f"{turn.speaker}: {text}", event_time=turn.event_time, ingest_time=written_at,
        source_turn_ids=[turn.turn_id], turn_seq=seq, original_text=turn.text,
        compressed_text=compressed, mode=EntryMode.extractive)


def covering_event_ids(entries: Iterable[MemoryEntry]) -> list[str]:
    """Ids of the events the memories ``entries`` retire (their source turns'), sorted."""
    return sorted({event_id(conversation_key(e.tenant, e.conversation), t)
                   for e in entries for t in e.source_turn_ids})
