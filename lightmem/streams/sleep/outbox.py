"""The sleep workers' outbox: each pending change is written to a small Elasticsearch index
before its target write, so that a worker that dies between the index write and the change's
produce leaves it for its successor (:func:`settle` decides which pending changes happened).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from lightmem.processors.erasure import ErasureLedger, to_ms
from lightmem.processors.store import ScoredEntry
from lightmem.schemas import (
    ChangeOp,
    MemoryChange,
    MemoryEntry,
    stable_id,
)

__all__ = ["Outbox", "OutboxStore", "outbox_index", "settle"]


def outbox_index(alias: str) -> str:
    """The sleep workers' outbox index of the deployment whose memory alias is ``alias``."""
    return f"{alias}.sleep-outbox"


class Outbox:
    """Pending changes in a small Elasticsearch index, written before each target write.

    Args:
        client: Elasticsearch client.
        name: The index (``<alias>.sleep-outbox``; outside the ``<alias>-*`` memory indices).
    """

    def __init__(self, client: Any, name: str) -> None:
        self.client = client
        self.name = name

    def ensure(self) -> None:
        """Create the index if it is missing (idempotent)."""
        from elasticsearch import BadRequestError

        if self.client.indices.exists(index=self.name):
            return
        try:
            self.client.indices.create(index=self.name, mappings={
                "dynamic": False,
                "properties": {"memory_id": {"type": "keyword"},
                               "partition": {"type": "integer"},
                               "topic": {"type": "keyword"}},
            })
        except BadRequestError as exc:
            if exc.error != "resource_already_exists_exception":
                raise

    def put(self, change: MemoryChange, *, topic: str, partition: int) -> None:
        """Record ``change`` as pending (real-time visible to ``get``)."""
        self.client.index(index=self.name, id=change.memory_id, document={
            "memory_id": change.memory_id, "topic": topic, "partition": partition,
            "change": change.model_dump(mode="json"),
        })

    def remove(self, memory_ids: Sequence[str]) -> None:
        """Forget settled changes (missing ids are fine)."""
        if not memory_ids:
            return
        from elasticsearch.helpers import bulk

        bulk(self.client, ({"_op_type": "delete", "_index": self.name, "_id": i}
                           for i in memory_ids), raise_on_error=False)

    def of_scope(self, tenant: str, user: str | None, before: datetime | None = None
                 ) -> list[str]:
        """Ids of the pending changes of a scope (``user`` None: the whole tenant) made at or
        before ``before``: their records hold the memory's text (erasure, issue 14)."""
        from elasticsearch import NotFoundError
        from elasticsearch.helpers import scan

        try:
            self.client.indices.refresh(index=self.name)
        except NotFoundError:
            return []
        # The outbox is small (the changes of the batches in flight, or left by a dead
        # worker), and its only mapped fields are the memory id and the partition: the scope
        # is read from each change.
        ids = []
        for hit in scan(self.client, index=self.name, query={"query": {"match_all": {}}}):
            c = MemoryChange.model_validate(hit["_source"]["change"])
            if (c.tenant == tenant and (user is None or c.user == user)
                    and (before is None or c.at <= before)):
                ids.append(hit["_id"])
        return ids

    def erase(self, tenant: str, user: str | None, before: datetime | None = None) -> int:
        """Delete the scope's pending changes made at or before ``before``, then refresh;
        returns how many were deleted (a dead worker's successor never produces them)."""
        from elasticsearch.helpers import bulk

        ids = self.of_scope(tenant, user, before)
        if not ids:
            return 0
        ok, _ = bulk(self.client, ({"_op_type": "delete", "_index": self.name, "_id": i}
                                   for i in ids), raise_on_error=False)
        self.client.indices.refresh(index=self.name)
        return ok

    def pending(self, topic: str, partitions: Sequence[int]) -> list[MemoryChange]:
        """Changes left pending for these partitions (by a worker that died)."""
        if not partitions:
            return []
        self.client.indices.refresh(index=self.name)
        resp = self.client.search(index=self.name, size=10_000, query={"bool": {"filter": [
            {"term": {"topic": topic}}, {"terms": {"partition": list(partitions)}}]}})
        return [MemoryChange.model_validate(h["_source"]["change"]) for h in resp["hits"]["hits"]]


class OutboxStore:
    """A :class:`~lightmem.processors.store.MemoryStore` that records each replace/delete
    in the :class:`Outbox` before it happens (see the module docstring).

    Args:
        store: The Elasticsearch store.
        outbox: Where pending changes go.
        topic: The entries topic (outbox entries are settled per partition).
        partition: The partition whose entries caused the work.
        caused_by: The newer entries of the target being revisited.
        now: Time of the change.
    """

    def __init__(self, store: Any, outbox: Outbox, *, topic: str, partition: int,
                 caused_by: Sequence[str], now: datetime) -> None:
        self.store = store
        self.outbox = outbox
        self.topic = topic
        self.partition = partition
        self.caused_by = list(caused_by)
        self.now = now
        self.written: list[str] = []

    def upsert(self, entries: Sequence[MemoryEntry]) -> None:
        self.store.upsert(entries)

    def search(self, tenant: str, user: str, vector: Sequence[float], k: int, *,
               not_after: datetime | None = None) -> list[ScoredEntry]:
        return self.store.search(tenant, user, vector, k, not_after=not_after)

    def get(self, ids: Sequence[str]) -> list[MemoryEntry]:
        return self.store.get(ids)

    def _pending(self, op: ChangeOp, before: MemoryEntry, after: MemoryEntry | None,
                 version: int) -> None:
        change = MemoryChange(
            change_id=stable_id(before.id, op.value, version), op=op, memory_id=before.id,
            tenant=before.tenant, user=before.user, before=before, after=after,
            caused_by=self.caused_by, reason="recovered after a worker restart", at=self.now)
        self.outbox.put(change, topic=self.topic, partition=self.partition)
        self.written.append(before.id)

    def replace(self, entry: MemoryEntry, *, expected_version: int) -> None:
        [before] = self.store.get([entry.id]) or [None]
        if before is not None and before.version == expected_version:
            self._pending(ChangeOp.update, before, entry, entry.version)
        self.store.replace(entry, expected_version=expected_version)

    def delete(self, entry_id: str, *, expected_version: int) -> None:
        [before] = self.store.get([entry_id]) or [None]
        if before is not None and before.version == expected_version:
            self._pending(ChangeOp.delete, before, None, before.version + 1)
        self.store.delete(entry_id, expected_version=expected_version)


def settle(store: Any, pending: Sequence[MemoryChange],
           erasures: ErasureLedger | None = None) -> list[MemoryChange]:
    """The pending changes that reached the index (to be produced); the others never
    happened. A change of a scope ``erasures`` erased after it was made is never produced
    (its record holds the erased memory's text)."""
    current = {e.id: e for e in store.get([c.memory_id for c in pending])}
    applied = []
    for c in pending:
        if erasures is not None and erasures.drops(c.tenant, c.user, to_ms(c.at)):
            continue
        now = current.get(c.memory_id)
        if c.op is ChangeOp.delete and now is None:
            applied.append(c)
        elif (c.op is ChangeOp.update and now is not None and c.after is not None
              and now.version == c.after.version and now.fact == c.after.fact):
            applied.append(c)
    return applied
