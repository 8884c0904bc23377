"""The index sink as a step: memory entries -> the Elasticsearch index (first write wins) and
their ``add`` changes (see :mod:`.step` for what every stage shares).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lightmem.processors.events import covering_event_ids
from lightmem.processors.update import added_change
from lightmem.schemas import (
    MemoryEntry,
    SchemaError,
    Stage,
)
from lightmem.settings import Settings
from lightmem.streams.ingest.step import (
    Inbound,
    KeyMismatchError,
    Outbound,
    PoisonedRecord,
    StageStep,
    StepResult,
    empty_value_error,
    entry_origin,
    is_transient,
)
from lightmem.streams.kafka.change_log import ChangeRouter, change_key, scope_partition
from lightmem.streams.kafka.topics import Topics
from lightmem.streams.models.components import Components

__all__ = ["IndexSink"]

log = logging.getLogger(__name__)


# -- index sink: entries -> Elasticsearch ------------------------------------------------------


class IndexSink(StageStep):
    """entries -> embed -> idempotent bulk upsert -> memory changes.

    Args:
        store: Anything with ``bulk_create(entries) -> ids written`` (the Elasticsearch
            store).
    """

    name = Stage.INDEX

    #: Recent writes remembered for an erasure that arrives just after them.
    RECENT_WRITES = 10_000

    def __init__(self, settings: Settings, components: Components, topics: Topics, store: Any,
                 **kwargs: Any) -> None:
        super().__init__(settings, components, topics, **kwargs)
        self.store = store
        #: Where a scope's changes go on the changes topic (the worker sets it from the
        #: topic's partition count; without one, ``settings.kafka_partitions``).
        self.change_router: ChangeRouter | None = None
        #: (entry id, tenant, user, origin ms) of the latest writes, oldest first.
        self.written: deque[tuple[str, str, str, int | None]] = deque(
            maxlen=self.RECENT_WRITES)

    def erased_writes(self) -> list[str]:
        """Ids of recent writes the ledger now erases (written by a step that ran before the
        erasure reached this worker): the caller deletes them, then :meth:`unremember`."""
        if not self.erasures:
            return []
        return [w[0] for w in self.written if self.erasures.drops(w[1], w[2], w[3])]

    def unremember(self, ids: Iterable[str]) -> None:
        gone = set(ids)
        self.written = deque((w for w in self.written if w[0] not in gone),
                             maxlen=self.RECENT_WRITES)

    def step(self, batch: Sequence[Inbound], slots: Mapping[bytes, bytes] | None = None
             ) -> StepResult:
        """Embed and upsert a batch of entries.

        Raises:
            Exception: a transient store error (429, 5xx, connection): run it again later.
        """
        result = StepResult()
        entries: dict[str, tuple[Inbound, MemoryEntry]] = {}
        for rec in batch:
            try:
                if rec.value is None:
                    raise empty_value_error("MemoryEntry")
                entry = MemoryEntry.parse(rec.value)
                if rec.key != entry.scope.encode():
                    raise KeyMismatchError(f"key: must be {entry.scope!r} (scope_key(tenant, "
                                           f"user)) (got {rec.key!r})")
            except (SchemaError, KeyMismatchError) as exc:
                self.dead_letter(result, rec, "parse", exc)
                continue
            if self.erasures.drops(entry.tenant, entry.user, entry_origin(rec)):
                result.skipped += 1
                result.erased += 1
                continue
            entries.pop(entry.id, None)
            entries[entry.id] = (rec, entry)  # the newest copy of an id wins
        if not entries:
            return result
        pairs = list(entries.values())
        poisoned_before = result.dead_letters
        stored = self._write_all(pairs, result)
        if self.events is not None and stored:
            # Memories first, visible (refresh), then their events go: a search finds each
            # turn as an event or as a memory, never in neither (both at once, briefly, is
            # left to the reader: the service drops an event its memory hits cover).
            self.store.refresh()
            result.retired_events += covering_event_ids(stored)
            self.apply_events(result)
        now = self.clock()
        # Every stored entry gets its `add` change, also one the index already held: the
        # worker commits the changes with the entries' offsets in one transaction, so an
        # entry read again is one whose earlier attempt was never committed (its change was
        # aborted with it). The change id is deterministic: a consumer sees at most the same
        # change twice, never two different ones. An entry already present (possibly updated
        # since by the sleep-time stage) is left as it is: the first write wins.
        for entry in stored:
            change = added_change(entry, now)
            result.out.append(Outbound(self.topics.memory_changes, change_key(change),
                                       change.to_bytes(),
                                       partition=self._change_partition(entry)))
            self.written.append((entry.id, entry.tenant, entry.user,
                                 entry_origin(entries[entry.id][0])))
        result.applied += len(stored)
        result.skipped += len(pairs) - len(stored) - (result.dead_letters - poisoned_before)
        return result

    def _change_partition(self, entry: MemoryEntry) -> int:
        """The scope's partition of the changes topic (its own key would scatter them)."""
        if self.change_router is not None:
            return self.change_router.partition(self.topics.memory_changes, entry.tenant,
                                                entry.user)
        return scope_partition(entry.tenant, entry.user, self.settings.kafka_partitions)

    def _write_all(self, pairs: list[tuple[Inbound, MemoryEntry]], result: StepResult
                   ) -> list[MemoryEntry]:
        """The entries now in the index: written here or already there (first write wins:
        see ``bulk_create``); the poison ones are dead-lettered."""
        embedder = self.components.embedder
        try:
            embedded = embedder.embed_entries([e for _, e in pairs])
            self.store.bulk_create(embedded)
            return embedded
        except Exception as exc:  # noqa: BLE001 - isolate the poison entries below
            if is_transient(exc):
                raise
            log.warning("index: batch write failed (%r); writing entries one by one", exc)
        written = []
        for rec, entry in pairs:
            def write(e: MemoryEntry = entry) -> list[MemoryEntry]:
                [done] = embedder.embed_entries([e])
                self.store.bulk_create([done])
                return [done]
            try:
                written.extend(self.guarded(write))
            except PoisonedRecord as poisoned:
                self.dead_letter(result, rec, "index", poisoned)
        return written
