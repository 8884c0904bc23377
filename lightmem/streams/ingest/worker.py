"""The ingest worker: the three stages on one consumer, one Kafka transaction per batch.

::

    turns ──▶ sensory ──▶ segments ──▶ short-term ──▶ entries ──▶ index sink
              (table sensory)           (table topic-buffers)      (Elasticsearch)
                    │                          │                         │
                    └─────── dead letters ─────┴─────────────────────────┴──▶ dlq
                                                       memory changes ◀──┘

Delivery chain (consume-transform-produce, exactly once on Kafka): the worker polls a batch
from the turns, segments and entries topics, runs each stage's step
(:mod:`lightmem.streams.ingest.stages`) on its records, then in ONE transaction produces the steps'
output (segments, entries, memory changes, dead letters), the new table slots (changelog
records, :mod:`.state`) and the batch's input offsets (``send_offsets_to_transaction`` with
the consumer's group metadata, so a worker that lost its partitions is fenced). The offsets
of a record are therefore never committed before its effects are durable, and its effects
are never visible (``read_committed``) without its offsets. A worker killed at any point
leaves either the whole batch or nothing; the next owner re-reads from the committed offset
with the state that belongs to it. The only effect outside Kafka, the Elasticsearch write,
is idempotent (deterministic ids, first write wins) and its ``add`` change is produced with
the offsets, so a redelivered entry gets the ``add`` its aborted first attempt lost.

Why one module of ~950 lines: the batch loop, its transaction, the held-batch retry and the
rebalance callbacks all keep the invariant above; split apart, no file would show it. The
tables' changelogs live in :mod:`.state`, the stage steps in :mod:`.stages`.

This replaced a faust 0.15 worker: faust acknowledged offsets it had never delivered to an
agent (dropped fetches after a restart became "gaps" that count as acked), so a rolling
restart lost turns; its offset bookkeeping cannot be made sound from outside.

Failures: a transient error (LLM, Elasticsearch, Kafka unavailable) aborts nothing durable;
the batch is held (its finished steps are not re-run: no second LLM call), the consumer is
paused but keeps serving the group, and the batch is retried with backoff. A rebalance while
a batch is held drops it: the new owner reads it again from the committed offset. A bug in a
stage stops the worker (exit 70) without committing; a fatal Kafka error (this worker was
fenced, or the idempotent producer failed) stops it with exit 75 so that a supervisor
restarts it.

Erasure: the worker reads the erasures topic to its end before it joins the group and keeps
following it between batches (:class:`~lightmem.streams.erasure.forget.ErasureFollower`); the stage
steps share its ledger and drop the records of a scope produced before the scope's erasure.
When the ledger changes, and when partitions are assigned, the table slots of the erased
scopes are deleted (tombstones on the changelog) or rewritten without their turns, in a
transaction of their own between batches (:meth:`IngestWorker.sweep`).

Flushes: a new session cuts the sensory buffer (in the processors); an idle conversation (no
new turn for ``idle_timeout_s``, by event time against the newest event seen, or by wall
clock since its last turn arrived) and ``lightmem flush`` both put an in-band flush command
on the turns topic, which the sensory stage applies in order. Backfills replay them where
they happened live.
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from lightmem.processors.erasure import ErasureLedger
from lightmem.schemas import utc_now
from lightmem.settings import Settings
from lightmem.streams.ingest.stages import (
    Inbound,
    IndexSink,
    Outbound,
    SensorySlot,
    SensoryStage,
    ShortTermStage,
    StepResult,
    is_transient,
)
from lightmem.streams.kafka.change_log import ChangeRouter
from lightmem.streams.kafka.flush_commands import FlushCommand, flush_headers
from lightmem.streams.kafka.producer import produce_when_room
from lightmem.streams.kafka.topics import Topics, dead_letter_max_bytes, kafka_config
from lightmem.streams.models.components import Components
from lightmem.streams.observe.logs import configure_logging, quiet_progress_bars, secrets_of

from ..observe import metrics
from .state import ChangelogTable, changelog_topic

__all__ = ["WorkerOptions", "IngestWorker", "run_worker", "EXIT_BUG", "EXIT_KAFKA_FATAL",
           "DeploymentConflictError"]

log = logging.getLogger("lightmem.streams.ingest")

#: Exit status when a stage hits a bug (not a bad input, not a transient failure).
EXIT_BUG = 70
#: Exit status after a fatal Kafka client error (fenced by a newer owner, idempotence lost):
#: restart the worker (EX_TEMPFAIL).
EXIT_KAFKA_FATAL = 75
#: Seconds one poll waits for a batch to fill up.
BATCH_WITHIN_S = 0.5
#: The consumer group notices a dead worker after this long.
SESSION_TIMEOUT_S = 10.0
#: Seconds between progress lines in the worker log.
PROGRESS_LOG_S = 10.0
#: Transient-failure backoff: first delay and cap (seconds).
BACKOFF_S = (0.5, 30.0)
#: Seconds between consumer-lag samples for the ``lightmem_consumer_lag`` gauge.
LAG_SAMPLE_S = 5.0
#: An open transaction of a killed worker blocks ``read_committed`` readers (the next
#: stage, a recovering owner) until the coordinator aborts it: keep that short. A batch's
#: transaction only produces and commits (the steps run before it), so seconds are plenty.
TRANSACTION_TIMEOUT_MS = 10_000
#: Tables: name -> the stage that owns it.
TABLES = ("sensory", "topic-buffers")



@dataclass(frozen=True)
class WorkerOptions:
    """What one pipeline run reads, writes and is called.

    Args:
        ingest_group: Consumer group id, prefix of the transactional id and part of the changelog
            topic names.
        topics: Topic names.
        index: Write this concrete Elasticsearch index instead of ``settings.es_alias``
            (a backfill into a new index).
        stop_offsets: Backfill only: turns partition -> end offset (exclusive). Turns at or
            past it are skipped; reaching it flushes every conversation of the partition.
        idle_timer: Run the idle-flush timer (off for a backfill: the live run's flushes are
            in the turns topic already).
        batch_size: Records per poll (default: ``settings.ingest_batch_turns``).
        instance: This worker's stable name within the group (``transactional.id`` =
            ``<ingest group>-<instance>``). A restarted worker with the same instance aborts its
            predecessor's open transaction at once; without one (a random name per
            process) that transaction blocks the next readers until it times out
            (``TRANSACTION_TIMEOUT_MS``). Two live workers must never share an instance.
    """

    ingest_group: str
    topics: Topics
    index: str | None = None
    stop_offsets: Mapping[int, int] | None = None
    idle_timer: bool = True
    batch_size: int | None = None
    instance: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> WorkerOptions:
        values: dict[str, Any] = {"ingest_group": settings.ingest_group,
                                  "topics": Topics.from_settings(settings)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass
class _Counters:
    batches: int = 0
    applied: int = 0
    skipped: int = 0
    erased: int = 0
    dead_letters: int = 0
    retries: int = 0
    stream_time: datetime | None = None
    idle_requested: set[bytes] = field(default_factory=set)
    replay_flushed: set[int] = field(default_factory=set)


class DeploymentConflictError(RuntimeError):
    """The consumer group already belongs to another deployment's topics."""


class _Fatal(Exception):
    """A fatal Kafka client error: the worker must restart."""


class _Dropped(Exception):
    """The held batch belongs to partitions this worker no longer owns."""


class IngestWorker:
    """One ingest worker process: consumer, transactional producer, tables, stages.

    Args:
        settings: Configuration.
        options: Names and run mode (see :class:`WorkerOptions`).
        components: The processors (default: built lazily from ``settings``).
        store: The memory store the index sink writes (default: Elasticsearch from
            ``settings``, ``options.index`` or the alias).
        clock: Time of ingest, dead letters and wall-clock idleness.
    """

    def __init__(
        self,
        settings: Settings,
        options: WorkerOptions,
        *,
        components: Components | None = None,
        store: Any = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.settings = settings
        self.options = options
        self.topics = options.topics
        self.components = components or Components(settings)
        self._store = store
        self.clock = clock
        self.instance = options.instance or uuid.uuid4().hex[:12]
        self.counters: dict[str, _Counters] = {
            n: _Counters() for n in ("sensory", "short-term", "index")}
        self.tables = {name: ChangelogTable(name, changelog_topic(self.topics, options.ingest_group,
                                                                   name))
                       for name in TABLES}
        self.sensory = SensoryStage(settings, self.components, self.topics, clock=clock)
        self.short_term = ShortTermStage(settings, self.components, self.topics, clock=clock)
        #: The erasure ledger, shared by the stage steps (filled by the follower in run()).
        self.erasures = ErasureLedger()
        self.sensory.erasures = self.short_term.erasures = self.erasures
        self._erasure_follower: Any = None
        #: Ledger version the tables were last swept for; partitions recovered since.
        self._swept_version = 0
        self._sweep_due: dict[str, set[int]] = {}
        self._sink: IndexSink | None = None
        #: Erased scopes whose events this worker deleted: (tenant, user) -> erased at ms.
        self._events_erased: dict[tuple[str, str | None], int] = {}
        self.stop_event = threading.Event()
        self._consumer: Any = None
        self._producer: Any = None
        #: Bumped on every revoke/loss: a batch consumed under an older one is dropped.
        self._generation = 0
        self._assigned: set[tuple[str, int]] = set()
        #: Offsets this worker committed, and end offsets the consumer reached (EOF events).
        self._committed: dict[tuple[str, int], int] = {}
        self._eofs: dict[tuple[str, int], int] = {}
        self._ready = False
        #: stage -> (what it is doing, since when): for diagnosing a stuck worker.
        self.where: dict[str, tuple[str, float]] = {}
        self._logged: dict[str, tuple[int, ...]] = {n: (0,) * 5 for n in self.counters}
        self._lag_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightmem-lag")
        self._lag_reader: Any = None
        self._lag_pending: Any = None

    # -- construction

    @property
    def store(self) -> Any:
        if self._store is None:
            from lightmem.streams.elastic.store import ElasticsearchStore, es_client

            self._store = ElasticsearchStore(es_client(self.settings), alias=self.settings.es_alias,
                                             index=self.options.index)
        return self._store

    @property
    def sink(self) -> IndexSink:
        if self._sink is None:
            self._sink = IndexSink(self.settings, self.components, self.topics, self.store,
                                   clock=self.clock)
            self._sink.erasures = self.erasures
            self._sink.change_router = ChangeRouter(self.settings)
        return self._sink

    def enable_events(self) -> None:
        """Write provisional events (turns searchable before their memories) to the
        deployment's events index (created when missing): the live worker does, a backfill
        into another index does not (its turns were searchable long ago)."""
        from lightmem.streams.elastic.events import EventIndex

        events = EventIndex(self.store.client, self.settings.es_alias)
        events.ensure()
        self.sensory.events = self.short_term.events = self.sink.events = events

    @property
    def transactional_id(self) -> str:
        return f"{self.options.ingest_group}-{self.instance}"

    def _stage_of(self, topic: str) -> str:
        return {self.topics.turns: "sensory", self.topics.segments: "short-term",
                self.topics.entries: "index"}[topic]

    def prepare(self) -> None:
        """Check the deployment and create the changelog topics (before joining the group).

        Raises:
            DeploymentConflictError: the group holds offsets of another deployment's topics.
            TopicAdminError: a changelog topic could not be created.
        """
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient(kafka_config(self.settings))
        self._check_group(admin)
        n = self.settings.kafka_partitions
        new = [NewTopic(t.topic, num_partitions=n,
                        replication_factor=self.settings.kafka_replication_factor,
                        config={"cleanup.policy": "compact"}) for t in self.tables.values()]
        from confluent_kafka import KafkaError, KafkaException

        from lightmem.streams.kafka.topics import TopicAdminError, _wait_for_leaders

        failures = {}
        for name, future in admin.create_topics(new, request_timeout=30).items():
            try:
                future.result(timeout=35)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    failures[name] = exc.args[0].str()
        if failures:
            raise TopicAdminError("create", failures)
        names = [t.topic for t in self.tables.values()]
        _wait_for_leaders(admin, names, 30.0)
        metadata = admin.list_topics(timeout=30)
        for table in self.tables.values():
            have = len(metadata.topics[table.topic].partitions)
            if have != n:
                raise TopicAdminError("use", {table.topic: f"has {have} partitions, the "
                                              f"deployment has {n} (kafka_partitions)"})

    def _check_group(self, admin: Any) -> None:
        """Refuse a consumer group that already consumes another deployment's stage topics
        (same ingest group, other topic prefix): the two would split one group's partitions."""
        from confluent_kafka import TopicPartition

        from lightmem.streams.kafka.lag import committed_offsets, group_reader

        group = self.options.ingest_group
        ours = {self.topics.turns, self.topics.segments, self.topics.entries}
        stage_bases = ("lightmem.turns.v1", "lightmem.segments.v1", "lightmem.entries.v1")
        try:
            topics = admin.list_topics(timeout=15).topics
            others = [TopicPartition(name, p) for name, meta in topics.items()
                      if name not in ours and name.endswith(stage_bases)
                      for p in meta.partitions]
            if not others:
                return
            reader = group_reader(self.settings, group)
            try:
                committed = committed_offsets(reader, others, timeout_s=20)
            finally:
                reader.close()
        except Exception as exc:  # noqa: BLE001 - a new group has nothing to compare
            log.debug("group %s: committed offsets not readable: %r", group, exc)
            return
        foreign = sorted({topic for topic, _ in committed})
        if foreign:
            raise DeploymentConflictError(
                f"ingest group {group!r} (a consumer group) already consumes {foreign}, topics "
                f"of another deployment; this one reads {sorted(ours)}: give it its own ingest "
                f"group (--ingest-group / LIGHTMEM_INGEST_GROUP)")

    # -- running

    def stop(self) -> None:
        """Finish the batch at hand, commit it, leave the group and return from run()."""
        self.stop_event.set()

    def run(self) -> int:
        """Consume until :meth:`stop`; returns the exit status (0, 70 or 75)."""
        from confluent_kafka import Consumer, Producer

        self._producer = Producer(kafka_config(self.settings, **{
            "transactional.id": self.transactional_id,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            # The Java client's hash, like every producer here (producer.py): a flush command
            # or a segment lands in the partition of its conversation's turns.
            "partitioner": "murmur2_random",
            "transaction.timeout.ms": TRANSACTION_TIMEOUT_MS,
            # Dead letters carry the original event: as large as the DLQ topic allows.
            "message.max.bytes": dead_letter_max_bytes(self.settings) + 65_536,
        }))
        try:
            self._producer.init_transactions(60)
        except Exception as exc:  # noqa: BLE001 - reported with the exit status
            log.error("could not initialise the transactional producer %s: %s",
                      self.transactional_id, exc)
            return EXIT_KAFKA_FATAL
        from lightmem.streams.erasure.forget import ErasureFollower

        self._erasure_follower = ErasureFollower(self.settings, self.topics,
                                                 ledger=self.erasures)
        try:
            self._erasure_follower.start()
        except Exception as exc:  # noqa: BLE001 - reported with the exit status
            log.error("could not read the erasure ledger %s: %s", self.topics.erasures, exc)
            return EXIT_KAFKA_FATAL
        self._swept_version = self.erasures.version
        self._consumer = Consumer(kafka_config(self.settings, **{
            "group.id": self.options.ingest_group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            # Only what committed transactions wrote: never a segment of an aborted batch.
            "isolation.level": "read_committed",
            "session.timeout.ms": int(SESSION_TIMEOUT_S * 1000),
            "heartbeat.interval.ms": 1000,
            # A batch (its LLM calls) must fit in here, or the group evicts the worker.
            "max.poll.interval.ms": 600_000,
            "partition.assignment.strategy": "roundrobin",
            # The end of a partition is reported: its offset is committed even when a
            # transaction marker, not a record, is the last thing there (see _process).
            "enable.partition.eof": True,
        }))
        self._consumer.subscribe([self.topics.turns, self.topics.segments, self.topics.entries],
                                 on_assign=self._on_assign, on_revoke=self._on_revoke,
                                 on_lost=self._on_revoke)
        log.info("worker %s (group %s) reading %s, %s, %s", self.transactional_id,
                 self.options.ingest_group, self.topics.turns, self.topics.segments,
                 self.topics.entries)
        status = 0
        next_progress = time.monotonic() + PROGRESS_LOG_S
        interval = max(1.0, min(self.settings.idle_timeout_s / 4, 10.0))
        next_idle = time.monotonic() + interval
        next_lag = time.monotonic()
        try:
            while not self.stop_event.is_set():
                self._at("all", "waiting for records")
                self.follow_erasures()
                size = self.options.batch_size or self.settings.ingest_batch_turns
                msgs = self._consumer.consume(size, timeout=BATCH_WITHIN_S)
                if self._sweep_due:
                    self.sweep(self._sweep_due)
                records = self._records(msgs)
                if records or self._eofs:
                    self._process(records, self._generation)
                now = time.monotonic()
                if self.options.idle_timer and now >= next_idle:
                    next_idle = now + interval
                    self.flush_idle()
                if now >= next_progress:
                    next_progress = now + PROGRESS_LOG_S
                    self.log_progress()
                if self.settings.metrics_port and now >= next_lag:
                    next_lag = now + LAG_SAMPLE_S
                    self._sample_lag()
        except _Fatal as exc:
            log.critical("fatal Kafka error, stopping the worker (exit %d): %s",
                         EXIT_KAFKA_FATAL, exc)
            status = EXIT_KAFKA_FATAL
        except _Bug as exc:
            log.critical("%s: unexpected error, stopping the worker (exit %d); nothing of "
                         "the batch was committed", exc.stage, EXIT_BUG, exc_info=exc.cause)
            metrics.record_stage_error(exc.stage, "bug")
            status = EXIT_BUG
        finally:
            self._shutdown(clean=status == 0)
        if status == 0:
            log.info("worker stopped cleanly")
        return status

    def _shutdown(self, *, clean: bool) -> None:
        self._lag_executor.shutdown(wait=True, cancel_futures=True)
        if self._erasure_follower is not None:
            self._erasure_follower.close()
        if self._lag_reader is not None:
            self._lag_reader.close()
        if self._consumer is not None:
            if clean:
                self._consumer.close()  # leaves the group: the partitions move at once
            # else: no close. A commit must not slip out; the group evicts us after the
            # session timeout.
        if self._producer is not None and clean:
            self._producer.flush(10)

    # -- group membership

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        self._assigned = {(tp.topic, tp.partition) for tp in partitions}
        turns = {p for t, p in self._assigned if t == self.topics.turns}
        segments = {p for t, p in self._assigned if t == self.topics.segments}
        started = time.monotonic()
        self._at("all", "recovering the tables")
        self.tables["sensory"].recover(self.settings, turns)
        self.tables["topic-buffers"].recover(self.settings, segments)
        for c in self.counters.values():
            c.idle_requested.clear()
        if self.erasures:  # the previous owner may have died before it swept these
            self._sweep_due.setdefault("sensory", set()).update(turns)
            self._sweep_due.setdefault("topic-buffers", set()).update(segments)
        log.info("assigned %s (tables recovered in %.1fs)",
                 ", ".join(f"{t}[{p}]" for t, p in sorted(self._assigned)) or "nothing",
                 time.monotonic() - started)
        if not self._ready:
            self._ready = True
            log.info("worker ready")

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        # Batches commit between polls, so nothing is in flight here; a batch held for a
        # retry is dropped (its generation is over) and re-read by the next owner.
        self._generation += 1
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        self._assigned -= revoked
        self._eofs = {}
        for tp in revoked:
            self._committed.pop(tp, None)
        self.tables["sensory"].drop(p for t, p in revoked if t == self.topics.turns)
        self.tables["topic-buffers"].drop(p for t, p in revoked if t == self.topics.segments)
        log.info("revoked %s", ", ".join(f"{t}[{p}]" for t, p in sorted(revoked)) or "nothing")

    # -- one batch

    def _records(self, msgs: Sequence[Any]) -> list[Inbound]:
        from confluent_kafka import KafkaError

        out = []
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    self._eofs[(msg.topic(), msg.partition())] = msg.offset()
                    continue
                if err.fatal():
                    raise _Fatal(str(err))
                # Per-partition fetch errors (e.g. a corrupt record batch) and transient
                # broker errors: librdkafka retries; say so once per occurrence.
                log.warning("consumer error on %s[%s]: %s", msg.topic(), msg.partition(), err)
                continue
            headers = msg.headers() or []
            ts_type, ts = msg.timestamp()
            out.append(Inbound(topic=msg.topic(), partition=msg.partition(), offset=msg.offset(),
                               key=msg.key(), value=msg.value(),
                               headers=tuple((str(k), bytes(v or b"")) for k, v in headers),
                               timestamp_ms=ts if ts_type != 0 and ts >= 0 else None))
        return out

    def _process(self, records: list[Inbound], generation: int) -> None:
        """Run the stages on one batch and commit it in one transaction; transient failures
        are retried with backoff until it commits or the partitions move."""
        by_stage: dict[str, list[Inbound]] = {"sensory": [], "short-term": [], "index": []}
        for r in records:
            by_stage[self._stage_of(r.topic)].append(r)
        for stage, batch in by_stage.items():
            if batch:
                metrics.record_events_in(stage, batch[0].topic, len(batch))
        by_stage["sensory"] = self._with_replay_flushes(by_stage["sensory"])
        offsets: dict[tuple[str, int], int] = {}
        for r in records:
            offsets[(r.topic, r.partition)] = max(offsets.get((r.topic, r.partition), -1),
                                                  r.offset + 1)
        # A partition read to its end commits the end offset: past the transaction markers
        # that follow the last record (the upstream stage writes in transactions), so that
        # a caught-up stage shows lag 0. Every record before it is in this batch or earlier.
        for tp, end in self._eofs.items():
            if tp in self._assigned and end > max(offsets.get(tp, -1),
                                                  self._committed.get(tp, -1)):
                offsets[tp] = end
        self._eofs = {}
        if not offsets:
            return
        done: dict[str, tuple[StepResult, float]] = {}
        delay, cap = BACKOFF_S
        while True:
            try:
                if generation != self._generation:
                    raise _Dropped
                for stage, batch in by_stage.items():
                    if batch and stage not in done:
                        started = time.perf_counter()
                        done[stage] = (self._step(stage, batch), time.perf_counter() - started)
                self._commit(done, offsets, generation)
                break
            except _Dropped:
                log.info("partitions moved while a batch was held: %d record(s) left to the "
                         "next owner", len(records))
                for stage, batch in by_stage.items():
                    if batch:
                        metrics.record_reread(stage)
                return
            except _Fatal:
                raise
            except _Bug:
                raise
            except Exception as exc:  # noqa: BLE001 - transient by construction (see _step)
                stage = next((s for s, b in by_stage.items() if b and s not in done), "commit")
                metrics.record_stage_error(stage if stage != "commit" else "index", "transient")
                self.counters[stage if stage != "commit" else "index"].retries += 1
                log.warning("%s: transient failure, retrying the batch in %.1fs: %r", stage,
                            delay, exc)
                self._backoff(delay)
                delay = min(delay * 2, cap)
        self._committed.update(offsets)
        for stage, (result, seconds) in done.items():
            self._account(stage, result, seconds)
        for table, stage in (("sensory", "sensory"), ("topic-buffers", "short-term")):
            if stage in done:
                self.tables[table].apply(done[stage][0].slots)

    def _with_replay_flushes(self, batch: list[Inbound]) -> list[Inbound]:
        """Backfill: drop turns at/after the stop offsets; close every buffer of a partition
        that reached its end (a flush marker just past the last replayed turn)."""
        stop = self.options.stop_offsets
        if stop is None:
            return batch
        counters = self.counters["sensory"]
        reached = {r.partition for r in batch if r.offset >= stop.get(r.partition, 0) - 1}
        kept = [r for r in batch if r.offset < stop.get(r.partition, 0)]
        for partition in sorted(reached - counters.replay_flushed):
            kept.append(Inbound(self.topics.turns, partition, stop[partition], None,
                                FlushCommand(issued_at=self.clock(),
                                             issued_by="replay").to_bytes(),
                                tuple(flush_headers())))
            counters.replay_flushed.add(partition)
        return kept

    def _step(self, stage: str, batch: Sequence[Inbound]) -> StepResult:
        self._at(stage, f"running the step ({len(batch)} records)")
        try:
            if stage == "sensory":
                return self.sensory.step(batch, self._snapshot(self.tables["sensory"], batch))
            if stage == "short-term":
                return self.short_term.step(batch,
                                            self._snapshot(self.tables["topic-buffers"], batch))
            return self.sink.step(batch)
        except Exception as exc:
            if is_transient(exc):
                raise
            raise _Bug(stage, exc) from exc

    @staticmethod
    def _snapshot(table: ChangelogTable, batch: Sequence[Inbound]) -> dict[bytes, bytes]:
        """The slots a step needs: the batch's keys, or every slot of a partition that gets
        a partition-wide flush (a record without key)."""
        wide = {r.partition for r in batch if r.key is None}
        out = dict(table.items(wide)) if wide else {}
        for r in batch:
            if r.key is not None and r.key not in out:
                value = table.get(r.key)
                if value is not None:
                    out[r.key] = value
        return out

    def _commit(self, done: Mapping[str, tuple[StepResult, float]],
                offsets: Mapping[tuple[str, int], int], generation: int) -> None:
        """Produce the output, the changelog records and the offsets in one transaction."""
        from confluent_kafka import TopicPartition

        out: list[Outbound] = [o for result, _ in done.values() for o in result.out]
        changelog: list[tuple[str, bytes, int, bytes]] = []
        for table, stage in (("sensory", "sensory"), ("topic-buffers", "short-term")):
            if stage in done:
                topic = self.tables[table].topic
                changelog += [(topic, key, partition, value)
                              for key, (partition, value) in done[stage][0].slots.items()]
        tps = [TopicPartition(t, p, o) for (t, p), o in sorted(offsets.items())]
        self._at("all", f"committing {len(out)} record(s), {len(changelog)} slot(s)")
        self._transaction(out, changelog, tps, generation)

    def _transaction(self, out: Sequence[Outbound],
                     changelog: Sequence[tuple[str, bytes, int, bytes]],
                     offsets: Sequence[Any], generation: int | None) -> None:
        """One transaction: records, changelog slots, then (if any) the input offsets.

        Raises:
            _Fatal: the producer cannot go on (fenced, fatal idempotence error).
            _Dropped: the group moved on (this worker's generation is over).
            KafkaException: a retriable/abortable failure (aborted here; retry).
        """
        from confluent_kafka import KafkaException

        producer = self._producer
        try:
            producer.begin_transaction()
        except KafkaException as exc:
            self._sort_kafka_error(exc)
            raise
        try:
            for o in out:
                self._produce(o.topic, o.key, o.value, partition=o.partition,
                              headers=list(o.headers) or None)
            for topic, key, partition, value in changelog:
                self._produce(topic, key, value, partition=partition)
            if offsets:
                producer.send_offsets_to_transaction(
                    list(offsets), self._consumer.consumer_group_metadata(), 30)
            producer.commit_transaction(60)
        except KafkaException as exc:
            self._sort_kafka_error(exc)
            try:
                producer.abort_transaction(30)
            except KafkaException as abort_exc:
                self._sort_kafka_error(abort_exc)
                raise
            if generation is not None and _is_fenced_generation(exc):
                raise _Dropped from exc
            raise
        except BaseException:
            try:
                producer.abort_transaction(30)
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
            raise

    def _produce(self, topic: str, key: bytes | None, value: bytes, *,
                 partition: int | None = None, headers: Any = None) -> None:
        produce_when_room(self._producer, topic, key, value, partition=partition,
                          headers=headers)

    @staticmethod
    def _sort_kafka_error(exc: Any) -> None:
        err = exc.args[0] if exc.args else None
        if err is not None and hasattr(err, "fatal") and err.fatal():
            raise _Fatal(str(err)) from exc

    def _backoff(self, delay: float) -> None:
        """Wait ``delay`` seconds with the partitions paused, still serving the group (a
        rebalance meanwhile drops the held batch, see _process)."""
        consumer = self._consumer
        assignment = consumer.assignment()
        if assignment:
            consumer.pause(assignment)
        deadline = time.monotonic() + delay
        try:
            while time.monotonic() < deadline and not self.stop_event.is_set():
                msg = consumer.poll(min(0.2, max(0.0, deadline - time.monotonic())))
                if msg is not None and msg.error() is None:
                    # Fetched before the pause took effect: read it again after the retry.
                    from confluent_kafka import TopicPartition

                    consumer.seek(TopicPartition(msg.topic(), msg.partition(), msg.offset()))
        finally:
            assignment = consumer.assignment()
            if assignment:
                consumer.resume(assignment)

    def _account(self, stage: str, result: StepResult, seconds: float) -> None:
        self._at(stage, f"committed a batch ({seconds:.2f}s in the step)")
        metrics.record_step(stage, seconds=seconds, applied=result.applied,
                            skipped=result.skipped, out_topics=[o.topic for o in result.out],
                            dead_letter_reasons=result.dead_letter_reasons)
        c = self.counters[stage]
        c.batches += 1
        c.applied += result.applied
        c.skipped += result.skipped
        c.erased += result.erased
        if result.erased:
            log.info("%s: dropped %d record(s) of erased scopes", stage, result.erased)
        c.dead_letters += result.dead_letters
        if result.stream_time is not None and (c.stream_time is None
                                               or result.stream_time > c.stream_time):
            c.stream_time = result.stream_time
        c.idle_requested.difference_update(result.flushed)

    # -- erasure (between batches)

    def follow_erasures(self) -> None:
        """Fold the erasures recorded since the last call; sweep the tables when the ledger
        changed."""
        if self._erasure_follower is None:
            return
        self._erasure_follower.poll(0)
        if self.erasures.version != self._swept_version:
            version = self.erasures.version
            if self.sweep(None) and self._unwrite():
                self._swept_version = version

    def _unwrite(self) -> bool:
        """Delete from the index what a step wrote just before an erasure of its scope
        reached this worker (the erasure's own deletes may have run before that write)."""
        if not self._unwrite_events():
            return False
        if self._sink is None:
            return True
        ids = self._sink.erased_writes()
        if not ids:
            return True
        from lightmem.streams.erasure.forget import delete_documents

        try:
            delete_documents(self.store, ids)
        except Exception as exc:  # noqa: BLE001 - tried again after the next batch
            log.warning("erasure: could not delete %d memorie(s) written before the erasure "
                        "arrived: %r", len(ids), exc)
            return False
        self._sink.unremember(ids)
        log.info("erasure: deleted %d memorie(s) written just before the erasure arrived",
                 len(ids))
        return True

    def _unwrite_events(self) -> bool:
        """Delete the events of the scopes erased since the last call (their turns were
        produced before the erasure; a stage may have written them before it knew)."""
        events = self.sensory.events
        if events is None:
            return True
        new = [(e.tenant, e.user, e.at_ms) for e in self.erasures.entries()
               if self._events_erased.get((e.tenant, e.user)) != e.at_ms]
        if not new:
            return True
        try:
            n = events.erase(new)
        except Exception as exc:  # noqa: BLE001 - tried again after the next batch
            log.warning("erasure: could not delete the events of %d erased scope(s): %r",
                        len(new), exc)
            return False
        self._events_erased.update({(t, u): at for t, u, at in new})
        if n:
            log.info("erasure: deleted %d event(s) of erased scopes", n)
        return True

    def sweep(self, partitions: Mapping[str, set[int]] | None) -> bool:
        """Delete (tombstone) or rewrite the table slots that hold erased turns, in one
        transaction; ``partitions``: table -> source partitions (None: every loaded one).
        Returns False when the transaction failed (tried again later)."""
        from lightmem.streams.erasure.forget import sweep_slot

        changelog: list[tuple[str, bytes, int, bytes | None]] = []
        writes: dict[str, dict[bytes, tuple[int, bytes | None]]] = {}
        for name, table in self.tables.items():
            parts = table.partitions if partitions is None else (
                set(partitions.get(name, ())) & table.partitions)
            for p in sorted(parts):
                for key, raw in list(table.items([p])):
                    new = sweep_slot(name, raw, self.erasures)
                    if new is not raw:
                        changelog.append((table.topic, key, p, new))
                        writes.setdefault(name, {})[key] = (p, new)
        if changelog:
            self._at("all", f"erasure: writing {len(changelog)} slot(s)")
            try:
                self._transaction([], changelog, [], None)  # type: ignore[arg-type]
            except _Fatal:
                raise
            except Exception as exc:  # noqa: BLE001 - swept again after the next batch
                log.warning("erasure: could not write the swept slots: %r", exc)
                return False
            for name, w in writes.items():
                self.tables[name].apply(w)  # type: ignore[arg-type]
            log.info("erasure: %d slot(s) deleted, %d rewritten without erased turns",
                     sum(1 for *_, v in changelog if v is None),
                     sum(1 for *_, v in changelog if v is not None))
        if partitions is self._sweep_due:
            self._sweep_due = {}
        return True

    # -- timers (run between batches)

    def flush_idle(self) -> None:
        """Ask for a flush of every conversation idle by event time or by wall clock."""
        counters = self.counters["sensory"]
        actives = {p for t, p in self._assigned if t == self.topics.turns}
        if not actives:
            return
        slots = dict(self.tables["sensory"].items(actives))
        if not slots:
            return
        keys = self.sensory.idle_keys(slots, counters.stream_time, actives, now=self.clock())
        keys = [k for k in keys if k not in counters.idle_requested]
        if not keys:
            return
        commands = []
        for key in keys:
            command = self.sensory.idle_flush_command(slots[key])
            # To the partition the conversation's turns came from, whatever partitioner
            # their producer used (the slot knows it; a hash could pick another one).
            commands.append(Outbound(self.topics.turns, key, command.to_bytes(),
                                     tuple(flush_headers()), partition=partition_of(slots[key])))
        try:
            self._transaction(commands, [], [], None)
        except _Fatal:
            raise
        except Exception as exc:  # noqa: BLE001 - the next tick asks again
            log.warning("idle flush: could not produce flush commands: %r", exc)
            return
        metrics.record_events_out("sensory", self.topics.turns, len(commands))
        counters.idle_requested.update(keys)
        log.info("idle flush requested for %d conversation(s)", len(keys))

    def log_progress(self) -> None:
        """One INFO line per stage whose counters moved since the last one."""
        for stage, c in self.counters.items():
            now = (c.batches, c.applied, c.skipped, c.dead_letters, c.retries)
            if now != self._logged.get(stage):
                self._logged[stage] = now
                log.info("%s: batches %d, applied %d, skipped %d, dead letters %d, "
                         "transient retries %d", stage, *now)

    def _sample_lag(self) -> None:
        """Set the ``lightmem_consumer_lag`` gauges of the partitions this worker owns (read
        in a thread of its own; a slow broker never delays a batch)."""
        if self._lag_pending is not None and not self._lag_pending.done():
            return
        owned = set(self._assigned)
        if not owned:
            metrics.set_consumer_lag({})
            return

        def sample() -> None:
            if self._lag_reader is None:
                from lightmem.streams.kafka.lag import LagReader

                self._lag_reader = LagReader(self.settings, self.options.ingest_group,
                                             timeout_s=10.0)
            try:
                lags = self._lag_reader.read(sorted({t for t, _ in owned}))
            except Exception as exc:  # noqa: BLE001 - a missed sample
                log.debug("consumer lag not readable: %r", exc)
                return
            metrics.set_consumer_lag({(p.topic, p.partition): p.lag for p in lags
                                      if (p.topic, p.partition) in owned})

        self._lag_pending = self._lag_executor.submit(sample)

    def _at(self, stage: str, what: str) -> None:
        self.where[stage] = (what, time.monotonic())

    def dump_state(self, *_: Any) -> None:
        """Log where the worker is, its assignment and its counters (SIGUSR2)."""
        now = time.monotonic()
        for stage, (what, since) in self.where.items():
            log.warning("stage %s: %s for %.1fs", stage, what, now - since)
        log.warning("assigned: %s", sorted(self._assigned))
        for stage, c in self.counters.items():
            log.warning("%s: %s", stage, c)


def partition_of(raw_slot: bytes) -> int:
    """The turns partition a sensory slot's conversation lives in."""
    return SensorySlot.model_validate_json(raw_slot).partition


class _Bug(Exception):
    """A stage failed with a non-transient error."""

    def __init__(self, stage: str, cause: BaseException) -> None:
        super().__init__(f"{stage}: {cause!r}")
        self.stage = stage
        self.cause = cause


def _is_fenced_generation(exc: Any) -> bool:
    from confluent_kafka import KafkaError

    err = exc.args[0] if exc.args else None
    codes = {getattr(KafkaError, n, None) for n in ("ILLEGAL_GENERATION", "UNKNOWN_MEMBER_ID",
                                                     "FENCED_INSTANCE_ID",
                                                     "REBALANCE_IN_PROGRESS")}
    return err is not None and hasattr(err, "code") and err.code() in codes


def missing_topics(settings: Settings, names: Sequence[str], timeout_s: float = 15.0
                   ) -> list[str]:
    """Which of ``names`` do not exist on the cluster."""
    from confluent_kafka.admin import AdminClient

    metadata = AdminClient(kafka_config(settings)).list_topics(timeout=timeout_s)
    return [n for n in names if n not in metadata.topics]


def run_worker(
    settings: Settings,
    options: WorkerOptions,
    *,
    loglevel: str = "info",
    components: Components | None = None,
) -> int:
    """Run a worker until it is stopped (SIGTERM/SIGINT); returns the exit status.

    Loads the models and prepares the Elasticsearch index before joining the consumer
    group, so that a slow start never stalls the group.
    """
    # A crash in native code (librdkafka, torch) leaves its Python stack in the log.
    faulthandler.enable()
    configure_logging(settings.log_format, level=loglevel.upper(),
                      secrets=secrets_of(settings))
    if settings.log_format == "json":
        quiet_progress_bars()
    worker = IngestWorker(settings, options, components=components)
    needed = [options.topics.turns, options.topics.segments, options.topics.entries,
              options.topics.memory_changes, options.topics.dlq, options.topics.erasures]
    missing = missing_topics(settings, needed)
    if missing:
        log.error("missing topics %s: run `lightmem topics create` first", missing)
        return 1
    try:
        worker.prepare()
    except Exception as exc:  # noqa: BLE001 - cannot start: say why, exit 1
        log.error("cannot start: %s", exc)
        return 1
    server = None
    if settings.metrics_port:
        # Bound before the models load: a port conflict fails the start at once.
        try:
            server = metrics.start_metrics_server(settings.metrics_port, settings.metrics_addr)
        except metrics.MetricsServerError as exc:
            log.error("%s: set another LIGHTMEM_METRICS_PORT / --metrics-port (0 = off)", exc)
            return 1
        log.info("metrics at %s", server.url)
    try:
        worker.components.warm_up()
        worker.store.ensure_index()
        if options.index is None and options.stop_offsets is None:
            worker.enable_events()
        # `kill -USR1 <pid>` writes every thread's stack to stderr (diagnosing a stuck worker).
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        signal.signal(signal.SIGUSR2, worker.dump_state)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: worker.stop())
        return worker.run()
    finally:
        if server is not None:
            server.close()
