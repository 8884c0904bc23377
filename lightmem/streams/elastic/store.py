"""The Elasticsearch store: memories in a kNN index behind an alias.

:class:`ElasticsearchStore` implements :class:`lightmem.processors.store.MemoryStore` with the
same semantics as the embedded store (:class:`lightmem.streams.embedded.store.EmbeddedStore`),
so retrieval and sleep-time consolidation run unchanged on either. On top of the protocol it
manages the index itself (the client and errors are in :mod:`.client`, the mapping in
:mod:`.mappings`; why one module of ~800 lines for the rest: it is one class, the
:class:`~lightmem.processors.store.MemoryStore` port, whose writes, reads and searches share
the alias resolution, scope filters and version checks below):

* **Versioned indices behind an alias.** Workers read and write ``<alias>`` (default
  ``lightmem-memories``); the alias points at exactly one concrete index, ``<alias>-v1`` at
  first. A backfill writes into a new index (``ElasticsearchStore(client, index="...")``) and
  :meth:`ElasticsearchStore.promote` moves the alias with ONE ``_aliases`` call (remove the old
  index + add the new one), which Elasticsearch applies atomically: a search through the alias
  sees either the old index or the new one, never both or neither.
* **Mapping.** An index template (pattern ``<alias>-*``) and the explicit mapping given to
  every index we create (so nothing depends on the template being there): ``embedding`` is a
  ``dense_vector`` with HNSW (``index_options.type = hnsw``, full float vectors, so scores are
  exact cosines of the stored vectors) and cosine similarity; scope and provenance fields are
  ``keyword``; ``event_time``/``ingest_time`` are ``date``; ``fact`` is ``text`` (standard
  analyzer: the test distribution has no analysis-common module); ``version`` is ``integer``.
  ``dynamic: false``: a field added to :class:`~lightmem.schemas.MemoryEntry` later is kept in
  ``_source`` (entries still round-trip) without breaking writes; making it searchable takes a
  new index version and a promote.
* **Scores.** For ``similarity: cosine`` Elasticsearch reports ``_score = (1 + cos) / 2``;
  :meth:`ElasticsearchStore.search` maps it back with ``cos = 2 * _score - 1`` so that
  :class:`~lightmem.processors.store.ScoredEntry.score` is the cosine similarity on both
  stores (the update-queue threshold of 0.8 means the same thing everywhere).
* **Idempotent writes.** The document ``_id`` is ``MemoryEntry.id`` (deterministic), so a
  replayed batch overwrites instead of duplicating. Bulk writes retry only 429 and 5xx
  (transient); anything else is permanent and raises :class:`BulkWriteError` naming every
  failed id.
* **Optimistic concurrency.** :meth:`~ElasticsearchStore.replace` and
  :meth:`~ElasticsearchStore.delete` read the document (real-time GET: no refresh needed),
  check the stored ``version`` field, then write with ``if_seq_no`` + ``if_primary_term`` from
  that read. A concurrent writer between the read and the write makes Elasticsearch answer
  409, which becomes :class:`~lightmem.processors.store.VersionConflict`.
* **Visibility.** Search, :meth:`~ElasticsearchStore.iter_entries` and
  :meth:`~ElasticsearchStore.count_entries` see what was refreshed (Elasticsearch is near
  real time, about 1 s); :meth:`~ElasticsearchStore.get`, ``replace`` and ``delete`` are
  real time. Pass ``refresh=True`` (tests) or call :meth:`~ElasticsearchStore.refresh` when a
  write must be searchable before the next call.

Exceptions::

    Exception
     ├── VersionConflict      (lightmem.processors.store) optimistic replace/delete lost
     ├── ValueError           entries without an embedding or with the wrong dimension;
     │                        conflicting Elasticsearch credentials in the settings
     └── EsStoreError         base of this module's own failures
          ├── BulkWriteError  documents rejected permanently (or still failing after the
          │                   retries); ``failures`` maps each id to its reason
          ├── IndexNotFound   the named index does not exist (or is an alias)
          ├── IndexExists     create_index on a name that is taken
          └── IncompatibleIndex  the index is not a memory index of this dimension, or the
                              alias name is taken by a concrete index

Client errors (``elasticsearch.ApiError``, ``elasticsearch.TransportError``) from reads
pass through unchanged; none of them carries the credentials (see :func:`es_client`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from elasticsearch import BadRequestError, ConflictError, Elasticsearch, NotFoundError
from elasticsearch.helpers import streaming_bulk

from lightmem.processors.store import ScoredEntry, VersionConflict
from lightmem.schemas import MemoryEntry
from lightmem.streams.elastic.client import (
    BulkWriteError,
    EsStoreError,
    IncompatibleIndex,
    IndexExists,
    IndexNotFound,
    es_client,
    redact_url,
)
from lightmem.streams.elastic.mappings import memory_mappings
from lightmem.streams.observe import metrics

__all__ = [
    "DEFAULT_ALIAS",
    "BulkWriteError",
    "ElasticsearchStore",
    "EsStoreError",
    "IncompatibleIndex",
    "IndexExists",
    "IndexInfo",
    "IndexNotFound",
    "es_client",
    "memory_mappings",
    "redact_url",
]

log = logging.getLogger(__name__)

#: The alias workers read and write through (``Settings.es_alias``).
DEFAULT_ALIAS = "lightmem-memories"

#: Statuses worth retrying: overload (429) and server-side trouble (5xx). A 4xx other than
#: 429 will fail the same way again (bad document, mapping conflict): retrying only delays
#: the dead letter.
_RETRY_STATUSES: tuple[int, ...] = (429, *range(500, 600))

#: Elasticsearch's cap on ``knn.num_candidates`` (and hence on ``k``).
_MAX_KNN = 10_000

Refresh = bool | Literal["wait_for"]


def _iso(t: datetime) -> str:
    if t.tzinfo is None:
        raise ValueError(f"time bound: must be timezone-aware (got {t!r})")
    return t.astimezone(UTC).isoformat()


def _cosine(score: float) -> float:
    """Elasticsearch's cosine ``_score = (1 + cos) / 2`` back to ``cos``."""
    return 2.0 * float(score) - 1.0


@dataclass(frozen=True)
class IndexInfo:
    """One memory index as ``lightmem index list`` shows it."""

    #: Concrete index name.
    name: str
    #: Documents (memories) in it, as of its last refresh.
    docs: int
    #: Embedding dimension from its mapping (None: not a memory index).
    dims: int | None
    #: Whether the alias points at it.
    current: bool


# --------------------------------------------------------------------------- store


class ElasticsearchStore:
    """Memory entries in an Elasticsearch kNN index, behind an alias.

    Implements :class:`lightmem.processors.store.MemoryStore`; see the module docstring for
    the mapping, scores, retries and concurrency.

    Args:
        client: an Elasticsearch client (see :func:`es_client`); not closed by the store.
        alias: the alias to read and write through (default ``lightmem-memories``); its
            indices are named ``<alias>-<version>``.
        dim: embedding dimension (default 384, all-MiniLM-L6-v2).
        index: read and write this concrete index instead of the alias, e.g. a backfill
            into a new index before it is promoted (default None: the alias).
        refresh: the ``refresh`` of every write (default False: visible to search within
            the refresh interval; True makes each write searchable at once, for tests).
        max_retries: bulk retries of documents answered 429/5xx (default 3).
        retry_backoff_s: first bulk retry delay, doubled per retry (default 1.0).
        chunk_size: documents per bulk request (default 500).
        kind: what the documents are (memories | events), a label of the docs metric.
    """

    def __init__(
        self,
        client: Elasticsearch,
        *,
        alias: str = DEFAULT_ALIAS,
        dim: int = 384,
        index: str | None = None,
        refresh: Refresh = False,
        max_retries: int = 3,
        retry_backoff_s: float = 1.0,
        chunk_size: int = 500,
        kind: str = "memories",
    ) -> None:
        if dim < 1:
            raise ValueError(f"dim: must be >= 1 (got {dim!r})")
        self.client = client
        self.alias = alias
        self.dim = dim
        self.index = index
        self.refresh_writes: Refresh = refresh
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self.chunk_size = chunk_size
        #: What the documents are, for the ``lightmem_es_docs_total{kind}`` metric.
        self.kind = kind

    @property
    def target(self) -> str:
        """What reads and writes address: the concrete ``index`` if given, else the alias."""
        return self.index or self.alias

    @property
    def template_name(self) -> str:
        """Name of the index template covering ``<alias>-*``."""
        return f"{self.alias}-template"

    # -- index management

    def ensure_index(self) -> str:
        """Make the store usable: template, first index and alias (idempotent).

        With ``index`` given, only that index is created when missing. Otherwise the index
        template is (re)written and, when the alias does not exist yet, ``<alias>-v1`` is
        created and the alias pointed at it.

        Returns:
            The concrete index that reads and writes now reach.

        Raises:
            IncompatibleIndex: the alias name is taken by a concrete index (e.g. one that
                Elasticsearch auto-created from a write before the alias existed).
        """
        if self.index is not None:
            self.create_index(self.index, exist_ok=True)
            return self.index
        self.client.indices.put_index_template(
            name=self.template_name,
            index_patterns=[f"{self.alias}-*"],
            template={"mappings": memory_mappings(self.dim)},
            # Overlapping templates must differ in priority: 100 beats unprioritised ones
            # and leaves room above for an operator's own override.
            priority=100,
            meta={"managed_by": "lightmem", "alias": self.alias},
        )
        current = self.current_index()
        if current is not None:
            return current
        if self.client.indices.exists(index=self.alias):
            raise IncompatibleIndex(
                f"{self.alias!r} is a concrete index, so it cannot be the alias: reindex it "
                "into a versioned index, delete it, then run ensure_index again"
            )
        first = f"{self.alias}-v1"
        self.create_index(first, exist_ok=True)
        self.promote(first)
        return first

    def create_index(self, name: str, *, exist_ok: bool = False) -> bool:
        """Create a memory index ``name`` with the explicit mapping (the alias is not moved).

        Args:
            name: the concrete index name, by convention ``<alias>-v<N>``.
            exist_ok: an existing index is fine (default False: :class:`IndexExists`).

        Returns:
            True when created, False when it existed and ``exist_ok``.

        Raises:
            IndexExists: ``name`` exists (as an index or an alias) and not ``exist_ok``.
            elasticsearch.BadRequestError: Elasticsearch rejects the name.
        """
        if self.client.indices.exists(index=name):
            if exist_ok and name in self._concrete(name):
                return False
            raise IndexExists(f"index {name!r} already exists (as an index or an alias)")
        try:
            self.client.indices.create(index=name, mappings=memory_mappings(self.dim))
        except BadRequestError as exc:
            if exc.error == "resource_already_exists_exception":
                # A concurrent creator won the race: same outcome as finding it above.
                if exist_ok:
                    return False
                raise IndexExists(f"index {name!r} already exists") from None
            raise
        return True

    def _concrete(self, name: str) -> list[str]:
        try:
            return list(self.client.indices.get(index=name))
        except NotFoundError:
            return []

    def alias_indices(self) -> list[str]:
        """The concrete indices the alias points at (none, or one in normal operation)."""
        try:
            return sorted(self.client.indices.get_alias(name=self.alias))
        except NotFoundError:
            return []

    def current_index(self) -> str | None:
        """The concrete index behind the alias, or None when the alias does not exist.

        Raises:
            IncompatibleIndex: the alias points at several indices (not made by this store).
        """
        indices = self.alias_indices()
        if len(indices) > 1:
            raise IncompatibleIndex(
                f"alias {self.alias!r} points at {len(indices)} indices {indices!r}: "
                f"promote one of them to make it single again"
            )
        return indices[0] if indices else None

    def _dims(self, name: str) -> int | None:
        """Embedding dims of concrete index ``name`` (None: not a memory index)."""
        try:
            mapping = self.client.indices.get_mapping(index=name)
        except NotFoundError:
            raise IndexNotFound(f"index {name!r} does not exist") from None
        if name not in mapping:
            raise IndexNotFound(
                f"{name!r} is an alias of {sorted(mapping)!r}, not an index: promote a "
                "concrete index"
            )
        props = mapping[name]["mappings"].get("properties", {})
        field = props.get("embedding", {})
        return int(field["dims"]) if field.get("type") == "dense_vector" else None

    def promote(self, name: str) -> str | None:
        """Point the alias at index ``name``, atomically.

        One ``_aliases`` request removes the alias from every index that has it and adds it
        to ``name``; Elasticsearch applies the actions of one request together, so searches
        through the alias never see zero or two indices.

        Args:
            name: an existing memory index with this store's embedding dimension.

        Returns:
            The index the alias pointed at before (None if the alias is new).

        Raises:
            IndexNotFound: ``name`` does not exist or is an alias.
            IncompatibleIndex: ``name`` has no ``dense_vector`` embedding of ``dim``
                dimensions, or the alias name is a concrete index.
        """
        dims = self._dims(name)
        if dims != self.dim:
            got = "no dense_vector 'embedding' field" if dims is None else f"dims={dims}"
            raise IncompatibleIndex(
                f"index {name!r} is not a memory index for {self.dim}-dimensional "
                f"embeddings ({got}): the alias {self.alias!r} was not moved"
            )
        before = self.alias_indices()
        if not before and self.client.indices.exists(index=self.alias):
            raise IncompatibleIndex(
                f"{self.alias!r} is a concrete index, so it cannot be the alias: reindex it "
                "into a versioned index and delete it"
            )
        actions: list[dict[str, Any]] = [
            {"remove": {"index": old, "alias": self.alias}} for old in before if old != name
        ]
        actions.append({"add": {"index": name, "alias": self.alias}})
        self.client.indices.update_aliases(actions=actions)
        log.info("alias %s -> %s (was %s)", self.alias, name, before or "unset")
        if not before:
            return None
        previous = [i for i in before if i != name]
        return previous[0] if previous else name

    def list_indices(self) -> list[IndexInfo]:
        """Memory indices under ``<alias>-*`` plus whatever the alias points at."""
        current = set(self.alias_indices())
        try:
            found = self.client.indices.get(index=f"{self.alias}-*", expand_wildcards="open")
        except NotFoundError:
            found = {}
        infos = {}
        for name in sorted(set(found) | current):
            dims = self._dims(name)
            docs = int(self.client.count(index=name)["count"])
            infos[name] = IndexInfo(name=name, docs=docs, dims=dims, current=name in current)
        return list(infos.values())

    def refresh(self) -> None:
        """Make every write so far visible to search (a barrier for tests and tools)."""
        self.client.indices.refresh(index=self.target)

    # -- writes

    def _check(self, entries: Sequence[MemoryEntry]) -> None:
        errors = []
        for e in entries:
            if e.embedding is None:
                errors.append(f"{e.id!r}: no embedding (embed before storing)")
            elif len(e.embedding) != self.dim:
                errors.append(f"{e.id!r}: embedding has {len(e.embedding)} dims, want {self.dim}")
        if errors:
            raise ValueError("embedding: " + "; ".join(errors))

    @staticmethod
    def _doc(e: MemoryEntry) -> dict[str, Any]:
        return e.model_dump(mode="json")

    def upsert(self, entries: Sequence[MemoryEntry]) -> None:
        """Insert or replace entries by id (idempotent). Each must carry its embedding.

        Raises:
            ValueError: an entry has no embedding or one of the wrong dimension (checked for
                all entries before anything is written).
            BulkWriteError: see :meth:`bulk_upsert`.
        """
        self.bulk_upsert(entries)

    def bulk_create(self, entries: Iterable[MemoryEntry], *, refresh: Refresh | None = None
                    ) -> list[str]:
        """Write entries whose id is not in the index yet; returns the ids written.

        The index sink's write: entry ids are deterministic, so an id already present was
        written by an earlier delivery of the same entry and may since have been updated by
        the sleep-time stage (version > 1). A redelivery must neither overwrite that update
        nor record a second ``add``: the first write wins. Retries and errors as in
        :meth:`bulk_upsert`.
        """
        created: list[str] = []
        self._bulk(list(entries), refresh, op="create", created=created)
        return created

    def bulk_upsert(self, entries: Iterable[MemoryEntry], *, refresh: Refresh | None = None) -> int:
        """Index entries with ``_id = entry.id`` through the bulk API.

        Replaying the same entries overwrites the same documents (at-least-once delivery
        never duplicates). Documents answered 429 or 5xx are retried up to ``max_retries``
        times with exponential backoff; any other failure is permanent.

        Args:
            entries: the entries, each with its embedding.
            refresh: this call's ``refresh`` (default: the store's).

        Returns:
            The number of documents written.

        Raises:
            ValueError: an entry has no embedding or the wrong dimension (nothing written).
            BulkWriteError: some documents failed permanently or ran out of retries; every
                other document of the call was written.
        """
        return self._bulk(list(entries), refresh, op="index")

    def _bulk(self, batch: list[MemoryEntry], refresh: Refresh | None, *, op: str,
              created: list[str] | None = None) -> int:
        self._check(batch)
        if not batch:
            return 0
        actions = (
            {"_op_type": op, "_index": self.target, "_id": e.id, "_source": self._doc(e)}
            for e in batch
        )
        written = 0
        present = 0
        failures: dict[str, str] = {}
        started = time.perf_counter()
        try:
            for ok, item in streaming_bulk(
                self.client,
                actions,
                chunk_size=self.chunk_size,
                max_retries=self.max_retries,
                initial_backoff=self.retry_backoff_s,
                retry_on_status=_RETRY_STATUSES,
                # Collect per-document failures ourselves, so the error lists every failed id.
                raise_on_error=False,
                refresh=self.refresh_writes if refresh is None else refresh,
            ):
                info = next(iter(item.values()))
                if ok:
                    written += 1
                    if created is not None:
                        created.append(str(info.get("_id")))
                    continue
                if op == "create" and info.get("status") == 409:
                    present += 1  # written before: the first write wins
                    continue
                err = info.get("error")
                if isinstance(err, Mapping):
                    reason = f"{info.get('status')} {err.get('type')}: {err.get('reason')}"
                else:
                    reason = f"{info.get('status')}: {err}"
                failures[str(info.get("_id"))] = reason
        finally:
            # A call that raised (connection lost) counts its documents as failed.
            metrics.record_es_bulk(time.perf_counter() - started, written=written,
                                   failed=len(batch) - written - present, kind=self.kind)
        if failures:
            raise BulkWriteError(failures)
        return written

    def _read_version(self, entry_id: str) -> tuple[int | None, int, int]:
        """Stored ``version``, ``_seq_no`` and ``_primary_term`` of one document (real time)."""
        try:
            doc = self.client.get(index=self.target, id=entry_id, source_includes=["version"])
        except NotFoundError:
            return None, -1, -1
        return int(doc["_source"]["version"]), int(doc["_seq_no"]), int(doc["_primary_term"])

    def replace(self, entry: MemoryEntry, *, expected_version: int) -> None:
        """Write ``entry`` only if the stored one has ``expected_version``.

        Raises:
            VersionConflict: the entry is missing, its stored version differs, or another
                writer changed it between our read and our write (409).
            ValueError: ``entry`` has no embedding or the wrong dimension.
        """
        self._check([entry])
        current, seq_no, term = self._read_version(entry.id)
        if current != expected_version:
            raise VersionConflict(f"{entry.id}: stored {current}, expected {expected_version}")
        try:
            self.client.index(
                index=self.target,
                id=entry.id,
                document=self._doc(entry),
                if_seq_no=seq_no,
                if_primary_term=term,
                refresh=self.refresh_writes,
            )
        except ConflictError:
            raise VersionConflict(
                f"{entry.id}: changed by another writer after it was read at version "
                f"{expected_version}"
            ) from None

    def delete(self, entry_id: str, *, expected_version: int) -> None:
        """Delete only if the stored version is ``expected_version``.

        Raises:
            VersionConflict: the entry is missing, its stored version differs, or another
                writer changed or deleted it between our read and our delete.
        """
        current, seq_no, term = self._read_version(entry_id)
        if current != expected_version:
            raise VersionConflict(f"{entry_id}: stored {current}, expected {expected_version}")
        try:
            self.client.delete(
                index=self.target,
                id=entry_id,
                if_seq_no=seq_no,
                if_primary_term=term,
                refresh=self.refresh_writes,
            )
        except (ConflictError, NotFoundError):
            raise VersionConflict(
                f"{entry_id}: changed or deleted by another writer after it was read at "
                f"version {expected_version}"
            ) from None

    # -- reads

    def get(self, ids: Sequence[str], *, with_embedding: bool = False) -> list[MemoryEntry]:
        """The stored entries with these ids, in the order asked (missing ids skipped).

        Real time: sees every acknowledged write, refreshed or not.
        """
        if not ids:
            return []
        excludes = None if with_embedding else ["embedding"]
        resp = self.client.mget(index=self.target, ids=list(ids), source_excludes=excludes)
        return [MemoryEntry.model_validate(d["_source"]) for d in resp["docs"] if d.get("found")]

    def _scope_filter(
        self,
        tenant: str,
        user: str,
        not_after: datetime | None,
        not_before: datetime | None,
    ) -> list[dict[str, Any]]:
        filters: list[dict[str, Any]] = [{"term": {"tenant": tenant}}, {"term": {"user": user}}]
        bounds = {}
        if not_after is not None:
            bounds["lte"] = _iso(not_after)
        if not_before is not None:
            bounds["gte"] = _iso(not_before)
        if bounds:
            filters.append({"range": {"event_time": bounds}})
        return filters

    def _knn(
        self, vector: Sequence[float], k: int, filters: list[dict[str, Any]], boost: float = 1.0
    ) -> dict[str, Any]:
        if not 1 <= k <= _MAX_KNN:
            raise ValueError(f"k: must be between 1 and {_MAX_KNN} (got {k!r})")
        if len(vector) != self.dim:
            raise ValueError(f"vector: has {len(vector)} dims, want {self.dim}")
        return {
            "field": "embedding",
            "query_vector": [float(x) for x in vector],
            "k": k,
            # More candidates than k improve HNSW recall; a scope with fewer matching
            # documents than this is searched exactly by Elasticsearch anyway.
            "num_candidates": min(_MAX_KNN, max(4 * k, 100)),
            # Inside the knn (pre-filter), not a post_filter: the k nearest are chosen
            # among the scope's memories, so another user's memories can neither be
            # returned nor crowd this user's out of the top k.
            "filter": filters,
            "boost": boost,
        }

    def search(
        self,
        tenant: str,
        user: str,
        vector: Sequence[float],
        k: int,
        *,
        not_after: datetime | None = None,
        not_before: datetime | None = None,
    ) -> list[ScoredEntry]:
        """kNN within the (tenant, user) scope, best first.

        Args:
            tenant: scope tenant (exact match).
            user: scope user (exact match).
            vector: query embedding of ``dim`` floats.
            k: number of hits (1..10000); fewer when the scope holds fewer memories.
            not_after: only memories with ``event_time <= not_after`` (millisecond
                precision, inclusive); timezone-aware.
            not_before: only memories with ``event_time >= not_before`` (inclusive).

        Returns:
            Hits with ``score`` = cosine similarity (``2 * _score - 1``), entries without
            embeddings.
        """
        if k < 1:
            return []
        filters = self._scope_filter(tenant, user, not_after, not_before)
        resp = self.client.search(
            index=self.target,
            knn=self._knn(vector, k, filters),
            size=k,
            source_excludes=["embedding"],
        )
        return [
            ScoredEntry(entry=MemoryEntry.model_validate(h["_source"]), score=_cosine(h["_score"]))
            for h in resp["hits"]["hits"]
        ]

    def lexical_search(
        self,
        tenant: str,
        user: str,
        terms: Sequence[str],
        k: int,
        *,
        not_after: datetime | None = None,
        not_before: datetime | None = None,
    ) -> list[ScoredEntry]:
        """BM25 on ``fact`` and ``original_text`` within the scope, best first (the lexical
        side of hybrid search).

        The scope and time bounds are the same ``filter`` clauses as the kNN's, so a word
        can never bring up another tenant's or user's memory. The terms go to one ``match``
        query (OR), analysed like the field (standard analyzer).

        Args:
            tenant: scope tenant.
            user: scope user.
            terms: query words (:func:`lightmem.processors.lexical.query_terms`).
            k: number of hits (1..10000).
            not_after: inclusive upper bound on event time.
            not_before: inclusive lower bound on event time.

        Returns:
            Hits with ``score`` = BM25 ``_score``; none without terms.
        """
        text = " ".join(t for t in terms if t.strip())
        if k < 1 or not text:
            return []
        if k > _MAX_KNN:
            raise ValueError(f"k: must be between 1 and {_MAX_KNN} (got {k!r})")
        filters = self._scope_filter(tenant, user, not_after, not_before)
        resp = self.client.search(
            index=self.target,
            # The fact and its source turn's original text, as the embedded store's FTS.
            query={"bool": {"must": [{"multi_match": {
                "query": text, "fields": ["fact", "original_text"], "type": "most_fields"}}],
                "filter": filters}},
            size=k,
            source_excludes=["embedding"],
        )
        return [
            ScoredEntry(entry=MemoryEntry.model_validate(h["_source"]), score=float(h["_score"]))
            for h in resp["hits"]["hits"]
        ]

    def hybrid_search(
        self,
        tenant: str,
        user: str,
        query_text: str,
        vector: Sequence[float],
        k: int,
        *,
        not_after: datetime | None = None,
        not_before: datetime | None = None,
        text_boost: float = 1.0,
        knn_boost: float = 1.0,
    ) -> list[ScoredEntry]:
        """BM25 on ``fact`` plus kNN on ``embedding``, within the scope, best first.

        Elasticsearch runs the ``match`` query and the ``knn`` search side by side and
        scores each document with the linear combination

            ``score = text_boost * BM25(fact, query_text) + knn_boost * (1 + cos) / 2``

        where a document found by only one of them gets only that term. Reciprocal rank
        fusion (``rank.rrf`` / the ``rrf`` retriever) would be scale-free, but it needs a
        paid license (and the x-pack module the test distribution lacks), so this is the
        combination every 8.x cluster can run. BM25 is unbounded (a rare exact term scores
        several points) while the kNN term is in [0, 1]: with the default equal boosts an
        exact keyword match (a name, an id, a date) outranks purely semantic neighbours,
        which is what a keyword in the query usually means; lower ``text_boost`` (0.1-0.3)
        to let semantics dominate.

        Args:
            tenant: scope tenant.
            user: scope user.
            query_text: the keywords (analysed with the standard analyzer).
            vector: query embedding of ``dim`` floats.
            k: number of hits (1..10000).
            not_after: inclusive upper bound on event time (both parts are filtered).
            not_before: inclusive lower bound on event time.
            text_boost: weight of BM25 (default 1.0).
            knn_boost: weight of the kNN score (default 1.0).

        Returns:
            Hits whose ``score`` is the combined score above, NOT a cosine: compare it only
            with other hybrid scores of the same query.
        """
        if k < 1:
            return []
        filters = self._scope_filter(tenant, user, not_after, not_before)
        query = {
            "bool": {
                "must": [{"match": {"fact": {"query": query_text, "boost": text_boost}}}],
                "filter": filters,
            }
        }
        resp = self.client.search(
            index=self.target,
            query=query,
            knn=self._knn(vector, k, filters, boost=knn_boost),
            size=k,
            source_excludes=["embedding"],
        )
        return [
            ScoredEntry(entry=MemoryEntry.model_validate(h["_source"]), score=float(h["_score"]))
            for h in resp["hits"]["hits"]
        ]

    # -- listing and stats

    def iter_entries(
        self,
        tenant: str | None = None,
        user: str | None = None,
        *,
        with_embedding: bool = False,
        page_size: int = 500,
    ) -> Iterator[MemoryEntry]:
        """Entries in event-time order (ties by id), optionally within one tenant / scope.

        Pages with ``search_after`` on (event_time, id): ``id`` is unique, so no entry is
        skipped or repeated between pages, and there is no scroll context to clean up.
        Sees refreshed writes only; it is not a snapshot (entries written meanwhile may or
        may not appear).
        """
        filters: list[dict[str, Any]] = []
        if tenant is not None:
            filters.append({"term": {"tenant": tenant}})
        if user is not None:
            filters.append({"term": {"user": user}})
        query = {"bool": {"filter": filters}} if filters else {"match_all": {}}
        after: list[Any] | None = None
        while True:
            resp = self.client.search(
                index=self.target,
                query=query,
                sort=[{"event_time": "asc"}, {"id": "asc"}],
                size=page_size,
                search_after=after,
                source_excludes=None if with_embedding else ["embedding"],
                track_total_hits=False,
            )
            hits = resp["hits"]["hits"]
            for h in hits:
                yield MemoryEntry.model_validate(h["_source"])
            if len(hits) < page_size:
                return
            after = hits[-1]["sort"]

    def count_entries(self) -> dict[tuple[str, str], int]:
        """Number of memories per (tenant, user), as of the last refresh.

        A composite aggregation, paged by ``after_key``: exact counts for any number of
        scopes (a ``terms`` aggregation would be approximate and capped).
        """
        out: dict[tuple[str, str], int] = {}
        after: dict[str, Any] | None = None
        while True:
            composite: dict[str, Any] = {
                "size": 1000,
                "sources": [
                    {"tenant": {"terms": {"field": "tenant"}}},
                    {"user": {"terms": {"field": "user"}}},
                ],
            }
            if after is not None:
                composite["after"] = after
            resp = self.client.search(
                index=self.target,
                size=0,
                aggs={"scopes": {"composite": composite}},
                track_total_hits=False,
            )
            agg = resp["aggregations"]["scopes"]
            for bucket in agg["buckets"]:
                out[(bucket["key"]["tenant"], bucket["key"]["user"])] = int(bucket["doc_count"])
            after = agg.get("after_key")
            if not agg["buckets"] or after is None:
                return out
