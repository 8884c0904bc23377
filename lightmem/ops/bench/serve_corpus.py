"""``lightmem bench serve``'s corpus: synthetic memories of many users, written straight into the
embedded store or an Elasticsearch index (kept and reused with ``--keep-corpus``).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from rich.console import Console

from lightmem.schemas import EntryMode, MemoryEntry
from lightmem.settings import Settings

__all__ = [
    "synthetic_memories",
    "build_embedded",
    "build_elasticsearch",
    "kept_alias",
    "corpus_docs",
    "drop_non_corpus",
    "TENANT",
    "WORDS",
]

err = Console(stderr=True, width=max(120, Console(stderr=True).width))

#: The tenant of the benchmark's memories (dev mode: the service's --dev-tenant).
TENANT = "bench"
WORDS = ("dog cat kayak cello Lisbon Porto marathon risotto peanuts maps garden piano "
         "sister brother violin tennis sushi Berlin hiking chess novel bakery ferry tulips "
         "yoga jazz camera lemon castle harbor").split()


# -- corpus ------------------------------------------------------------------------------------


def synthetic_memories(n: int, users: int, *, dim: int = 384, seed: int = 0,
                       tenant: str = TENANT) -> Iterator[MemoryEntry]:
    """``n`` memories spread evenly over ``users`` users, each with a random unit vector.

    Args:
        n: Memories in all.
        users: Users ``u0``..``u{users-1}``; memory ``i`` belongs to ``u{i % users}``.
        dim: Embedding dimension (384: all-MiniLM-L6-v2).
        seed: The same seed gives the same memories and vectors.
        tenant: Their tenant.

    Yields:
        Entries with their embedding, ids ``bench-<i>``, event times a minute apart.
    """
    rng = np.random.default_rng(seed)
    words = random.Random(seed)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    for lo in range(0, n, 1000):
        block = rng.standard_normal((min(1000, n - lo), dim)).astype(np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        for j, vector in enumerate(block):
            i = lo + j
            user = f"u{i % users}"
            when = start + timedelta(minutes=i)
            fact = (f"{user}: I like the {words.choice(WORDS)} and the {words.choice(WORDS)} "
                    f"(note {i})")
            yield MemoryEntry(
                id=f"bench-{i}", tenant=tenant, user=user, conversation=f"c-{user}",
                topic_id=f"t{i // 10}", speaker=user, fact=fact, event_time=when,
                ingest_time=when, source_turn_ids=[f"turn-{i}"], original_text=fact,
                compressed_text=fact, mode=EntryMode.extractive,
                embedding=vector.tolist())


def _chunks(entries: Iterator[MemoryEntry], size: int) -> Iterator[list[MemoryEntry]]:
    chunk: list[MemoryEntry] = []
    for e in entries:
        chunk.append(e)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def build_embedded(data_dir: Path, memories: int, users: int, seed: int) -> float:
    """Fill ``data_dir``'s store (skipped when it holds this corpus); returns seconds."""
    from lightmem.streams.embedded.store import EmbeddedStore
    from lightmem.streams.models.encoder import MINILM_DIM

    marker = data_dir / "bench-corpus.json"
    corpus = {"memories": memories, "users": users, "seed": seed}
    if marker.exists() and json.loads(marker.read_text()) == corpus:
        err.print(f"embedded: reusing the corpus in {data_dir}")
        return 0.0
    data_dir.mkdir(parents=True, exist_ok=True)
    for name in ("lightmem.db", "lightmem.db-wal", "lightmem.db-shm"):
        (data_dir / name).unlink(missing_ok=True)
    store = EmbeddedStore(data_dir / "lightmem.db", dim=MINILM_DIM)
    started = time.perf_counter()
    try:
        for chunk in _chunks(synthetic_memories(memories, users, seed=seed), 5000):
            store.upsert(chunk)
    finally:
        store.close()
    marker.write_text(json.dumps(corpus))
    return time.perf_counter() - started


def kept_alias(memories: int, users: int, seed: int) -> str:
    """The alias of the Elasticsearch corpus ``--keep-corpus`` keeps and reuses."""
    return f"lmbench-serve-{memories}-{users}-{seed}-mem"


def corpus_docs(settings: Settings) -> int:
    """Corpus memories (ids ``bench-*``) behind ``settings.es_alias``; 0 when it is missing."""
    from lightmem.streams.elastic.store import es_client

    es = es_client(settings)
    try:
        if not es.indices.exists_alias(name=settings.es_alias):
            return 0
        es.indices.refresh(index=settings.es_alias)
        return int(es.count(index=settings.es_alias,
                            query={"prefix": {"id": "bench-"}})["count"])
    finally:
        es.close()


def drop_non_corpus(settings: Settings) -> None:
    """Leave only the corpus behind a kept alias: the freshness turns' memories and the
    events index go."""
    from lightmem.streams.elastic.events import events_index
    from lightmem.streams.elastic.store import es_client

    es = es_client(settings)
    try:
        es.indices.delete(index=events_index(settings.es_alias), ignore_unavailable=True)
        # Search + bulk delete: the integ-test distribution has no _delete_by_query.
        resp = es.search(index=settings.es_alias, size=10_000, source=False,
                         query={"bool": {"must_not": {"prefix": {"id": "bench-"}}}})
        hits = resp["hits"]["hits"]
        if hits:
            es.bulk(operations=[{"delete": {"_index": h["_index"], "_id": h["_id"]}}
                                for h in hits], refresh=True)
    finally:
        es.close()


def build_elasticsearch(settings: Settings, memories: int, users: int, seed: int) -> float:
    """Create the alias's index and bulk-load the corpus; returns seconds (refresh included)."""
    from lightmem.streams.elastic.store import ElasticsearchStore, es_client

    es = es_client(settings)
    try:
        store = ElasticsearchStore(es, alias=settings.es_alias)
        store.ensure_index()
        started = time.perf_counter()
        for chunk in _chunks(synthetic_memories(memories, users, seed=seed), 2000):
            store.bulk_upsert(chunk)
        store.refresh()
        return time.perf_counter() - started
    finally:
        es.close()
