"""Producing turns (and dead letters, flush commands) with confluent-kafka.

Delivery: the producer is idempotent (``enable.idempotence``: acks=all, retries without
duplicates or reordering within a partition), every record has a delivery callback, the
produce loop calls ``poll(0)`` to serve callbacks and waits on ``poll`` when the local queue is
full (``BufferError``), and :meth:`RecordProducer.flush` drains the queue at the end. Turns are
keyed ``conversation_key(tenant, conversation)`` (:mod:`lightmem.schemas.keys`: the JSON array
of the two names, so ``/`` in a name cannot merge two conversations) so that a conversation
stays in one partition, in order. The partitioner is ``murmur2_random``, the Java client's
(and aiokafka's) hash, so a key lands in the same partition whichever client produced it.

Exceptions::

    Exception
     └── DeliveryError      some records were not acknowledged by the brokers; lists all
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from lightmem.schemas import DeadLetter, RejectedLine, SchemaError, TurnEvent, parse_turn, utc_now
from lightmem.settings import Settings
from lightmem.streams.kafka.flush_commands import FlushCommand, flush_headers
from lightmem.streams.kafka.topics import Topics, dead_letter_max_bytes, kafka_config

__all__ = [
    "DeliveryError",
    "RecordProducer",
    "produce_when_room",
    "FileReport",
    "add_turns",
    "produce_file",
    "send_flush",
    "OversizeError",
    "oversize_error",
    "raw_preview",
    "RAW_PREVIEW_CHARS",
]

log = logging.getLogger(__name__)


def produce_when_room(producer: Any, topic: str, key: bytes | None, value: bytes, *,
                      partition: int | None = None, headers: Any = None,
                      on_delivery: Any = None) -> None:
    """``producer.produce(...)``, waiting while the client's local queue is full.

    Raises:
        KafkaException: the client refused the record at once (e.g. too large).
    """
    kwargs: dict[str, Any] = {"key": key, "value": value}
    if partition is not None:
        kwargs["partition"] = partition
    if headers:
        kwargs["headers"] = headers
    if on_delivery is not None:
        kwargs["on_delivery"] = on_delivery
    while True:
        try:
            producer.produce(topic, **kwargs)
            return
        except BufferError:
            # Local queue full: serve delivery reports until there is room again.
            producer.poll(0.5)


class DeliveryError(Exception):
    """Records the brokers did not acknowledge (after the producer's own retries)."""

    def __init__(self, failures: list[str]) -> None:
        self.failures = failures
        shown = "; ".join(failures[:10])
        more = f" (and {len(failures) - 10} more)" if len(failures) > 10 else ""
        super().__init__(f"{len(failures)} record(s) not delivered: {shown}{more}")


class OversizeError(ValueError):
    """An event larger than ``settings.max_event_bytes``."""


def oversize_error(size: int, limit: int) -> OversizeError:
    """The error for an event of ``size`` bytes over the ``max_event_bytes`` limit."""
    return OversizeError(
        f"<record>: event is {size} bytes, larger than max_event_bytes={limit} "
        "(LIGHTMEM_MAX_EVENT_BYTES)"
    )


#: UTF-8 byte-order mark that some editors put at the start of a file.
_BOM = b"\xef\xbb\xbf"


def _delivery_reason(err: Any, settings: Settings) -> str:
    """A broker's refusal in words; a record too large says which limit to raise."""
    from confluent_kafka import KafkaError

    reason = err.str()
    if err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
        reason += (
            f" (the topic's max.message.bytes is below this record; topics created by "
            f"`lightmem topics create` accept max_event_bytes={settings.max_event_bytes}: "
            "raise the existing topic's max.message.bytes, or lower the event)"
        )
    return reason



class RecordProducer:
    """Produces the deployment's records: turn events, raw records, dead letters, flush,
    sleep-window and erasure commands.

    Use as a context manager (``flush()`` on exit) or call :meth:`close`.

    Args:
        settings: Kafka connection and security settings.
        topics: Topic names (default: the deployment's).
        producer: An existing ``confluent_kafka.Producer`` (tests); default builds one.
    """

    def __init__(
        self,
        settings: Settings,
        topics: Topics | None = None,
        *,
        producer: Any = None,
    ) -> None:
        from confluent_kafka import Producer

        self.settings = settings
        self.topics = topics or Topics.from_settings(settings)
        self._producer = producer or Producer(
            kafka_config(
                settings,
                **{
                    "enable.idempotence": True,
                    "partitioner": "murmur2_random",
                    "linger.ms": 5,
                    # Room for the dead letter of the largest turn (settings.max_event_bytes).
                    "message.max.bytes": dead_letter_max_bytes(settings),
                },
            )
        )
        self.delivered = 0
        self.failures: list[str] = []

    # -- delivery bookkeeping

    def _on_delivery(self, label: str | None) -> Callable[[Any, Any], None]:
        def report(err: Any, msg: Any) -> None:
            # Runs inside poll()/flush(): record, never raise.
            if err is not None:
                where = f"{label} -> " if label else ""
                self.failures.append(f"{where}{msg.topic()} key={msg.key()!r}: "
                                     f"{_delivery_reason(err, self.settings)}")
            else:
                self.delivered += 1
        return report

    def produce(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None = None,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        label: str | None = None,
    ) -> None:
        """Queue one record; waits for room when the local queue is full.

        Args:
            label: Where the record came from (``FILE:LINE``, a turn id): named in every
                failure of this record.

        Raises:
            DeliveryError: the client refused the record at once (e.g. larger than its
                ``message.max.bytes``); the records queued before it are unaffected.
        """
        from confluent_kafka import KafkaException

        try:
            produce_when_room(self._producer, topic, key, value, partition=partition,
                              headers=headers, on_delivery=self._on_delivery(label))
        except KafkaException as exc:
            where = f"{label} -> " if label else ""
            raise DeliveryError([f"{where}{topic} key={key!r}: "
                                 f"{_delivery_reason(exc.args[0], self.settings)}"]) from None
        self._producer.poll(0)

    def check_size(self, value: bytes, label: str) -> None:
        """Refuse a turn larger than ``max_event_bytes`` before it is sent.

        Raises:
            OversizeError: naming ``label`` (the line or the turn) and the limit.
        """
        limit = self.settings.max_event_bytes
        if len(value) > limit:
            raise OversizeError(f"{label}: {oversize_error(len(value), limit)}")

    def add_turns(self, turns: Iterable[TurnEvent]) -> int:
        """Queue turn events keyed by their ``conversation_key``; returns how many were queued.

        Call :meth:`flush` (or leave the ``with`` block) to wait for their delivery.

        Raises:
            OversizeError: a turn is larger than ``max_event_bytes`` (checked before it is
                sent, named by turn id and conversation; the turns before it stay queued).
        """
        n = 0
        for turn in turns:
            label = f"turn {turn.turn_id!r} of {turn.conversation_key}"
            value = turn.to_bytes()
            self.check_size(value, label)
            self.produce(self.topics.turns, value, key=turn.conversation_key.encode(), label=label)
            n += 1
        return n

    def dead_letter(self, letter: DeadLetter, key: bytes | None = None) -> None:
        """Queue a dead letter on the DLQ topic."""
        self.produce(self.topics.dlq, letter.to_bytes(), key=key)

    def send_flush(self, command: FlushCommand) -> int:
        """Queue a flush command on the turns topic: keyed to its conversation, or one record
        per partition for a flush of everything. Returns the number of records queued."""
        if command.key is not None:
            self.produce(self.topics.turns, command.to_bytes(), key=command.key,
                         headers=flush_headers())
            return 1
        metadata = self._producer.list_topics(self.topics.turns, timeout=30)
        meta = metadata.topics.get(self.topics.turns)
        if meta is None or meta.error is not None or not meta.partitions:
            reason = "unknown topic" if meta is None or meta.error is None else meta.error.str()
            raise DeliveryError([f"{self.topics.turns}: {reason}"])
        for partition in sorted(meta.partitions):
            self.produce(self.topics.turns, command.to_bytes(), partition=partition,
                         headers=flush_headers())
        return len(meta.partitions)

    def flush(self, timeout_s: float = 60.0) -> None:
        """Wait until every queued record is delivered or failed.

        Raises:
            DeliveryError: some records failed, or were still queued at the deadline.
        """
        remaining = self._producer.flush(timeout_s)
        failures = list(self.failures)
        self.failures.clear()
        if remaining:
            failures.append(f"{remaining} record(s) still queued after {timeout_s:.0f}s")
        if failures:
            raise DeliveryError(failures)

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> RecordProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.flush()
        else:  # already failing: drain what we can, keep the original exception
            self._producer.flush(10)


def add_turns(
    turns: Iterable[TurnEvent], settings: Settings, *, topics: Topics | None = None
) -> int:
    """Produce ``turns`` and wait for their delivery.

    Args:
        turns: Turn events; each is keyed by its ``conversation_key``.
        settings: Kafka connection settings.
        topics: Topic names (default: the deployment's).

    Returns:
        How many turns were delivered.

    Raises:
        DeliveryError: some turns were not delivered (every failure is listed).
        OversizeError: a turn is larger than ``max_event_bytes`` (none after it is sent).
    """
    with RecordProducer(settings, topics) as producer:
        n = producer.add_turns(turns)
    return n


def send_flush(
    settings: Settings,
    *,
    tenant: str | None = None,
    conversation: str | None = None,
    topics: Topics | None = None,
) -> int:
    """Produce an explicit flush (see :mod:`lightmem.streams.kafka.flush_commands`); returns
    records sent."""
    if conversation is not None and tenant is None:
        raise ValueError("conversation: needs a tenant too (a conversation key holds both)")
    with RecordProducer(settings, topics) as producer:
        return producer.send_flush(
            FlushCommand(tenant=tenant, conversation=conversation, issued_at=utc_now())
        )


@dataclass
class FileReport:
    lines: int = 0
    produced: int = 0
    blank: int = 0
    rejected: list[RejectedLine] = field(default_factory=list)


def _numbered_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            # A byte-order mark belongs to the file, not to the first turn: drop it so that
            # the record on the topic is plain JSON for every consumer.
            yield number, line.removeprefix(_BOM) if number == 1 else line


def _file_dead_letter(body: bytes, error: Exception, *, path: Path, number: int,
                      at: datetime, limit: int) -> DeadLetter:
    """The dead letter of a rejected line; without its bytes when it would not fit the DLQ
    (the line is still in the file, and the reason says where)."""
    letter = DeadLetter.from_raw(body, step="parse", error=error, source=str(path),
                                 offset=number, at=at).model_copy(
        update={"raw": raw_preview(body)})
    if len(letter.to_bytes()) > limit:
        letter = letter.model_copy(update={
            "raw_b64": "",
            "reason": f"{letter.reason} [the line's {len(body)} bytes are not kept in this "
                      f"dead letter: too large for the DLQ; see {path} line {number}]",
        })
    return letter


def produce_file(
    path: Path,
    settings: Settings,
    *,
    topics: Topics | None = None,
    on_progress: Callable[[int], None] = lambda n: None,
    clock: Callable[[], datetime] = utc_now,
) -> FileReport:
    """Produce a JSONL file of turn events (``lightmem produce FILE.jsonl``).

    Every line is validated first; a bad line (invalid JSON, schema violation, larger than
    ``max_event_bytes``, an event time more than ``max_event_time_skew_s`` ahead) is
    reported with its line number and reason and sent to the DLQ topic (stage ``parse``,
    source = the file, offset = the line number); the valid lines are produced all the
    same. A UTF-8 byte-order mark at the start of the file is ignored. A record the broker
    still refuses is named by ``FILE:LINE`` in the :class:`DeliveryError`.

    Args:
        path: The file; blank lines are skipped.
        settings: Kafka settings and ``max_event_bytes``.
        topics: Topic names (default: the deployment's).
        on_progress: Called with the number of lines just handled.
        clock: Now: stamped on dead letters, and the reference of the event-time bound.

    Returns:
        The report (lines, produced, rejected with reasons).

    Raises:
        DeliveryError: some records (turns or dead letters) were not delivered.
    """
    report = FileReport()
    with RecordProducer(settings, topics) as producer:
        for number, raw in _numbered_lines(path):
            report.lines += 1
            body = raw.rstrip(b"\r\n")
            if not body.strip():
                report.blank += 1
                on_progress(1)
                continue
            label = f"{path}:{number}"
            try:
                if len(body) > settings.max_event_bytes:
                    raise oversize_error(len(body), settings.max_event_bytes)
                turn = parse_turn(body, now=clock(),
                                  max_future_s=settings.max_event_time_skew_s)
            except (SchemaError, OversizeError) as exc:
                report.rejected.append(RejectedLine(number, str(exc)))
                letter = _file_dead_letter(body, exc, path=path, number=number, at=clock(),
                                           limit=dead_letter_max_bytes(settings))
                producer.produce(producer.topics.dlq, letter.to_bytes(), label=label)
            else:
                # The validated bytes as they were: consumers re-validate the same payload.
                producer.produce(producer.topics.turns, body,
                                 key=turn.conversation_key.encode(), label=label)
                report.produced += 1
            on_progress(1)
    return report


#: ``DeadLetter.raw`` is for reading; ``raw_b64`` is the exact payload. Long payloads are cut
#: in ``raw`` so that a dead letter of an oversized event still fits in a record.
RAW_PREVIEW_CHARS = 4096


def raw_preview(raw: bytes) -> str:
    """``raw`` as text for ``DeadLetter.raw``, cut after :data:`RAW_PREVIEW_CHARS`."""
    text = raw.decode("utf-8", errors="replace")
    if len(text) <= RAW_PREVIEW_CHARS:
        return text
    return text[:RAW_PREVIEW_CHARS] + f"... [{len(raw)} bytes in total, see raw_b64]"
