"""Producing turns (and dead letters, flush commands) with confluent-kafka.

Delivery: the producer is idempotent (``enable.idempotence``: acks=all, retries without
duplicates or reordering within a partition), every record has a delivery callback, the
produce loop calls ``poll(0)`` to serve callbacks and waits on ``poll`` when the local queue is
full (``BufferError``), and :meth:`TurnProducer.flush` drains the queue at the end. Turns are
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lightmem.schemas import DeadLetter, SchemaError, TurnEvent
from lightmem.settings import Settings

from .control import FlushCommand, flush_headers
from .topics import Topics, kafka_config

__all__ = [
    "DeliveryError",
    "TurnProducer",
    "FileReport",
    "RejectedLine",
    "add_turns",
    "produce_file",
    "send_flush",
    "OversizeError",
    "oversize_error",
    "raw_preview",
    "RAW_PREVIEW_CHARS",
]

log = logging.getLogger(__name__)


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
    return OversizeError(f"<record>: event is {size} bytes, larger than max_event_bytes={limit}")


def _utcnow() -> datetime:
    return datetime.now(UTC)


class TurnProducer:
    """Produces turn events, raw records, dead letters and flush commands.

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
                    # Room for dead letters of oversized events (see topics.DLQ_MAX_...).
                    "message.max.bytes": 5 * 1024 * 1024,
                },
            )
        )
        self.delivered = 0
        self.failures: list[str] = []

    # -- delivery bookkeeping

    def _on_delivery(self, err: Any, msg: Any) -> None:
        # Runs inside poll()/flush(): record, never raise.
        if err is not None:
            key = msg.key()
            self.failures.append(f"{msg.topic()} key={key!r}: {err.str()}")
        else:
            self.delivered += 1

    def produce(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None = None,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        """Queue one record; waits for room when the local queue is full."""
        kwargs: dict[str, Any] = {"key": key, "value": value, "on_delivery": self._on_delivery}
        if partition is not None:
            kwargs["partition"] = partition
        if headers:
            kwargs["headers"] = headers
        while True:
            try:
                self._producer.produce(topic, **kwargs)
                break
            except BufferError:
                # Local queue full: serve delivery reports until there is room again.
                self._producer.poll(0.5)
        self._producer.poll(0)

    def add_turns(self, turns: Iterable[TurnEvent]) -> int:
        """Queue turn events keyed ``tenant/conversation``; returns how many were queued.

        Call :meth:`flush` (or leave the ``with`` block) to wait for their delivery.
        """
        n = 0
        for turn in turns:
            self.produce(self.topics.turns, turn.to_bytes(), key=turn.conversation_key.encode())
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

    def __enter__(self) -> TurnProducer:
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
    """
    with TurnProducer(settings, topics) as producer:
        n = producer.add_turns(turns)
    return n


def send_flush(
    settings: Settings,
    *,
    tenant: str | None = None,
    conversation: str | None = None,
    topics: Topics | None = None,
) -> int:
    """Produce an explicit flush (see :mod:`lightmem.streams.control`); returns records sent."""
    if conversation is not None and tenant is None:
        raise ValueError("conversation: needs a tenant too (a conversation key holds both)")
    with TurnProducer(settings, topics) as producer:
        return producer.send_flush(
            FlushCommand(tenant=tenant, conversation=conversation, issued_at=_utcnow())
        )


@dataclass(frozen=True)
class RejectedLine:
    line: int
    reason: str


@dataclass
class FileReport:
    lines: int = 0
    produced: int = 0
    blank: int = 0
    rejected: list[RejectedLine] = field(default_factory=list)


def _numbered_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as f:
        yield from enumerate(f, start=1)


def produce_file(
    path: Path,
    settings: Settings,
    *,
    topics: Topics | None = None,
    on_progress: Callable[[int], None] = lambda n: None,
    clock: Callable[[], datetime] = _utcnow,
) -> FileReport:
    """Produce a JSONL file of turn events (``lightmem produce FILE.jsonl``).

    Every line is validated first; a bad line (invalid JSON, schema violation, larger than
    ``max_event_bytes``) is reported with its line number and reason and sent to the DLQ
    topic (stage ``parse``, source = the file, offset = the line number); the valid lines
    are produced all the same.

    Args:
        path: The file; blank lines are skipped.
        settings: Kafka settings and ``max_event_bytes``.
        topics: Topic names (default: the deployment's).
        on_progress: Called with the number of lines just handled.
        clock: Time stamped on dead letters.

    Returns:
        The report (lines, produced, rejected with reasons).

    Raises:
        DeliveryError: some records (turns or dead letters) were not delivered.
    """
    report = FileReport()
    with TurnProducer(settings, topics) as producer:
        for number, raw in _numbered_lines(path):
            report.lines += 1
            body = raw.rstrip(b"\r\n")
            if not body.strip():
                report.blank += 1
                on_progress(1)
                continue
            try:
                if len(body) > settings.max_event_bytes:
                    raise oversize_error(len(body), settings.max_event_bytes)
                turn = TurnEvent.parse(body)
            except (SchemaError, OversizeError) as exc:
                report.rejected.append(RejectedLine(number, str(exc)))
                producer.dead_letter(
                    DeadLetter.from_raw(body, stage="parse", error=exc, source=str(path),
                                        offset=number, at=clock()).model_copy(
                        update={"raw": raw_preview(body)}),
                )
            else:
                # The validated bytes as they were: consumers re-validate the same payload.
                producer.produce(producer.topics.turns, body, key=turn.conversation_key.encode())
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
