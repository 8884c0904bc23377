"""Erasure on the streaming deployment: the ledger topic, the slot sweep, every sink's erase.

One request (:func:`new_request`) forgets a user (tenant, user) or a whole tenant.
:func:`forget` is the one function underneath ``lightmem forget`` and the memory service's
delete-all route: on the embedded store it erases in one SQLite transaction
(:mod:`.embedded_erasure`); on the stream (:func:`forget_stream`) it

1. records the request on the compacted topic ``lightmem.erasures.v1`` (key = the scope key,
   or the tenant's one-name key); from then on every stage, the sleep workers and every
   replay drop the scope's records produced at or before the request (the ledger,
   :class:`~lightmem.processors.erasure.ErasureLedger`);
2. deletes the scope's memories (and anything else filed under its scope fields) by query in
   every memory index: the ones behind the alias and every ``<alias>-*`` version;
3. waits until the ingest group has committed past everything that was in its input topics
   when the request was recorded, and until the workers' tables (the sensory and topic
   buffer slots, read back from their changelog topics) hold nothing of the scope: the
   worker deletes the slots (tombstones) or rewrites them without the scope's turns, inside
   its own transaction (:func:`sweep_slot`);
4. deletes by query again (a batch in flight when the request was recorded may have
   written after step 2), and checks that nothing of the scope is left; both passes also
   delete the scope's pending changes in the sleep workers' outbox index
   (``<alias>.sleep-outbox``: they hold the memories' text until produced);
5. produces a tombstone per change of the scope on the compacted memory-changes topic
   (one key per change, :mod:`lightmem.streams.kafka.change_log`): no reader returns them
   from then on, and the log cleaner removes their bytes;
6. produces a content-free ``erase`` change (scope, counts, time) for audit.

What remains until compaction or retention is reported, not hidden: the tombstoned
changes' bytes until the log cleaner compacts them (the report says when, from the topic's
settings), the scope's records in a legacy ``lightmem.memory-changes.v1`` topic (until
``lightmem topics migrate-changes --delete-old``: the erasure does not confirm meanwhile),
the DLQ's dead letters of the scope (keyed by their source record, so they cannot be
tombstoned one by one: ``dlq list/replay`` skip them, and the topic keeps records forever
by default, so the report says so; a dead letter whose bytes name no scope cannot be
attributed to anyone and is counted), the changelog topics' superseded slot values until
the log cleaner compacts them, and the raw turns in the turns topic until its retention
deletes them (the ledger keeps them out of every stage and replay meanwhile).
"""

from __future__ import annotations

import base64
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from lightmem.processors.erasure import ErasureLedger, raw_scopes, strip_turns, to_ms
from lightmem.schemas import (
    ChangeOp,
    DeadLetter,
    ErasureRequest,
    MemoryChange,
    SchemaError,
    SegmentTurn,
    stable_id,
    utc_now,
)
from lightmem.settings import Settings
from lightmem.streams.ingest.stages import SensorySlot, TopicSlot
from lightmem.streams.kafka.change_log import tombstone
from lightmem.streams.kafka.topics import Topics, kafka_config

__all__ = [
    "SinkReport",
    "ErasureReport",
    "ErasureFollower",
    "new_request",
    "read_ledger",
    "sweep_slot",
    "dead_letter_scopes",
    "dead_letter_erased",
    "erase_elasticsearch",
    "delete_documents",
    "erase_change",
    "forget",
    "forget_stream",
    "erasure_status",
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


# -- the workers' tables --------------------------------------------------------------------


def _remaining_user(user: str, kept: Sequence[SegmentTurn]) -> str:
    """The buffer's user after its erased turns left: its own while a turn still falls back
    to it, else the first remaining turn's."""
    if any(t.user is None or t.user == user for t in kept):
        return user
    return kept[0].user or user


def _sweep_sensory(raw: bytes, ledger: ErasureLedger) -> bytes | None:
    slot = SensorySlot.model_validate_json(raw)
    if not ledger.tenant_touched(slot.tenant):
        return raw
    changed = False
    buf = slot.buffer
    if buf is not None and buf.turns:
        kept = strip_turns(buf.turns, default_user=buf.user, user_of=lambda t: t.user,
                           origin_of=lambda t: slot.origins.get(t.turn_id),
                           tenant=slot.tenant, ledger=ledger)
        if len(kept) != len(buf.turns):
            changed = True
            gone = {t.turn_id for t in buf.turns} - {t.turn_id for t in kept}
            slot.recent = [t for t in slot.recent if t not in gone]
            slot.buffer = buf.model_copy(update={
                "turns": kept, "user": _remaining_user(buf.user, kept),
                "last_event_time": max(t.event_time for t in kept)}) if kept else None
            slot.prune_origins()
    empty = slot.buffer is None or not slot.buffer.turns
    arrived = None if slot.arrived_at is None else to_ms(slot.arrived_at)
    if empty and ledger.drops(slot.tenant, slot.user, arrived):
        return None  # nothing left but the erased user's name: delete the slot
    if not changed:
        return raw
    if slot.buffer is not None and ledger.erased_at(slot.tenant, slot.user) is not None:
        slot.user = slot.buffer.user
    return slot.model_dump_json().encode()


def _sweep_topic(raw: bytes, ledger: ErasureLedger) -> bytes | None:
    slot = TopicSlot.model_validate_json(raw)
    buf = slot.buffer
    if buf is None or not ledger.tenant_touched(buf.tenant):
        return raw
    segments = []
    changed = False
    for seg in buf.segments:
        kept = strip_turns(seg.turns, default_user=seg.user, user_of=lambda t: t.user,
                           origin_of=lambda t: slot.origins.get(t.turn_id), tenant=seg.tenant,
                           ledger=ledger)
        if len(kept) == len(seg.turns):
            segments.append(seg)
            continue
        changed = True
        if kept:
            segments.append(seg.model_copy(update={
                "turns": kept, "user": _remaining_user(seg.user, kept)}))
    if not changed:
        return raw
    if not segments:
        return None
    user = buf.user if ledger.erased_at(buf.tenant, buf.user) is None else segments[0].user
    slot.buffer = buf.model_copy(update={"segments": segments, "user": user})
    slot.prune_origins()
    return slot.model_dump_json().encode()


def sweep_slot(table: str, raw: bytes, ledger: ErasureLedger) -> bytes | None:
    """One table slot without the erased scopes' turns.

    Args:
        table: ``sensory`` or ``topic-buffers``.
        raw: The serialized slot.
        ledger: The erasure ledger.

    Returns:
        ``raw`` itself when nothing in it is erased; None when the slot must be deleted
        (a tombstone on the changelog); else the rewritten slot.
    """
    if not ledger:
        return raw
    if table == "sensory":
        return _sweep_sensory(raw, ledger)
    if table == "topic-buffers":
        return _sweep_topic(raw, ledger)
    raise ValueError(f"table: sensory or topic-buffers (got {table!r})")


def _changelog_slots(settings: Settings, topic: str) -> dict[bytes, bytes]:
    """The current slots of a changelog topic (the last value per key; tombstones delete)."""
    from lightmem.streams.kafka.topic_reader import read_to_end

    slots: dict[bytes, bytes] = {}
    try:
        for msg in read_to_end(settings, topic, timeout_s=60.0, purpose="erasure-check"):
            if msg.value() is None:
                slots.pop(msg.key(), None)
            else:
                slots[msg.key()] = msg.value()
    except LookupError:
        return {}
    return slots


def _held_slots(settings: Settings, topics: Topics, ingest_group: str,
                ledger: ErasureLedger) -> dict[str, int]:
    """Slots of the ingest group's tables that still hold something the ledger erases."""
    from lightmem.streams.ingest.state import changelog_topic
    from lightmem.streams.ingest.worker import TABLES

    out = {}
    for table in TABLES:
        slots = _changelog_slots(settings, changelog_topic(topics, ingest_group, table))
        out[table] = sum(1 for raw in slots.values()
                         if sweep_slot(table, raw, ledger) is not raw)
    return out


# -- dead letters -------------------------------------------------------------------------------


def dead_letter_scopes(letter: DeadLetter) -> set[tuple[str, str | None]]:
    """The (tenant, user) scopes a dead letter's original record belongs to, as far as it
    says (a record without a user gives (tenant, None); undecodable bytes give nothing)."""
    try:
        raw = base64.b64decode(letter.raw_b64)
    except (ValueError, TypeError):
        return set()
    return raw_scopes(raw)


def dead_letter_erased(letter: DeadLetter, ledger: ErasureLedger) -> bool:
    """Whether a dead letter holds a record of a scope erased after it was written."""
    if not ledger:
        return False
    at = to_ms(letter.at)
    return any(ledger.drops(tenant, user, at) for tenant, user in dead_letter_scopes(letter))


# -- Elasticsearch ------------------------------------------------------------------------------


def _scope_query(tenant: str, user: str | None, before: datetime | None = None
                 ) -> dict[str, Any]:
    filters: list[dict[str, Any]] = [{"term": {"tenant": tenant}}]
    if user is not None:
        filters.append({"term": {"user": user}})
    if before is not None:
        # Memories written after the erasure are of turns produced after it (a new
        # beginning): an erasure never deletes them, however late it runs.
        filters.append({"range": {"ingest_time": {"lte": before.astimezone(UTC).isoformat()}}})
    return {"bool": {"filter": filters}}


def _memory_indices(store: Any) -> list[str]:
    """Every memory index: behind the alias and every ``<alias>-*`` version."""
    from elasticsearch import NotFoundError

    names = set(store.alias_indices())
    try:
        names |= set(store.client.indices.get(index=f"{store.alias}-*",
                                               expand_wildcards="open"))
    except NotFoundError:
        pass
    return sorted(names)


def erase_elasticsearch(store: Any, tenant: str, user: str | None,
                        before: datetime | None = None) -> dict[str, int]:
    """Delete the scope's documents from every memory index (delete by query on the scope
    fields, then refresh); returns index -> documents deleted.

    ``before``: only documents written (``ingest_time``) at or before it, the erasure time.

    A cluster without the ``reindex`` module (which serves ``_delete_by_query``; the
    integ-test distribution has none) is answered by search + bulk delete rounds instead.
    """
    from elasticsearch import BadRequestError, NotFoundError

    out = {}
    for name in _memory_indices(store):
        query = _scope_query(tenant, user, before)
        try:
            resp = store.client.delete_by_query(index=name, query=query, conflicts="proceed",
                                                refresh=True, wait_for_completion=True)
            out[name] = int(resp.get("deleted", 0))
        except (BadRequestError, NotFoundError) as exc:
            if "no handler found" not in str(exc):
                raise
            out[name] = _delete_by_search(store.client, name, query)
    return out


def _delete_by_search(client: Any, index: str, query: dict[str, Any]) -> int:
    """Delete what ``query`` finds, 1,000 ids per round, refreshing between rounds."""
    from elasticsearch.helpers import bulk

    deleted = 0
    client.indices.refresh(index=index)
    while True:
        hits = client.search(index=index, query=query, size=1000, source=False,
                             track_total_hits=False)["hits"]["hits"]
        if not hits:
            return deleted
        ok, errors = bulk(client, ({"_op_type": "delete", "_index": index, "_id": h["_id"]}
                                   for h in hits), raise_on_error=False)
        if not ok:
            raise RuntimeError(f"{index}: no document of the scope could be deleted: "
                               f"{errors!r:.500}")
        deleted += ok
        client.indices.refresh(index=index)


def delete_documents(store: Any, ids: Sequence[str]) -> int:
    """Delete documents by id from the store's index (missing ids are fine), then refresh;
    returns how many were deleted."""
    from elasticsearch.helpers import bulk

    if not ids or not hasattr(store, "client"):
        return 0
    ok, _ = bulk(store.client, ({"_op_type": "delete", "_index": store.target, "_id": i}
                                for i in ids), raise_on_error=False)
    store.client.indices.refresh(index=store.target)
    return ok


def _outbox(store: Any) -> Any:
    """The sleep workers' outbox beside the store's alias (pending changes hold memories'
    text until the worker that wrote them produced them)."""
    from lightmem.streams.sleep.outbox import Outbox, outbox_index

    return Outbox(store.client, outbox_index(store.alias))


def _es_remaining(store: Any, tenant: str, user: str | None,
                  before: datetime | None = None) -> int:
    names = _memory_indices(store)
    if not names:
        return 0
    store.client.indices.refresh(index=",".join(names))
    return int(store.client.count(index=",".join(names),
                                  query=_scope_query(tenant, user, before))["count"])


def _es_users(store: Any, tenant: str) -> set[str]:
    names = _memory_indices(store)
    if not names:
        return set()
    resp = store.client.search(index=",".join(names), size=0, query=_scope_query(tenant, None),
                               aggs={"users": {"terms": {"field": "user", "size": 10_000}}})
    return {b["key"] for b in resp["aggregations"]["users"]["buckets"]}


# -- the stream ----------------------------------------------------------------------------------


def _ends(settings: Settings, names: Iterable[str]) -> dict[tuple[str, int], int]:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(kafka_config(settings, **{
        "group.id": f"lightmem-erasure-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False}))
    try:
        out = {}
        for name in names:
            meta = consumer.list_topics(name, timeout=30).topics.get(name)
            if meta is None or meta.error is not None:
                continue
            for p in meta.partitions:
                _, high = consumer.get_watermark_offsets(TopicPartition(name, p), timeout=30)
                out[(name, p)] = high
        return out
    finally:
        consumer.close()


def _behind(settings: Settings, group: str, ends: dict[tuple[str, int], int]) -> int:
    """Records before ``ends`` the group has not committed past yet."""
    from lightmem.streams.kafka.lag import LagReader

    with LagReader(settings, group) as reader:
        lags = reader.read(sorted({t for t, _ in ends}))
    behind = 0
    for p in lags:
        end = ends.get((p.topic, p.partition), 0)
        at = p.committed if p.committed is not None else 0
        behind += max(0, end - at) if end > 0 else 0
    return behind


#: How to give a topic kept forever a retention: the turns topics follow a setting; the
#: memory-changes and DLQ topics keep every scope's records forever unless an operator sets
#: one on the topic (which ages out everyone's history, not only the erased scope's).
_SET_TURNS_RETENTION = "LIGHTMEM_TURNS_RETENTION, then `lightmem topics create`"
_SET_TOPIC_RETENTION = ("retention.ms on the topic, e.g. kafka-configs --alter --add-config "
                        "retention.ms=...; it ages out every scope's records, not only these")


def _retention(settings: Settings, topic: str, since: datetime,
               how: str = _SET_TURNS_RETENTION) -> str:
    """When the last record of ``topic`` produced up to ``since`` is gone, in words (``how``:
    what to do when the topic keeps its records forever)."""
    from datetime import timedelta

    from confluent_kafka.admin import AdminClient, ConfigResource

    try:
        admin = AdminClient(kafka_config(settings))
        res = ConfigResource(ConfigResource.Type.TOPIC, topic)
        conf = admin.describe_configs([res])[res].result(timeout=30)
        ms = int(conf["retention.ms"].value)
    except Exception as exc:  # noqa: BLE001 - the report says it is unknown
        return f"retention unknown ({exc!r})"
    if ms < 0:
        return f"retention.ms=-1: kept until a retention is set ({how})"
    by = (since + timedelta(milliseconds=ms)).astimezone(UTC).isoformat(timespec="seconds")
    return (f"the last one of the scope from before the erasure ages out by {by} "
            f"(retention.ms={ms}; the broker deletes whole log segments, so up to one "
            f"segment later)")


def _changes_sink(settings: Settings, topics: Topics, changes: Any, legacy: Any, *,
                  tombstoned: int | None = None) -> SinkReport:
    """The memory-changes sink's report from :func:`~lightmem.streams.kafka.change_log.
    scan_scope` of the topic and of the legacy v1 topic; ``tombstoned``: what ``forget``
    just tombstoned (None: a status check, which tombstones nothing)."""
    from lightmem.streams.kafka.change_log import compaction_terms

    topic = topics.memory_changes
    if tombstoned is not None:
        hist = SinkReport("memory-changes", found=tombstoned + legacy.unkeyed,
                          removed={"change records tombstoned": tombstoned})
        live = 0
    else:
        live = len(changes.live)
        hist = SinkReport("memory-changes", found=live + changes.unkeyed + legacy.unkeyed)
    compacted, terms = compaction_terms(settings, topic)
    waiting = (tombstoned or 0) + changes.awaiting_compaction
    if waiting:
        hist.pending.append(f"{waiting} tombstoned change record(s) of the scope on {topic}: "
                            f"no reader returns them; {terms}")
        hist.confirmed = hist.confirmed and compacted
    if live:
        hist.confirmed = False
        hist.pending.append(f"{live} change record(s) of the scope from before the erasure on "
                            f"{topic} are not tombstoned (written after `forget` ran?): run "
                            f"`lightmem forget` again")
    if changes.unkeyed:
        hist.confirmed = False
        hist.pending.append(f"{changes.unkeyed} change record(s) of the scope on {topic} have "
                            f"no per-change key, so no tombstone can reach them")
    if legacy.unkeyed:
        hist.confirmed = False
        hist.pending.append(
            f"{legacy.unkeyed} change record(s) of the scope in the legacy topic "
            f"{legacy.topic}, which cannot be erased record by record (nothing reads it any "
            f"more): run `lightmem topics migrate-changes --delete-old` (copies what no "
            f"erasure covers into {topic}, then deletes {legacy.topic})")
    return hist


def _dlq_notes(dlq: SinkReport, settings: Settings, topics: Topics, request: ErasureRequest,
               hidden: int, letters: Sequence[Any]) -> None:
    """What stays on the DLQ: the scope's hidden dead letters, and the ones nobody's."""
    if hidden:
        dlq.pending.append(f"{hidden} dead letter(s) stay in {topics.dlq}, keyed by their "
                           f"source record so not erasable one by one (dlq list and replay "
                           f"skip them): "
                           + _retention(settings, topics.dlq, request.requested_at,
                                        _SET_TOPIC_RETENTION))
    anonymous = sum(1 for r in letters if r.letter is None or not dead_letter_scopes(r.letter))
    if anonymous:
        dlq.pending.append(f"{anonymous} dead letter(s) in {topics.dlq} name no tenant or "
                           f"user (bytes that are not JSON, or no scope fields): they cannot "
                           f"be attributed to a scope, so no erasure hides or removes them")


def forget_stream(
    settings: Settings,
    request: ErasureRequest,
    *,
    topics: Topics | None = None,
    ingest_group: str | None = None,
    store: Any = None,
    wait_s: float = 120.0,
    clock: Callable[[], datetime] = utc_now,
) -> ErasureReport:
    """Erase ``request``'s scope from the streaming deployment (see the module docstring).

    Args:
        settings: Kafka and Elasticsearch connection.
        request: The erasure (:func:`new_request`).
        topics: The deployment's topics (default from ``settings``).
        ingest_group: The ingest workers' ingest group (default ``settings.ingest_group``).
        store: The Elasticsearch store (default: ``settings.es_alias``).
        wait_s: How long to wait for the ingest workers to pass the erasure.

    Returns:
        The report; ``confirmed`` is False when a sink could not confirm in time (e.g. no
        ingest worker ran to delete its buffer slots).

    Raises:
        DeliveryError: the request could not be recorded (nothing was erased).
    """
    from lightmem.streams.kafka.change_log import ChangeRouter, produce_change, scan_scope
    from lightmem.streams.kafka.dlq import read_dead_letters
    from lightmem.streams.kafka.producer import RecordProducer

    topics = topics or Topics.from_settings(settings)
    ingest_group = ingest_group or settings.ingest_group
    if store is None:
        from lightmem.streams.elastic.store import ElasticsearchStore, es_client

        store = ElasticsearchStore(es_client(settings), alias=settings.es_alias)
    tenant, user = request.tenant, request.user
    report = ErasureReport(request)

    # 1. the ledger: from now on nothing of the scope produced until now gets through
    with RecordProducer(settings, topics) as producer:
        producer.produce(topics.erasures, request.to_bytes(), key=request.key.encode(),
                         label=f"erasure {request.erasure_id}")
        producer.flush()
    ledger = read_ledger(settings, topics)
    ledger.apply(request)
    ends = _ends(settings, [topics.turns, topics.segments, topics.entries])

    # 2. Elasticsearch, first pass
    users = {user} if user is not None else _es_users(store, tenant)
    erased_at = request.requested_at
    deleted = erase_elasticsearch(store, tenant, user, erased_at)
    outbox = _outbox(store)
    boxed = outbox.erase(tenant, user, erased_at)

    # 3. the workers' buffers and the group's progress
    held = _held_slots(settings, topics, ingest_group, ledger)
    changes = scan_scope(settings, topics.memory_changes, tenant, user, ledger)
    all_letters = read_dead_letters(settings, topics, skip_erased=False)
    letters = [r for r in all_letters
               if r.letter is not None and dead_letter_erased(r.letter, ledger)]
    held_before = sum(held.values())
    found_before = (sum(deleted.values()) + sum(held.values()) + len(changes.live)
                    + changes.unkeyed + len(letters))
    behind = 0
    if found_before:
        deadline = time.monotonic() + wait_s
        while True:
            behind = _behind(settings, ingest_group, ends)
            held = _held_slots(settings, topics, ingest_group, ledger)
            if (behind == 0 and not any(held.values())) or time.monotonic() > deadline:
                break
            time.sleep(1.0)  # polling interval: the workers sweep between batches
    # 4. Elasticsearch, second pass (a batch in flight at step 1 may have written since)
    again = erase_elasticsearch(store, tenant, user, erased_at)
    boxed += outbox.erase(tenant, user, erased_at)
    remaining = _es_remaining(store, tenant, user, erased_at)
    boxed_left = len(outbox.of_scope(tenant, user, erased_at))
    # 5. the memory changes: read again now that the workers passed the erasure (a batch in
    # flight may have written a change meanwhile), a tombstone per change of the scope
    changes = scan_scope(settings, topics.memory_changes, tenant, user, ledger)
    users |= changes.users()
    tombstoned = tombstone(settings, topics.memory_changes,
                           [(p, k) for k, (p, _) in changes.live.items()], topics)
    legacy = scan_scope(settings, topics.memory_changes_v1, tenant, user, ledger)
    memories = sum(deleted.values()) + sum(again.values())
    es = SinkReport("elasticsearch", found=memories + boxed)
    es.removed = {"memories": memories, "sleep outbox changes": boxed}
    for name in sorted(set(deleted) | set(again)):
        es.removed[f"index {name}"] = deleted.get(name, 0) + again.get(name, 0)
    if remaining:
        es.confirmed = False
        es.pending.append(f"{remaining} document(s) of the scope still searchable")
    if boxed_left:
        es.confirmed = False
        es.pending.append(f"{boxed_left} pending sleep change(s) of the scope still in "
                          f"{outbox.name}")
    report.sinks.append(es)

    buffers = SinkReport("buffers", found=held_before,
                         removed={"slots deleted or rewritten by the ingest worker":
                                  held_before - sum(held.values())})
    slots_left = sum(held.values())
    if slots_left or behind:
        buffers.confirmed = False
        if slots_left:
            buffers.pending.append(f"{slots_left} table slot(s) of the scope not yet deleted "
                                   f"by an ingest worker (group {ingest_group}): is one running?")
        if behind:
            buffers.pending.append(f"the ingest group {ingest_group} has {behind} record(s) from "
                                   f"before the erasure left to pass (they are dropped)")
    elif held_before:
        buffers.pending.append("superseded slot values stay in the changelog topics until "
                               "the log cleaner compacts them")
    report.sinks.append(buffers)

    hist = _changes_sink(settings, topics, changes, legacy, tombstoned=tombstoned)
    report.sinks.append(hist)

    dlq = SinkReport("dlq", found=len(letters), removed={"hidden from dlq list/replay":
                                                         len(letters)})
    _dlq_notes(dlq, settings, topics, request, len(letters), all_letters)
    report.sinks.append(dlq)

    turns = SinkReport("turns", found=0)
    turns.pending.append(f"raw turns in {topics.turns}: "
                         f"{_retention(settings, topics.turns, request.requested_at)}; "
                         f"the ledger keeps them out of every stage and replay")
    report.sinks.append(turns)

    # 5. the audit record (content-free)
    if report.found:
        now = clock()
        counts = {"memories": memories, "changes_tombstoned": tombstoned,
                  "dead_letters_hidden": len(letters)}
        router = ChangeRouter(settings)
        with RecordProducer(settings, topics) as producer:
            for u in sorted(users):
                produce_change(producer, topics.memory_changes,
                               erase_change(request, u, counts, now), router)
            producer.flush()
    return report


def forget(settings: Settings, tenant: str, user: str | None = None, *, reason: str = "",
           requested_by: str = "ops", stream: bool = False, topics: Topics | None = None,
           wait_s: float = 120.0, runtime: Any = None) -> ErasureReport:
    """Forget a user (tenant, user) or a whole tenant: the one function underneath
    ``lightmem forget`` and the memory service's delete-all route.

    Args:
        settings: Configuration (data directory, or Kafka and Elasticsearch with ``stream``).
        tenant: The tenant.
        user: The user; None erases the whole tenant.
        reason: Why (kept with the request).
        requested_by: Who asked.
        stream: The streaming deployment instead of the embedded store.
        topics: With ``stream``: the topics (default from ``settings``).
        wait_s: With ``stream``: how long to wait for the ingest workers.
        runtime: Embedded: an open :class:`~lightmem.streams.embedded.runtime.EmbeddedRuntime` (or
            anything with a ``store``) to use instead of opening ``settings.data_dir``.

    Raises:
        SchemaError: malformed tenant or user name.
        DeliveryError: ``stream``: the request could not be recorded.
    """
    request = new_request(tenant, user, reason=reason, requested_by=requested_by)
    if stream:
        return forget_stream(settings, request, topics=topics, wait_s=wait_s)
    from lightmem.streams.embedded.erasure import forget_embedded

    if runtime is None:
        from lightmem.streams.embedded.runtime import EmbeddedRuntime

        runtime = EmbeddedRuntime(settings)
    return forget_embedded(runtime.store, request,
                           dead_letter_path=settings.data_dir / "dead-letters.jsonl")


def _request_of(erased: Any) -> ErasureRequest:
    return ErasureRequest(erasure_id=erased.erasure_id, tenant=erased.tenant, user=erased.user,
                          requested_at=datetime.fromtimestamp(erased.at_ms / 1000, tz=UTC))


def _recorded(ledger: ErasureLedger, tenant: str, user: str | None) -> Any:
    """The ledger entry that erases (tenant, user) last (the tenant's or the user's)."""
    found = [e for e in ledger.entries() if e.tenant == tenant and e.user in (None, user)]
    return max(found, key=lambda e: e.at_ms) if found else None


def erasure_status(settings: Settings, tenant: str, user: str | None = None, *,
                   stream: bool = False, topics: Topics | None = None,
                   ingest_group: str | None = None, store: Any = None,
                   runtime: Any = None) -> ErasureReport | None:
    """What is left of an erasure recorded earlier (``lightmem forget --status``), changing
    nothing; None when no erasure of the scope is recorded.

    Each sink is confirmed when nothing of the scope from before the erasure is left in it
    (what was written after it is a new beginning and does not count).
    """
    if not stream:
        from lightmem.streams.embedded.erasure import embedded_status

        if runtime is None:
            from lightmem.streams.embedded.runtime import EmbeddedRuntime

            runtime = EmbeddedRuntime(settings)
        return embedded_status(runtime.store, tenant, user)
    from lightmem.streams.kafka.change_log import scan_scope
    from lightmem.streams.kafka.dlq import read_dead_letters

    topics = topics or Topics.from_settings(settings)
    ingest_group = ingest_group or settings.ingest_group
    ledger = read_ledger(settings, topics)
    erased = _recorded(ledger, tenant, user)
    if erased is None:
        return None
    if store is None:
        from lightmem.streams.elastic.store import ElasticsearchStore, es_client

        store = ElasticsearchStore(es_client(settings), alias=settings.es_alias)
    request = _request_of(erased)
    report = ErasureReport(request)
    left = _es_remaining(store, tenant, user, request.requested_at)
    outbox = _outbox(store)
    boxed = len(outbox.of_scope(tenant, user, request.requested_at))
    es = SinkReport("elasticsearch", found=left + boxed, confirmed=not left and not boxed)
    if left:
        es.pending.append(f"{left} document(s) of the scope from before the erasure")
    if boxed:
        es.pending.append(f"{boxed} pending sleep change(s) of the scope in {outbox.name}")
    held = sum(_held_slots(settings, topics, ingest_group, ledger).values())
    buffers = SinkReport("buffers", found=held, confirmed=not held)
    if held:
        buffers.pending.append(f"{held} table slot(s) of the scope not yet deleted by an "
                               f"ingest worker (group {ingest_group})")
    changes = scan_scope(settings, topics.memory_changes, tenant, user, ledger)
    legacy = scan_scope(settings, topics.memory_changes_v1, tenant, user, ledger)
    hist = _changes_sink(settings, topics, changes, legacy)
    all_letters = read_dead_letters(settings, topics, skip_erased=False)
    letters = [r for r in all_letters
               if r.letter is not None and dead_letter_erased(r.letter, ledger)
               and any(t == tenant and (user is None or u == user)
                       for t, u in dead_letter_scopes(r.letter))]
    dlq = SinkReport("dlq", found=len(letters), removed={"hidden from dlq list/replay":
                                                         len(letters)})
    _dlq_notes(dlq, settings, topics, request, len(letters), all_letters)
    turns = SinkReport("turns", pending=[
        f"raw turns in {topics.turns}: "
        f"{_retention(settings, topics.turns, request.requested_at)}; the ledger "
        f"keeps them out of every stage and replay"])
    report.sinks = [es, buffers, hist, dlq, turns]
    return report
