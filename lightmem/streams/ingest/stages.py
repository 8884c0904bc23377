"""The three stream stages as plain steps over record batches, without any Kafka client.

Each stage turns a batch of raw inbound records (bytes, with topic/partition/offset) and the
table slots it touches into the records to produce and the slots to write back
(:class:`StepResult`). The ingest worker (:mod:`lightmem.streams.ingest`) only moves bytes:
it reads the slots, runs the steps, then commits their output, the new slots (changelog) and
the input offsets in one Kafka transaction. A step never mutates its inputs, so a failed step
(a transient error) is simply run again on the same batch and the same slots.

Delivery semantics (exactly once on Kafka, idempotent outside it):

- The transaction makes output, state and offsets one unit: a batch is applied entirely or
  not at all, and read again from the committed offset after a crash.
- A slot still remembers the last source offset it applied (per conversation, which lives in
  one partition) and its recent turn ids / segment ids, so a turn produced twice or a
  segment replayed from the DLQ is applied once.
- Entries have deterministic ids: the index sink's write (first write wins) never
  duplicates, and an entry read again gets the ``add`` change its aborted attempt lost.

Failure sorting, per record (STYLE.md section 4):

- undecodable, schema-invalid, wrongly keyed or oversized records: a dead letter at once;
- transient errors (:func:`is_transient`: LLM/ES/Kafka unavailable, 429, 5xx): the whole
  step raises, the worker backs off and runs it again (nothing is committed meanwhile);
- any other exception while processing one record: retried up to ``poison_attempts`` times,
  then that record is dead-lettered (a *poison message*) and the batch goes on.

Exceptions: none of its own; processor exceptions are sorted as above.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from lightmem.processors.erasure import ErasureLedger, raw_scopes, strip_turns
from lightmem.processors.events import covering_event_ids, event_entry, event_id
from lightmem.processors.llm import LLMTransientError
from lightmem.processors.segment import (
    SensoryBufferState,
    cut_at,
    group_exchanges,
    push,
    should_flush,
    to_segment_turn,
)
from lightmem.processors.summarize import TopicBufferState
from lightmem.processors.update import added_change
from lightmem.schemas import (
    DeadLetter,
    MemoryEntry,
    SchemaError,
    Segment,
    Stage,
    TurnEvent,
    parse_turn,
    utc_now,
)
from lightmem.settings import Settings
from lightmem.streams.kafka.flush_commands import (
    CONTROL_HEADER,
    FLUSH,
    FlushCommand,
    control_kind,
    flush_headers,
)
from lightmem.streams.kafka.producer import OversizeError, oversize_error, raw_preview
from lightmem.streams.kafka.topics import Topics
from lightmem.streams.models.components import Components

__all__ = [
    "Inbound",
    "Outbound",
    "StepResult",
    "SensorySlot",
    "TopicSlot",
    "SensoryStage",
    "ShortTermStage",
    "IndexSink",
    "is_transient",
    "REDELIVERY_HEADER",
    "SUMMARIZER_SOURCE",
    "ORIGINS_HEADER",
    "ORIGIN_HEADER",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: ``DeadLetter.source`` of a failed summarization (as the summarizer's own dead letters).
SUMMARIZER_SOURCE = "summarizer"
#: Header on records re-produced by ``lightmem dlq replay``: the short-term stage buffers
#: such a segment even if its id was seen before (it was, when its summarization failed).
REDELIVERY_HEADER = "lightmem-redelivery"

#: Header on segments: JSON object turn id -> Kafka timestamp (ms) of the source turn, so that
#: the erasure ledger judges a segment made later from an erased turn by the turn's time.
ORIGINS_HEADER = "lightmem-origins"
#: Header on entries: the earliest Kafka timestamp (ms) of the entry's source turns.
ORIGIN_HEADER = "lightmem-origin-ms"

#: Turn ids / segment ids a slot remembers for deduplication. Redelivery only reaches back
#: to the last committed offset, a few batches: a few hundred ids per conversation is plenty.
RECENT_IDS = 256



# -- records in and out ----------------------------------------------------------------------


@dataclass(frozen=True)
class Inbound:
    """One consumed record, as raw bytes with its coordinates."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
    #: The record's Kafka timestamp (ms); None when not known.
    timestamp_ms: int | None = None

    def header(self, name: str) -> bytes | None:
        """The last value of header ``name``, or None."""
        found = [v for k, v in self.headers if k == name]
        return found[-1] if found else None


@dataclass(frozen=True)
class Outbound:
    """One record to produce."""

    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()
    #: An explicit partition (default: the producer's partitioner hashes the key).
    partition: int | None = None


@dataclass
class StepResult:
    """What a step produced: records (in order), slots to write, counters."""

    out: list[Outbound] = field(default_factory=list)
    #: key -> (changelog partition, serialized slot)
    slots: dict[bytes, tuple[int, bytes]] = field(default_factory=dict)
    #: Newest event time applied (the sensory stage's stream time).
    stream_time: datetime | None = None
    applied: int = 0
    skipped: int = 0
    #: Of ``skipped``: records (or parts of records) of an erased scope, dropped.
    erased: int = 0
    dead_letters: int = 0
    #: Dead letters by reason class (the step that failed: parse, compress, segment, ...).
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)
    #: Conversations (keys) flushed by this step.
    flushed: list[bytes] = field(default_factory=list)
    #: Provisional events of the turns pushed into sensory buffers (freshness; written
    #: before the batch commits, see :mod:`lightmem.streams.elastic.events`).
    events: list[MemoryEntry] = field(default_factory=list)
    #: Ids of events retired by this step (their turns were summarized).
    retired_events: list[str] = field(default_factory=list)

    def count_dead_letter(self, reason: str) -> None:
        """Count one dead letter of reason class ``reason``."""
        self.dead_letters += 1
        self.dead_letter_reasons[reason] = self.dead_letter_reasons.get(reason, 0) + 1


# -- failure sorting -------------------------------------------------------------------------


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` means "try the same thing again later" rather than "this input is bad".

    Transient: LLM unavailable/throttled, Elasticsearch connection errors, timeouts, 429 and
    5xx (also inside a bulk error when every failed item is one), Kafka producer errors,
    network ``OSError``/``TimeoutError``.
    """
    if isinstance(exc, LLMTransientError | TimeoutError | ConnectionError):
        return True
    try:
        import elasticsearch
        from elasticsearch.helpers import BulkIndexError
    except ImportError:  # pragma: no cover - the stream extra is missing
        elasticsearch = None  # type: ignore[assignment]
    if elasticsearch is not None:
        if isinstance(exc, elasticsearch.ConnectionError | elasticsearch.ConnectionTimeout):
            return True
        if isinstance(exc, elasticsearch.ApiError):
            status = getattr(exc.meta, "status", None) or getattr(exc, "status_code", 0)
            return status == 429 or status >= 500
        if isinstance(exc, BulkIndexError):
            statuses = [_bulk_item_status(e) for e in exc.errors]
            return bool(statuses) and all(s == 429 or s >= 500 for s in statuses)
        from lightmem.streams.elastic.store import BulkWriteError

        if isinstance(exc, BulkWriteError):
            # Reasons read "<status> <type>: <reason>"; 429/5xx ran out of the store's own
            # retries: still worth retrying the batch later.
            statuses = [_leading_int(r) for r in exc.failures.values()]
            return bool(statuses) and all(s == 429 or s >= 500 for s in statuses)
    try:
        from confluent_kafka import KafkaException
    except ImportError:  # pragma: no cover - the stream extra is missing
        KafkaException = ()  # type: ignore[assignment,misc]  # noqa: N806
    if KafkaException and isinstance(exc, KafkaException):
        err = exc.args[0] if exc.args else None
        return not (hasattr(err, "fatal") and err.fatal())
    return isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError)


def _leading_int(text: str) -> int:
    head = text.split(" ", 1)[0]
    return int(head) if head.isdigit() else 0


def _bulk_item_status(item: Mapping[str, Any]) -> int:
    for body in item.values():
        if isinstance(body, Mapping) and "status" in body:
            return int(body["status"])
    return 0


class _Poisoned(Exception):
    """Internal: a record failed ``poison_attempts`` times."""

    def __init__(self, cause: Exception, attempts: int) -> None:
        self.cause = cause
        self.attempts = attempts
        super().__init__(f"{cause} (failed {attempts} times: poison message)")


class _Stage:
    """Shared plumbing: poison guard and dead letters."""

    name: str = "stage"

    def __init__(
        self,
        settings: Settings,
        components: Components,
        topics: Topics,
        *,
        clock: Callable[[], datetime] = utc_now,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.components = components
        self.topics = topics
        self.clock = clock
        self.sleep = sleep
        #: The erasure ledger every step consults (the worker shares its follower's).
        self.erasures = ErasureLedger()
        #: Where provisional events go (an :class:`~lightmem.streams.elastic.events.EventIndex`);
        #: None: no events (tests, backfills).
        self.events: Any = None

    def apply_events(self, result: StepResult) -> None:
        """Write the step's events and retire the retired ones.

        Events only make turns searchable sooner: a transient failure retries the step like
        any other, a permanent one is logged and ingest goes on (those turns are found once
        their memories are indexed).
        """
        if self.events is None or not (result.events or result.retired_events):
            return
        try:
            if result.events:
                self.events.write(self.components.embedder.embed_entries(result.events))
            self.events.retire(result.retired_events)
        except Exception as exc:  # noqa: BLE001 - sorted here
            if is_transient(exc):
                raise
            log.warning("%s: events not written/retired (%r); those turns are searchable "
                        "once their memories are", self.name, exc)

    def guarded(self, fn: Callable[[], T]) -> T:
        """Run ``fn``; retry a non-transient failure until ``poison_attempts`` failures.

        Raises:
            _Poisoned: it failed every attempt (the caller dead-letters the record).
            Exception: a transient error, at once (the step is retried as a whole).
        """
        attempts = self.settings.poison_attempts
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - sorting failures is this guard's job
                if is_transient(exc):
                    raise
                log.warning("%s: attempt %d/%d failed: %r", self.name, attempt, attempts, exc,
                            exc_info=attempt == attempts)
                if attempt == attempts:
                    raise _Poisoned(exc, attempts) from exc
                self.sleep(min(0.05 * 2 ** (attempt - 1), 1.0))
        raise AssertionError("unreachable")  # pragma: no cover

    def dead_letter(
        self, result: StepResult, rec: Inbound, step: str, error: BaseException
    ) -> None:
        """Append a dead letter for ``rec`` (original bytes, coordinates, reason); a record of
        an erased scope produced before its erasure is dropped instead (counted)."""
        raw = rec.value or b""
        if self.erasures and any(self.erasures.drops(t, u, rec.timestamp_ms)
                                 for t, u in raw_scopes(raw)):
            result.skipped += 1
            result.erased += 1
            return
        if isinstance(error, _Poisoned):
            reason_error: BaseException = error
            error_type = type(error.cause).__name__
        else:
            reason_error, error_type = error, type(error).__name__
        letter = DeadLetter.from_raw(
            raw, step=step, error=reason_error, source=rec.topic, partition=rec.partition,
            offset=rec.offset, at=self.clock(),
        ).model_copy(update={"raw": raw_preview(raw), "error_type": error_type})
        result.out.append(Outbound(self.topics.dlq, rec.key, letter.to_bytes()))
        result.count_dead_letter(step)
        log.warning("%s: dead letter for %s[%d]@%d: %s", self.name, rec.topic, rec.partition,
                    rec.offset, letter.reason)


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


class KeyMismatchError(ValueError):
    """A record keyed differently from what its payload says (breaks partition ordering)."""


def _check_key(rec: Inbound, expected: str) -> None:
    # Byte equality with the canonical key (lightmem.schemas.keys), not just the same names:
    # Kafka partitions by the bytes, so any other spelling would split the conversation.
    if rec.key != expected.encode():
        raise KeyMismatchError(
            f"key: must be {expected!r} (conversation_key(tenant, conversation): the JSON "
            f"array of the two names) so that the conversation stays in one partition "
            f"(got {rec.key!r})"
        )


def _empty_value_error(record: str) -> SchemaError:
    return SchemaError(record, [("<record>", "empty value (a tombstone is not an event)", "None")])


class SensoryStage(_Stage):
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
            raise _empty_value_error("TurnEvent")
        if len(rec.value) > self.settings.max_event_bytes:
            raise oversize_error(len(rec.value), self.settings.max_event_bytes)
        turn = parse_turn(rec.value, now=self.clock(),
                          max_future_s=self.settings.max_event_time_skew_s)
        _check_key(rec, turn.conversation_key)
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
                except _Poisoned as poisoned:
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
        except _Poisoned as poisoned:
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
            except _Poisoned as poisoned:
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


class ShortTermStage(_Stage):
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
                raise _empty_value_error("Segment")
            segment = Segment.parse(rec.value)
            _check_key(rec, segment.conversation_key)
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
        except _Poisoned as poisoned:
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
        except _Poisoned as poisoned:
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


# -- index sink: entries -> Elasticsearch ------------------------------------------------------


class IndexSink(_Stage):
    """entries -> embed -> idempotent bulk upsert -> memory changes.

    Args:
        store: Anything with ``bulk_create(entries) -> ids written`` (the Elasticsearch
            store).
    """

    name = Stage.INDEX

    #: Recent writes remembered for an erasure that arrives just after them.
    RECENT_WRITES = 10_000

    def __init__(self, settings: Settings, components: Components, topics: Topics, store: Any,
                 **kwargs: Any) -> None:
        super().__init__(settings, components, topics, **kwargs)
        self.store = store
        #: (entry id, tenant, user, origin ms) of the latest writes, oldest first.
        self.written: deque[tuple[str, str, str, int | None]] = deque(
            maxlen=self.RECENT_WRITES)

    def erased_writes(self) -> list[str]:
        """Ids of recent writes the ledger now erases (written by a step that ran before the
        erasure reached this worker): the caller deletes them, then :meth:`unremember`."""
        if not self.erasures:
            return []
        return [w[0] for w in self.written if self.erasures.drops(w[1], w[2], w[3])]

    def unremember(self, ids: Iterable[str]) -> None:
        gone = set(ids)
        self.written = deque((w for w in self.written if w[0] not in gone),
                             maxlen=self.RECENT_WRITES)

    def step(self, batch: Sequence[Inbound], slots: Mapping[bytes, bytes] | None = None
             ) -> StepResult:
        """Embed and upsert a batch of entries.

        Raises:
            Exception: a transient store error (429, 5xx, connection): run it again later.
        """
        result = StepResult()
        entries: dict[str, tuple[Inbound, MemoryEntry]] = {}
        for rec in batch:
            try:
                if rec.value is None:
                    raise _empty_value_error("MemoryEntry")
                entry = MemoryEntry.parse(rec.value)
                if rec.key != entry.scope.encode():
                    raise KeyMismatchError(f"key: must be {entry.scope!r} (scope_key(tenant, "
                                           f"user)) (got {rec.key!r})")
            except (SchemaError, KeyMismatchError) as exc:
                self.dead_letter(result, rec, "parse", exc)
                continue
            if self.erasures.drops(entry.tenant, entry.user, entry_origin(rec)):
                result.skipped += 1
                result.erased += 1
                continue
            entries.pop(entry.id, None)
            entries[entry.id] = (rec, entry)  # the newest copy of an id wins
        if not entries:
            return result
        pairs = list(entries.values())
        poisoned_before = result.dead_letters
        stored = self._write_all(pairs, result)
        if self.events is not None and stored:
            # Memories first, visible (refresh), then their events go: a search finds each
            # turn as an event or as a memory, never in neither (both at once, briefly, is
            # left to the reader: the service drops an event its memory hits cover).
            self.store.refresh()
            result.retired_events += covering_event_ids(stored)
            self.apply_events(result)
        now = self.clock()
        # Every stored entry gets its `add` change, also one the index already held: the
        # worker commits the changes with the entries' offsets in one transaction, so an
        # entry read again is one whose earlier attempt was never committed (its change was
        # aborted with it). The change id is deterministic: a consumer sees at most the same
        # change twice, never two different ones. An entry already present (possibly updated
        # since by the sleep-time stage) is left as it is: the first write wins.
        for entry in stored:
            result.out.append(Outbound(self.topics.memory_changes, entry.scope.encode(),
                                       added_change(entry, now).to_bytes()))
            self.written.append((entry.id, entry.tenant, entry.user,
                                 entry_origin(entries[entry.id][0])))
        result.applied += len(stored)
        result.skipped += len(pairs) - len(stored) - (result.dead_letters - poisoned_before)
        return result

    def _write_all(self, pairs: list[tuple[Inbound, MemoryEntry]], result: StepResult
                   ) -> list[MemoryEntry]:
        """The entries now in the index: written here or already there (first write wins:
        see ``bulk_create``); the poison ones are dead-lettered."""
        embedder = self.components.embedder
        try:
            embedded = embedder.embed_entries([e for _, e in pairs])
            self.store.bulk_create(embedded)
            return embedded
        except Exception as exc:  # noqa: BLE001 - isolate the poison entries below
            if is_transient(exc):
                raise
            log.warning("index: batch write failed (%r); writing entries one by one", exc)
        written = []
        for rec, entry in pairs:
            def write(e: MemoryEntry = entry) -> list[MemoryEntry]:
                [done] = embedder.embed_entries([e])
                self.store.bulk_create([done])
                return [done]
            try:
                written.extend(self.guarded(write))
            except _Poisoned as poisoned:
                self.dead_letter(result, rec, "index", poisoned)
        return written


def segment_origins(rec: Inbound, segment: Segment) -> dict[str, int]:
    """Turn id -> Kafka timestamp (ms) of the source turn: from :data:`ORIGINS_HEADER`, else
    the segment record's own timestamp (a segment written before the header existed, or
    re-produced by ``dlq replay``)."""
    raw = rec.header(ORIGINS_HEADER)
    known: dict[str, int] = {}
    if raw is not None:
        try:
            parsed = json.loads(raw)
            known = {str(k): int(v) for k, v in parsed.items()} if isinstance(parsed, dict) else {}
        except (ValueError, TypeError, AttributeError):
            known = {}
    out = {}
    for t in segment.turns:
        ms = known.get(t.turn_id, rec.timestamp_ms)
        if ms is not None:
            out[t.turn_id] = ms
    return out


def entry_origin(rec: Inbound) -> int | None:
    """Kafka timestamp (ms) of an entry's earliest source turn (:data:`ORIGIN_HEADER`), else
    the entry record's own timestamp."""
    raw = rec.header(ORIGIN_HEADER)
    if raw is not None:
        try:
            return int(raw)
        except ValueError:
            pass
    return rec.timestamp_ms
