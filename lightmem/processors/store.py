"""The memory store as the processors see it.

Two implementations satisfy it: the embedded store (``lightmem.streams.embedded.store``,
SQLite + sqlite-vec, no server) and the Elasticsearch store. Processors only ever talk to
this protocol, so retrieval and consolidation are the same code on both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable

from lightmem.schemas import MemoryEntry

__all__ = ["ScoredEntry", "MemoryStore", "LexicalStore", "VersionConflict"]


@dataclass(frozen=True)
class ScoredEntry:
    """A search hit: the entry and its score: the cosine similarity to the query (1 =
    identical) for kNN, the BM25 score for lexical search, the fused score for hybrid."""

    entry: MemoryEntry
    score: float


class VersionConflict(Exception):
    """An optimistic-concurrency write lost: the stored version is not the expected one."""


class MemoryStore(Protocol):
    def upsert(self, entries: Sequence[MemoryEntry]) -> None:
        """Insert or replace entries by id (idempotent). Entries carry their embedding."""
        ...

    def search(
        self,
        tenant: str,
        user: str,
        vector: Sequence[float],
        k: int,
        *,
        not_after: datetime | None = None,
    ) -> list[ScoredEntry]:
        """kNN within the (tenant, user) scope, best first; ``not_after`` bounds event time."""
        ...

    def get(self, ids: Sequence[str]) -> list[MemoryEntry]:
        """The stored entries with these ids (missing ids are skipped)."""
        ...

    def replace(self, entry: MemoryEntry, *, expected_version: int) -> None:
        """Write ``entry`` only if the stored one has ``expected_version``, else raise
        :class:`VersionConflict`."""
        ...

    def delete(self, entry_id: str, *, expected_version: int) -> None:
        """Delete only if the stored version is ``expected_version``, else raise
        :class:`VersionConflict`."""
        ...


@runtime_checkable
class LexicalStore(Protocol):
    """A store that also ranks by words (BM25), scoped exactly like its kNN.

    Both stores implement it (SQLite FTS5 in the embedded store, a ``match`` query in
    Elasticsearch); :class:`~lightmem.processors.retrieve.Retriever` fuses it with kNN.
    """

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
        """BM25 over the memories' text within the (tenant, user) scope, best first.

        ``terms`` are words (:func:`lightmem.processors.lexical.query_terms`), matched with
        OR; ``not_after``/``not_before`` bound event time inclusively, as in kNN. No terms,
        no hits.
        """
        ...
