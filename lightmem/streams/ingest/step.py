"""What the three stream stages share: records in and out, the step result, failure sorting
and the poison guard (the stages themselves: :mod:`.sensory`, :mod:`.short_term`,
:mod:`.index_sink`; :mod:`.stages` re-exports them all).

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from lightmem.processors.erasure import ErasureLedger, raw_scopes
from lightmem.processors.llm import LLMTransientError
from lightmem.schemas import (
    DeadLetter,
    MemoryEntry,
    SchemaError,
    Segment,
    utc_now,
)
from lightmem.settings import Settings
from lightmem.streams.kafka.producer import raw_preview
from lightmem.streams.kafka.topics import Topics
from lightmem.streams.models.components import Components

__all__ = [
    "Inbound",
    "Outbound",
    "StepResult",
    "StageStep",
    "PoisonedRecord",
    "KeyMismatchError",
    "check_key",
    "empty_value_error",
    "is_transient",
    "bulk_item_status",
    "leading_int",
    "segment_origins",
    "entry_origin",
    "REDELIVERY_HEADER",
    "SUMMARIZER_SOURCE",
    "ORIGINS_HEADER",
    "ORIGIN_HEADER",
    "RECENT_IDS",
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
            statuses = [bulk_item_status(e) for e in exc.errors]
            return bool(statuses) and all(s == 429 or s >= 500 for s in statuses)
        from lightmem.streams.elastic.store import BulkWriteError

        if isinstance(exc, BulkWriteError):
            # Reasons read "<status> <type>: <reason>"; 429/5xx ran out of the store's own
            # retries: still worth retrying the batch later.
            statuses = [leading_int(r) for r in exc.failures.values()]
            return bool(statuses) and all(s == 429 or s >= 500 for s in statuses)
    try:
        from confluent_kafka import KafkaException
    except ImportError:  # pragma: no cover - the stream extra is missing
        KafkaException = ()  # type: ignore[assignment,misc]  # noqa: N806
    if KafkaException and isinstance(exc, KafkaException):
        err = exc.args[0] if exc.args else None
        return not (hasattr(err, "fatal") and err.fatal())
    return isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError)


def leading_int(text: str) -> int:
    head = text.split(" ", 1)[0]
    return int(head) if head.isdigit() else 0


def bulk_item_status(item: Mapping[str, Any]) -> int:
    for body in item.values():
        if isinstance(body, Mapping) and "status" in body:
            return int(body["status"])
    return 0


class PoisonedRecord(Exception):
    """Internal: a record failed ``poison_attempts`` times."""

    def __init__(self, cause: Exception, attempts: int) -> None:
        self.cause = cause
        self.attempts = attempts
        super().__init__(f"{cause} (failed {attempts} times: poison message)")


class StageStep:
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
            PoisonedRecord: it failed every attempt (the caller dead-letters the record).
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
                    raise PoisonedRecord(exc, attempts) from exc
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
        if isinstance(error, PoisonedRecord):
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


class KeyMismatchError(ValueError):
    """A record keyed differently from what its payload says (breaks partition ordering)."""


def check_key(rec: Inbound, expected: str) -> None:
    # Byte equality with the canonical key (lightmem.schemas.keys), not just the same names:
    # Kafka partitions by the bytes, so any other spelling would split the conversation.
    if rec.key != expected.encode():
        raise KeyMismatchError(
            f"key: must be {expected!r} (conversation_key(tenant, conversation): the JSON "
            f"array of the two names) so that the conversation stays in one partition "
            f"(got {rec.key!r})"
        )


def empty_value_error(record: str) -> SchemaError:
    return SchemaError(record, [("<record>", "empty value (a tombstone is not an event)", "None")])


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
