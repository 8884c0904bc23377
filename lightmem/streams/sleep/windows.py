"""Sleep windows: when the sleep-time workers may consume, and the control topic behind it.

Three sources open a window; one command closes it::

    manual    `lightmem sleep open [--for 30m] [--tenant T]`  open now (until a time or a close)
    schedule  a cron expression + length, from the config (LIGHTMEM_SLEEP_CRON) or a
              `schedule` command on the control topic
    auto      ingest below LIGHTMEM_SLEEP_AUTO_MAX_RATE turns/s for LIGHTMEM_SLEEP_AUTO_QUIET_S
              opens; traffic above the threshold closes
    close     `lightmem sleep close [--tenant T]` ends whatever window is open now: a manual
              one, and the scheduled or automatic one in progress (the next occurrence opens
              again)

A window (of any source) is an interval ``[start, end)``; a tenant's window is open at
``now`` when some interval for it (or for all tenants) contains ``now`` and started after the
last close for it (or for all tenants). Tenant-limited commands override all-tenant ones
issued before them; an all-tenant command resets every tenant.

The control topic ``lightmem.sleep-control.v1`` is compacted, with the key
``window/<tenant or *>`` (open/close) or ``schedule/<tenant or *>``: the latest command per
key is all the fold above needs, so compaction never changes the state. Every worker reads
the topic from the beginning (no consumer group) and follows it. A record that does not
parse, or parses but makes no sense (a close with a cron, a schedule with a bad cron), is
rejected with every reason and dead-lettered (stage ``sleep-control``) once: the workers share
a dead-letter bookmark (the committed offset of group ``<sleep_group>.control``).

The pure part (cron, command rules, the fold) is :mod:`lightmem.processors.sleep_windows`;
this module reads and writes the control topic.

Exceptions::

    ValueError
     ├── SchemaError         (lightmem.schemas) the record does not validate
     ├── CommandError        a valid record that is not a meaningful command; lists all reasons
     └── CronError           a cron expression that does not parse
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from lightmem.processors.sleep_windows import (
    AutoWindow,
    CommandError,
    CronSchedule,
    WindowState,
    command_key,
    parse_command,
    validate_command,
)
from lightmem.schemas import DeadLetter, SchemaError, SleepAction, SleepWindowCommand, utc_now
from lightmem.settings import Settings
from lightmem.streams.kafka.topics import Topics, kafka_config

__all__ = [
    "ControlFollower",
    "ControlRecord",
    "configured_window_state",
    "describe_records",
    "new_command",
    "read_commands",
    "send_command",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- Kafka


def configured_window_state(settings: Settings) -> WindowState:
    """A fold holding the configured schedule and auto mode (LIGHTMEM_SLEEP_*)."""
    cron = CronSchedule.parse(settings.sleep_cron) if settings.sleep_cron else None
    auto = (AutoWindow(settings.sleep_auto_max_rate,
                       timedelta(seconds=settings.sleep_auto_quiet_s))
            if settings.sleep_auto else None)
    return WindowState(config_cron=cron, config_duration=timedelta(
        seconds=settings.sleep_cron_duration_s), auto=auto)



def new_command(action: SleepAction | str, *, tenant: str | None = None,
                until: datetime | None = None, cron: str | None = None,
                duration_s: int | None = None, issued_by: str = "ops",
                now: datetime | None = None) -> SleepWindowCommand:
    """Build and check a command.

    Raises:
        SchemaError: a field does not validate.
        CommandError: the fields do not go together.
    """
    payload: dict[str, Any] = {
        "command_id": uuid.uuid4().hex, "action": str(action), "tenant": tenant,
        "until": until, "cron": cron, "duration_s": duration_s,
        "issued_at": now or utc_now(), "issued_by": issued_by,
    }
    cmd = SleepWindowCommand.parse(payload)
    validate_command(cmd)
    return cmd


def send_command(settings: Settings, cmd: SleepWindowCommand, topics: Topics | None = None
                 ) -> None:
    """Produce ``cmd`` on the control topic (keyed for compaction) and wait for delivery.

    Raises:
        CommandError: the command is not meaningful (nothing is sent).
        DeliveryError: the broker did not acknowledge it.
    """
    from lightmem.streams.kafka.producer import RecordProducer

    validate_command(cmd)
    with RecordProducer(settings, topics) as producer:
        producer.produce(producer.topics.sleep_control, cmd.to_bytes(),
                         key=command_key(cmd).encode())


@dataclass(frozen=True)
class ControlRecord:
    offset: int
    key: bytes | None
    command: SleepWindowCommand | None
    error: str | None = None


def read_commands(settings: Settings, topics: Topics | None = None, *,
                  timeout_s: float = 30.0) -> list[ControlRecord]:
    """Every record of the control topic, in order (nothing joined, nothing committed).

    Raises:
        LookupError: the control topic does not exist.
        TimeoutError: its end was not reached within ``timeout_s``.
    """
    follower = ControlFollower(settings, topics, dead_letters=False)
    try:
        return follower.read_to_end(timeout_s)
    finally:
        follower.close()


class ControlFollower:
    """Follows the control topic from the beginning into a :class:`WindowState`.

    Args:
        settings: Kafka connection; the configured schedule and auto mode.
        topics: Topic names (default: the deployment's).
        dead_letters: Dead-letter bad records not dead-lettered yet (default True; the
            workers do, ``lightmem sleep status`` does not).
        clock: Time stamped on dead letters.
    """

    def __init__(self, settings: Settings, topics: Topics | None = None, *,
                 dead_letters: bool = True, clock: Any = utc_now) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        self.settings = settings
        self.topics = topics or Topics.from_settings(settings)
        self.state = configured_window_state(settings)
        self.clock = clock
        self.rejected: list[ControlRecord] = []
        self._dead_letters = dead_letters
        # The group only holds the dead-letter bookmark: it is never joined (assign()).
        self._consumer = Consumer(kafka_config(settings, **{
            "group.id": f"{settings.sleep_group}.control",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }))
        self._tp = TopicPartition(self.topics.sleep_control, 0, OFFSET_BEGINNING)
        self._dl_from: int | None = None
        self._producer: Any = None
        self._turn_partitions: list[int] | None = None
        self._admin: Any = None
        self.at_end = False

    def _bookmark(self) -> int:
        from confluent_kafka import TopicPartition

        if self._dl_from is None:
            [tp] = self._consumer.committed([TopicPartition(self._tp.topic, 0)], timeout=30)
            self._dl_from = max(tp.offset, 0)
        return self._dl_from

    def start(self, timeout_s: float = 30.0) -> None:
        """Check the topic exists and start reading it from the beginning.

        Raises:
            LookupError: the control topic does not exist.
        """
        topic = self._tp.topic
        meta = self._consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if meta is None or meta.error is not None:
            raise LookupError(f"topic {topic!r} does not exist: run `lightmem topics create`")
        self._consumer.assign([self._tp])

    def poll(self, timeout_s: float = 0.0, max_records: int = 500) -> list[ControlRecord]:
        """Apply the records available now (waiting up to ``timeout_s`` for the first)."""
        from confluent_kafka import KafkaError, KafkaException

        out: list[ControlRecord] = []
        msgs = self._consumer.consume(max_records, timeout=timeout_s)
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    self.at_end = True
                    continue
                raise KafkaException(err)
            raw = msg.value() or b""
            try:
                cmd = parse_command(raw)
            except (SchemaError, CommandError) as exc:
                rec = ControlRecord(msg.offset(), msg.key(), None, str(exc))
                self.rejected.append(rec)
                log.error("sleep-control offset %d rejected: %s", msg.offset(), exc)
                if self._dead_letters:
                    self._dead_letter(msg, exc)
            else:
                rec = ControlRecord(msg.offset(), msg.key(), cmd)
                self.state.apply(cmd)
            out.append(rec)
        return out

    def _dead_letter(self, msg: Any, exc: Exception) -> None:
        from confluent_kafka import TopicPartition

        from lightmem.streams.kafka.producer import RecordProducer

        if msg.offset() < self._bookmark():
            return  # dead-lettered before (by this or another worker)
        if self._producer is None:
            self._producer = RecordProducer(self.settings, self.topics)
        letter = DeadLetter.from_raw(msg.value() or b"", step="sleep-control", error=exc,
                                     source=msg.topic(), partition=msg.partition(),
                                     offset=msg.offset(), at=self.clock())
        self._producer.dead_letter(letter, key=msg.key())
        self._producer.flush()
        # Only after the dead letter is durable: at least once, never zero times.
        self._consumer.commit(offsets=[TopicPartition(msg.topic(), 0, msg.offset() + 1)],
                              asynchronous=False)
        self._dl_from = msg.offset() + 1

    def read_to_end(self, timeout_s: float = 30.0) -> list[ControlRecord]:
        """Start, then apply every record up to the current end of the topic.

        Raises:
            LookupError: no control topic.
            TimeoutError: the end was not reached in time.
        """
        import time

        from confluent_kafka import TopicPartition

        self.start(timeout_s)
        low, high = self._consumer.get_watermark_offsets(
            TopicPartition(self._tp.topic, 0), timeout=timeout_s)
        out: list[ControlRecord] = []
        if high <= low:
            return out
        deadline = time.monotonic() + timeout_s
        while not self.at_end:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self._tp.topic}: end not reached in {timeout_s:.0f}s")
            out += self.poll(0.5)
        return out

    def turns_end_offset(self, timeout_s: float = 10.0) -> int:
        """Sum of the turns topic's end offsets (for automatic mode).

        One ListOffsets request through an admin client: the follower's consumer has a long
        poll outstanding on the control topic, and its watermark queries would wait behind it
        (about 0.5 s per partition), holding up the worker loop that samples.
        """
        from confluent_kafka import TopicPartition
        from confluent_kafka.admin import AdminClient, OffsetSpec

        topic = self.topics.turns
        if self._admin is None:
            self._admin = AdminClient(kafka_config(self.settings))
        if self._turn_partitions is None:
            meta = self._admin.list_topics(topic, timeout=timeout_s).topics.get(topic)
            if meta is None or meta.error is not None:
                raise LookupError(f"topic {topic!r} does not exist")
            self._turn_partitions = sorted(meta.partitions)
        futures = self._admin.list_offsets(
            {TopicPartition(topic, p): OffsetSpec.latest() for p in self._turn_partitions},
            request_timeout=timeout_s)
        return sum(f.result(timeout=timeout_s).offset for f in futures.values())

    def close(self) -> None:
        """Close the consumer (and flush a dead-letter producer)."""
        try:
            if self._producer is not None:
                self._producer.flush()
        finally:
            self._consumer.close()


def describe_records(records: Sequence[ControlRecord]) -> Iterable[str]:
    """One line per control record, for ``lightmem sleep status --log``."""
    for r in records:
        if r.command is None:
            yield f"{r.offset}: REJECTED {r.error}"
        else:
            c = r.command
            extra = " ".join(f"{k}={v}" for k, v in (("tenant", c.tenant), ("until", c.until),
                                                     ("cron", c.cron),
                                                     ("duration_s", c.duration_s)) if v)
            yield f"{r.offset}: {c.action.value} {extra} at {c.issued_at.isoformat()} " \
                  f"by {c.issued_by}".replace("  ", " ")
