"""Provisional events on Elasticsearch: turns searchable before their memories (freshness).

One concrete index per deployment, ``<alias>-events`` (the memory mapping; the memories'
index template covers the name, and so do the erasure, which deletes a scope from every
``<alias>-*`` index, and the teardown of a deployment). Not behind the alias: searches of
memories never see events unless they ask for them.

Who writes what (:mod:`lightmem.streams.ingest.stages`): the sensory stage writes the event
of every turn it pushes into a sensory buffer (embedded, idempotent: the id comes from the
conversation key and the turn id), before its batch's transaction commits, so an event
always exists before the segment holding its turn can be read downstream. The index sink
retires the events of the turns its memories cover, after refreshing the memories, so a
search never finds the turn in neither place; the short-term stage retires at once the turns
a summary found nothing in. A write that is lost with an aborted transaction is written
again when the batch is read again; retiring an event twice is a no-op.

Exceptions: :class:`~lightmem.streams.elastic.store.BulkWriteError` (documents failed
permanently); transport errors pass through (the stage sorts them as transient).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from elasticsearch.helpers import streaming_bulk

from lightmem.schemas import MemoryEntry

from .store import _RETRY_STATUSES, BulkWriteError, ElasticsearchStore

__all__ = ["events_index", "EventIndex"]


def events_index(alias: str) -> str:
    """The events index of the deployment whose memories are behind ``alias``."""
    return f"{alias}-events"


class EventIndex:
    """Writes and retires the events of one deployment.

    Args:
        client: An Elasticsearch client (not closed here).
        alias: The memories' alias (the events index is named after it).
        dim: Embedding dimension (384: all-MiniLM-L6-v2).
    """

    def __init__(self, client: Any, alias: str, *, dim: int = 384) -> None:
        self.client = client
        self.name = events_index(alias)
        self.store = ElasticsearchStore(client, alias=alias, dim=dim, index=self.name,
                                          kind="events")

    def ensure(self) -> None:
        """Create the index when missing (idempotent)."""
        self.store.create_index(self.name, exist_ok=True)

    def write(self, events: Sequence[MemoryEntry]) -> int:
        """Index ``events`` (each with its embedding) by id; returns how many were written."""
        return self.store.bulk_upsert(events)

    def retire(self, ids: Sequence[str]) -> int:
        """Delete the events ``ids`` (missing ones are fine); returns how many were deleted.

        Raises:
            BulkWriteError: some could not be deleted (other than not found).
        """
        if not ids:
            return 0
        deleted = 0
        failures: dict[str, str] = {}
        for ok, item in streaming_bulk(
            self.client,
            ({"_op_type": "delete", "_index": self.name, "_id": i} for i in ids),
            chunk_size=500, max_retries=3, initial_backoff=0.5,
            retry_on_status=_RETRY_STATUSES, raise_on_error=False,
        ):
            info = next(iter(item.values()))
            if ok:
                deleted += 1
            elif info.get("status") != 404:
                failures[str(info.get("_id"))] = f"{info.get('status')}: {info.get('error')}"
        if failures:
            raise BulkWriteError(failures)
        return deleted

    def erase(self, scopes: Sequence[tuple[str, str | None, int]]) -> int:
        """Delete the events of erased scopes: ``(tenant, user or None for the whole tenant,
        erased at ms)``, each only for turns produced at or before then (an event's
        ``ingest_time`` is its turn's produce time). Returns how many were deleted.

        The erasure's own passes delete them too; this catches an event a worker wrote
        before the erasure reached it, after those passes ran.
        """
        from datetime import UTC, datetime

        deleted = 0
        for lo in range(0, len(scopes), 500):
            should = []
            for tenant, user, at_ms in scopes[lo:lo + 500]:
                at = datetime.fromtimestamp(at_ms / 1000, UTC).isoformat()
                clauses: list[dict[str, Any]] = [{"term": {"tenant": tenant}},
                                                 {"range": {"ingest_time": {"lte": at}}}]
                if user is not None:
                    clauses.append({"term": {"user": user}})
                should.append({"bool": {"filter": clauses}})
            query = {"bool": {"should": should, "minimum_should_match": 1}}
            while True:
                self.client.indices.refresh(index=self.name)
                hits = self.client.search(index=self.name, query=query, size=1000,
                                          source=False, track_total_hits=False)["hits"]["hits"]
                if not hits:
                    break
                deleted += self.retire([h["_id"] for h in hits])
        return deleted
