"""What the ingest workers erase themselves: the scope's turns in their table slots, and which
dead letters an erasure covers (see :mod:`.forget` for the whole flow).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence

from lightmem.processors.erasure import ErasureLedger, raw_scopes, strip_turns, to_ms
from lightmem.schemas import (
    DeadLetter,
    SegmentTurn,
)
from lightmem.settings import Settings
from lightmem.streams.ingest.stages import SensorySlot, TopicSlot
from lightmem.streams.kafka.topics import Topics

__all__ = [
    "sweep_slot",
    "changelog_slots",
    "held_slots",
    "dead_letter_scopes",
    "dead_letter_erased",
]

log = logging.getLogger(__name__)


# -- the workers' tables --------------------------------------------------------------------


def _remaining_user(user: str, kept: Sequence[SegmentTurn]) -> str:
    """The buffer's user after its erased turns left: its own while a turn still falls back
    to it, else the first remaining turn's."""
    if any(t.user is None or t.user == user for t in kept):
        return user
    return kept[0].user or user


def _sweep_sensory(raw: bytes, ledger: ErasureLedger) -> bytes | None:
    slot = SensorySlot.model_validate_json(raw)
    if not ledger.tenant_touched(slot.tenant):
        return raw
    changed = False
    buf = slot.buffer
    if buf is not None and buf.turns:
        kept = strip_turns(buf.turns, default_user=buf.user, user_of=lambda t: t.user,
                           origin_of=lambda t: slot.origins.get(t.turn_id),
                           tenant=slot.tenant, ledger=ledger)
        if len(kept) != len(buf.turns):
            changed = True
            gone = {t.turn_id for t in buf.turns} - {t.turn_id for t in kept}
            slot.recent = [t for t in slot.recent if t not in gone]
            slot.buffer = buf.model_copy(update={
                "turns": kept, "user": _remaining_user(buf.user, kept),
                "last_event_time": max(t.event_time for t in kept)}) if kept else None
            slot.prune_origins()
    empty = slot.buffer is None or not slot.buffer.turns
    arrived = None if slot.arrived_at is None else to_ms(slot.arrived_at)
    if empty and ledger.drops(slot.tenant, slot.user, arrived):
        return None  # nothing left but the erased user's name: delete the slot
    if not changed:
        return raw
    if slot.buffer is not None and ledger.erased_at(slot.tenant, slot.user) is not None:
        slot.user = slot.buffer.user
    return slot.model_dump_json().encode()


def _sweep_topic(raw: bytes, ledger: ErasureLedger) -> bytes | None:
    slot = TopicSlot.model_validate_json(raw)
    buf = slot.buffer
    if buf is None or not ledger.tenant_touched(buf.tenant):
        return raw
    segments = []
    changed = False
    for seg in buf.segments:
        kept = strip_turns(seg.turns, default_user=seg.user, user_of=lambda t: t.user,
                           origin_of=lambda t: slot.origins.get(t.turn_id), tenant=seg.tenant,
                           ledger=ledger)
        if len(kept) == len(seg.turns):
            segments.append(seg)
            continue
        changed = True
        if kept:
            segments.append(seg.model_copy(update={
                "turns": kept, "user": _remaining_user(seg.user, kept)}))
    if not changed:
        return raw
    if not segments:
        return None
    user = buf.user if ledger.erased_at(buf.tenant, buf.user) is None else segments[0].user
    slot.buffer = buf.model_copy(update={"segments": segments, "user": user})
    slot.prune_origins()
    return slot.model_dump_json().encode()


def sweep_slot(table: str, raw: bytes, ledger: ErasureLedger) -> bytes | None:
    """One table slot without the erased scopes' turns.

    Args:
        table: ``sensory`` or ``topic-buffers``.
        raw: The serialized slot.
        ledger: The erasure ledger.

    Returns:
        ``raw`` itself when nothing in it is erased; None when the slot must be deleted
        (a tombstone on the changelog); else the rewritten slot.
    """
    if not ledger:
        return raw
    if table == "sensory":
        return _sweep_sensory(raw, ledger)
    if table == "topic-buffers":
        return _sweep_topic(raw, ledger)
    raise ValueError(f"table: sensory or topic-buffers (got {table!r})")


def changelog_slots(settings: Settings, topic: str) -> dict[bytes, bytes]:
    """The current slots of a changelog topic (the last value per key; tombstones delete)."""
    from lightmem.streams.kafka.topic_reader import read_to_end

    slots: dict[bytes, bytes] = {}
    try:
        for msg in read_to_end(settings, topic, timeout_s=60.0, purpose="erasure-check"):
            if msg.value() is None:
                slots.pop(msg.key(), None)
            else:
                slots[msg.key()] = msg.value()
    except LookupError:
        return {}
    return slots


def held_slots(settings: Settings, topics: Topics, ingest_group: str,
                ledger: ErasureLedger) -> dict[str, int]:
    """Slots of the ingest group's tables that still hold something the ledger erases."""
    from lightmem.streams.ingest.state import changelog_topic
    from lightmem.streams.ingest.worker import TABLES

    out = {}
    for table in TABLES:
        slots = changelog_slots(settings, changelog_topic(topics, ingest_group, table))
        out[table] = sum(1 for raw in slots.values()
                         if sweep_slot(table, raw, ledger) is not raw)
    return out


# -- dead letters -------------------------------------------------------------------------------


def dead_letter_scopes(letter: DeadLetter) -> set[tuple[str, str | None]]:
    """The (tenant, user) scopes a dead letter's original record belongs to, as far as it
    says (a record without a user gives (tenant, None); undecodable bytes give nothing)."""
    try:
        raw = base64.b64decode(letter.raw_b64)
    except (ValueError, TypeError):
        return set()
    return raw_scopes(raw)


def dead_letter_erased(letter: DeadLetter, ledger: ErasureLedger) -> bool:
    """Whether a dead letter holds a record of a scope erased after it was written."""
    if not ledger:
        return False
    at = to_ms(letter.at)
    return any(ledger.drops(tenant, user, at) for tenant, user in dead_letter_scopes(letter))
