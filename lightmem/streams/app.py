"""The faust application: three agents over raw bytes, two changelog-backed tables.

::

    turns ──▶ sense_turns ──▶ segments ──▶ summarize_segments ──▶ entries ──▶ index_entries
              (table sensory)               (table topic-buffers)             (Elasticsearch)
                    │                              │                               │
                    └────────── dead letters ──────┴───────────────────────────────┴──▶ dlq
                                                                  memory changes ◀──┘

Every agent consumes raw bytes (faust would ack an undecodable event before the agent saw
it) with ``concurrency=1`` (faust issue #606: more would let offsets be committed past an
in-flight event), batches with ``take_events(n, within=s)`` and hands each batch to a stage
of :mod:`lightmem.streams.stages`, run in a worker thread so that the models never block the
event loop (heartbeats, fetches). A batch's output is produced *and its delivery awaited*
before its table slots are written and before faust may ack (and later commit) its offsets:
processing is at-least-once, and the stages make a redelivery harmless (see there).

Tables are in memory (``memory://``) and rebuilt from their changelog topics when a worker
starts or is assigned partitions; each slot's changelog record goes to the partition its
conversation's events come from (:class:`ConversationTable`), whichever key hashing the
producers used, so the worker that owns the events also recovers the state.

Flushes: a new session cuts the sensory buffer (in the processors); an idle conversation (no
turn for ``idle_timeout_s`` of *event time*, compared with the newest event time the worker
has seen) and ``lightmem flush`` both put an in-band flush command on the turns topic, which
the sensory stage applies in order and forwards to the short-term stage. In-band flushes are
replayed by a backfill exactly where they happened live.

Observability: every stage counts what it consumed, applied, skipped, produced and
dead-lettered, its failures and its batch times in :mod:`lightmem.streams.metrics`; with
``metrics_port`` set the worker serves them on ``/metrics`` (127.0.0.1 by default) and samples
the consumer lag of its partitions every ``LAG_SAMPLE_S``. ``log_format=json`` makes the
worker log one JSON object per line (:mod:`lightmem.streams.logs`).

Exit codes of the worker: 0 stopped cleanly, 1 could not start (missing topics, bad
settings), 70 a bug in a stage (the process dies at once, so that no offset of the failed
batch is committed; the batch is redelivered after a restart).
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import faust

from lightmem.settings import Settings

from . import metrics
from .components import Components
from .control import FlushCommand, flush_headers
from .lag import PartitionLag
from .logs import configure_logging, quiet_progress_bars, secrets_of, worker_logging_config
from .stages import (
    Inbound,
    IndexSink,
    Outbound,
    SensoryStage,
    ShortTermStage,
    StepResult,
    is_transient,
)
from .topics import DLQ_MAX_MESSAGE_BYTES, Topics, faust_broker_settings, kafka_config

__all__ = ["WorkerOptions", "Pipeline", "ConversationTable", "run_worker", "EXIT_BUG"]

log = logging.getLogger(__name__)

#: Exit status when a stage hits a bug (not a bad input, not a transient failure).
EXIT_BUG = 70
#: Seconds a take() batch waits to fill up.
BATCH_WITHIN_S = 0.5
#: The consumer group notices a dead worker after this long (faust's default is 60 s; the
#: event loop never blocks on models here, so heartbeats are reliable at 1 s).
SESSION_TIMEOUT_S = 10.0
#: Seconds between progress lines in the worker log.
PROGRESS_LOG_S = 10.0
#: A stage busy with one batch for longer than this is reported in the log.
STUCK_WARNING_S = 60.0
#: Lost-record watchdog: check interval, and how long an idle agent with read but
#: uncommitted records is tolerated before its partition is re-read.
WATCHDOG_S = 5.0
STALL_S = 15.0
#: Transient-failure backoff: first delay and cap (seconds).
BACKOFF_S = (0.5, 30.0)
#: Seconds between consumer-lag samples for the ``lightmem_consumer_lag`` gauge.
LAG_SAMPLE_S = 5.0


def _utcnow() -> datetime:
    return datetime.now(UTC)


class StallDetector:
    """Which partitions have stopped: lag above zero with the same committed offset for
    ``stall_s`` seconds of observations (fed only while the partition's agent is idle).

    Args:
        stall_s: How long one committed offset may stay behind the high watermark.
    """

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        #: (topic, partition) -> (committed offset, first seen at)
        self._since: dict[tuple[str, int], tuple[int, float]] = {}

    def observe(self, now: float, lags: Sequence[PartitionLag]) -> list[PartitionLag]:
        """The partitions found stalled at ``now``; each is forgotten once reported, so a
        partition still stalled after the recovery is reported again ``stall_s`` later."""
        stalled = []
        for p in lags:
            key = (p.topic, p.partition)
            committed = p.high - p.lag
            if p.lag == 0:
                self._since.pop(key, None)
                continue
            seen = self._since.setdefault(key, (committed, now))
            if seen[0] != committed:  # progress: start over
                self._since[key] = (committed, now)
            elif now - seen[1] >= self.stall_s:
                stalled.append(p)
                del self._since[key]
        return stalled

    def reset(self) -> None:
        """Forget everything (a rebalance, or every agent busy)."""
        self._since.clear()


class ConversationTable(faust.Table):
    """A table whose changelog partition is given explicitly with each write (:meth:`put`).

    faust derives it from "the current event" by default, which inside a ``take()`` batch is
    the batch's last event, not the one a key belongs to, and does not exist in a timer.
    """

    _next_partition: int | None = None

    def put(self, key: bytes, value: bytes, partition: int) -> None:
        """Set ``key`` and write its changelog record to ``partition``."""
        self._next_partition = partition
        try:
            self[key] = value
        finally:
            self._next_partition = None

    def partition_for_key(self, key: Any) -> int | None:
        if self._next_partition is None:
            raise TypeError(f"{self.name}: write through put(key, value, partition)")
        return self._next_partition


@dataclass(frozen=True)
class WorkerOptions:
    """What one pipeline run reads, writes and is called.

    Args:
        app_id: faust app id = consumer group id = prefix of the changelog topics.
        topics: Topic names.
        index: Write this concrete Elasticsearch index instead of ``settings.es_alias``
            (a backfill into a new index).
        stop_offsets: Backfill only: turns partition -> end offset (exclusive). Turns at or
            past it are skipped; reaching it flushes every conversation of the partition.
        idle_timer: Run the idle-flush timer (off for a backfill: the live run's flushes are
            in the turns topic already).
        batch_size: Records per stage batch (default: ``settings.ingest_batch_turns``).
    """

    app_id: str
    topics: Topics
    index: str | None = None
    stop_offsets: Mapping[int, int] | None = None
    idle_timer: bool = True
    batch_size: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> WorkerOptions:
        values: dict[str, Any] = {"app_id": settings.worker_id,
                                  "topics": Topics.from_settings(settings)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _inbound(event: Any) -> Inbound:
    msg = event.message
    headers = msg.headers or ()
    if isinstance(headers, Mapping):
        headers = headers.items()
    return Inbound(
        topic=msg.topic, partition=msg.partition, offset=msg.offset, key=msg.key,
        value=msg.value, headers=tuple((str(k), bytes(v or b"")) for k, v in headers),
    )


@dataclass
class _Counters:
    batches: int = 0
    applied: int = 0
    skipped: int = 0
    dead_letters: int = 0
    retries: int = 0
    #: Partitions sought back after faust dropped fetched records (recover_lost_records).
    reseeks: int = 0
    stream_time: datetime | None = None
    idle_requested: set[bytes] = field(default_factory=set)
    replay_flushed: set[int] = field(default_factory=set)


class Pipeline:
    """The faust app with its topics, tables, agents and timer.

    Args:
        settings: Configuration.
        options: Names and run mode (see :class:`WorkerOptions`).
        components: The processors (default: built lazily from ``settings``).
        store: The memory store the index sink writes (default: Elasticsearch from
            ``settings``, ``options.index`` or the alias).
        clock: Time of ingest and dead letters.
    """

    def __init__(
        self,
        settings: Settings,
        options: WorkerOptions,
        *,
        components: Components | None = None,
        store: Any = None,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.settings = settings
        self.options = options
        self.topics = options.topics
        self.components = components or Components(settings)
        self._store = store
        self.clock = clock
        self.counters: dict[str, _Counters] = {
            n: _Counters() for n in ("sensory", "short-term", "index")}
        # One thread for every model call: the models are not shared across threads, and
        # the event loop stays free for heartbeats and fetches.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightmem-stage")
        self.app = self._make_app()
        n = settings.kafka_partitions
        raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw",
               "value_serializer": "raw"}
        self.turns_topic = self.app.topic(self.topics.turns, partitions=n, **raw)
        self.segments_topic = self.app.topic(self.topics.segments, partitions=n, **raw)
        self.entries_topic = self.app.topic(self.topics.entries, partitions=n, **raw)
        # bytes in, bytes out: faust picks the "raw" codec for the bytes type.
        self.sensory_table: ConversationTable = self.app.Table(
            "sensory", default=None, partitions=n, help="sensory buffer per conversation",
            key_type=bytes, value_type=bytes)
        self.topic_table: ConversationTable = self.app.Table(
            "topic-buffers", default=None, partitions=n, help="topic buffer per conversation",
            key_type=bytes, value_type=bytes)
        self.sensory_lock = asyncio.Lock()
        self.topic_lock = asyncio.Lock()
        self.sensory = SensoryStage(settings, self.components, self.topics, clock=clock)
        self.short_term = ShortTermStage(settings, self.components, self.topics, clock=clock)
        self._sink: IndexSink | None = None
        self._logged: dict[str, tuple[int, ...]] = {}
        #: stage -> (what it is doing, since when): for diagnosing a stuck worker.
        self.where: dict[str, tuple[str, float]] = {}
        self._batches: dict[str, Any] = {}
        self.stalls = StallDetector(STALL_S)
        # Lag sampling (metrics only): its own thread, its own Kafka clients.
        self._lag_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightmem-lag")
        self._lag_reader: Any = None
        self._register()

    # -- construction

    def _make_app(self) -> faust.App:
        s = self.settings
        web = s.worker_web_port > 0
        return faust.App(
            self.options.app_id,
            **faust_broker_settings(s),
            autodiscover=False,
            processing_guarantee="at_least_once",
            store="memory://",
            Table=ConversationTable,
            topic_partitions=s.kafka_partitions,
            topic_replication_factor=s.kafka_replication_factor,
            # A standby copy would put other workers' conversations in this worker's table
            # (and its idle timer); recovery from the changelog is what we rely on.
            table_standby_replicas=0,
            consumer_auto_offset_reset="earliest",
            broker_session_timeout=SESSION_TIMEOUT_S,
            broker_heartbeat_interval=1.0,
            broker_commit_interval=1.0,
            producer_acks=-1,
            producer_max_request_size=DLQ_MAX_MESSAGE_BYTES,
            web_enabled=web,
            web_bind="127.0.0.1",
            web_host="127.0.0.1",
            web_port=s.worker_web_port or 6066,
        )

    @property
    def store(self) -> Any:
        if self._store is None:
            from .es_store import ElasticsearchStore, es_client

            self._store = ElasticsearchStore(es_client(self.settings), alias=self.settings.es_alias,
                                             index=self.options.index)
        return self._store

    @property
    def sink(self) -> IndexSink:
        if self._sink is None:
            self._sink = IndexSink(self.settings, self.components, self.topics, self.store,
                                   clock=self.clock)
        return self._sink

    def _register(self) -> None:
        app = self.app
        size = self.options.batch_size or self.settings.ingest_batch_turns

        @app.agent(self.turns_topic, name="sense_turns", concurrency=1)
        async def sense_turns(stream: faust.StreamT) -> None:
            self._at("sensory", "waiting for records")
            self._batches["sensory"] = batches = stream.take_events(size, within=BATCH_WITHIN_S)
            async for events in batches:
                metrics.record_events_in("sensory", self.topics.turns, len(events))
                await self.on_turns([_inbound(e) for e in events])
                self._at("sensory", "waiting for records")

        @app.agent(self.segments_topic, name="summarize_segments", concurrency=1)
        async def summarize_segments(stream: faust.StreamT) -> None:
            self._at("short-term", "waiting for records")
            self._batches["short-term"] = batches = stream.take_events(
                size, within=BATCH_WITHIN_S)
            async for events in batches:
                metrics.record_events_in("short-term", self.topics.segments, len(events))
                batch = [_inbound(e) for e in events]
                await self._run("short-term", self.short_term.step, batch,
                                self.topic_table, self.topic_lock)
                self._at("short-term", "waiting for records")

        @app.agent(self.entries_topic, name="index_entries", concurrency=1)
        async def index_entries(stream: faust.StreamT) -> None:
            self._at("index", "waiting for records")
            self._batches["index"] = batches = stream.take_events(
                self.settings.embed_batch_size, within=BATCH_WITHIN_S)
            async for events in batches:
                metrics.record_events_in("index", self.topics.entries, len(events))
                await self._run("index", self.sink.step, [_inbound(e) for e in events])
                self._at("index", "waiting for records")

        if self.options.idle_timer:
            interval = max(1.0, min(self.settings.idle_timeout_s / 4, 10.0))
            app.timer(interval, name="flush_idle")(self.flush_idle)
        app.timer(PROGRESS_LOG_S, name="log_progress")(self.log_progress)
        app.timer(WATCHDOG_S, name="recover_lost_records")(self.recover_lost_records)
        if self.settings.metrics_port:
            app.timer(LAG_SAMPLE_S, name="sample_lag")(self.sample_lag)

        @app.task
        async def install_task_dump() -> None:
            # `kill -USR2 <pid>` logs the stack of every asyncio task (where agents wait).
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, self.dump_state)

    # -- the agents' work

    async def on_turns(self, batch: list[Inbound]) -> None:
        """Sensory stage for one batch (plus a backfill's end-of-range flushes)."""
        stop = self.options.stop_offsets
        reached: set[int] = set()
        if stop is not None:
            reached = {r.partition for r in batch if r.offset >= stop.get(r.partition, 0) - 1}
            batch = [r for r in batch if r.offset < stop.get(r.partition, 0)]
        if batch:
            await self._run("sensory", self.sensory.step, batch, self.sensory_table,
                            self.sensory_lock)
        counters = self.counters["sensory"]
        for partition in sorted(reached - counters.replay_flushed):
            # End of the backfill range: close every buffer of the partition, like a flush
            # command placed just past the last replayed turn.
            assert stop is not None
            marker = Inbound(self.topics.turns, partition, stop[partition], None,
                             FlushCommand(issued_at=self.clock(), issued_by="replay").to_bytes(),
                             tuple(flush_headers()))
            await self._run("sensory", self.sensory.step, [marker], self.sensory_table,
                            self.sensory_lock)
            counters.replay_flushed.add(partition)

    def _snapshot(self, table: ConversationTable, batch: Sequence[Inbound]) -> dict[bytes, bytes]:
        """The table values a step needs (read on the event loop, handed to the thread)."""
        if any(r.key is None for r in batch):  # a partition-wide flush needs every slot
            return {k: v for k, v in table.items() if v is not None}
        out = {}
        for r in batch:
            if r.key is not None and r.key not in out:
                value = table.get(r.key)
                if value is not None:
                    out[r.key] = value
        return out

    async def _run(
        self,
        stage: str,
        step: Callable[[Sequence[Inbound], Mapping[bytes, bytes]], StepResult],
        batch: Sequence[Inbound],
        table: ConversationTable | None = None,
        lock: asyncio.Lock | None = None,
    ) -> StepResult:
        """Run one step until it succeeds; transient failures back off and retry (the
        batch is not acked meanwhile), anything else is a bug: the worker dies."""
        loop = asyncio.get_running_loop()
        counters = self.counters[stage]
        delay, cap = BACKOFF_S
        while True:
            started = time.perf_counter()
            try:
                self._at(stage, f"waiting for the lock ({len(batch)} records)")
                async with lock or _NoLock():
                    self._at(stage, "reading the table")
                    slots = self._snapshot(table, batch) if table is not None else {}
                    self._at(stage, "running the step")
                    result = await loop.run_in_executor(self.executor, step, batch, slots)
                    self._at(stage, f"delivering {len(result.out)} records")
                    await self.deliver(result.out)
                    if table is not None:
                        self._at(stage, "writing the table")
                        for key, (partition, value) in result.slots.items():
                            table.put(key, value, partition)
                break
            except Exception as exc:  # noqa: BLE001 - sorted right here
                if not is_transient(exc):
                    metrics.record_stage_error(stage, "bug")
                    self._die(stage, exc)
                metrics.record_stage_error(stage, "transient")
                counters.retries += 1
                log.warning("%s: transient failure, retrying the batch in %.1fs: %r",
                            stage, delay, exc)
                self._at(stage, f"backing off {delay:.1f}s")
                await asyncio.sleep(delay)
                delay = min(delay * 2, cap)
        metrics.record_step(stage, seconds=time.perf_counter() - started,
                            applied=result.applied, skipped=result.skipped,
                            out_topics=[o.topic for o in result.out],
                            dead_letter_reasons=result.dead_letter_reasons)
        counters.batches += 1
        counters.applied += result.applied
        counters.skipped += result.skipped
        counters.dead_letters += result.dead_letters
        if result.stream_time is not None and (
            counters.stream_time is None or result.stream_time > counters.stream_time
        ):
            counters.stream_time = result.stream_time
        counters.idle_requested.difference_update(result.flushed)
        return result

    async def deliver(self, out: Sequence[Outbound]) -> None:
        """Produce ``out`` in order and wait until the brokers acknowledged every record."""
        producer = self.app.producer
        pending = []
        for o in out:
            pending.append(await producer.send(o.topic, o.key, o.value, None, None,
                                               list(o.headers) or None))
        if pending:
            await asyncio.gather(*pending)

    def _at(self, stage: str, what: str) -> None:
        self.where[stage] = (what, time.monotonic())

    def dump_state(self) -> None:
        """Log where each stage is, and every asyncio task's stack (SIGUSR2)."""
        now = time.monotonic()
        for stage, (what, since) in self.where.items():
            log.warning("stage %s: %s for %.1fs", stage, what, now - since)
            gen = self._batches.get(stage)
            frame = getattr(gen, "ag_frame", None)
            if frame is not None:
                f = frame.f_locals
                log.warning("  take(): buffer %s, events %s, full %s, consumed %s, consuming %r",
                            len(f.get("buffer", ())), len(f.get("events", ())),
                            getattr(f.get("buffer_full"), "is_set", lambda: "?")(),
                            getattr(f.get("buffer_consumed"), "is_set", lambda: "?")(),
                            f.get("buffer_consuming"))
        consumer = self.app.consumer
        for name in ("_active_partitions", "_paused_partitions", "_buffered_partitions"):
            log.warning("consumer %s: %s", name, sorted(map(str, getattr(consumer, name, None)
                                                                or ())))
        log.warning("flow control active: %s", self.app.flow_control.is_active())
        read = getattr(consumer, "_read_offset", {})
        for tp in sorted(consumer.assignment()):
            try:
                high = consumer.highwater(tp)
            except Exception as exc:  # noqa: BLE001 - diagnostics only
                high = repr(exc)
            log.warning("  %s[%d]: read %s, highwater %s, committed %s", tp.topic, tp.partition,
                        read.get(tp), high, consumer._committed_offset.get(tp))
        for topic in (self.turns_topic, self.segments_topic, self.entries_topic):
            queue = getattr(topic, "_queue", None)
            log.warning("channel %s: queued %s", topic.get_topic_name(),
                        queue.qsize() if queue is not None else "?")
        log.warning("unacked: %s", sorted(str(m.tp) + "@" + str(m.offset)
                                          for m in consumer.unacked))
        _dump_tasks()

    async def recover_lost_records(self) -> None:
        """Timer: restart a partition that has records to process while its agent starves.

        Under load, right after a (re)start, faust 0.15 can drop fetched records of a stream
        partition (its fetcher races with the recovery's pause/seek of the stream
        partitions): the read offset moves past them, they never reach the agent, are never
        acked, and the committed offset stays behind them forever. Nothing is lost for good
        (a restart re-reads from the committed offset), but the worker stops making
        progress. The symptom, read from the brokers: a partition of ours whose committed
        offset stays below its high watermark while its agent has waited for records for
        ``STALL_S`` (with concurrency 1 an idle agent has nothing in flight, and a healthy
        one has committed everything within ``broker_commit_interval``). faust's own
        ``unacked`` set cannot tell: the dropped records stay in it forever. Then resume the
        partition (in case faust left it paused) and seek it back to its committed offset;
        the stages skip what they had already applied.
        """
        consumer = self.app.consumer
        now = time.monotonic()
        stage_of = {self.topics.turns: "sensory", self.topics.segments: "short-term",
                    self.topics.entries: "index"}
        starving = {stage for stage, (what, since) in self.where.items()
                    if what == "waiting for records" and now - since >= STALL_S}
        if self.app.rebalancing or self.app.in_recovery or not starving:
            self.stalls.reset()
            return
        mine = [tp for tp in consumer.assignment() if stage_of.get(tp.topic) in starving]
        if not mine:
            return
        loop = asyncio.get_running_loop()
        try:
            lags = await loop.run_in_executor(self._lag_executor, self._read_lag,
                                              sorted({tp.topic for tp in mine}))
        except Exception as exc:  # noqa: BLE001 - the next tick asks again
            log.debug("stall check: lag not readable: %r", exc)
            return
        ours = {(tp.topic, tp.partition): tp for tp in mine}
        read_offsets = getattr(consumer, "_read_offset", {})
        for lag in self.stalls.observe(now, [p for p in lags if (p.topic, p.partition) in ours]):
            tp = ours[(lag.topic, lag.partition)]
            target = lag.high - lag.lag  # the committed offset (or the low watermark)
            stage = stage_of[tp.topic]
            log.warning("%s: %d record(s) of %s[%d] from offset %d never reached the agent "
                        "(read offset %s, paused %s); resuming and seeking back to %d",
                        stage, lag.lag, tp.topic, tp.partition, target,
                        read_offsets.get(tp), tp in consumer._paused_partitions, target)
            self.counters[stage].reseeks += 1
            metrics.record_reread(stage)
            consumer.resume_partitions([tp])
            await consumer.seek(tp, target)

    async def sample_lag(self) -> None:
        """Timer: set the ``lightmem_consumer_lag`` gauges of the partitions this worker owns.

        Lag means what ``lightmem stats`` shows (:mod:`lightmem.streams.lag`): high watermark
        minus the group's committed offset. Read from the brokers in a thread of its own
        (blocking admin calls, never on the event loop, never behind a model call); only
        the partitions assigned here, so that the workers of a group never report one
        partition twice.
        """
        stage_topics = {self.topics.turns, self.topics.segments, self.topics.entries}
        owned = {(tp.topic, tp.partition) for tp in self.app.consumer.assignment()
                 if tp.topic in stage_topics}
        if not owned:
            metrics.set_consumer_lag({})
            return
        loop = asyncio.get_running_loop()
        try:
            lags = await loop.run_in_executor(self._lag_executor, self._read_lag,
                                              sorted({t for t, _ in owned}))
        except Exception as exc:  # noqa: BLE001 - a missed sample; the next tick tries again
            log.debug("consumer lag not readable: %r", exc)
            return
        metrics.set_consumer_lag({(p.topic, p.partition): p.lag for p in lags
                                  if (p.topic, p.partition) in owned})

    def _read_lag(self, topics: list[str]) -> list[Any]:
        if self._lag_reader is None:
            from .lag import LagReader

            self._lag_reader = LagReader(self.settings, self.options.app_id, timeout_s=10.0)
        return self._lag_reader.read(topics)

    def close_lag_reader(self) -> None:
        """Stop lag sampling and close its Kafka clients."""
        # Wait for a sample in flight (bounded by the reader's timeout) before closing.
        self._lag_executor.shutdown(wait=True, cancel_futures=True)
        if self._lag_reader is not None:
            self._lag_reader.close()
            self._lag_reader = None

    async def log_progress(self) -> None:
        """Timer: one INFO line per stage whose counters moved since the last tick."""
        for stage, c in self.counters.items():
            now = (c.batches, c.applied, c.skipped, c.dead_letters, c.retries, c.reseeks)
            if now != self._logged.get(stage):
                self._logged[stage] = now
                log.info("%s: batches %d, applied %d, skipped %d, dead letters %d, "
                         "transient retries %d, re-reads %d", stage, *now)
        clock = time.monotonic()
        for stage, (what, since) in self.where.items():
            if what != "waiting for records" and clock - since > STUCK_WARNING_S:
                log.warning("%s: %s for %.0fs", stage, what, clock - since)

    async def flush_idle(self) -> None:
        """Timer: ask for a flush of every conversation idle in event time."""
        counters = self.counters["sensory"]
        if counters.stream_time is None:
            return
        actives = {tp.partition for tp in self.app.assignor.assigned_actives()
                   if tp.topic == self.topics.turns}
        if not actives:
            return
        async with self.sensory_lock:
            slots = {k: v for k, v in self.sensory_table.items() if v is not None}
        loop = asyncio.get_running_loop()
        keys = await loop.run_in_executor(self.executor, self.sensory.idle_keys, slots,
                                          counters.stream_time, actives)
        keys = [k for k in keys if k not in counters.idle_requested]
        if not keys:
            return
        commands = []
        for key in keys:
            tenant, _, conversation = key.decode().partition("/")
            command = FlushCommand(tenant=tenant, conversation=conversation,
                                   issued_at=self.clock(), issued_by="idle-timer")
            commands.append(Outbound(self.topics.turns, key, command.to_bytes(),
                                     tuple(flush_headers())))
        try:
            await self.deliver(commands)
        except Exception as exc:  # noqa: BLE001 - the next tick asks again
            if not is_transient(exc):
                raise
            log.warning("idle flush: could not produce flush commands: %r", exc)
            return
        metrics.record_events_out("sensory", self.topics.turns, len(commands))
        counters.idle_requested.update(keys)
        log.info("idle flush requested for %d conversation(s)", len(keys))

    def _die(self, stage: str, exc: BaseException) -> None:
        # faust acks an event once the agent moves past it, even when the agent raised: a
        # bug must not let the batch's offsets be committed. Die now; a restarted worker
        # gets the batch again.
        log.critical("%s: unexpected error, stopping the worker (exit %d)", stage, EXIT_BUG,
                     exc_info=exc)
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        os._exit(EXIT_BUG)


def _dump_tasks() -> None:
    import io

    for task in asyncio.all_tasks():
        buf = io.StringIO()
        task.print_stack(limit=12, file=buf)
        log.warning("task %s:\n%s", task.get_name(), buf.getvalue())


class _NoLock:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


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
    # Until faust installs its own handlers (when the worker starts), log in the same format
    # at the same level: the model loading and the metrics address are logged before that.
    configure_logging(settings.log_format, level=loglevel.upper(),
                      secrets=secrets_of(settings))
    if settings.log_format == "json":
        quiet_progress_bars()
    pipeline = Pipeline(settings, options, components=components)
    needed = [options.topics.turns, options.topics.segments, options.topics.entries,
              options.topics.memory_changes, options.topics.dlq]
    missing = missing_topics(settings, needed)
    if missing:
        log.error("missing topics %s: run `lightmem topics create` first", missing)
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
        pipeline.components.warm_up()
        pipeline.store.ensure_index()
        # `kill -USR1 <pid>` writes every thread's stack to stderr (diagnosing a stuck worker).
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        worker = faust.Worker(pipeline.app, loglevel=loglevel, quiet=True,
                              redirect_stdouts=False,
                              logging_config=worker_logging_config(settings.log_format,
                                                                   loglevel))
        try:
            worker.execute_from_commandline()
        except SystemExit as exc:
            return int(exc.code or 0)
        finally:
            pipeline.executor.shutdown(wait=False, cancel_futures=True)
            pipeline.close_lag_reader()
    finally:
        if server is not None:
            server.close()
    return 0  # pragma: no cover - execute_from_commandline always raises SystemExit
