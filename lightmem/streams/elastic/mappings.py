"""The memory index's mapping (see :mod:`lightmem.streams.elastic.store`, "Mapping")."""

from __future__ import annotations

from typing import Any

__all__ = ["memory_mappings"]


def memory_mappings(dim: int) -> dict[str, Any]:
    """The index mapping for memory entries with ``dim``-dimensional embeddings."""
    keyword = {"type": "keyword"}
    return {
        # Unknown fields stay in _source (entries round-trip) but are not indexed: a schema
        # addition never makes writes fail; searching on it takes a new index + promote.
        "dynamic": False,
        "properties": {
            "schema_version": {"type": "integer"},
            "id": keyword,
            "tenant": keyword,
            "user": keyword,
            "conversation": keyword,
            "topic_id": keyword,
            "speaker": keyword,
            "mode": keyword,
            # BM25 on the memory itself (hybrid search); standard analyzer is core.
            "fact": {"type": "text"},
            # Millisecond precision: a not_after bound is inclusive to the millisecond.
            "event_time": {"type": "date"},
            "ingest_time": {"type": "date"},
            "source_turn_ids": keyword,
            # Audit text: searchable originals, compressed text kept in _source only.
            "original_text": {"type": "text"},
            "compressed_text": {"type": "text", "index": False},
            "version": {"type": "integer"},
            "embedding": {
                "type": "dense_vector",
                "dims": dim,
                "index": True,
                "similarity": "cosine",
                # Plain HNSW over float vectors (8.x defaults to int8_hnsw): scores are the
                # exact cosines of the stored vectors, comparable with the embedded store.
                "index_options": {"type": "hnsw", "m": 16, "ef_construction": 100},
            },
        },
    }
