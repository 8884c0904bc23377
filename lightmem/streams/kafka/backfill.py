"""Backfill: re-run the pipeline over the turns topic into a new index.

A backfill run ``R`` is an ordinary worker with:

- a new ingest group (``<ingest_group>-replay-<R>``), so a new consumer group and new, empty tables;
- the deployment's turns topic as input, read from a start offset per partition (earliest, or
  the first turn at/after a time) up to the end offsets seen when the run was planned
  (turns produced later belong to the live pipeline);
- private segments/entries/changes/DLQ topics (:meth:`Topics.for_replay`), so nothing mixes
  with the live pipeline;
- the new Elasticsearch index instead of the alias, and no idle timer (the live run's
  in-band flushes are replayed where they happened; each partition is flushed at its end).

The start offsets are committed for the new group before the worker starts, so the worker
simply resumes from them. The run is complete when the group's committed turns offsets
reach the end offsets and the private segments and entries topics have no lag.
``lightmem index promote <index>`` then switches the alias.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

from lightmem.settings import Settings
from lightmem.streams.kafka.lag import LagReader, by_topic
from lightmem.streams.kafka.topics import Topics, create_topics, delete_topics, kafka_config

__all__ = [
    "BackfillPlan",
    "BackfillProgress",
    "plan_backfill",
    "prepare_backfill",
    "backfill_progress",
    "cleanup_backfill",
    "worker_args",
]


@dataclass(frozen=True)
class BackfillPlan:
    run: str
    ingest_group: str
    index: str
    topics: Topics
    #: turns partition -> first offset to replay
    start: dict[int, int]
    #: turns partition -> end offset (exclusive) at planning time
    stop: dict[int, int]

    @property
    def total(self) -> int:
        return sum(max(0, self.stop[p] - self.start[p]) for p in self.stop)

    def changelog_topics(self) -> list[str]:
        from lightmem.streams.ingest.state import changelog_topic

        return [changelog_topic(self.topics, self.ingest_group, t)
                for t in ("sensory", "topic-buffers")]


@dataclass
class BackfillProgress:
    #: Turns the run has committed past (of ``plan.total``).
    turns_done: int
    #: Unconsumed records on the run's segments / entries topics.
    segments_lag: int
    entries_lag: int
    turns_finished: bool
    per_partition: dict[int, int] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.turns_finished and self.segments_lag == 0 and self.entries_lag == 0


def _run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%d%H%M%S") + "-" + uuid.uuid4().hex[:6]


def plan_backfill(
    settings: Settings,
    *,
    index: str,
    since: datetime | None = None,
    topics: Topics | None = None,
    run: str | None = None,
    timeout_s: float = 30.0,
) -> BackfillPlan:
    """Work out the offsets of a backfill into ``index``.

    Args:
        settings: Kafka settings; ``ingest_group`` names the ingest group.
        index: The new Elasticsearch index.
        since: Replay turns from this time on (Kafka record timestamps); None = earliest.
        topics: The deployment's topics (default from ``settings``).
        run: Run id (default: time + random suffix); only ``[A-Za-z0-9._-]``.

    Raises:
        LookupError: the turns topic does not exist.
        ValueError: an invalid run id.
    """
    from confluent_kafka import Consumer, TopicPartition

    base = topics or Topics.from_settings(settings)
    run = run or _run_id()
    if not re.fullmatch(r"[A-Za-z0-9._-]+", run):
        raise ValueError(f"run: only letters, digits, '.', '_' and '-' (got {run!r})")
    consumer = Consumer(kafka_config(settings, **{"group.id": f"lightmem-plan-{run}",
                                                  "enable.auto.commit": False}))
    try:
        meta = consumer.list_topics(base.turns, timeout=timeout_s).topics.get(base.turns)
        if meta is None or meta.error is not None:
            raise LookupError(f"topic {base.turns!r} does not exist")
        start: dict[int, int] = {}
        stop: dict[int, int] = {}
        for p in sorted(meta.partitions):
            low, high = consumer.get_watermark_offsets(TopicPartition(base.turns, p),
                                                       timeout=timeout_s)
            start[p], stop[p] = low, high
        if since is not None:
            when = since if since.tzinfo else since.replace(tzinfo=UTC)
            ms = int(when.timestamp() * 1000)
            found = consumer.offsets_for_times(
                [TopicPartition(base.turns, p, ms) for p in start], timeout=timeout_s)
            for tp in found:
                # -1: no record at/after the time: nothing to replay in that partition.
                start[tp.partition] = stop[tp.partition] if tp.offset < 0 else tp.offset
    finally:
        consumer.close()
    return BackfillPlan(run=run, ingest_group=f"{settings.ingest_group}-replay-{run}", index=index,
                        topics=base.for_replay(run), start=start, stop=stop)


def prepare_backfill(settings: Settings, plan: BackfillPlan) -> None:
    """Create the run's private topics and commit its start offsets on the turns topic."""
    from confluent_kafka import Consumer, TopicPartition

    create_topics(settings, plan.topics, only=plan.topics.stage_topics())
    consumer = Consumer(kafka_config(settings, **{"group.id": plan.ingest_group,
                                                  "enable.auto.commit": False}))
    try:
        offsets = [TopicPartition(plan.topics.turns, p, o) for p, o in plan.start.items()]
        consumer.commit(offsets=offsets, asynchronous=False)
    finally:
        consumer.close()


def backfill_progress(settings: Settings, plan: BackfillPlan, *,
                      reader: LagReader | None = None, timeout_s: float = 15.0
                      ) -> BackfillProgress:
    """Committed progress of the run (read in pipeline order, so a ``finished`` answer is
    never premature: each stage delivers its output before its input offsets commit).

    Args:
        reader: The run group's lag reader, kept open across calls (default: one per call).

    Raises:
        confluent_kafka.KafkaException: the cluster did not answer; ``retriable()`` errors
            (leader elections, timeouts) are worth asking again.
    """
    own = reader is None
    reader = reader or LagReader(settings, plan.ingest_group, timeout_s=timeout_s)
    try:
        turns = {p.partition: p for p in reader.read([plan.topics.turns])}
        per_partition = {}
        finished = True
        for p in plan.stop:
            committed = turns[p].committed if p in turns else None
            at = min(plan.start[p] if committed is None else committed, plan.stop[p])
            per_partition[p] = max(0, at - plan.start[p])
            finished &= at >= plan.stop[p] or plan.start[p] >= plan.stop[p]
        lags = by_topic(reader.read([plan.topics.segments, plan.topics.entries]))
        return BackfillProgress(turns_done=sum(per_partition.values()),
                                segments_lag=lags.get(plan.topics.segments, 0),
                                entries_lag=lags.get(plan.topics.entries, 0),
                                turns_finished=finished, per_partition=per_partition)
    finally:
        if own:
            reader.close()


def cleanup_backfill(settings: Settings, plan: BackfillPlan, *, keep_dlq: bool = True) -> None:
    """Delete the run's private topics, its changelogs and its consumer group (the DLQ topic
    is kept when ``keep_dlq``: it may hold dead letters to inspect)."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient

    names = [plan.topics.segments, plan.topics.entries, plan.topics.memory_changes,
             *plan.changelog_topics()]
    if not keep_dlq:
        names.append(plan.topics.dlq)
    delete_topics(settings, names)
    admin = AdminClient(kafka_config(settings))
    for future in admin.delete_consumer_groups([plan.ingest_group], request_timeout=30).values():
        try:
            future.result(timeout=60)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.GROUP_ID_NOT_FOUND:
                raise


def worker_args(plan: BackfillPlan, *, topic_prefix: str = "") -> list[str]:
    """``lightmem worker`` arguments that run ``plan``."""
    import json

    args = ["worker", "--ingest-group", plan.ingest_group, "--index", plan.index,
            "--replay-run", plan.run,
            "--stop-offsets", json.dumps({str(p): o for p, o in plan.stop.items()}),
            "--no-idle-timer"]
    if topic_prefix:
        args += ["--topic-prefix", topic_prefix]
    return args
