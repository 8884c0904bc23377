"""Hybrid retrieval, the pure parts: query terms, reciprocal rank fusion, the Retriever's
modes over in-memory stores, and the embedded store's FTS index kept in step with its rows.
Both real stores run the scoped/time/delete bodies in tests/integration/test_hybrid_search.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from lightmem.processors.lexical import STOP_WORDS, content_words, query_terms, words
from lightmem.processors.retrieve import Retriever, fuse_rankings
from lightmem.processors.store import LexicalStore, ScoredEntry
from lightmem.schemas import MemoryEntry
from lightmem.streams.embedded.store import EmbeddedStore

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


def entry(entry_id: str, fact: str = "", *, user: str = "alice", day: int = 0,
          vector: Sequence[float] = (1.0, 0.0)) -> MemoryEntry:
    return MemoryEntry(
        id=entry_id, tenant="acme", user=user, conversation="c1", topic_id="t1",
        speaker=user, fact=fact or f"memory {entry_id}", event_time=T0 + timedelta(days=day),
        ingest_time=T0, source_turn_ids=[f"turn-{entry_id}"], mode="extractive",
        original_text=fact, compressed_text=fact, embedding=list(vector))


def hits(*ids: str) -> list[ScoredEntry]:
    return [ScoredEntry(entry(i), 1.0 - n / 10) for n, i in enumerate(ids)]


# -- words ------------------------------------------------------------------------------------


def test_query_terms_drop_stop_words_and_split_possessives() -> None:
    assert words("Caroline's dog, don't!") == ["caroline", "s", "dog", "don", "t"]
    assert query_terms("What did Caroline's dog do in 2023?") == ["caroline", "dog", "2023"]
    assert query_terms("what did she do?") == []
    assert query_terms("a b c d", limit=2) == ["b", "c"]
    assert content_words("The THE the cat") == {"cat"}
    assert {"the", "what", "s", "t"} <= STOP_WORDS


# -- fusion -----------------------------------------------------------------------------------


def test_rrf_rewards_agreement_and_weights_each_list() -> None:
    dense, lexical = hits("a", "b", "c"), hits("c", "d", "a")
    fused = fuse_rankings([dense, lexical], [0.5, 0.5], rrf_k=10)
    scores = {h.entry.id: h.score for h in fused}
    assert scores["a"] == pytest.approx(0.5 / 11 + 0.5 / 13)
    assert scores["d"] == pytest.approx(0.5 / 12)
    assert [h.entry.id for h in fused] == ["a", "c", "b", "d"]
    # All weight on one list: its order, the other list's extras after it.
    assert [h.entry.id for h in fuse_rankings([dense, lexical], [1.0, 0.0])][:3] == \
        ["a", "b", "c"]
    assert [h.entry.id for h in fuse_rankings([dense, lexical], [0.0, 1.0])][:3] == \
        ["c", "d", "a"]
    # A memory repeated in one list counts once, at its best rank; ties break by id.
    assert [h.entry.id for h in fuse_rankings([hits("x", "x", "y")], [1.0])] == ["x", "y"]
    assert [h.entry.id for h in fuse_rankings([hits("b"), hits("a")], [1, 1])] == ["a", "b"]
    with pytest.raises(ValueError, match="weights"):
        fuse_rankings([dense], [0.5, 0.5])
    with pytest.raises(ValueError, match="rrf_k"):
        fuse_rankings([dense], [1.0], rrf_k=0)


class ListStore:
    """kNN by dot product over a list; optionally BM25-ish by word overlap."""

    def __init__(self, entries: Sequence[MemoryEntry]) -> None:
        self.entries = list(entries)
        self.lexical_calls: list[list[str]] = []

    def _scoped(self, tenant: str, user: str, not_after: datetime | None
                ) -> list[MemoryEntry]:
        return [e for e in self.entries if (e.tenant, e.user) == (tenant, user)
                and (not_after is None or e.event_time <= not_after)]

    def search(self, tenant: str, user: str, vector: Sequence[float], k: int, *,
               not_after: datetime | None = None) -> list[ScoredEntry]:
        scored = [ScoredEntry(e, float(np.dot(e.embedding, vector)))
                  for e in self._scoped(tenant, user, not_after)]
        return sorted(scored, key=lambda h: (-h.score, h.entry.id))[:k]


class WordStore(ListStore):
    def lexical_search(self, tenant: str, user: str, terms: Sequence[str], k: int, *,
                       not_after: datetime | None = None,
                       not_before: datetime | None = None) -> list[ScoredEntry]:
        self.lexical_calls.append(list(terms))
        scored = [ScoredEntry(e, float(len(set(terms) & content_words(e.fact))))
                  for e in self._scoped(tenant, user, not_after)]
        return sorted([h for h in scored if h.score > 0],
                      key=lambda h: (-h.score, h.entry.id))[:k]


def _same_vector(texts: Sequence[str]) -> np.ndarray:
    return np.asarray([[1.0, 0.0] for _ in texts], dtype=np.float32)


MEMORIES = [
    entry("noise-1", "Alice talked about the weather", vector=(1.0, 0.0)),
    entry("noise-2", "Alice had lunch", vector=(0.99, 0.14)),
    entry("answer", "Alice's beagle is called Biscuit", vector=(0.0, 1.0)),
    entry("bob", "Bob's beagle is called Biscuit", user="bob", vector=(1.0, 0.0)),
    entry("late", "Biscuit again", day=9, vector=(1.0, 0.0)),
]


def test_hybrid_mode_fuses_words_with_vectors_in_the_scope() -> None:
    store = WordStore(MEMORIES)
    assert isinstance(store, LexicalStore) and not isinstance(ListStore([]), LexicalStore)
    hybrid = Retriever(store, _same_vector, k=2, mode="hybrid", candidates=3)
    assert hybrid.hybrid
    got = hybrid.search("acme", "alice", "What is the beagle called?",
                        not_after=T0 + timedelta(days=1))
    assert [h.entry.id for h in got][0] == "answer"
    assert store.lexical_calls == [["beagle", "called"]]
    knn = Retriever(store, _same_vector, k=2)
    assert "answer" not in [h.entry.id for h in knn.search("acme", "alice", "beagle?")]
    # Scoped, bounded: never Bob's memory, never one after not_after.
    everything = hybrid.search("acme", "alice", "beagle Biscuit", k=10,
                               not_after=T0 + timedelta(days=1))
    assert {h.entry.id for h in everything} == {"noise-1", "noise-2", "answer"}


def test_hybrid_without_terms_or_without_a_lexical_store_is_knn() -> None:
    store = WordStore(MEMORIES)
    hybrid = Retriever(store, _same_vector, k=2, mode="hybrid")
    # A query of stop words has no terms: no lexical call, the vector order stands.
    assert [h.entry.id for h in hybrid.search("acme", "alice", "what was it?")] == [
        "late", "noise-1"]
    assert store.lexical_calls == []
    plain = Retriever(ListStore(MEMORIES), _same_vector, k=2, mode="hybrid")
    assert not plain.hybrid
    assert plain.search("acme", "alice", "beagle")[0].score == pytest.approx(1.0)
    with pytest.raises(ValueError, match="mode"):
        Retriever(store, _same_vector, mode="bm25")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="vector_weight"):
        Retriever(store, _same_vector, vector_weight=1.5)


# -- the embedded store's FTS index -----------------------------------------------------------


def test_embedded_rank_ids_are_the_ids_of_both_searches(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path / "m.db", dim=2)
    store.upsert(MEMORIES)
    vector, terms = [0.6, 0.8], ["beagle", "biscuit", "weather"]
    for not_after in (None, T0 + timedelta(days=1)):
        dense, lexical = store.rank_ids("acme", "alice", vector, terms, 3, not_after=not_after)
        assert dense == [h.entry.id for h in store.search("acme", "alice", vector, 3,
                                                           not_after=not_after)]
        assert lexical == [h.entry.id for h in store.lexical_search(
            "acme", "alice", terms, 3, not_after=not_after)]
    assert "bob" not in dense + lexical and store.rank_ids("acme", "alice", vector, [], 3)[1] == []
    # The Retriever's fast path (ids, then the fused top k read) ranks like the slow one.
    fast = Retriever(store, _same_vector, k=3, mode="hybrid").search("acme", "alice", "beagle")
    slow = Retriever(WordlessRankStore(store), _same_vector, k=3, mode="hybrid").search(
        "acme", "alice", "beagle")
    assert [(h.entry.id, h.score) for h in fast] == [(h.entry.id, h.score) for h in slow]
    store.close()


class WordlessRankStore:
    """The embedded store without its ``rank_ids`` fast path."""

    def __init__(self, inner: EmbeddedStore) -> None:
        self.search, self.lexical_search = inner.search, inner.lexical_search


def test_embedded_fts_follows_every_write_path(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    store = EmbeddedStore(path, dim=2)
    store.upsert([entry("a", "Alice lives in Lisbon"), entry("b", "Alice plays the cello")])
    assert [h.entry.id for h in store.lexical_search("acme", "alice", ["lisbon"], 5)] == ["a"]
    # Stemmed: "plays" matches "playing"; quotes in a term cannot break the query.
    assert [h.entry.id for h in store.lexical_search("acme", "alice", ["playing"], 5)] == ["b"]
    assert store.lexical_search("acme", "alice", ['cel"lo OR x'], 5) == []
    # A direct DELETE on the entries table (the erasure path) leaves no words behind.
    with store.transaction():
        store._db.execute("DELETE FROM entries WHERE id='b'")
    assert store.lexical_search("acme", "alice", ["cello"], 5) == []
    store.close()
    # A database written before the FTS table existed is indexed when opened.
    reopened = EmbeddedStore(path, dim=2)
    with reopened.transaction():
        reopened._db.execute("DELETE FROM entry_fts")
        reopened._db.execute("DELETE FROM meta WHERE key='fts'")
    reopened.close()
    again = EmbeddedStore(path, dim=2)
    assert [h.entry.id for h in again.lexical_search("acme", "alice", ["lisbon"], 5)] == ["a"]
    again.close()
