"""The sleep-time consumer group: replays ``lightmem.entries.v1`` while a sleep window is open.

One :class:`SleepWorker` per process (``lightmem sleep-worker``); several share the entries
topic's partitions in the consumer group ``lightmem-sleep`` (``settings.sleep_group``).
Entries are keyed ``scope_key(tenant, user)``, so one scope lives in one partition and one
worker at a time: parallel across partitions is parallel across user scopes, and inside a
worker the targets of a batch run concurrently (``settings.sleep_concurrency``, the LLM is the
bottleneck) in the order :func:`~lightmem.processors.consolidate.schedule_targets` gives.

Why one module of ~700 lines: it is one consumer's loop, and its parts (assignment and
settling the outbox, the window follower, the batch, the target pool, the commit) share that
consumer's state; what is pure lives below it (:mod:`lightmem.processors.sleep_batches`,
:mod:`lightmem.processors.consolidate`, :mod:`lightmem.processors.sleep_windows`), the outbox
in :mod:`.outbox`, the window control topic in :mod:`.windows`.

The loop::

    follow the control topic (sleep_control.ControlFollower) -> window scope now
    closed: every assigned partition paused; poll() only serves the group (blocks, no spin)
    open:   consume a batch -> per entry: the stored copy (with its vector) from ES ->
            build_queues (kNN: same scope, event time <= the entry's, top-k 20, keep 10) ->
            targets_from_queues (score >= threshold) -> one consolidation call per target ->
            apply with optimistic concurrency (conflict: re-read, decide again) ->
            MemoryChange per change to lightmem.memory-changes.v2, flushed ->
            outbox cleared -> offsets committed (synchronously)

Delivery semantics: at-least-once, made idempotent.

* Offsets are committed only after the batch's Elasticsearch writes are acknowledged and its
  change records are flushed. A kill -9 anywhere replays the uncommitted entries.
* Replayed entries are not applied twice: an update leaves the newer entries' source turns
  in the target, and :func:`~lightmem.processors.consolidate.consolidate_pending` skips
  newer entries the target already reflects; a deleted target is gone from the index.
* A change written to Elasticsearch but not yet to Kafka would be lost by such a skip, so
  every write goes through an **outbox**: before a target is replaced or deleted, the
  pending change is recorded in the index ``<alias>.sleep-outbox`` (id = memory id). After
  the batch's change records are flushed the outbox entries are removed. A worker that is
  assigned a partition first settles the outbox entries left for it: a change that reached
  the index is produced (same deterministic ``change_id``; consumers such as
  ``lightmem history`` keep one record per id), one that did not is dropped.
* Entries of tenants whose window is closed (a tenant-limited window) are not consumed past:
  the partition's commit stops at the first of them and the partition is rewound there when
  the window changes.

Closing a window mid-batch lets the targets in flight finish, commits what is complete and
pauses; the rest of the batch is replayed in the next window.

Metrics (:mod:`~lightmem.streams.observe.metrics`, served by
``lightmem sleep-worker --metrics-port``):
``lightmem_sleep_window_open`` follows the window ("*" and each tenant with a window of its
own); entries consumed (``events_in``, stage ``sleep``, replays included), changes produced
(``events_out`` to the memory-changes topic, recovered ones included), targets consolidated
(``events_applied``; ``events_skipped`` = already reflected), failed targets
(``stage_errors`` kind ``transient``: replayed) and a crash (kind ``bug``), dead letters
(stage ``sleep``, reason ``parse`` for entries, ``control`` for control commands), and the
consumer lag of the assigned partitions, sampled every ``LAG_SAMPLE_S`` by a thread of its
own. LLM calls are counted by the chat model (purpose ``consolidate``).

Erasure: the worker follows the erasure ledger (:class:`~lightmem.streams.erasure.forget.
ErasureFollower`) and drops the entries of a scope erased after their source turns were
produced (counted as ``erased``): no LLM call is ever made about them.

Exceptions: none of its own. Transient failures (LLM, Elasticsearch, Kafka) leave the batch's
incomplete entries uncommitted and back off; ``LLMConfigError`` stops the worker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from lightmem.processors.consolidate import (
    Outcome,
    TargetWork,
    consolidate_pending,
    schedule_targets,
)
from lightmem.processors.erasure import ErasureLedger
from lightmem.processors.llm import LLMConfigError, LLMError, LLMPermanentError
from lightmem.processors.sleep_batches import commit_plan, incomplete_offsets
from lightmem.processors.sleep_windows import WindowScope
from lightmem.processors.store import VersionConflict
from lightmem.processors.update import (
    Consolidator,
    UpdateQueueBuilder,
    build_queues,
    targets_from_queues,
)
from lightmem.schemas import (
    ChangeOp,
    DeadLetter,
    MemoryChange,
    MemoryEntry,
    SchemaError,
    Stage,
    utc_now,
)
from lightmem.settings import Settings
from lightmem.streams.ingest.stages import ORIGIN_HEADER
from lightmem.streams.kafka.change_log import ChangeRouter, produce_change
from lightmem.streams.kafka.producer import RecordProducer
from lightmem.streams.kafka.topics import Topics, kafka_config
from lightmem.streams.models.components import Components
from lightmem.streams.observe import metrics
from lightmem.streams.sleep.ingest_priority import IngestBacklogMonitor
from lightmem.streams.sleep.outbox import Outbox, OutboxStore, outbox_index, settle
from lightmem.streams.sleep.windows import ControlFollower

__all__ = ["SleepWorker", "BatchReport", "WorkerStats"]

log = logging.getLogger(__name__)

STAGE = Stage.SLEEP
#: Seconds between two samples of the ``lightmem_consumer_lag`` gauge (when metrics are on).
LAG_SAMPLE_S = 5.0



class _MeteredFollower(ControlFollower):
    """A :class:`ControlFollower` that counts the control commands it dead-letters."""

    def _dead_letter(self, msg: Any, exc: Exception) -> None:
        # Below the bookmark a record was dead-lettered before (by this or another worker):
        # the parent skips it, so must the count.
        fresh = msg.offset() >= self._bookmark()
        super()._dead_letter(msg, exc)
        if fresh:
            metrics.DEAD_LETTERS.labels(STAGE, "control").inc()


# --------------------------------------------------------------------------- reports


@dataclass
class BatchReport:
    """What one batch did."""

    entries: int = 0
    held: int = 0
    #: Entries the index sink had not read yet: not processed, read again after a pause.
    unindexed: int = 0
    missing: int = 0
    dead_letters: int = 0
    #: Entries of erased scopes produced before the erasure: dropped.
    erased: int = 0
    targets: int = 0
    done: int = 0
    updated: int = 0
    deleted: int = 0
    ignored: int = 0
    reflected: int = 0
    failed: int = 0
    interrupted: bool = False
    committed: dict[int, int] = field(default_factory=dict)


@dataclass
class WorkerStats:
    """Totals since the worker started (read by the bench and the logs)."""

    batches: int = 0
    entries: int = 0
    targets: int = 0
    changes: int = 0
    updated: int = 0
    deleted: int = 0
    reflected: int = 0
    failed: int = 0
    recovered: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, r: BatchReport) -> None:
        with self.lock:
            self.batches += 1
            self.entries += r.entries
            self.targets += r.done
            self.updated += r.updated
            self.deleted += r.deleted
            self.changes += r.updated + r.deleted
            self.reflected += r.reflected
            self.failed += r.failed


@dataclass(frozen=True)
class _Record:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    #: Kafka timestamp (ms) of the entry's earliest source turn (the erasure ledger's time).
    origin_ms: int | None = None


# --------------------------------------------------------------------------- worker


class SleepWorker:
    """One member of the sleep-time consumer group.

    Args:
        settings: Kafka/ES connection, ``sleep_*`` and ``update_*`` settings.
        topics: Topic names (default: the deployment's).
        components: Processors (embedder, chat model); default built from ``settings``.
        store: The Elasticsearch store (default: ``settings.es_alias``).
        clock: Source of "now" (window evaluation, change times).
        name: For the logs.
    """

    def __init__(self, settings: Settings, *, topics: Topics | None = None,
                 components: Components | None = None, store: Any = None,
                 clock: Callable[[], datetime] = utc_now, name: str = "sleep") -> None:
        self.settings = settings
        self.topics = topics or Topics.from_settings(settings)
        self.components = components or Components(settings)
        self.clock = clock
        self.name = name
        if store is None:
            from lightmem.streams.elastic.store import ElasticsearchStore, es_client

            store = ElasticsearchStore(es_client(settings), alias=settings.es_alias)
        self.store = store
        self.outbox = Outbox(store.client, outbox_index(settings.es_alias))
        self.stats = WorkerStats()
        self.scope = WindowScope(False)
        self.stop_event = threading.Event()
        self._assigned: set[int] = set()
        self._held: dict[int, int] = {}
        self._consumer: Any = None
        self._follower: ControlFollower | None = None
        self._producer: RecordProducer | None = None
        #: Each change to its scope's partition of the changes topic.
        self._changes = ChangeRouter(settings)
        self._pool: ThreadPoolExecutor | None = None
        self._next_sample = 0.0
        self._settle_partitions: list[int] = []
        #: Tenants with a window gauge series of their own (set back when they lose it).
        self._gauged: set[str] = set()
        self._lag_thread: threading.Thread | None = None
        #: Ingest first (``sleep_yield_lag``): no new targets while ingest has a backlog.
        self.ingest = IngestBacklogMonitor(settings, self.topics, name=name)
        #: Partitions are consuming: a window is open and ingest has no backlog.
        self._active = False
        #: The erasure ledger (followed from the erasures topic in run()).
        self.erasures = ErasureLedger()
        self._erasure_follower: Any = None

    # -- processors

    def _consolidator(self) -> Consolidator:
        chat = self.components.chat
        if chat is None:
            raise LLMConfigError("the sleep worker needs an LLM endpoint (LIGHTMEM_LLM_BASE_URL)")
        return Consolidator(chat, threshold=self.settings.update_threshold)

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.components.embedder(texts)

    # -- lifecycle

    def stop(self) -> None:
        """Ask the loop to stop after the targets in flight (thread- and signal-safe)."""
        self.stop_event.set()

    def run(self, *, ready: Callable[[], None] = lambda: None) -> None:
        """Consume until :meth:`stop`; always commits what is complete and closes.

        Args:
            ready: Called once the worker joined the group and read the control topic.

        Raises:
            LLMConfigError: the endpoint rejects us (bad key, model, URL).
            LookupError: a topic is missing.
        """
        from confluent_kafka import Consumer

        consolidator = self._consolidator()
        self.outbox.ensure()
        # Load the encoder before joining the group: the first batch must not stall for it.
        _ = self.components.embedder
        self._follower = _MeteredFollower(self.settings, self.topics, clock=self.clock)
        self._follower.start()
        from lightmem.streams.erasure.forget import ErasureFollower

        self._erasure_follower = ErasureFollower(self.settings, self.topics,
                                                 ledger=self.erasures)
        self._erasure_follower.start()
        self._producer = RecordProducer(self.settings, self.topics)
        self._consumer = Consumer(kafka_config(self.settings, **{
            "group.id": self.settings.sleep_group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            # A batch (its LLM calls) must fit in here, or the group evicts the worker.
            "max.poll.interval.ms": 600_000,
            "partition.assignment.strategy": "roundrobin",
        }))
        self._pool = ThreadPoolExecutor(self.settings.sleep_concurrency,
                                        thread_name_prefix=f"{self.name}-target")
        try:
            # Read the control topic up to now before consuming anything.
            while not self._follower.at_end and not self.stop_event.is_set():
                self._follower.poll(0.5)
            self.scope = self._current_scope()
            self._publish_window(self.scope)
            log.info("%s: window %s", self.name, self.scope.describe())
            if self.ingest.enabled:
                log.info("%s: ingest first: no new target while group %r has more than %d "
                         "records waiting", self.name, self.settings.ingest_group,
                         self.settings.sleep_yield_lag)
            self.ingest.start()
            # The first sample tells which entries are indexed: nothing is processed before.
            self.ingest.sampled.wait(30)
            self._active = self.scope.anything and not self.ingest.yielding
            if self.settings.metrics_port:
                self._lag_thread = threading.Thread(target=self._sample_lag, daemon=True,
                                                    name=f"{self.name}-lag")
                self._lag_thread.start()
            self._consumer.subscribe([self.topics.entries], on_assign=self._on_assign,
                                     on_revoke=self._on_revoke, on_lost=self._on_revoke)
            ready_called = False
            while not self.stop_event.is_set():
                self._follow_control()
                self._erasure_follower.poll(0)
                msgs = self._consumer.consume(self.settings.sleep_batch_entries,
                                              timeout=self.settings.sleep_poll_s)
                if self._settle_partitions:
                    self._settle(self._settle_partitions)
                    self._settle_partitions = []
                if not ready_called and self._assigned:
                    ready_called = True
                    ready()
                records = self._records(msgs)
                if not records:
                    continue
                if not self._active:
                    # Fetched just before a pause: not processed, so read them again later.
                    self._rewind(records)
                    continue
                report = self._process(records, consolidator)
                self.stats.add(report)
                if report.failed:
                    self.stop_event.wait(2.0)  # back off before the replay of the failures
                elif report.unindexed:
                    self.stop_event.wait(1.0)  # the index sink's next commit, roughly
        except Exception:
            metrics.record_stage_error(STAGE, "bug")  # the worker stops: alert on it
            raise
        finally:
            self.stop_event.set()  # ends the lag sampler too
            self._shutdown()

    def _shutdown(self) -> None:
        self.ingest.stop()
        if self._erasure_follower is not None:
            self._erasure_follower.close()
        if self._lag_thread is not None:
            self._lag_thread.join(timeout=30)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        try:
            if self._producer is not None:
                self._producer.flush()
        finally:
            if self._consumer is not None:
                self._consumer.close()  # leaves the group at once: partitions move now
            if self._follower is not None:
                self._follower.close()

    # -- group membership

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        consumer.assign(partitions)
        self._assigned = {p.partition for p in partitions}
        self._held = {}
        if not self._active:
            consumer.pause(partitions)
        # Settle outbox entries of dead workers before this worker writes anything here
        # (done from the loop: producing inside a rebalance callback would be re-entrant).
        self._settle_partitions = sorted(self._assigned)
        log.info("%s: assigned %s (window %s)", self.name, sorted(self._assigned),
                 self.scope.describe())

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        # Nothing is in flight here: batches finish (and commit) between polls.
        self._assigned = set()
        self._held = {}

    def _settle(self, partitions: Sequence[int]) -> None:
        pending = self.outbox.pending(self.topics.entries, partitions)
        if not pending:
            return
        applied = settle(self.store, pending, self.erasures)
        assert self._producer is not None
        for change in applied:
            produce_change(self._producer, self.topics.memory_changes, change, self._changes)
        self._producer.flush()
        self.outbox.remove([c.memory_id for c in pending])
        self.stats.recovered += len(applied)
        metrics.record_events_out(STAGE, self.topics.memory_changes, len(applied))
        log.warning("%s: settled %d pending change(s) of a previous worker (%d had reached "
                    "the index and were produced)", self.name, len(pending), len(applied))

    # -- windows

    def _current_scope(self) -> WindowScope:
        assert self._follower is not None
        now = self.clock()
        auto = self._follower.state.auto
        if auto is not None and time.monotonic() >= self._next_sample:
            self._next_sample = time.monotonic() + self.settings.sleep_auto_sample_s
            try:
                auto.observe(now, self._follower.turns_end_offset())
            except Exception as exc:  # noqa: BLE001 - a failed sample keeps the last state
                log.warning("%s: could not sample the turns topic: %s", self.name, exc)
        return self._follower.state.scope(now)

    def _follow_control(self) -> bool:
        """Apply new control records and the ingest-first rule; pause/resume the partitions
        when that changes whether work may start. True when it may."""
        assert self._follower is not None
        self._follower.poll(0)
        scope = self._current_scope()
        changed = scope != self.scope
        if changed:
            before, self.scope = self.scope, scope
            self._publish_window(scope)
            log.info("%s: window %s -> %s", self.name, before.describe(), scope.describe())
        active = scope.anything and not self.ingest.yielding
        metrics.set_sleep_yielding(scope.anything and self.ingest.yielding)
        if active != self._active:
            self._active = active
            parts = self._partitions(sorted(self._assigned))
            if parts:
                if active:
                    self._rewind_held()
                    self._consumer.resume(parts)
                else:
                    self._consumer.pause(parts)
        elif active and changed:
            # Still consuming, under another scope (a tenant-limited window widened): the
            # entries held back for the tenants not open before are read again.
            self._rewind_held()
        return active

    def _publish_window(self, scope: WindowScope) -> None:
        """Set the window gauges: "*" for every tenant, plus each tenant that differs."""
        metrics.set_sleep_window(None, scope.default)
        for tenant in scope.exceptions | self._gauged:
            metrics.set_sleep_window(tenant, scope.allows(tenant))
        self._gauged |= scope.exceptions

    # -- consumer lag (metrics)

    def _sample_lag(self) -> None:
        """Thread: every ``LAG_SAMPLE_S``, the group's lag on the partitions assigned here.

        Its own Kafka clients, so a slow broker answer never holds up the consumer loop.
        """
        from lightmem.streams.kafka.lag import LagReader

        reader: LagReader | None = None
        try:
            while not self.stop_event.is_set():
                try:
                    if reader is None:
                        reader = LagReader(self.settings, self.settings.sleep_group,
                                           timeout_s=LAG_SAMPLE_S)
                    mine = set(self._assigned)  # replaced, never mutated: a safe snapshot
                    metrics.set_consumer_lag({(p.topic, p.partition): p.lag
                                              for p in reader.read([self.topics.entries])
                                              if p.partition in mine})
                except Exception as exc:  # noqa: BLE001 - a lost sample; the next one retries
                    log.debug("%s: lag not readable: %r", self.name, exc)
                self.stop_event.wait(LAG_SAMPLE_S)
        finally:
            if reader is not None:
                reader.close()

    def _partitions(self, numbers: Sequence[int], offsets: dict[int, int] | None = None
                    ) -> list[Any]:
        from confluent_kafka import TopicPartition

        topic = self.topics.entries
        if offsets is None:
            return [TopicPartition(topic, p) for p in numbers]
        return [TopicPartition(topic, p, offsets[p]) for p in numbers]

    def _seek(self, offsets: dict[int, int]) -> None:
        for tp in self._partitions(sorted(offsets), offsets):
            if tp.partition in self._assigned:
                self._consumer.seek(tp)

    def _rewind(self, records: Sequence[_Record]) -> None:
        first: dict[int, int] = {}
        for r in records:
            first[r.partition] = min(first.get(r.partition, r.offset), r.offset)
        self._seek(first)

    def _rewind_held(self) -> None:
        """A tenant-limited window left entries unconsumed: read them again now."""
        if self._held:
            self._seek(dict(self._held))
            self._held = {}

    # -- one batch

    def _records(self, msgs: Sequence[Any]) -> list[_Record]:
        from confluent_kafka import KafkaException

        out = []
        for msg in msgs or ():
            err = msg.error()
            if err is not None:
                if err.fatal():
                    raise KafkaException(err)
                log.warning("%s: consumer error: %s", self.name, err.str())
                continue
            ts_type, ts = msg.timestamp()
            origin = ts if ts_type != 0 and ts >= 0 else None
            for name, value in msg.headers() or []:
                if name == ORIGIN_HEADER and value:
                    try:
                        origin = int(value)
                    except ValueError:
                        pass
            out.append(_Record(msg.partition(), msg.offset(), msg.key(), msg.value(), origin))
        return out

    def _process(self, records: Sequence[_Record], consolidator: Consolidator) -> BatchReport:
        """Consolidate one batch, produce its changes, commit what is complete."""
        report = BatchReport(entries=len(records))
        started = time.perf_counter()
        scope = self.scope
        now = self.clock()
        by_partition: dict[int, list[_Record]] = defaultdict(list)
        for r in records:
            by_partition[r.partition].append(r)
        # entry id -> offsets that carry it (a redelivered duplicate may appear twice).
        offsets_of: dict[str, list[tuple[int, int]]] = defaultdict(list)
        held: dict[int, int] = {}
        incomplete: dict[int, set[int]] = defaultdict(set)
        parsed: list[tuple[_Record, MemoryEntry]] = []
        indexed_before = dict(self.ingest.indexed_before)
        assert self._producer is not None
        for p, recs in by_partition.items():
            for r in sorted(recs, key=lambda r: r.offset):
                if r.offset >= indexed_before.get(p, r.offset + 1):
                    # Maybe not in the index yet: its absence would read as a delete.
                    incomplete[p].add(r.offset)
                    report.unindexed += 1
                    continue
                try:
                    entry = MemoryEntry.parse(r.value or b"")
                except SchemaError as exc:
                    self._dead_letter(r, exc)
                    report.dead_letters += 1
                    continue
                if self.erasures.drops(entry.tenant, entry.user, r.origin_ms):
                    report.erased += 1  # consumed: never consolidated, never asked about
                    continue
                if not self.scope.allows(entry.tenant):
                    held.setdefault(p, r.offset)
                    report.held += 1
                    continue
                parsed.append((r, entry))
                offsets_of[entry.id].append((p, r.offset))
        # The stored copies carry the vectors the index sink wrote: the queue's kNN uses
        # exactly the vector the entry is indexed with (it finds itself at score 1).
        stored = {e.id: e for e in self.store.get(list(offsets_of), with_embedding=True)}
        report.missing = len(offsets_of) - len(stored)
        if report.missing:
            log.info("%s: %d entr(y/ies) not in the index (deleted, or not indexed yet)",
                     self.name, report.missing)
        entries = list(stored.values())
        builder = UpdateQueueBuilder(self.settings.update_top_k, self.settings.update_keep)
        queues = build_queues(self.store, builder, entries, self._embed)
        listed = {t for q in queues for t, s in q.items if s >= self.settings.update_threshold}
        by_id = {e.id: e for e in self.store.get(sorted(listed - set(stored)))}
        by_id.update(stored)
        targets = targets_from_queues(queues, by_id, self.settings.update_threshold)
        work = schedule_targets(targets)
        report.targets = len(work)
        # The offsets each target's outcome is waited for by (its newer entries').
        waits: dict[str, set[tuple[int, int]]] = defaultdict(set)
        for w in work:
            for n in w.newer_ids:
                waits[w.target_id].update(offsets_of.get(n, ()))
        changes, done = self._run_targets(work, consolidator, offsets_of, now, report)
        # Failed targets, or not started before the window closed: their entries again.
        for p, offsets in incomplete_offsets(waits, done).items():
            incomplete[p].update(offsets)
        # Durable before the commit: the change records, then the outbox is cleared.
        for change in changes:
            produce_change(self._producer, self.topics.memory_changes, change, self._changes)
        self._producer.flush()
        self.outbox.remove([c.memory_id for c in changes])
        self._commit(by_partition, held, incomplete, report)
        if self._active and self.scope != scope:
            # The window widened while this batch ran: _follow_control rewound the entries
            # held before it, but not the ones this batch has just held.
            self._rewind_held()
        # Held entries are not consumed (read again when their window opens).
        metrics.record_events_in(STAGE, self.topics.entries,
                                 report.entries - report.held - report.unindexed)
        metrics.record_step(STAGE, seconds=time.perf_counter() - started,
                            applied=report.done - report.reflected, skipped=report.reflected,
                            out_topics=[self.topics.memory_changes] * len(changes),
                            dead_letter_reasons={"parse": report.dead_letters})
        log.info("%s: batch of %d entries: %d targets, %d updated, %d deleted, %d ignored, "
                 "%d already reflected, %d failed, %d not indexed yet%s; committed %s",
                 self.name, report.entries, report.targets, report.updated, report.deleted,
                 report.ignored, report.reflected, report.failed, report.unindexed,
                 " (stopped mid-batch)" if report.interrupted else "", report.committed)
        return report

    def _run_targets(self, work: Sequence[TargetWork], consolidator: Consolidator,
                     offsets_of: dict[str, list[tuple[int, int]]], now: datetime,
                     report: BatchReport) -> tuple[list[MemoryChange], set[str]]:
        """Run the targets, at most ``sleep_concurrency`` at once, in schedule order; stop
        starting new ones when the window closes or the worker stops.

        Returns:
            The changes written and the ids of the targets done (the others failed or were
            not started: their entries are replayed).
        """
        assert self._pool is not None
        remaining = {w.target_id: w for w in work}
        done: set[str] = set()
        changes: list[MemoryChange] = []
        running: dict[Future[Outcome], str] = {}
        while remaining or running:
            stopping = self.stop_event.is_set() or not self._follow_control()
            if stopping and not report.interrupted and remaining:
                report.interrupted = True
                why = ("yielding to ingest" if self.scope.anything and self.ingest.yielding
                       else "window closed")
                log.info("%s: %s: finishing %d target(s) in flight, %d left for later",
                         self.name, why, len(running), len(remaining))
            if not stopping:
                for tid, w in list(remaining.items()):
                    if len(running) >= self.settings.sleep_concurrency:
                        break
                    if w.after <= done:
                        del remaining[tid]
                        running[self._submit(w, consolidator, offsets_of, now)] = tid
            if not running:
                # Stopping, finished, or only targets waiting on a failed one (replayed).
                break
            finished, _ = wait(list(running), timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in finished:
                tid = running.pop(fut)
                try:
                    outcome = fut.result()
                except LLMConfigError:
                    raise
                except (LLMError, VersionConflict) as exc:
                    # Transient, or the endpoint refuses this prompt: the target is not done,
                    # its entries stay uncommitted and are replayed after a back-off.
                    level = logging.ERROR if isinstance(exc, LLMPermanentError) else \
                        logging.WARNING
                    log.log(level, "%s: target %s failed: %s: %s", self.name, tid,
                            type(exc).__name__, exc)
                    report.failed += 1
                    metrics.record_stage_error(STAGE, "transient")
                    continue
                done.add(tid)
                report.done += 1
                if outcome.change is not None:
                    changes.append(outcome.change)
                    if outcome.change.op is ChangeOp.update:
                        report.updated += 1
                    else:
                        report.deleted += 1
                elif outcome.skipped == "reflected":
                    report.reflected += 1
                else:
                    report.ignored += 1
        return changes, done

    def _submit(self, w: TargetWork, consolidator: Consolidator,
                offsets_of: dict[str, list[tuple[int, int]]], now: datetime
                ) -> Future[Outcome]:
        assert self._pool is not None
        # Outbox entries are settled per partition: the one of the target's scope, which
        # is where its newer entries came from.
        locs = [loc for n in w.newer_ids for loc in offsets_of.get(n, ())]
        store = OutboxStore(self.store, self.outbox, topic=self.topics.entries,
                            partition=locs[0][0] if locs else -1, caused_by=w.newer_ids,
                            now=now)
        return self._pool.submit(consolidate_pending, store, consolidator, self._embed,
                                 w.target_id, list(w.newer_ids), now)

    def _commit(self, by_partition: dict[int, list[_Record]], held: dict[int, int],
                incomplete: dict[int, set[int]], report: BatchReport) -> None:
        """Commit, per partition, up to the first offset that is held or incomplete; rewind
        the partition there so that the rest is read again (:func:`commit_plan`)."""
        # A partition revoked meanwhile is left alone: its new owner replays from the last
        # commit.
        ends = {p: max(r.offset for r in recs) + 1 for p, recs in by_partition.items()
                if p in self._assigned}
        plan = commit_plan(ends, held, self._held, incomplete)
        self._held = plan.held
        if plan.commit:
            self._consumer.commit(offsets=self._partitions(sorted(plan.commit), plan.commit),
                                  asynchronous=False)
        if plan.rewind:
            self._seek(plan.rewind)
        report.committed = plan.commit

    def _dead_letter(self, r: _Record, exc: Exception) -> None:
        assert self._producer is not None
        letter = DeadLetter.from_raw(r.value or b"", step=STAGE, error=exc,
                                     source=self.topics.entries, partition=r.partition,
                                     offset=r.offset, at=self.clock())
        self._producer.dead_letter(letter, key=r.key)

