"""The Elasticsearch side of an erasure: the scope's memories, events and sleep-outbox entries
in every memory index (see :mod:`.forget` for the whole flow).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "erase_elasticsearch",
    "failed_deletes",
    "delete_documents",
    "sleep_outbox",
    "es_remaining",
    "es_users",
]

log = logging.getLogger(__name__)


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
        failed = failed_deletes(errors)
        if failed and not ok:
            raise RuntimeError(f"{index}: no document of the scope could be deleted: "
                               f"{failed!r:.500}")
        deleted += ok
        client.indices.refresh(index=index)


def failed_deletes(errors: Sequence[Any]) -> list[Any]:
    """The bulk delete errors that are failures: a ``not_found`` (404) is a document another
    writer removed between the search and the delete (the index sink retiring a stream
    event once its memory is indexed), i.e. already gone, as the erasure wants."""
    out = []
    for item in errors:
        result = next(iter(item.values()), {}) if isinstance(item, dict) else {}
        if not (isinstance(result, dict) and result.get("status") == 404):
            out.append(item)
    return out


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


def sleep_outbox(store: Any) -> Any:
    """The sleep workers' outbox beside the store's alias (pending changes hold memories'
    text until the worker that wrote them produced them)."""
    from lightmem.streams.sleep.outbox import Outbox, outbox_index

    return Outbox(store.client, outbox_index(store.alias))


def es_remaining(store: Any, tenant: str, user: str | None,
                  before: datetime | None = None) -> int:
    names = _memory_indices(store)
    if not names:
        return 0
    store.client.indices.refresh(index=",".join(names))
    return int(store.client.count(index=",".join(names),
                                  query=_scope_query(tenant, user, before))["count"])


def es_users(store: Any, tenant: str) -> set[str]:
    names = _memory_indices(store)
    if not names:
        return set()
    resp = store.client.search(index=",".join(names), size=0, query=_scope_query(tenant, None),
                               aggs={"users": {"terms": {"field": "user", "size": 10_000}}})
    return {b["key"] for b in resp["aggregations"]["users"]["buckets"]}
