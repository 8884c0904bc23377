"""The erasure request, its report, and the ledger topic every worker follows
(``lightmem.erasures.v1``; see :mod:`.forget` for the whole flow).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from lightmem.processors.erasure import ErasureLedger
from lightmem.schemas import (
    ChangeOp,
    ErasureRequest,
    MemoryChange,
    SchemaError,
    stable_id,
    utc_now,
)
from lightmem.settings import Settings
from lightmem.streams.kafka.topics import Topics, kafka_config

__all__ = [
    "SinkReport",
    "ErasureReport",
    "ErasureFollower",
    "new_request",
    "erase_change",
    "read_ledger",
]

log = logging.getLogger(__name__)


# -- the request and the report -----------------------------------------------------------------


def new_request(tenant: str, user: str | None = None, *, reason: str = "",
                requested_by: str = "ops", now: datetime | None = None) -> ErasureRequest:
    """A new erasure request, effective ``now``.

    Raises:
        SchemaError: a malformed tenant or user name (empty, blank, too long).
    """
    try:
        return ErasureRequest(erasure_id=uuid.uuid4().hex, tenant=tenant, user=user,
                              requested_at=now or utc_now(), requested_by=requested_by,
                              reason=reason)
    except ValidationError as exc:
        raise SchemaError("ErasureRequest", [
            (".".join(str(p) for p in e["loc"]), e["msg"], repr(e.get("input")))
            for e in exc.errors(include_url=False)]) from None


@dataclass
class SinkReport:
    """What one sink did for an erasure."""

    sink: str
    #: What was removed, by kind (memories, slots, rows, ...).
    removed: dict[str, int] = field(default_factory=dict)
    #: What is still there, and until when (compaction, retention), in words.
    pending: list[str] = field(default_factory=list)
    #: The sink did its part (pending items are expected, e.g. compaction).
    confirmed: bool = True
    #: Records of the scope found in the sink (removed or hidden): 0 = nothing of it there.
    found: int = 0

    def as_json(self) -> dict[str, Any]:
        return {"sink": self.sink, "confirmed": self.confirmed, "found": self.found,
                "removed": self.removed, "pending": self.pending}


@dataclass
class ErasureReport:
    """Every sink's answer to one erasure request."""

    request: ErasureRequest
    sinks: list[SinkReport] = field(default_factory=list)

    @property
    def confirmed(self) -> bool:
        """Every sink confirmed (exit 0)."""
        return all(s.confirmed for s in self.sinks)

    @property
    def found(self) -> bool:
        """Something of the scope was found anywhere (False: an unknown scope)."""
        return any(s.found for s in self.sinks)

    def sink(self, name: str) -> SinkReport:
        return next(s for s in self.sinks if s.sink == name)

    def as_json(self) -> dict[str, Any]:
        return {"erasure_id": self.request.erasure_id, "tenant": self.request.tenant,
                "user": self.request.user, "requested_at": self.request.requested_at.isoformat(),
                "confirmed": self.confirmed, "found": self.found,
                "sinks": [s.as_json() for s in self.sinks]}


def erase_change(request: ErasureRequest, user: str, counts: dict[str, int],
                 at: datetime) -> MemoryChange:
    """The content-free ``erase`` change of one erased (tenant, user) scope."""
    return MemoryChange(
        change_id=stable_id(request.erasure_id, ChangeOp.erase.value, request.tenant, user),
        op=ChangeOp.erase, memory_id=f"erasure:{request.erasure_id}", tenant=request.tenant,
        user=user, reason=f"erasure {request.erasure_id}" + (
            " (whole tenant)" if request.user is None else ""),
        at=at, counts=counts)


# -- the ledger topic ---------------------------------------------------------------------------


def read_ledger(settings: Settings, topics: Topics | None = None, *,
                timeout_s: float = 30.0) -> ErasureLedger:
    """The erasure ledger as recorded now (empty when the topic does not exist yet)."""
    from lightmem.streams.kafka.topic_reader import read_to_end

    topics = topics or Topics.from_settings(settings)
    ledger = ErasureLedger()
    try:
        for msg in read_to_end(settings, topics.erasures, timeout_s=timeout_s,
                               purpose="erasures"):
            _fold(ledger, msg.value())
    except LookupError:
        pass
    return ledger


def _fold(ledger: ErasureLedger, value: bytes | None) -> bool:
    if value is None:  # a tombstone: an erasure is never undone by one
        return False
    try:
        return ledger.apply(ErasureRequest.parse(value))
    except SchemaError as exc:
        log.warning("erasures: a record that is not an erasure request is ignored: %s", exc)
        return False


class ErasureFollower:
    """Reads the erasures topic from the beginning, then keeps following it.

    ``start`` reads to the current end (a worker knows every erasure before its first
    batch); ``poll`` folds what arrived since (call it between batches). Assigns the
    partitions itself: no group is joined and nothing is committed.

    Args:
        settings: Kafka connection.
        topics: Topic names (the erasures topic is the deployment's, also for a replay).
        ledger: The ledger to fold into (shared with the stages); default a new one.
    """

    def __init__(self, settings: Settings, topics: Topics, *,
                 ledger: ErasureLedger | None = None) -> None:
        self.settings = settings
        self.topic = topics.erasures
        self.ledger = ledger if ledger is not None else ErasureLedger()
        self._consumer: Any = None

    def start(self, timeout_s: float = 60.0) -> None:
        """Assign every partition from the beginning and read up to the current end.

        Raises:
            LookupError: the topic does not exist (run ``lightmem topics create``).
            TimeoutError: the end was not reached in time.
        """
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        self._consumer = Consumer(kafka_config(self.settings, **{
            "group.id": f"lightmem-erasures-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        }))
        meta = self._consumer.list_topics(self.topic, timeout=timeout_s).topics.get(self.topic)
        if meta is None or meta.error is not None:
            raise LookupError(f"topic {self.topic!r} does not exist: run `lightmem topics "
                              f"create`")
        parts = sorted(meta.partitions)
        ends = {}
        for p in parts:
            low, high = self._consumer.get_watermark_offsets(TopicPartition(self.topic, p),
                                                             timeout=timeout_s)
            if high > low:
                ends[p] = high
        self._consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in parts])
        deadline = time.monotonic() + timeout_s
        pending = set(ends)
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.topic}: end not reached within {timeout_s:.0f}s")
            self.poll(0.5)
            for tp in self._consumer.position([TopicPartition(self.topic, p) for p in pending]):
                if tp.offset >= ends[tp.partition]:
                    pending.discard(tp.partition)
        log.info("erasure ledger: %d erased scope(s)", len(self.ledger))

    def poll(self, timeout_s: float = 0.0) -> int:
        """Fold the records available now; returns how many changed the ledger."""
        if self._consumer is None:
            return 0
        changed = 0
        for msg in self._consumer.consume(500, timeout=timeout_s):
            err = msg.error()
            if err is not None:
                if err.fatal():
                    from confluent_kafka import KafkaException

                    raise KafkaException(err)
                log.warning("erasures: consumer error: %s", err.str())
                continue
            if _fold(self.ledger, msg.value()):
                changed += 1
                log.info("erasure recorded at %s[%d]@%d", msg.topic(), msg.partition(),
                         msg.offset())
        return changed

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
