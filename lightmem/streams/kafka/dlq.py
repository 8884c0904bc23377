"""Reading and replaying the dead-letter topic.

:func:`read_dead_letters` reads ``lightmem.dlq.v1`` from the beginning to its current end
with a consumer that *assigns* the partitions itself: no consumer group joins, and no offset
is committed, so listing never disturbs anything.

:func:`replay_dead_letters` re-produces the original bytes (``raw_b64``) of the selected dead
letters to where they came from, with their original key:

- ``source`` is a pipeline topic: back to that topic;
- ``source`` is a file (``lightmem produce``): to the turns topic, keyed by the turn's
  ``conversation_key`` when the bytes parse (else unkeyed: the worker dead-letters them
  again, with the reason);
- ``source`` is ``summarizer`` (a failed summarization): each carried segment goes back to
  the segments topic, marked as a redelivery so that the short-term stage buffers it again.

A replayed record that still fails is dead-lettered again with a new offset: nothing is lost.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lightmem.schemas import DeadLetter, SchemaError, Segment, TurnEvent
from lightmem.settings import Settings
from lightmem.streams.ingest.stages import REDELIVERY_HEADER, SUMMARIZER_SOURCE
from lightmem.streams.kafka.producer import RecordProducer
from lightmem.streams.kafka.topic_reader import read_to_end
from lightmem.streams.kafka.topics import Topics

__all__ = ["DeadLetterRecord", "read_dead_letters", "replay_dead_letters", "ReplayTarget"]


@dataclass(frozen=True)
class DeadLetterRecord:
    """One record of the DLQ topic."""

    partition: int
    #: Offset in the DLQ topic (what ``lightmem dlq replay --offset`` selects).
    offset: int
    key: bytes | None
    #: The decoded dead letter; None when the record itself does not decode.
    letter: DeadLetter | None
    error: str | None = None

    @property
    def original(self) -> bytes:
        """The dead event's exact bytes."""
        assert self.letter is not None
        return base64.b64decode(self.letter.raw_b64)


def read_dead_letters(
    settings: Settings, topics: Topics | None = None, *, timeout_s: float = 30.0,
    skip_erased: bool = True,
) -> list[DeadLetterRecord]:
    """Every record of the DLQ topic, oldest first per partition.

    Dead letters of a scope erased after they were written are left out (``skip_erased``,
    default): ``dlq list`` never shows them and ``dlq replay`` never re-produces them.

    Raises:
        LookupError: the DLQ topic does not exist.
        TimeoutError: the end of the topic was not reached within ``timeout_s``.
    """
    topics = topics or Topics.from_settings(settings)
    ledger = None
    if skip_erased:
        from lightmem.streams.erasure.ledger import read_ledger

        ledger = read_ledger(settings, topics)
    out: list[DeadLetterRecord] = []
    for msg in read_to_end(settings, topics.dlq, timeout_s=timeout_s, purpose="dlq-list"):
        try:
            letter, error = DeadLetter.parse(msg.value() or b""), None
        except SchemaError as exc:
            letter, error = None, str(exc)
        if ledger and letter is not None:
            from lightmem.streams.erasure.sweeps import dead_letter_erased

            if dead_letter_erased(letter, ledger):
                continue
        out.append(DeadLetterRecord(msg.partition(), msg.offset(), msg.key(), letter, error))
    return sorted(out, key=lambda r: (r.partition, r.offset))


@dataclass(frozen=True)
class ReplayTarget:
    """Where one dead letter goes back to."""

    record: DeadLetterRecord
    topic: str | None
    #: (key, value, headers) records to produce; empty with a reason when not replayable.
    records: tuple[tuple[bytes | None, bytes, tuple[tuple[str, bytes], ...]], ...] = ()
    problem: str | None = None


def plan_replay(records: Iterable[DeadLetterRecord], topics: Topics) -> list[ReplayTarget]:
    """Decide, for each dead letter, what to re-produce where (nothing is sent)."""
    pipeline_topics = {topics.turns, topics.segments, topics.entries}
    plans = []
    for rec in records:
        letter = rec.letter
        if letter is None:
            plans.append(ReplayTarget(rec, None, problem=f"not a dead letter: {rec.error}"))
            continue
        raw = rec.original
        if letter.source in pipeline_topics:
            plans.append(ReplayTarget(rec, letter.source, ((rec.key, raw, ()),)))
        elif letter.source == SUMMARIZER_SOURCE:
            try:
                payload = json.loads(raw)
                segments = [Segment.parse(s) for s in payload["segments"]]
            except (ValueError, KeyError, TypeError) as exc:
                plans.append(ReplayTarget(rec, None, problem=f"no segments to replay: {exc}"))
                continue
            header = ((REDELIVERY_HEADER, b"1"),)
            plans.append(ReplayTarget(rec, topics.segments, tuple(
                (s.conversation_key.encode(), s.to_bytes(), header) for s in segments)))
        elif letter.step == "parse" and letter.partition is None:
            # From a file: the turns topic, keyed by the turn when it parses now.
            try:
                key: bytes | None = TurnEvent.parse(raw).conversation_key.encode()
            except SchemaError:
                key = None
            plans.append(ReplayTarget(rec, topics.turns, ((key, raw, ()),)))
        else:
            plans.append(ReplayTarget(rec, None,
                                      problem=f"unknown source {letter.source!r}"))
    return plans


def replay_dead_letters(
    settings: Settings, plans: Sequence[ReplayTarget], topics: Topics | None = None
) -> int:
    """Produce the planned records; returns how many records were delivered.

    Raises:
        DeliveryError: some records were not delivered (every failure is listed).
    """
    sent = 0
    with RecordProducer(settings, topics) as producer:
        for plan in plans:
            if plan.topic is None:
                continue
            for key, value, headers in plan.records:
                producer.produce(plan.topic, value, key=key, headers=list(headers) or None)
                sent += 1
    return sent
