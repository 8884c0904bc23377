"""Erasure on the streaming deployment: the ledger topic, the slot sweep, every sink's erase.

This module is the flow (:func:`forget`, :func:`forget_stream`, :func:`erasure_status`) and
re-exports its parts: the request, report and ledger topic in :mod:`.ledger`, what the
ingest workers sweep themselves in :mod:`.sweeps`, the Elasticsearch side in :mod:`.es_sink`.

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

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from lightmem.processors.erasure import ErasureLedger
from lightmem.schemas import (
    ErasureRequest,
    utc_now,
)
from lightmem.settings import Settings
from lightmem.streams.erasure.es_sink import (
    delete_documents,
    erase_elasticsearch,
    es_remaining,
    es_users,
    sleep_outbox,
)
from lightmem.streams.erasure.ledger import (
    ErasureFollower,
    ErasureReport,
    SinkReport,
    erase_change,
    new_request,
    read_ledger,
)
from lightmem.streams.erasure.sweeps import (
    dead_letter_erased,
    dead_letter_scopes,
    held_slots,
    sweep_slot,
)
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
    users = {user} if user is not None else es_users(store, tenant)
    erased_at = request.requested_at
    deleted = erase_elasticsearch(store, tenant, user, erased_at)
    outbox = sleep_outbox(store)
    boxed = outbox.erase(tenant, user, erased_at)

    # 3. the workers' buffers and the group's progress
    held = held_slots(settings, topics, ingest_group, ledger)
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
            held = held_slots(settings, topics, ingest_group, ledger)
            if (behind == 0 and not any(held.values())) or time.monotonic() > deadline:
                break
            time.sleep(1.0)  # polling interval: the workers sweep between batches
    # 4. Elasticsearch, second pass (a batch in flight at step 1 may have written since)
    again = erase_elasticsearch(store, tenant, user, erased_at)
    boxed += outbox.erase(tenant, user, erased_at)
    remaining = es_remaining(store, tenant, user, erased_at)
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
    left = es_remaining(store, tenant, user, request.requested_at)
    outbox = sleep_outbox(store)
    boxed = len(outbox.of_scope(tenant, user, request.requested_at))
    es = SinkReport("elasticsearch", found=left + boxed, confirmed=not left and not boxed)
    if left:
        es.pending.append(f"{left} document(s) of the scope from before the erasure")
    if boxed:
        es.pending.append(f"{boxed} pending sleep change(s) of the scope in {outbox.name}")
    held = sum(held_slots(settings, topics, ingest_group, ledger).values())
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
