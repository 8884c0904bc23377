"""The sensory stage as a step: turns -> compressed turns in the sensory buffer -> topic
segments (see :mod:`.step` for what every stage shares).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field

from lightmem.processors.events import event_entry
from lightmem.processors.segment import (
    SensoryBufferState,
    cut_at,
    group_exchanges,
    push,
    should_flush,
    to_segment_turn,
)
from lightmem.schemas import (
    SchemaError,
    Segment,
    Stage,
    TurnEvent,
    parse_turn,
)
from lightmem.streams.ingest.step import (
    ORIGINS_HEADER,
    RECENT_IDS,
    Inbound,
    KeyMismatchError,
    Outbound,
    PoisonedRecord,
    StageStep,
    StepResult,
    check_key,
    empty_value_error,
    is_transient,
)
from lightmem.streams.kafka.flush_commands import (
    CONTROL_HEADER,
    FLUSH,
    FlushCommand,
    control_kind,
    flush_headers,
)
from lightmem.streams.kafka.producer import OversizeError, oversize_error

__all__ = ["SensorySlot", "SensoryStage"]

log = logging.getLogger(__name__)


# -- sensory stage: turns -> segments --------------------------------------------------------


class SensorySlot(BaseModel):
    """One conversation's sensory table value."""

    model_config = ConfigDict(extra="forbid")

    tenant: str
    user: str
    conversation: str
    #: Partition of the turns topic the conversation lives in (and of its changelog record).
    partition: int
    #: Last turns-topic offset applied (turns and flushes); -1 before the first.
    offset: int = -1
    #: Recent turn ids, oldest first (duplicate turns are skipped).
    recent: list[str] = Field(default_factory=list)
    buffer: SensoryBufferState | None = None
    #: Segments went downstream since the last flush: a flush must tell the next stage.
    downstream_open: bool = False
    #: Wall-clock time the conversation's last turn was applied: a quiet stream is flushed
    #: by the idle timer even when no newer event time arrives to compare with.
    arrived_at: datetime | None = None
    #: Buffered turn id -> Kafka timestamp (ms) of its record: the erasure ledger's "when".
    origins: dict[str, int] = Field(default_factory=dict)

    def prune_origins(self) -> None:
        held = {t.turn_id for t in self.buffer.turns} if self.buffer is not None else set()
        self.origins = {k: v for k, v in self.origins.items() if k in held}

    def applied(self, rec: Inbound) -> bool:
        return rec.partition == self.partition and rec.offset <= self.offset

    def advance(self, rec: Inbound) -> None:
        if rec.partition == self.partition:
            self.offset = max(self.offset, rec.offset)

    def remember(self, turn_id: str) -> None:
        self.recent = [*self.recent[-(RECENT_IDS - 1):], turn_id]

    def holds(self, turn_id: str) -> bool:
        return turn_id in self.recent or (
            self.buffer is not None and any(t.turn_id == turn_id for t in self.buffer.turns)
        )


class SensoryStage(StageStep):
    """turns -> (compress, sensory buffer, topic segmentation) -> segments."""

    name = Stage.SENSORY

    def parse(self, rec: Inbound) -> TurnEvent:
        """Decode one turn record.

        Raises:
            SchemaError: invalid JSON, schema violation (every field named), or an event
                time more than ``max_event_time_skew_s`` ahead of the stage's clock.
            OversizeError: larger than ``max_event_bytes``.
            KeyMismatchError: the key is not the turn's ``conversation_key``.
        """
        if rec.value is None:
            raise empty_value_error("TurnEvent")
        if len(rec.value) > self.settings.max_event_bytes:
            raise oversize_error(len(rec.value), self.settings.max_event_bytes)
        turn = parse_turn(rec.value, now=self.clock(),
                          max_future_s=self.settings.max_event_time_skew_s)
        check_key(rec, turn.conversation_key)
        return turn

    def step(self, batch: Sequence[Inbound], slots: Mapping[bytes, bytes]) -> StepResult:
        """Apply a batch of turn records (and in-band flush commands) in order.

        Args:
            batch: Records of the turns topic, in consumption order.
            slots: Current table values: at least every key of the batch, and every key of
                the table when the batch holds a partition-wide flush.

        Returns:
            Segments (and flush markers) for the segments topic, dead letters, new slots.
        """
        result = StepResult()
        work: dict[bytes, SensorySlot] = {}

        def slot_for(key: bytes, turn: TurnEvent, partition: int) -> SensorySlot:
            if key not in work:
                raw = slots.get(key)
                work[key] = (
                    SensorySlot.model_validate_json(raw) if raw is not None else SensorySlot(
                        tenant=turn.tenant, user=turn.user, conversation=turn.conversation,
                        partition=partition)
                )
            return work[key]

        # 1. parse, dead-letter the bad, drop what the slots already applied
        items: list[tuple[Inbound, TurnEvent | FlushCommand]] = []
        #: Turns of an erased scope produced before its erasure: dropped, counted.
        erased: set[tuple[int, int]] = set()
        for rec in batch:
            kind = control_kind(rec.headers)
            if kind == FLUSH:
                items.append((rec, FlushCommand.from_bytes(rec.value)))
                continue
            if kind is not None:
                self.dead_letter(result, rec, "parse", ValueError(
                    f"headers.{CONTROL_HEADER}: unknown control command {kind!r}"))
                continue
            try:
                turn = self.parse(rec)
            except (SchemaError, OversizeError, KeyMismatchError) as exc:
                self.dead_letter(result, rec, "parse", exc)
                continue
            if self.erasures.drops(turn.tenant, turn.user, rec.timestamp_ms):
                erased.add((rec.partition, rec.offset))
            items.append((rec, turn))

        fresh: list[tuple[Inbound, TurnEvent]] = []
        seen: set[tuple[bytes, str]] = set()
        for rec, item in items:
            if isinstance(item, TurnEvent) and (rec.partition, rec.offset) not in erased:
                key = item.conversation_key.encode()
                slot = slot_for(key, item, rec.partition)
                if slot.applied(rec) or slot.holds(item.turn_id) or (key, item.turn_id) in seen:
                    continue
                seen.add((key, item.turn_id))
                fresh.append((rec, item))

        # 2. compress every fresh turn in one batched call (the expensive model step)
        compressed = self._compress(fresh, result)

        # 3. apply in order
        for rec, item in items:
            if isinstance(item, FlushCommand):
                self._flush_command(rec, item, slots, work, result)
                continue
            key = item.conversation_key.encode()
            if (rec.partition, rec.offset) in erased:
                result.skipped += 1
                result.erased += 1
                if key in work or key in slots:  # never a new slot for an erased turn
                    slot_for(key, item, rec.partition).advance(rec)
                continue
            slot = work[key]
            if slot.applied(rec):
                result.skipped += 1
                continue
            comp = compressed.get((rec.partition, rec.offset), _SKIP)
            if comp is _SKIP:  # a duplicate turn id: remember the offset only
                result.skipped += 1
            elif comp is not _DEAD and self._push(rec, item, str(comp), slot, result):
                # Dead-lettered turns are not remembered: `dlq replay` may bring them back.
                slot.remember(item.turn_id)
            slot.advance(rec)
            slot.arrived_at = self.clock()
            if result.stream_time is None or item.event_time > result.stream_time:
                result.stream_time = item.event_time

        for key, slot in work.items():
            slot.prune_origins()
            result.slots[key] = (slot.partition, slot.model_dump_json().encode())
        self.apply_events(result)
        return result

    def _compress(
        self, fresh: list[tuple[Inbound, TurnEvent]], result: StepResult
    ) -> dict[tuple[int, int], object]:
        if not fresh:
            return {}
        compressor = self.components.compressor
        try:
            texts = [c.compressed for c in compressor.compress([t.text for _, t in fresh])]
        except Exception as exc:  # noqa: BLE001 - isolate the poison turn(s) below
            if is_transient(exc):
                raise
            log.warning("sensory: batch compression failed (%r); compressing one by one", exc)
            texts = []
            for rec, turn in fresh:
                try:
                    texts.append(self.guarded(
                        lambda t=turn: compressor.compress([t.text])[0].compressed))
                except PoisonedRecord as poisoned:
                    self.dead_letter(result, rec, "compress", poisoned)
                    texts.append(_DEAD)  # type: ignore[arg-type]
        return {(rec.partition, rec.offset): text
                for (rec, _), text in zip(fresh, texts, strict=True)}

    def _push(
        self, rec: Inbound, turn: TurnEvent, compressed: str, slot: SensorySlot,
        result: StepResult,
    ) -> bool:
        c = self.components
        if rec.timestamp_ms is not None:
            slot.origins[turn.turn_id] = rec.timestamp_ms
        try:
            segments, state = self.guarded(lambda: push(
                slot.buffer, turn, to_segment_turn(turn, compressed, seq=rec.offset),
                buffer=c.sensory_buffer, segmenter=c.segmenter, idle_timeout=c.idle_timeout,
            ))
        except PoisonedRecord as poisoned:
            self.dead_letter(result, rec, "segment", poisoned)
            return False
        slot.buffer = state
        if self.events is not None:
            # The produce time where known: an erasure compares it (see .elastic.events).
            origin = (self.clock() if rec.timestamp_ms is None
                      else datetime.fromtimestamp(rec.timestamp_ms / 1000, UTC))
            result.events.append(event_entry(turn, compressed, seq=rec.offset,
                                             written_at=origin))
        self._emit_segments(segments, slot, result)
        result.applied += 1
        return True

    def _emit_segments(
        self, segments: Iterable[Segment], slot: SensorySlot, result: StepResult
    ) -> None:
        for segment in segments:
            origins = {t.turn_id: slot.origins[t.turn_id] for t in segment.turns
                       if t.turn_id in slot.origins}
            headers = ((ORIGINS_HEADER, json.dumps(origins).encode()),) if origins else ()
            result.out.append(Outbound(self.topics.segments,
                                       segment.conversation_key.encode(), segment.to_bytes(),
                                       headers))
            slot.downstream_open = True

    def _flush_command(
        self,
        rec: Inbound,
        command: FlushCommand,
        slots: Mapping[bytes, bytes],
        work: dict[bytes, SensorySlot],
        result: StepResult,
    ) -> None:
        if command.key is not None:
            keys = [command.key]
        else:  # every conversation of this partition (that the command's tenant matches)
            keys = list(dict.fromkeys([*work, *slots]))
        for key in keys:
            if key not in work:
                raw = slots.get(key)
                if raw is None:
                    continue
                work[key] = SensorySlot.model_validate_json(raw)
            slot = work[key]
            if slot.partition != rec.partition or slot.applied(rec):
                continue
            if not command.matches(slot.tenant, slot.conversation):
                continue
            self._flush_slot(rec, slot, result)
            slot.advance(rec)
            result.flushed.append(key)

    def _flush_slot(self, rec: Inbound, slot: SensorySlot, result: StepResult) -> None:
        """Close the whole sensory buffer and tell the short-term stage to drain its own."""
        state = slot.buffer
        if state is not None and state.turns:
            try:
                segments, _ = self.guarded(
                    lambda: self.components.segmenter.cut(state, flush=True))
            except PoisonedRecord as poisoned:
                # The buffered turns must not be lost: close the buffer as one segment
                # (no model involved), and record why.
                self.dead_letter(result, rec, "segment", poisoned)
                segments, _ = cut_at(state, group_exchanges(state.turns), [], flush=True)
            self._emit_segments(segments, slot, result)
        slot.buffer = None
        if slot.downstream_open:
            command = FlushCommand(tenant=slot.tenant, conversation=slot.conversation,
                                   issued_at=self.clock(), issued_by="sensory")
            key = command.key
            result.out.append(Outbound(self.topics.segments, key, command.to_bytes(),
                                       tuple(flush_headers())))
            slot.downstream_open = False

    def idle_keys(
        self, slots: Mapping[bytes, bytes], stream_time: datetime | None, partitions: set[int],
        *, now: datetime | None = None,
    ) -> list[bytes]:
        """Conversations of ``partitions`` with a buffer and no new turn for longer than the
        idle timeout: in event time (against ``stream_time``, the newest event time the
        worker saw) or, with ``now``, in wall-clock time since their last turn arrived (so
        the last conversations of a stream that went quiet are flushed too)."""
        idle = []
        timeout = self.components.idle_timeout
        for key, raw in slots.items():
            slot = SensorySlot.model_validate_json(raw)
            if slot.partition not in partitions or slot.buffer is None:
                continue
            by_event = stream_time is not None and should_flush(
                slot.buffer, now=stream_time, idle_timeout=timeout) is not None
            by_clock = (now is not None and slot.arrived_at is not None
                        and now - slot.arrived_at >= timeout)
            if by_event or by_clock:
                idle.append(key)
        return idle

    def idle_flush_command(self, raw_slot: bytes) -> FlushCommand:
        """The flush command for one idle conversation (names from the slot, never parsed
        back out of the key)."""
        slot = SensorySlot.model_validate_json(raw_slot)
        return FlushCommand(tenant=slot.tenant, conversation=slot.conversation,
                            issued_at=self.clock(), issued_by="idle-timer")


_SKIP = object()
_DEAD = object()
