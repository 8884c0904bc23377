"""One search of the memory service: kNN, or kNN + BM25 fused by reciprocal rank, over a
user's memories and provisional events.

Two ways to the same ranking:

- :func:`retrieve_with` (the embedded store, and any backend): the backend's own kNN over
  memories and events and its BM25, each list of full entries, fused here.
- :func:`retrieve_elasticsearch` (``--stream``): one ``_msearch`` round trip for every
  candidate list, then the few winners' documents. Why (measured on the 2-core build
  machine, 100,000 memories of 1,000 users, ``took`` of one search): a hit's ``_source``
  holds its 384-float embedding as JSON, and returning a hit means decompressing and
  parsing all of it even when the embedding is filtered out: 100 kNN candidates with their
  source took 9-12 ms, with only the ``id`` doc value 1 ms. So the candidate lists (100
  each under hybrid) carry ids and scores only, and the k winners are fetched once (with
  kNN alone there is nothing to fuse: the k hits come with their source in the same
  round trip). Three separate requests (memories kNN, events kNN, BM25) cost 27 ms of
  wall time beside 18 ms as one ``_msearch``, before the id-only change.

Both rank the same: memories and events merged by cosine, fused with BM25 over memories
(:func:`~lightmem.processors.retrieve.fuse_rankings`, the Retriever's weights and rank
constant). One difference, in a window of a second: an event whose memory is already
indexed (the index sink retires it just after) is dropped after the fusion on
Elasticsearch, before it on the embedded store (where the window does not exist).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from lightmem.processors.retrieve import fuse_rankings
from lightmem.processors.store import ScoredEntry
from lightmem.schemas import MemoryEntry

if TYPE_CHECKING:
    from .backends import Backend, StreamBackend

__all__ = ["Plan", "retrieve_with", "retrieve_elasticsearch", "fuse_ids"]


@dataclass(frozen=True)
class Plan:
    """What one search asks for.

    Attributes:
        k: Hits wanted.
        n: Candidates per list (``k`` for kNN alone; more under hybrid, for the fusion).
        hybrid: Fuse kNN with BM25.
        terms: The query's BM25 terms (hybrid only; empty: kNN ranks alone are fused).
        events: Also the provisional events (turns not summarized yet).
        weights: (kNN, BM25) weights of the fusion.
        rrf_k: The fusion's rank constant.
    """

    k: int
    n: int
    hybrid: bool
    terms: tuple[str, ...]
    events: bool
    weights: tuple[float, float]
    rrf_k: float
    conversation: str | None = None
    not_before: datetime | None = None
    not_after: datetime | None = None


def fuse_ids(rankings: Sequence[Sequence[str]], weights: Sequence[float], rrf_k: float
             ) -> list[tuple[str, float]]:
    """:func:`~lightmem.processors.retrieve.fuse_rankings` on ids: ``(id, score)`` best first."""
    stubs = [[ScoredEntry(entry=MemoryEntry.model_construct(id=i), score=0.0) for i in ids]
             for ids in rankings]
    return [(h.entry.id, h.score) for h in fuse_rankings(stubs, weights, rrf_k=rrf_k)]


def retrieve_with(backend: Backend, tenant: str, user: str, vector: Sequence[float],
                  plan: Plan) -> list[ScoredEntry]:
    """The search through the backend's kNN, events and BM25 calls (full entries)."""
    where = {"conversation": plan.conversation, "not_before": plan.not_before,
             "not_after": plan.not_after}
    hits = backend.search(tenant, user, vector, plan.n, **where)
    if plan.events:
        # Turns still in open buffers (freshness): searchable before their memories
        # exist; a turn is in a buffer or summarized, never both, so nothing repeats.
        hits += backend.search_events(tenant, user, vector, plan.n, **where)
    hits = sorted(hits, key=lambda h: (-h.score, h.entry.id))
    if plan.hybrid:
        lexical = (backend.lexical_search(tenant, user, plan.terms, plan.n, **where)
                   if plan.terms else [])
        hits = fuse_rankings([hits, lexical], plan.weights, rrf_k=plan.rrf_k)
    return hits[:plan.k]


def _id_only() -> dict[str, Any]:
    # Ids from doc values: no stored fields, so no _source is decompressed and parsed.
    return {"stored_fields": "_none_", "docvalue_fields": ["id"], "_source": False,
            "track_total_hits": False}


def _full() -> dict[str, Any]:
    return {"_source": {"excludes": ["embedding"]}, "track_total_hits": False}


def _cos(es_score: float) -> float:
    """Elasticsearch's cosine ``_score`` is ``(1 + cos) / 2``: back to ``cos``."""
    return 2.0 * es_score - 1.0


def _answers(resp: Any) -> list[dict[str, Any]]:
    out = []
    for r in resp["responses"]:
        if "error" in r:
            raise RuntimeError(f"Elasticsearch search failed: {r['error']}")
        out.append(r)
    return out


def retrieve_elasticsearch(backend: StreamBackend, tenant: str, user: str,
                           vector: Sequence[float], plan: Plan) -> list[ScoredEntry]:
    """The search on the streaming deployment in two round trips at most (see the module
    docstring): the candidate lists in one ``_msearch``, the winners' documents in one
    search (hybrid only)."""
    from lightmem.streams.elastic.events import events_index

    memories = backend.store.target
    events = events_index(backend.settings.es_alias)
    filters = backend._filters(tenant, user, plan.conversation, plan.not_before,
                               plan.not_after)
    knn = {"field": "embedding", "query_vector": [float(x) for x in vector], "k": plan.n,
           # A pre-filter: the nearest are chosen within the scope only.
           "num_candidates": min(10_000, max(4 * plan.n, 100)), "filter": filters}
    fields = _id_only() if plan.hybrid else _full()
    searches: list[dict[str, Any]] = [{"index": memories},
                                      {"knn": knn, "size": plan.n, **fields}]
    if plan.events:
        # Workers from before events have no events index: no hits, not an error.
        searches += [{"index": events, "ignore_unavailable": True},
                     {"knn": knn, "size": plan.n, **fields}]
    text = " ".join(t for t in plan.terms if t.strip()) if plan.hybrid else ""
    if text:
        searches += [{"index": memories}, {
            "query": {"bool": {"must": [{"multi_match": {
                "query": text, "fields": ["fact", "original_text"], "type": "most_fields"}}],
                "filter": filters}},
            "size": plan.n, **_id_only()}]
    answers = _answers(backend.client.msearch(searches=searches))
    vector_hits = [h for a in answers[:2 if plan.events else 1] for h in a["hits"]["hits"]]
    if not plan.hybrid:
        hits = [ScoredEntry(entry=MemoryEntry.model_validate(h["_source"]),
                            score=_cos(float(h["_score"]))) for h in vector_hits]
        hits = _drop_covered(backend, tenant, user, hits)
        return sorted(hits, key=lambda h: (-h.score, h.entry.id))[:plan.k]
    ranked = sorted(((h["fields"]["id"][0], _cos(float(h["_score"]))) for h in vector_hits),
                    key=lambda x: (-x[1], x[0]))
    lexical = [h["fields"]["id"][0] for h in answers[-1]["hits"]["hits"]] if text else []
    fused = fuse_ids([[i for i, _ in ranked], lexical], plan.weights, plan.rrf_k)
    return _fetch_best(backend, tenant, user, fused, plan.k,
                       f"{memories},{events}" if plan.events else memories)


def _drop_covered(backend: StreamBackend, tenant: str, user: str,
                  hits: list[ScoredEntry]) -> list[ScoredEntry]:
    """``hits`` without the events whose turns an indexed memory already covers."""
    from .backends import EVENT_PREFIX

    if not any(h.entry.id.startswith(EVENT_PREFIX) for h in hits):
        return hits
    kept = {e.id for e, _ in backend._without_covered(
        tenant, user, [(h.entry, []) for h in hits])}
    return [h for h in hits if h.entry.id in kept]


def _fetch_best(backend: StreamBackend, tenant: str, user: str,
                fused: list[tuple[str, float]], k: int, index: str) -> list[ScoredEntry]:
    """The first ``k`` of ``fused`` as full entries, in order (events a memory covers
    skipped, the next ones taken instead)."""
    out: list[ScoredEntry] = []
    at = 0
    while len(out) < k and at < len(fused):
        batch = fused[at:at + (k - len(out))]
        at += len(batch)
        resp = backend.client.search(
            index=index, ignore_unavailable=True, size=len(batch), track_total_hits=False,
            query={"bool": {"filter": [*backend._filters(tenant, user, None, None, None),
                                       {"ids": {"values": [i for i, _ in batch]}}]}},
            source_excludes=["embedding"])
        found = {h["_id"]: MemoryEntry.model_validate(h["_source"])
                 for h in resp["hits"]["hits"]}
        got = [ScoredEntry(entry=found[i], score=s) for i, s in batch if i in found]
        out += _drop_covered(backend, tenant, user, got)
    return out[:k]
