"""The short-term stage as a step: topic segments -> topic buffers -> memory entries (one LLM
call per full buffer in LLM mode; see :mod:`.step` for what every stage shares).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field

from lightmem.processors.erasure import strip_turns
from lightmem.processors.events import event_id
from lightmem.processors.summarize import TopicBufferState
from lightmem.schemas import (
    DeadLetter,
    SchemaError,
    Segment,
    Stage,
)
from lightmem.streams.ingest.step import (
    ORIGIN_HEADER,
    RECENT_IDS,
    REDELIVERY_HEADER,
    SUMMARIZER_SOURCE,
    Inbound,
    KeyMismatchError,
    Outbound,
    PoisonedRecord,
    StageStep,
    StepResult,
    check_key,
    empty_value_error,
    segment_origins,
)
from lightmem.streams.kafka.flush_commands import (
    CONTROL_HEADER,
    FLUSH,
    control_kind,
)
from lightmem.streams.kafka.producer import raw_preview

__all__ = ["TopicSlot", "ShortTermStage"]

log = logging.getLogger(__name__)


# -- short-term stage: segments -> entries ---------------------------------------------------


class TopicSlot(BaseModel):
    """One conversation's topic-buffer table value."""

    model_config = ConfigDict(extra="forbid")

    partition: int
    offset: int = -1
    #: Recent segment ids, oldest first (a segment delivered twice is buffered once).
    recent: list[str] = Field(default_factory=list)
    buffer: TopicBufferState | None = None
    #: Buffered turn id -> Kafka timestamp (ms) of its source turn (see ORIGINS_HEADER).
    origins: dict[str, int] = Field(default_factory=dict)

    def prune_origins(self) -> None:
        held = ({t.turn_id for s in self.buffer.segments for t in s.turns}
                if self.buffer is not None else set())
        self.origins = {k: v for k, v in self.origins.items() if k in held}

    def applied(self, rec: Inbound) -> bool:
        return rec.partition == self.partition and rec.offset <= self.offset

    def advance(self, rec: Inbound) -> None:
        if rec.partition == self.partition:
            self.offset = max(self.offset, rec.offset)


class ShortTermStage(StageStep):
    """segments -> topic buffer -> one summarization per flush -> memory entries."""

    name = Stage.SHORT_TERM

    def step(self, batch: Sequence[Inbound], slots: Mapping[bytes, bytes]) -> StepResult:
        """Apply a batch of segment records (and flush markers) in order.

        Raises:
            LLMTransientError: the LLM is unavailable; run the same step again later.
        """
        result = StepResult()
        work: dict[bytes, TopicSlot] = {}
        for rec in batch:
            key = rec.key or b""
            if key not in work:
                raw = slots.get(key)
                work[key] = (TopicSlot.model_validate_json(raw) if raw is not None
                             else TopicSlot(partition=rec.partition))
            slot = work[key]
            if slot.applied(rec):
                result.skipped += 1
                continue
            kind = control_kind(rec.headers)
            if kind == FLUSH:
                if slot.buffer is not None and not slot.buffer.is_empty:
                    segments, _ = self.components.topic_buffer.drain(slot.buffer)
                    self._summarize(rec, segments, result, slot.origins)
                slot.buffer = None
                result.flushed.append(key)
            elif kind is not None:
                self.dead_letter(result, rec, "parse", ValueError(
                    f"headers.{CONTROL_HEADER}: unknown control command {kind!r}"))
            else:
                self._segment(rec, slot, result)
            slot.advance(rec)
        for key, slot in work.items():
            if key:
                slot.prune_origins()
                result.slots[key] = (slot.partition, slot.model_dump_json().encode())
        self.apply_events(result)
        return result

    def _segment(self, rec: Inbound, slot: TopicSlot, result: StepResult) -> None:
        try:
            if rec.value is None:
                raise empty_value_error("Segment")
            segment = Segment.parse(rec.value)
            check_key(rec, segment.conversation_key)
        except (SchemaError, KeyMismatchError) as exc:
            self.dead_letter(result, rec, "parse", exc)
            return
        redelivered = any(name == REDELIVERY_HEADER for name, _ in rec.headers)
        if segment.segment_id in slot.recent and not redelivered:
            result.skipped += 1
            return
        origins = segment_origins(rec, segment)
        segment = self._without_erased(segment, origins, result)
        if segment is None:
            result.skipped += 1
            return
        slot.origins.update(origins)
        topic_buffer = self.components.topic_buffer
        state = slot.buffer or TopicBufferState.for_segment(segment)
        try:
            state, batches = self.guarded(lambda: topic_buffer.push(state, segment))
        except PoisonedRecord as poisoned:
            self.dead_letter(result, rec, "summarize", poisoned)
            return
        for segments in batches:
            self._summarize(rec, segments, result, slot.origins)
        slot.buffer = None if state.is_empty else state
        slot.recent = [*slot.recent[-(RECENT_IDS - 1):], segment.segment_id]
        result.applied += 1

    def _without_erased(self, segment: Segment, origins: Mapping[str, int],
                        result: StepResult) -> Segment | None:
        """``segment`` without the turns of erased scopes (None: nothing left)."""
        kept = strip_turns(segment.turns, default_user=segment.user, user_of=lambda t: t.user,
                           origin_of=lambda t: origins.get(t.turn_id), tenant=segment.tenant,
                           ledger=self.erasures)
        if len(kept) == len(segment.turns):
            return segment
        result.erased += 1
        if not kept:
            return None
        users = {t.user or segment.user for t in kept}
        user = segment.user if segment.user in users else (kept[0].user or segment.user)
        return segment.model_copy(update={"turns": kept, "user": user})

    def _summarize(self, rec: Inbound, segments: Sequence[Segment], result: StepResult,
                   origins: Mapping[str, int] | None = None) -> None:
        summarizer = self.components.summarizer
        try:
            summary = self.guarded(lambda: summarizer.summarize(segments, now=self.clock()))
        except PoisonedRecord as poisoned:
            # Dead-letter the segments themselves (the record at hand may be a flush marker),
            # in the shape of the summarizer's own dead letters: `lightmem dlq replay`
            # re-produces them to the segments topic.
            payload = {"segment_ids": [s.segment_id for s in segments],
                       "segments": [s.model_dump(mode="json") for s in segments]}
            raw = json.dumps(payload, ensure_ascii=False).encode()
            letter = DeadLetter.from_raw(raw, step="summarize", error=poisoned,
                                         source=SUMMARIZER_SOURCE, at=self.clock())
            letter = letter.model_copy(update={"raw": raw_preview(raw),
                                               "error_type": type(poisoned.cause).__name__})
            result.out.append(Outbound(self.topics.dlq, rec.key, letter.to_bytes()))
            result.count_dead_letter("summarize")
            return
        if summary.dead_letter is not None:
            result.out.append(Outbound(self.topics.dlq, rec.key, summary.dead_letter.to_bytes()))
            result.count_dead_letter(summary.dead_letter.step or "summarize")
        if self.events is not None:
            # The turns no memory covers (the model found nothing in them) leave the
            # searchable events now; the others when the index sink indexed their memories.
            covered = {t for e in summary.entries for t in e.source_turn_ids}
            result.retired_events += [event_id(s.conversation_key, t.turn_id)
                                      for s in segments for t in s.turns
                                      if t.turn_id not in covered]
        for entry in summary.entries:
            known = [origins[t] for t in entry.source_turn_ids if origins and t in origins]
            headers = ((ORIGIN_HEADER, str(min(known)).encode()),) if known else ()
            result.out.append(Outbound(self.topics.entries, entry.scope.encode(),
                                       entry.to_bytes(), headers))
