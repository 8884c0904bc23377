"""Hybrid (BM25 + kNN) search on both stores: scoped exactly like kNN, words kept in step.

The same bodies run on the embedded store (SQLite FTS5 beside sqlite-vec, no server) and on
the Elasticsearch store (a ``match`` query beside the kNN, the session's local node): no hit
of another tenant or user, event-time bounds honoured, and a deleted or rewritten memory's
old words no longer match, through ``lexical_search`` and through the
:class:`~lightmem.processors.retrieve.Retriever` in hybrid mode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lightmem.processors.retrieve import Retriever
from lightmem.processors.store import LexicalStore, ScoredEntry
from lightmem.schemas import MemoryEntry
from lightmem.streams.embedded.store import EmbeddedStore

DIM = 8
T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


def unit(*components: float) -> list[float]:
    v = np.zeros(DIM, dtype=np.float64)
    v[: len(components)] = components
    return (v / np.linalg.norm(v)).tolist()


def entry(entry_id: str, fact: str, *, tenant: str = "acme", user: str = "alice",
          day: float = 0, version: int = 1, vector: list[float] | None = None) -> MemoryEntry:
    return MemoryEntry(
        id=entry_id, tenant=tenant, user=user, conversation="c1", topic_id="topic-1",
        speaker=user, fact=fact, event_time=T0 + timedelta(days=day),
        ingest_time=T0 + timedelta(days=30), source_turn_ids=[f"turn-{entry_id}"],
        original_text=fact, compressed_text=fact, mode="extractive", version=version,
        embedding=vector or unit(1, day / 10 + 0.01),
    )


def ids(hits: Sequence[ScoredEntry]) -> list[str]:
    return [h.entry.id for h in hits]


@pytest.fixture
def es_stores(es_client, unique_id: Callable[[str], str]) -> Iterator[Callable[..., Any]]:  # noqa: ANN001
    from lightmem.streams.elastic.store import ElasticsearchStore

    aliases: list[str] = []

    def make() -> ElasticsearchStore:
        alias = unique_id("lightmem-test-hybrid")
        aliases.append(alias)
        store = ElasticsearchStore(es_client, alias=alias, dim=DIM, refresh=True)
        store.ensure_index()
        return store

    yield make
    for alias in aliases:
        for name in list(es_client.indices.get(index=f"{alias}-*", expand_wildcards="all")):
            es_client.indices.delete(index=name, ignore_unavailable=True)
        es_client.options(ignore_status=404).indices.delete_index_template(
            name=f"{alias}-template")


@pytest.fixture(params=["embedded", pytest.param("elasticsearch", marks=pytest.mark.integration)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if request.param == "embedded":
        embedded = EmbeddedStore(tmp_path / "memories.db", dim=DIM)
        yield embedded
        embedded.close()
    else:
        pytest.importorskip("elasticsearch", reason="elasticsearch (the stream extra) is missing")
        yield request.getfixturevalue("es_stores")()


def _vectors(texts: Sequence[str]) -> np.ndarray:
    # Every query points the same way: the kNN side cannot tell memories apart, so what the
    # hybrid retriever returns first is decided by the words.
    return np.asarray([unit(1) for _ in texts], dtype=np.float32)


def test_both_stores_search_by_words(store) -> None:  # noqa: ANN001
    assert isinstance(store, LexicalStore)
    store.upsert([entry("dog", "Alice adopted a beagle called Biscuit"),
                  entry("job", "Alice works as a nurse in Lisbon")])

    assert ids(store.lexical_search("acme", "alice", ["biscuit"], 5)) == ["dog"]
    assert ids(store.lexical_search("acme", "alice", ["nurse", "lisbon"], 5)) == ["job"]
    both = store.lexical_search("acme", "alice", ["biscuit", "nurse"], 5)
    assert sorted(ids(both)) == ["dog", "job"]
    assert all(h.score > 0 for h in both)
    assert store.lexical_search("acme", "alice", [], 5) == []
    assert store.lexical_search("acme", "alice", ["zeppelin"], 5) == []


def test_lexical_search_never_returns_another_scope(store) -> None:  # noqa: ANN001
    store.upsert([
        entry("mine", "Biscuit the beagle"),
        entry("bob", "Biscuit the beagle Biscuit Biscuit", user="bob"),
        entry("other-tenant", "Biscuit the beagle Biscuit", tenant="globex"),
    ])

    assert ids(store.lexical_search("acme", "alice", ["biscuit", "beagle"], 10)) == ["mine"]
    assert ids(store.lexical_search("acme", "bob", ["biscuit"], 10)) == ["bob"]
    assert ids(store.lexical_search("globex", "alice", ["biscuit"], 10)) == ["other-tenant"]
    assert store.lexical_search("acme", "carol", ["biscuit"], 10) == []


def test_lexical_search_honours_time_bounds(store) -> None:  # noqa: ANN001
    store.upsert([entry(f"d{d}", f"trip to Porto number {d}", day=d) for d in (1, 2, 3)])

    upper = store.lexical_search("acme", "alice", ["porto"], 10,
                                 not_after=T0 + timedelta(days=2))
    assert sorted(ids(upper)) == ["d1", "d2"]
    lower = store.lexical_search("acme", "alice", ["porto"], 10,
                                 not_before=T0 + timedelta(days=2))
    assert sorted(ids(lower)) == ["d2", "d3"]
    assert store.lexical_search("acme", "alice", ["porto"], 10, not_after=T0) == []


def test_deleted_and_rewritten_memories_lose_their_old_words(store) -> None:  # noqa: ANN001
    store.upsert([entry("a", "Alice lives in Lisbon"), entry("b", "Alice plays the cello")])

    store.replace(entry("a", "Alice moved to Oslo", version=2), expected_version=1)
    store.delete("b", expected_version=1)
    if hasattr(store, "refresh"):
        store.refresh()

    assert store.lexical_search("acme", "alice", ["lisbon"], 5) == []
    assert store.lexical_search("acme", "alice", ["cello"], 5) == []
    assert ids(store.lexical_search("acme", "alice", ["oslo"], 5)) == ["a"]
    # An idempotent re-upsert with new words replaces the old ones too.
    store.upsert([entry("a", "Alice moved to Bergen", version=3)])
    assert store.lexical_search("acme", "alice", ["oslo"], 5) == []
    assert ids(store.lexical_search("acme", "alice", ["bergen"], 5)) == ["a"]


def test_hybrid_retriever_is_scoped_and_finds_the_keyword(store) -> None:  # noqa: ANN001
    store.upsert([
        entry("noise-1", "Alice talked about the weather", vector=unit(1)),
        entry("noise-2", "Alice had lunch", vector=unit(1, 0.01)),
        # Far from the query vector: only the words can bring it up.
        entry("answer", "Alice's beagle is called Biscuit", vector=unit(0, 1)),
        entry("bob", "Bob's beagle is called Biscuit", user="bob", vector=unit(1)),
        entry("late", "Biscuit the beagle again", day=5, vector=unit(1)),
    ])
    hybrid = Retriever(store, _vectors, k=2, mode="hybrid")
    knn = Retriever(store, _vectors, k=2, mode="knn")

    hits = hybrid.search("acme", "alice", "What is Alice's beagle called?",
                         not_after=T0 + timedelta(days=1))
    assert ids(hits)[0] == "answer"
    assert "answer" not in ids(knn.search("acme", "alice", "What is the beagle called?",
                                          not_after=T0 + timedelta(days=1)))
    for query in ("beagle Biscuit", "weather lunch"):
        for h in hybrid.search("acme", "alice", query, k=10, not_after=T0 + timedelta(days=1)):
            assert (h.entry.tenant, h.entry.user) == ("acme", "alice")
            assert h.entry.id not in ("bob", "late")


def test_words_compression_dropped_still_match_through_the_original(store) -> None:  # noqa: ANN001
    compressed = entry("c", "Alice: adopted beagle shelter")
    compressed = compressed.model_copy(update={
        "original_text": "I adopted a beagle called Biscuit from the shelter"})
    store.upsert([compressed])

    assert ids(store.lexical_search("acme", "alice", ["biscuit"], 5)) == ["c"]
    # Rewritten: the old original's words go with it.
    store.replace(compressed.model_copy(update={"original_text": "a cat", "fact": "cat",
                                                "version": 2}), expected_version=1)
    if hasattr(store, "refresh"):
        store.refresh()
    assert store.lexical_search("acme", "alice", ["biscuit"], 5) == []
