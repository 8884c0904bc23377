"""Ingest first: sleep-time work yields while the ingest pipeline has a backlog.

A sleep window is opened for low traffic, but traffic does not always follow the plan (a
manual window left open, a schedule that meets a burst). Sleep workers share Elasticsearch,
Kafka and often hosts with the ingest workers, so every consolidation target they run
(kNN, update, re-embedding, an LLM call) slows ingest down. To keep ingest throughput
unchanged while a window is open, a sleep worker watches the ingest pipeline's consumer
group (``ingest_group``) on its topics (turns, segments, entries): while more than
``sleep_yield_lag`` records wait there, it starts no new target (the ones in flight finish
and commit, the rest are read again later) and pauses its partitions; it resumes once the
backlog is back under half of that (hysteresis, so it does not flap at the threshold).

Partitions where the ingest group has never committed are not counted: a deployment without
ingest workers (or one whose entries were written by a backfill) must not hold sleep work
back forever.

The same samples tell which entries the index sink has read: its committed offset on each
entries partition (:attr:`IngestBacklogMonitor.indexed_before`). An entry at or after it may
not be in Elasticsearch yet, so the sleep worker does not commit past it (it would take its
absence for a delete).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from lightmem.settings import Settings
from lightmem.streams.kafka.lag import LagReader, PartitionLag
from lightmem.streams.kafka.topics import Topics

__all__ = ["IngestPriority", "IngestBacklogMonitor", "ingest_backlog"]

log = logging.getLogger(__name__)


def ingest_backlog(lags: Iterable[PartitionLag]) -> int | None:
    """Records the ingest group has not committed past, over the partitions it has committed
    on; None when it has committed on none (no ingest worker has run on these topics)."""
    counted = [p.lag for p in lags if p.committed is not None]
    return sum(counted) if counted else None


class IngestPriority:
    """Decides, from backlog samples, whether sleep-time work must yield to ingest.

    Args:
        yield_above: Yield while the backlog is above this many records; 0 = never yield.
    """

    def __init__(self, yield_above: int) -> None:
        if yield_above < 0:
            raise ValueError(f"yield_above: must be >= 0 (got {yield_above!r})")
        self.yield_above = yield_above
        #: Resume threshold: half the yield threshold (hysteresis).
        self.resume_at = yield_above // 2
        self.yielding = False

    def observe(self, backlog: int | None) -> bool:
        """Take one sample (None = unknown: keep the current decision); True while yielding."""
        if self.yield_above == 0 or backlog is None:
            if self.yield_above == 0:
                self.yielding = False
            return self.yielding
        if self.yielding:
            self.yielding = backlog > self.resume_at
        else:
            self.yielding = backlog > self.yield_above
        return self.yielding


class IngestBacklogMonitor:
    """Thread: samples the ingest group's backlog every ``interval_s`` into an
    :class:`IngestPriority`; :attr:`yielding` is safe to read from any thread.

    Its own Kafka clients, so a slow broker answer never holds up the sleep worker's loop.
    A failed sample keeps the last decision (logged once per failure streak).

    Args:
        settings: Kafka connection; ``ingest_group`` names the ingest group,
            ``sleep_yield_lag`` the threshold.
        topics: The deployment's topics (turns, segments and entries are watched).
        interval_s: Sampling period.
    """

    def __init__(self, settings: Settings, topics: Topics, *, interval_s: float = 1.0,
                 name: str = "sleep") -> None:
        self.settings = settings
        self.watched = [topics.turns, topics.segments, topics.entries]
        self.entries_topic = topics.entries
        self.interval_s = interval_s
        self.name = name
        self.priority = IngestPriority(settings.sleep_yield_lag)
        #: The last backlog read (None: unknown or no ingest group on these topics).
        self.backlog: int | None = None
        #: Entries partition -> the ingest group's committed offset there (the index sink has
        #: read every entry before it); partitions it never committed on are absent.
        self.indexed_before: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Set once the first sample was taken (or failed).
        self.sampled = threading.Event()

    @property
    def yielding(self) -> bool:
        return self.priority.yielding

    @property
    def enabled(self) -> bool:
        return self.priority.yield_above > 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"{self.name}-ingest-backlog")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        reader: LagReader | None = None
        failing = False
        try:
            while not self._stop.is_set():
                try:
                    if reader is None:
                        reader = LagReader(self.settings, self.settings.ingest_group,
                                           timeout_s=max(5.0, self.interval_s))
                    lags = reader.read(self.watched)
                    self.backlog = ingest_backlog(lags)
                    self.indexed_before = {p.partition: p.committed for p in lags
                                           if p.topic == self.entries_topic
                                           and p.committed is not None}
                    failing = False
                except Exception as exc:  # noqa: BLE001 - a lost sample; the next one retries
                    if not failing:
                        log.warning("%s: ingest backlog not readable (keeping the last "
                                    "decision): %r", self.name, exc)
                    failing = True
                self.sampled.set()
                if not failing and self.enabled:
                    before = self.priority.yielding
                    if self.priority.observe(self.backlog) != before:
                        log.info("%s: ingest backlog %s records: %s", self.name, self.backlog,
                                 "yielding to ingest (no new targets)" if self.yielding
                                 else "resuming sleep-time work")
                self._stop.wait(self.interval_s)
        finally:
            if reader is not None:
                reader.close()
