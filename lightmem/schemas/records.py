"""The event contracts: one pydantic model per record, the one place a field is defined.

The versioned JSON Schema files under ``schemas/json/`` are generated from these models
(``lightmem schemas export``) and a test keeps them identical, so producers in other
languages validate against exactly what the Python side accepts.

Strictness (the contract, not a convenience): :meth:`Record.parse` validates in pydantic's
strict mode over JSON, so a number is never taken for a date-time or a string and ``true`` is
not a version; date-times must be RFC 3339 as JSON Schema's ``date-time`` format means it
(``T`` separator, seconds, an offset), and the schema files carry the same rule as a
``pattern`` so that validators which treat ``format`` as an annotation reject the same
payloads. A UTF-8 byte-order mark before the JSON text is ignored (RFC 8259 section 8.1).

Exceptions::

    ValueError
     └── SchemaError        a payload failed to decode or validate; lists every error
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

import pydantic_core
from pydantic import (
    AliasChoices,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError

from .keys import conversation_key, encode_key, scope_key

__all__ = [
    "SchemaError",
    "Record",
    "Role",
    "TurnEvent",
    "SegmentTurn",
    "Segment",
    "EntryMode",
    "MemoryEntry",
    "ChangeOp",
    "MemoryChange",
    "SleepAction",
    "SleepWindowCommand",
    "DeadLetter",
    "ErasureRequest",
    "stable_id",
    "RejectedLine",
    "Timestamp",
    "utc_now",
    "RFC3339_PATTERN",
    "check_event_time",
    "parse_turn",
]

#: A name (tenant, user, conversation, ...): the pattern makes the published schema refuse a
#: whitespace-only name too, as the model does after stripping.
Name = Annotated[str, StringConstraints(min_length=1, max_length=256, strip_whitespace=True,
                                        pattern=r"\S")]

#: RFC 3339 ``date-time`` (section 5.6): ``T`` (or ``t``) between date and time, seconds,
#: optional fraction, ``Z`` or a ``+hh:mm`` offset. pydantic alone also takes a space, ``_``,
#: a missing seconds field, ``+hhmm`` or digits as a Unix time, which the published schema's
#: ``date-time`` format does not: the pattern keeps the two sides identical.
RFC3339_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)
_RFC3339 = re.compile(RFC3339_PATTERN)


_DATETIME: TypeAdapter[datetime] = TypeAdapter(AwareDatetime)


def _rfc3339(value: object) -> object:
    # Strings only: a datetime built in Python is already typed, and numbers are refused by
    # strict parsing (Record.parse) with pydantic's own message. A string that passes is
    # parsed here, because under strict parsing the field's own validator takes only a
    # datetime from a validator before it.
    if not isinstance(value, str):
        return value
    if not _RFC3339.match(value):
        raise PydanticCustomError(
            "rfc3339_datetime",
            "Input should be an RFC 3339 date-time: date 'T' time with seconds and a timezone "
            "offset, e.g. 2024-05-01T09:00:00Z or 2024-05-01T11:00:00+02:00",
        )
    try:
        return _DATETIME.validate_strings(value)
    except ValidationError as exc:  # e.g. month 13: pydantic's own reason, on this field
        error = exc.errors(include_url=False)[0]
        raise PydanticCustomError(error["type"], error["msg"]) from None


#: A timezone-aware instant, written as an RFC 3339 string on the wire.
Timestamp = Annotated[
    AwareDatetime,
    BeforeValidator(_rfc3339),
    Field(json_schema_extra={"pattern": RFC3339_PATTERN}),
]

def utc_now() -> datetime:
    """The wall clock in UTC: the default ``clock`` of everything that stamps a record (a test
    passes its own clock instead of patching this)."""
    return datetime.now(UTC)


#: Text that says something: a whitespace-only message would make no memory, no dead letter
#: and no log line downstream, so the contract refuses it.
Text = Annotated[str, StringConstraints(min_length=1, max_length=100_000, pattern=r"\S")]


class SchemaError(ValueError):
    """A payload failed to decode or validate against a record's schema.

    ``errors`` holds one ``(field, reason, value repr)`` triple per problem, all of them,
    not only the first.
    """

    def __init__(self, record: str, errors: list[tuple[str, str, str]]) -> None:
        self.record = record
        self.errors = errors
        lines = "; ".join(f"{field}: {reason} (got {value})" for field, reason, value in errors)
        super().__init__(f"invalid {record}: {lines}")


#: UTF-8 byte-order mark: some editors write one at the start of a file; RFC 8259 lets a
#: parser ignore it, and a valid first line must not be rejected for it.
_BOM = b"\xef\xbb\xbf"


def stable_id(*parts: object) -> str:
    """A deterministic id from the given parts, so re-processing never duplicates a record."""
    joined = "\x1f".join(str(p) for p in parts)
    return hashlib.sha256(joined.encode()).hexdigest()[:32]


class Record(BaseModel):
    """Base of every event record: strict about unknown fields, JSON in and out."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Version of this record's schema; bumped on incompatible changes. A strict integer, not
    #: ``Literal[1]``: pydantic's literal check takes ``true`` for 1 even in strict mode.
    schema_version: Annotated[StrictInt, Field(ge=1, le=1, json_schema_extra={"const": 1})] = 1

    @classmethod
    def parse(cls, payload: bytes | str | dict[str, Any]) -> Self:
        """Decode and validate ``payload``; raise :class:`SchemaError` naming every bad field.

        Strict JSON validation whatever the input: a dict is serialised first, so that it
        meets exactly the rules a Kafka value or a JSONL line does. A leading UTF-8
        byte-order mark is ignored.
        """
        try:
            if isinstance(payload, dict):
                payload = pydantic_core.to_json(payload)
            elif isinstance(payload, bytes) and payload.startswith(_BOM):
                payload = payload[len(_BOM):]
            elif isinstance(payload, str):
                payload = payload.removeprefix(_BOM.decode())
            return cls.model_validate_json(payload, strict=True)
        except pydantic_core.PydanticSerializationError as exc:
            raise SchemaError(cls.__name__, [("<record>", str(exc), "a dict")]) from None
        except ValidationError as exc:
            errors = []
            for err in exc.errors(include_url=False):
                loc = ".".join(str(p) for p in err["loc"]) or "<record>"
                value = "nothing" if err["type"] == "missing" else repr(err.get("input"))
                if len(value) > 80:
                    value = value[:77] + "..."
                errors.append((loc, err["msg"], value))
            raise SchemaError(cls.__name__, errors) from None

    def to_json(self) -> str:
        """Serialise to compact JSON."""
        return self.model_dump_json(exclude_none=False)

    def to_bytes(self) -> bytes:
        """Serialise to UTF-8 JSON bytes (the Kafka value)."""
        return self.to_json().encode()


class Stage(StrEnum):
    """The pipeline's stages: the ``stage`` label of every metric, the lag tables and the
    worker logs. (What an LLM call is billed to is its *purpose*; what failed in a dead
    letter is its *step*.)"""

    SENSORY = "sensory"
    SHORT_TERM = "short-term"
    INDEX = "index"
    SLEEP = "sleep"


class Role(StrEnum):
    user = "user"
    assistant = "assistant"


class TurnEvent(Record):
    """One chat message produced by the platform (topic ``lightmem.turns.v1``)."""

    #: Tenant (customer) the conversation belongs to.
    tenant: Name
    #: End user whose memory this turn feeds: memories are scoped to (tenant, user).
    user: Name
    #: Conversation id; the partition key is ``conversation_key(tenant, conversation)``.
    conversation: Name
    #: Session within the conversation; a new session flushes the sensory buffer.
    session: Name
    #: Turn id, unique within the conversation.
    turn_id: Name
    #: Who wrote it: the user or the assistant (the other party).
    role: Role
    #: Display name of the speaker ("Caroline", "assistant").
    speaker: Name
    #: The message text.
    text: Text
    #: When the message was written (RFC 3339 with an offset, e.g. 2024-05-01T09:00:00Z).
    event_time: Timestamp
    #: Free-form platform metadata, carried through untouched.
    metadata: dict[str, Any] | None = None

    @property
    def conversation_key(self) -> str:
        """Kafka key and buffer key: :func:`~lightmem.schemas.keys.conversation_key`."""
        return conversation_key(self.tenant, self.conversation)

    @property
    def scope(self) -> str:
        """Memory scope: :func:`~lightmem.schemas.keys.scope_key`."""
        return scope_key(self.tenant, self.user)


def check_event_time(turn: TurnEvent, *, now: datetime, max_future_s: float) -> TurnEvent:
    """``turn`` when its event time is at most ``max_future_s`` seconds after ``now``.

    Why: event time drives the idle flushes; one producer with a clock far in the future
    would flush every conversation it shares a partition with and file its memories under a
    time that has not happened. Such a turn is refused (dead-lettered with this reason);
    turns from the past are always accepted (replays and backfills).

    Pure: the caller passes ``now`` (the receiving stage's clock).

    Raises:
        SchemaError: on ``event_time``, naming the limit and the receiver's time.
    """
    if turn.event_time - now > timedelta(seconds=max_future_s):
        raise SchemaError(type(turn).__name__, [(
            "event_time",
            f"more than max_event_time_skew_s={max_future_s:g} s in the future of the "
            f"receiver's clock ({now.isoformat()})",
            repr(turn.event_time.isoformat()),
        )])
    return turn


@dataclass(frozen=True)
class RejectedLine:
    """A line of a JSONL input file that was not a valid turn, and why (1-based number)."""

    line: int
    reason: str


def parse_turn(payload: bytes | str, *, now: datetime, max_future_s: float) -> TurnEvent:
    """Decode, validate and time-check one turn: the one parse of every ingest path.

    Raises:
        SchemaError: invalid JSON, a schema violation, or an event time too far ahead.
    """
    return check_event_time(TurnEvent.parse(payload), now=now, max_future_s=max_future_s)


class SegmentTurn(BaseModel):
    """A turn as it travels inside a segment: original and compressed text side by side."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    turn_id: Name
    #: The turn's own user: a conversation may have several, and each memory is filed under
    #: its source turn's (tenant, user). None (segments written before the field): the
    #: segment's ``user``.
    user: Name | None = None
    role: Role
    speaker: Name
    event_time: Timestamp
    #: The text as the platform sent it (kept for audit, replay and evaluation).
    original_text: str
    #: The text after sensory pre-compression (equal to the original when not compressed).
    compressed_text: str
    #: The turn's place in the order the sensory stage received its conversation's turns:
    #: the turns-topic offset on the stream path (a conversation lives in one partition), the
    #: embedded runtime's turn count otherwise. Orders the memories of turns that share an
    #: event time (a LoCoMo session dates all its turns alike). None: not known (segments
    #: written before the field).
    seq: int | None = Field(default=None, ge=0)


class Segment(Record):
    """A topic segment cut from a sensory buffer (topic ``lightmem.segments.v1``)."""

    tenant: Name
    user: Name
    conversation: Name
    session: Name
    #: Deterministic id: hash of the conversation key and the first turn id.
    segment_id: str
    #: Turns of the segment, in conversation order.
    turns: list[SegmentTurn] = Field(min_length=1)
    #: Why the segment was closed: a detected topic boundary or a buffer flush.
    closed_by: Literal["boundary", "flush"]

    @property
    def conversation_key(self) -> str:
        return conversation_key(self.tenant, self.conversation)

    @property
    def scope(self) -> str:
        return scope_key(self.tenant, self.user)


class EntryMode(StrEnum):
    #: Facts written by one LLM call per topic-buffer flush.
    llm = "llm"
    #: No LLM configured: each entry is a compressed turn tagged with its topic segment.
    extractive = "extractive"


class MemoryEntry(Record):
    """One long-term memory (topic ``lightmem.entries.v1``, key = ``scope_key(tenant, user)``)."""

    #: Deterministic id (scope, source turns, fact index): replays upsert, never duplicate.
    id: str
    tenant: Name
    user: Name
    conversation: Name
    #: The topic segment the fact came from.
    topic_id: str
    speaker: str
    #: The memory itself: a standalone sentence (llm) or a compressed turn (extractive).
    fact: str
    #: When the source turn happened (the memory's time for temporal reasoning).
    event_time: Timestamp
    #: When the entry was written.
    ingest_time: Timestamp
    #: Turn ids the fact was extracted from.
    source_turn_ids: list[str] = Field(min_length=1)
    #: ``SegmentTurn.seq`` of the source turn: with ``event_time``, the memory's place in
    #: time (consolidation lets only newer memories change older ones). An update keeps the
    #: target's, as it keeps its event time. None: not known (entries written before it).
    turn_seq: int | None = Field(default=None, ge=0)
    #: Source turns' original text, joined.
    original_text: str
    #: Source turns' compressed text, joined.
    compressed_text: str
    mode: EntryMode
    #: Bumped on every consolidation of this memory.
    version: int = Field(default=1, ge=1)
    #: Sentence embedding; absent on the wire, filled by the index sink.
    embedding: list[float] | None = None

    @property
    def scope(self) -> str:
        return scope_key(self.tenant, self.user)


class ChangeOp(StrEnum):
    add = "add"
    update = "update"
    delete = "delete"
    #: A scope was erased on request (content-free audit record: scope, counts, time).
    erase = "erase"


class MemoryChange(Record):
    """Every add/update/delete of a memory (topic ``lightmem.memory-changes.v2``: key
    ``encode_key(tenant, user, memory_id, change_id)``, compacted, the scope's partition)."""

    #: Deterministic id: (memory id, op, resulting version).
    change_id: str
    op: ChangeOp
    memory_id: str
    tenant: Name
    user: Name
    #: The entry before the change (None for add).
    before: MemoryEntry | None = None
    #: The entry after the change (None for delete).
    after: MemoryEntry | None = None
    #: Newer entries that caused an update/delete.
    caused_by: list[str] = Field(default_factory=list)
    #: The consolidator's explanation, or "ingest".
    reason: str = ""
    at: Timestamp
    #: ``erase`` only: what was removed, per sink (no text).
    counts: dict[str, int] | None = None

    @field_validator("before", "after")
    @classmethod
    def _without_embedding(cls, entry: MemoryEntry | None) -> MemoryEntry | None:
        # A change is an audit record; vectors live in the index and would make every
        # change record ~8 KB of floats.
        if entry is not None and entry.embedding is not None:
            return entry.model_copy(update={"embedding": None})
        return entry


class SleepAction(StrEnum):
    open = "open"
    close = "close"
    schedule = "schedule"


class SleepWindowCommand(Record):
    """An operator's command on the sleep-time window (topic ``lightmem.sleep-control.v1``)."""

    command_id: Name
    action: SleepAction
    #: Limit the window to one tenant; None = all tenants.
    tenant: Name | None = None
    #: For ``open``: when the window closes by itself.
    until: Timestamp | None = None
    #: For ``schedule``: a cron expression (minute hour dom month dow) and window length.
    cron: str | None = None
    duration_s: int | None = Field(default=None, gt=0)
    issued_at: Timestamp
    issued_by: str = "ops"


class ErasureRequest(Record):
    """One request to forget a scope (topic ``lightmem.erasures.v1``, compacted, key =
    ``scope_key(tenant, user)``, or ``encode_key(tenant)`` for a whole tenant).

    Every stage, the sleep workers and replays drop records of the scope produced at or
    before ``requested_at``; records produced later are a new beginning.
    """

    #: Unique id of the request (audit: the ``erase`` changes name it).
    erasure_id: Name
    tenant: Name
    #: None: the whole tenant.
    user: Name | None = None
    #: When the erasure took effect: records produced until then are erased.
    requested_at: Timestamp
    #: Who asked (operator, service route, API key name).
    requested_by: str = "ops"
    #: Why (free text, e.g. a ticket reference).
    reason: str = ""

    @property
    def key(self) -> str:
        """The record key: the scope key, or the tenant's one-name key."""
        return encode_key(self.tenant) if self.user is None else scope_key(self.tenant, self.user)


class DeadLetter(Record):
    """An event a stage could not process, with everything needed to replay it."""

    #: The step that gave up: parse, compress, segment, summarize, index, consolidate, ...
    #: (JSON key ``step``; records written by earlier versions name it ``stage`` and still parse.)
    step: Annotated[Name, Field(validation_alias=AliasChoices("step", "stage"))]
    #: Human-readable reason: field, problem, value.
    reason: str
    #: Exception class name.
    error_type: str
    #: Where the event came from: a topic name, or a file path for file ingest.
    source: str
    partition: int | None = None
    #: Kafka offset, or the 1-based line number for file ingest.
    offset: int | None = None
    #: The original bytes, decoded as UTF-8 with replacement (see ``raw_b64`` for exactness).
    raw: str
    raw_b64: str
    at: Timestamp

    @classmethod
    def from_raw(
        cls,
        raw: bytes,
        *,
        step: str,
        error: BaseException,
        source: str,
        at: datetime,
        partition: int | None = None,
        offset: int | None = None,
    ) -> DeadLetter:
        """Build a dead letter for ``raw`` that failed in ``step`` with ``error``."""
        import base64

        return cls(
            step=step,
            reason=str(error),
            error_type=type(error).__name__,
            source=source,
            partition=partition,
            offset=offset,
            raw=raw.decode("utf-8", errors="replace"),
            raw_b64=base64.b64encode(raw).decode(),
            at=at,
        )
