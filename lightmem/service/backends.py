"""The two stores the memory service serves, behind one small port.

- :class:`EmbeddedBackend`: the embedded runtime (SQLite + sqlite-vec under ``data_dir``);
  added turns are applied in-process before the call returns.
- :class:`StreamBackend`: the streaming deployment; reads go to the Elasticsearch alias,
  added turns are produced to the turns topic with the idempotent producer (the workers
  apply them), deletes are recorded on the memory-changes topic.

Both load the encoder once per process (:func:`lightmem.streams.models.encoder.load_encoder` is
cached) and answer searches with the same :class:`~lightmem.processors.retrieve.Retriever`
scoring: cosine similarity within the (tenant, user) scope.

Exceptions: :class:`StartupError` (the store or the topics are missing: one line, said by
``lightmem serve`` before it exits 1); store and Kafka client errors pass through.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from lightmem.processors.llm import ChatModel
from lightmem.processors.store import ScoredEntry
from lightmem.schemas import (
    ChangeOp,
    EntryMode,
    MemoryChange,
    MemoryEntry,
    TurnEvent,
    encode_key,
    stable_id,
)
from lightmem.settings import Settings

if TYPE_CHECKING:
    from lightmem.streams.erasure.forget import ErasureReport

    from .retrieval import Plan

__all__ = [
    "Backend",
    "EmbeddedBackend",
    "StreamBackend",
    "StartupError",
    "Written",
    "PageKey",
    "delete_change",
    "EVENT_PREFIX",
]

#: A backend's opaque position in a scope's (event time, id) order.
PageKey = list[Any]

#: sqlite-vec's largest ``k``: a filtered embedded search scans this many nearest first.
_VEC_MAX_K = 4096
#: Embeddings of buffered turns kept by the embedded backend (oldest dropped first).
_EVENT_CACHE = 50_000
#: Ids of provisional events (turns not summarized yet) start with this.
EVENT_PREFIX = "event:"


class StartupError(RuntimeError):
    """The service cannot serve this deployment (missing index alias or topics)."""


@dataclass
class Written:
    """What a backend did with added turns."""

    status: str
    skipped: list[str] = field(default_factory=list)
    memories: int = 0
    searchable: bool = False
    #: Turn ids no memory covered yet when the call returned (stream, when waited for).
    not_searchable: list[str] = field(default_factory=list)


def _us(t: datetime) -> int:
    """The embedded store's page key of a time (microseconds)."""
    return int(t.timestamp() * 1_000_000)


def delete_change(entry: MemoryEntry, *, at: datetime, reason: str) -> MemoryChange:
    """The ``delete`` change of ``entry`` (deterministic id: memory, op, version)."""
    return MemoryChange(
        change_id=stable_id(entry.id, ChangeOp.delete.value, entry.version),
        op=ChangeOp.delete, memory_id=entry.id, tenant=entry.tenant, user=entry.user,
        before=entry, reason=reason, at=at)


class Backend(Protocol):
    #: ``embedded`` or ``stream``.
    name: str
    #: Whether added turns are applied (and can be flushed) before an add returns.
    applies_turns: bool

    def warm_up(self) -> None: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...

    @property
    def chat(self) -> ChatModel | None: ...

    def write_turns(self, turns: Sequence[TurnEvent], *, flush: bool,
                    wait_s: float | None = None) -> Written:
        """Add turns; ``flush`` closes their conversations' buffers; ``wait_s`` (stream)
        waits that long for memories covering them to be searchable."""
        ...

    def search(self, tenant: str, user: str, vector: Sequence[float], k: int, *,
               conversation: str | None, not_before: datetime | None,
               not_after: datetime | None, text: str | None = None) -> list[ScoredEntry]: ...

    def lexical_search(self, tenant: str, user: str, terms: Sequence[str], k: int, *,
                       conversation: str | None, not_before: datetime | None,
                       not_after: datetime | None) -> list[ScoredEntry]:
        """BM25 over the scope's memories (the lexical side of hybrid search), best first,
        filtered exactly like :meth:`search`."""
        ...

    def page(self, tenant: str, user: str, *, after: PageKey | None, limit: int,
             events: bool = False) -> list[tuple[MemoryEntry, PageKey]]:
        """Up to ``limit`` of the scope's memories after the key ``after``, in (event
        time, id) order; ``events``: provisional events too, in the same order."""
        ...

    def search_events(self, tenant: str, user: str, vector: Sequence[float], k: int, *,
                      conversation: str | None, not_before: datetime | None,
                      not_after: datetime | None) -> list[ScoredEntry]:
        """Turns of the scope not summarized yet (provisional *events*), nearest first."""
        ...

    def retrieve(self, tenant: str, user: str, vector: Sequence[float], plan: Plan
                 ) -> list[ScoredEntry]:
        """One search of the service (kNN or hybrid, events or not): the best ``plan.k``
        (:mod:`lightmem.service.retrieval`)."""
        ...

    def get(self, entry_id: str) -> MemoryEntry | None: ...

    def history(self, entry_id: str) -> list[MemoryChange]: ...

    def delete(self, entry: MemoryEntry, change: MemoryChange) -> None: ...

    def erase(self, tenant: str, user: str | None, *, requested_by: str,
              reason: str = "memory service: delete all of the user") -> ErasureReport:
        """Forget ``(tenant, user)`` (``user`` None: the whole tenant) everywhere (the
        erasure of issue 14, as ``lightmem forget`` runs it)."""
        ...

    def erasure_status(self, tenant: str, user: str | None) -> ErasureReport | None:
        """What is left of the scope's recorded erasure (None: none is recorded)."""
        ...

    def count_entries(self) -> dict[tuple[str, str], int]:
        """Memories per (tenant, user)."""
        ...

    def readiness(self) -> dict[str, str]: ...

    def close(self) -> None: ...


class EmbeddedBackend:
    """The embedded runtime as a service backend (one lock: one SQLite connection, one set
    of models; the service is I/O-light and the models are the bottleneck on 2 cores).

    Args:
        settings: ``data_dir``, model and LLM settings.
        runtime: An existing runtime (the SDK's, tests); default builds one.
    """

    name = "embedded"
    applies_turns = True

    def __init__(self, settings: Settings, *, runtime: Any = None) -> None:
        from lightmem.streams.embedded.runtime import EmbeddedRuntime

        self.settings = settings
        self.runtime = runtime or EmbeddedRuntime(settings)
        self.lock = threading.RLock()
        self._event_vectors: dict[str, np.ndarray] = {}

    def warm_up(self) -> None:
        with self.lock:
            _ = self.runtime.store, self.runtime.embedder

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        with self.lock:
            return self.runtime.embedder(list(texts))

    @property
    def chat(self) -> ChatModel | None:
        return self.runtime.chat

    def write_turns(self, turns: Sequence[TurnEvent], *, flush: bool,
                    wait_s: float | None = None) -> Written:
        flush = flush or wait_s is not None  # applied in-process: flushed = searchable
        with self.lock:
            store = self.runtime.store
            skipped, seen = [], set()
            for t in turns:
                key = (t.conversation_key, t.turn_id)
                if key in seen or store.seen(*key):
                    skipped.append(t.turn_id)
                seen.add(key)
            report = self.runtime.ingest_lines(
                ((i, t.to_bytes()) for i, t in enumerate(turns, start=1)),
                source="api", flush=False)
            if flush:
                self.runtime.flush(report, conversations={t.conversation_key for t in turns})
            return Written(status="applied", skipped=skipped, memories=report.entries,
                           searchable=flush)

    def search(self, tenant: str, user: str, vector: Sequence[float], k: int, *,
               conversation: str | None, not_before: datetime | None,
               not_after: datetime | None, text: str | None = None) -> list[ScoredEntry]:
        filtered = conversation is not None or not_before is not None
        with self.lock:
            # The vector index filters by scope and time upper bound; the other filters are
            # applied to the nearest _VEC_MAX_K of the scope (exact kNN, best first).
            hits = self.runtime.store.search(tenant, user, vector,
                                             _VEC_MAX_K if filtered else k,
                                             not_after=not_after)
        hits = [h for h in hits
                if (conversation is None or h.entry.conversation == conversation)
                and (not_before is None or h.entry.event_time >= not_before)]
        return hits[:k]

    def lexical_search(self, tenant: str, user: str, terms: Sequence[str], k: int, *,
                       conversation: str | None, not_before: datetime | None,
                       not_after: datetime | None) -> list[ScoredEntry]:
        with self.lock:
            # FTS5 filters scope and time; the conversation on the best _VEC_MAX_K.
            hits = self.runtime.store.lexical_search(
                tenant, user, terms, _VEC_MAX_K if conversation is not None else k,
                not_after=not_after, not_before=not_before)
        return [h for h in hits
                if conversation is None or h.entry.conversation == conversation][:k]

    def page(self, tenant: str, user: str, *, after: PageKey | None, limit: int,
             events: bool = False) -> list[tuple[MemoryEntry, PageKey]]:
        key = None if after is None else (int(after[0]), str(after[1]))
        with self.lock:
            rows = self.runtime.store.page_entries(tenant, user, after=key, limit=limit)
            if events:
                # The few turns in open buffers, merged in the same (event time, id) order.
                held = [(e, (_us(e.event_time), e.id))
                        for e in self._buffered_turns(tenant, user)]
                rows = sorted(rows + [r for r in held if key is None or r[1] > key],
                              key=lambda r: r[1])[:limit]
        return [(e, list(k)) for e, k in rows]

    def _buffered_turns(self, tenant: str, user: str) -> list[MemoryEntry]:
        """The scope's turns still in open sensory or topic buffers, as event entries."""
        from lightmem.processors.segment import SensoryBufferState
        from lightmem.processors.summarize import TopicBufferState

        store = self.runtime.store
        # Buffer keys are conversation keys, the JSON array ["tenant","conversation"]: the
        # tenant's all start with the same characters.
        prefix = encode_key(tenant)[:-1] + ","
        out: list[MemoryEntry] = []
        for kind in ("sensory", "topic"):
            for key in store.buffer_keys(kind):
                if not key.startswith(prefix):
                    continue
                body = store.load_buffer(kind, key)
                if body is None:
                    continue
                if kind == "sensory":
                    state = SensoryBufferState.model_validate_json(body)
                    turns = [(state.user, t) for t in state.turns]
                else:
                    topic = TopicBufferState.model_validate_json(body)
                    turns = [(seg.user, t) for seg in topic.segments for t in seg.turns]
                    state = topic
                for owner, turn in turns:
                    if (turn.user or owner) != user:
                        continue
                    text = " ".join((turn.compressed_text or turn.original_text).split())
                    out.append(MemoryEntry(
                        id=EVENT_PREFIX + stable_id(key, turn.turn_id), tenant=tenant,
                        user=user, conversation=state.conversation, topic_id="",
                        speaker=turn.speaker, fact=f"{turn.speaker}: {text}",
                        event_time=turn.event_time, ingest_time=turn.event_time,
                        source_turn_ids=[turn.turn_id], turn_seq=turn.seq,
                        original_text=turn.original_text,
                        compressed_text=turn.compressed_text, mode=EntryMode.extractive))
        return out

    def search_events(self, tenant: str, user: str, vector: Sequence[float], k: int, *,
                      conversation: str | None, not_before: datetime | None,
                      not_after: datetime | None) -> list[ScoredEntry]:
        with self.lock:
            events = [e for e in self._buffered_turns(tenant, user)
                      if (conversation is None or e.conversation == conversation)
                      and (not_before is None or e.event_time >= not_before)
                      and (not_after is None or e.event_time <= not_after)]
            if not events:
                return []
            # Embeddings of buffered turns are kept per event id: a turn stays in its buffer
            # over many searches, and leaves it (summarized) only once.
            todo = [e for e in events if e.id not in self._event_vectors]
            if todo:
                vectors = self.runtime.embedder([e.fact for e in todo])
                for e, v in zip(todo, vectors, strict=True):
                    self._event_vectors[e.id] = np.asarray(v, dtype=np.float32)
                while len(self._event_vectors) > _EVENT_CACHE:
                    self._event_vectors.pop(next(iter(self._event_vectors)))
            matrix = np.stack([self._event_vectors[e.id] for e in events])
        scores = matrix @ np.asarray(vector, dtype=np.float32)  # unit vectors: cosines
        ranked = sorted(zip(events, scores.tolist(), strict=True), key=lambda x: -x[1])[:k]
        return [ScoredEntry(entry=e, score=float(score)) for e, score in ranked]

    def get(self, entry_id: str) -> MemoryEntry | None:
        with self.lock:
            found = self.runtime.store.get([entry_id])
        return found[0] if found else None

    def history(self, entry_id: str) -> list[MemoryChange]:
        with self.lock:
            return self.runtime.store.history(entry_id)

    def delete(self, entry: MemoryEntry, change: MemoryChange) -> None:
        store = self.runtime.store
        with self.lock, store.transaction():
            store.delete(entry.id, expected_version=entry.version)
            store.append_changes([change])

    def retrieve(self, tenant: str, user: str, vector: Sequence[float], plan: Plan
                 ) -> list[ScoredEntry]:
        from .retrieval import retrieve_with

        return retrieve_with(self, tenant, user, vector, plan)

    def erase(self, tenant: str, user: str | None, *, requested_by: str,
              reason: str = "memory service: delete all of the user") -> ErasureReport:
        from lightmem.streams.erasure.forget import forget

        with self.lock:
            return forget(self.settings, tenant, user, requested_by=requested_by,
                          reason=reason, runtime=self.runtime)

    def erasure_status(self, tenant: str, user: str | None) -> ErasureReport | None:
        from lightmem.streams.erasure.forget import erasure_status

        with self.lock:
            return erasure_status(self.settings, tenant, user, runtime=self.runtime)

    def count_entries(self) -> dict[tuple[str, str], int]:
        with self.lock:
            return self.runtime.store.count_entries()

    def readiness(self) -> dict[str, str]:
        try:
            with self.lock:
                self.runtime.store.turns_seen()
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            return {"store": f"{type(exc).__name__}: {exc}"}
        return {"store": "ok"}

    def close(self) -> None:
        with self.lock:
            if "store" in vars(self.runtime):
                self.runtime.store.close()


class StreamBackend:
    """The streaming deployment: Elasticsearch alias for reads, Kafka for writes.

    Args:
        settings: Kafka and Elasticsearch settings (``es_alias``, ``kafka_topic_prefix``).
        check: Refuse to start (:class:`StartupError`) when the alias or a topic is missing.
    """

    name = "stream"
    applies_turns = False
    #: Seconds a delete-all waits for the ingest workers to confirm the erasure.
    erase_wait_s = 10.0

    def __init__(self, settings: Settings, *, check: bool = True) -> None:
        from lightmem.streams.elastic.store import ElasticsearchStore, es_client
        from lightmem.streams.kafka.producer import RecordProducer
        from lightmem.streams.kafka.topics import Topics

        self.settings = settings
        self.topics = Topics.from_settings(settings)
        self.client = es_client(settings)
        self.store = ElasticsearchStore(self.client, alias=settings.es_alias)
        if check:
            self._check()
        from lightmem.streams.models.components import Components

        self.components = Components(settings)
        self.producer = RecordProducer(settings, self.topics)
        self._produce_lock = threading.Lock()
        self._changes: Any = None  # the changes topic's router, made at the first delete

    def _needed_topics(self) -> list[str]:
        return [self.topics.turns, self.topics.memory_changes, self.topics.erasures]

    def _missing_topics(self, timeout_s: float = 10.0) -> list[str]:
        from confluent_kafka.admin import AdminClient

        from lightmem.streams.kafka.topics import kafka_config

        metadata = AdminClient(kafka_config(self.settings)).list_topics(timeout=timeout_s)
        return [n for n in self._needed_topics() if n not in metadata.topics]

    def _check(self) -> None:
        try:
            current = self.store.current_index()
        except Exception as exc:  # noqa: BLE001 - one line, not a stack trace
            raise StartupError(f"Elasticsearch at {self.settings.es_url}: "
                               f"{type(exc).__name__}: {exc}") from None
        if current is None:
            raise StartupError(
                f"index alias {self.settings.es_alias!r} not found on {self.settings.es_url}: "
                "start `lightmem worker` once (it creates it) or run `lightmem index create`")
        try:
            missing = self._missing_topics()
        except Exception as exc:  # noqa: BLE001
            raise StartupError(f"Kafka at {self.settings.kafka_bootstrap}: "
                               f"{type(exc).__name__}: {exc}") from None
        if missing:
            raise StartupError(f"missing topics {missing}: run `lightmem topics create` first")

    def warm_up(self) -> None:
        _ = self.components.embedder

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.components.embedder(list(texts))

    @property
    def chat(self) -> ChatModel | None:
        return self.components.chat

    def write_turns(self, turns: Sequence[TurnEvent], *, flush: bool,
                    wait_s: float | None = None) -> Written:
        from lightmem.streams.kafka.flush_commands import FlushCommand

        # Idempotent producer, acks=all: when flush() returns, every turn is on the topic.
        with self._produce_lock:
            self.producer.add_turns(turns)
            if flush or wait_s is not None:
                # In-band, keyed like the turns: the worker closes the conversation's
                # buffers right after these turns, so their memories are made now.
                for tenant, conversation in sorted({(t.tenant, t.conversation)
                                                    for t in turns}):
                    self.producer.send_flush(FlushCommand(
                        tenant=tenant, conversation=conversation,
                        issued_at=datetime.now(UTC), issued_by="memory service"))
            self.producer.flush(timeout_s=30.0)
        if wait_s is None:
            return Written(status="queued")
        missing = self._wait_searchable(turns, wait_s)
        return Written(status="queued", searchable=not missing, not_searchable=missing)

    def _wait_searchable(self, turns: Sequence[TurnEvent], wait_s: float) -> list[str]:
        """Turn ids still covered by no searchable memory after up to ``wait_s`` seconds."""
        import time

        by_scope: dict[tuple[str, str], set[str]] = {}
        for t in turns:
            by_scope.setdefault((t.tenant, t.user), set()).add(t.turn_id)
        deadline = time.monotonic() + wait_s
        while True:
            for (tenant, user), pending in by_scope.items():
                if not pending:
                    continue
                resp = self.client.search(
                    index=self.store.target, size=len(pending) * 4,
                    query={"bool": {"filter": [
                        *self._filters(tenant, user, None, None, None),
                        {"terms": {"source_turn_ids": sorted(pending)}}]}},
                    source_includes=["source_turn_ids"], track_total_hits=False)
                for h in resp["hits"]["hits"]:
                    pending.difference_update(h["_source"]["source_turn_ids"])
            missing = [t.turn_id for t in turns if t.turn_id in by_scope[(t.tenant, t.user)]]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.2)  # polling interval: the index is refreshed about every second

    def _filters(self, tenant: str, user: str, conversation: str | None,
                 not_before: datetime | None, not_after: datetime | None
                 ) -> list[dict[str, Any]]:
        filters: list[dict[str, Any]] = [{"term": {"tenant": tenant}}, {"term": {"user": user}}]
        if conversation is not None:
            filters.append({"term": {"conversation": conversation}})
        bounds = {}
        if not_before is not None:
            bounds["gte"] = not_before.astimezone(UTC).isoformat()
        if not_after is not None:
            bounds["lte"] = not_after.astimezone(UTC).isoformat()
        if bounds:
            filters.append({"range": {"event_time": bounds}})
        return filters

    def search(self, tenant: str, user: str, vector: Sequence[float], k: int, *,
               conversation: str | None, not_before: datetime | None,
               not_after: datetime | None, text: str | None = None) -> list[ScoredEntry]:
        filters = self._filters(tenant, user, conversation, not_before, not_after)
        # Lexical + vector when asked: BM25 on the fact beside the kNN, both filtered to the
        # scope (ElasticsearchStore.hybrid_search's linear combination, plus our filters).
        query = None if text is None else {
            "bool": {"must": [{"match": {"fact": {"query": text}}}], "filter": filters}}
        resp = self.client.search(
            index=self.store.target,
            knn={"field": "embedding", "query_vector": [float(x) for x in vector], "k": k,
                 "num_candidates": min(10_000, max(4 * k, 100)),
                 # A pre-filter: the k nearest are chosen within the scope only.
                 "filter": filters},
            query=query, size=k, source_excludes=["embedding"])
        # Elasticsearch's cosine _score is (1 + cos) / 2: back to cos. A score with a text
        # query (this store's own BM25 + kNN sum, not the service's rank fusion) is kept.
        return [ScoredEntry(entry=MemoryEntry.model_validate(h["_source"]),
                            score=float(h["_score"]) if text is not None
                            else 2.0 * float(h["_score"]) - 1.0)
                for h in resp["hits"]["hits"]]

    def lexical_search(self, tenant: str, user: str, terms: Sequence[str], k: int, *,
                       conversation: str | None, not_before: datetime | None,
                       not_after: datetime | None) -> list[ScoredEntry]:
        text = " ".join(t for t in terms if t.strip())
        if not text:
            return []
        filters = self._filters(tenant, user, conversation, not_before, not_after)
        resp = self.client.search(
            index=self.store.target, size=k, source_excludes=["embedding"],
            query={"bool": {"must": [{"multi_match": {
                "query": text, "fields": ["fact", "original_text"], "type": "most_fields"}}],
                "filter": filters}})
        return [ScoredEntry(entry=MemoryEntry.model_validate(h["_source"]),
                            score=float(h["_score"])) for h in resp["hits"]["hits"]]

    def page(self, tenant: str, user: str, *, after: PageKey | None, limit: int,
             events: bool = False) -> list[tuple[MemoryEntry, PageKey]]:
        from lightmem.streams.elastic.events import events_index

        # Events: one search over both indices, sorted together (search_after spans them).
        index = (f"{self.store.target},{events_index(self.settings.es_alias)}" if events
                 else self.store.target)
        out: list[tuple[MemoryEntry, PageKey]] = []
        while len(out) < limit:
            want = limit - len(out)
            resp = self.client.search(
                index=index, ignore_unavailable=True,
                query={"bool": {"filter": self._filters(tenant, user, None, None, None)}},
                sort=[{"event_time": "asc"}, {"id": "asc"}],
                size=want, search_after=after, source_excludes=["embedding"],
                track_total_hits=False)
            hits = resp["hits"]["hits"]
            rows = [(MemoryEntry.model_validate(h["_source"]), list(h["sort"])) for h in hits]
            # Left-out events are refilled from further on: a short page means the end.
            out += self._without_covered(tenant, user, rows) if events else rows
            if len(hits) < want:
                break
            after = list(hits[-1]["sort"])
        return out

    def _without_covered(self, tenant: str, user: str,
                         rows: list[tuple[MemoryEntry, PageKey]]
                         ) -> list[tuple[MemoryEntry, PageKey]]:
        """``rows`` without the events whose turns a memory covers (indexed, not yet
        retired: the index sink retires events just after it indexed their memories)."""
        turn_ids = sorted({t for e, _ in rows if e.id.startswith(EVENT_PREFIX)
                           for t in e.source_turn_ids})
        if not turn_ids:
            return rows
        resp = self.client.search(
            index=self.store.target, size=4 * len(turn_ids), track_total_hits=False,
            query={"bool": {"filter": [*self._filters(tenant, user, None, None, None),
                                       {"terms": {"source_turn_ids": turn_ids}}]}},
            source_includes=["source_turn_ids"])
        covered = {t for h in resp["hits"]["hits"] for t in h["_source"]["source_turn_ids"]}
        return [(e, k) for e, k in rows
                if not (e.id.startswith(EVENT_PREFIX) and set(e.source_turn_ids) <= covered)]

    def search_events(self, tenant: str, user: str, vector: Sequence[float], k: int, *,
                      conversation: str | None, not_before: datetime | None,
                      not_after: datetime | None) -> list[ScoredEntry]:
        # Turns the ingest worker holds in its buffers: the events index its sensory stage
        # writes and its index sink retires (lightmem.streams.elastic.events).
        from elasticsearch import NotFoundError

        from lightmem.streams.elastic.events import events_index

        filters = self._filters(tenant, user, conversation, not_before, not_after)
        try:
            resp = self.client.search(
                index=events_index(self.settings.es_alias),
                knn={"field": "embedding", "query_vector": [float(x) for x in vector], "k": k,
                     "num_candidates": min(10_000, max(4 * k, 100)), "filter": filters},
                size=k, source_excludes=["embedding"])
        except NotFoundError:
            return []  # workers from before events: memories only
        events = [ScoredEntry(entry=MemoryEntry.model_validate(h["_source"]),
                              score=2.0 * float(h["_score"]) - 1.0)
                  for h in resp["hits"]["hits"]]
        if not events:
            return []
        # The index sink indexes memories just before it retires their events: a search in
        # between meets both. An event whose turn a memory covers is left out.
        kept = {e.id for e, _ in self._without_covered(
            tenant, user, [(h.entry, []) for h in events])}
        return [h for h in events if h.entry.id in kept]

    def get(self, entry_id: str) -> MemoryEntry | None:
        found = self.store.get([entry_id])
        return found[0] if found else None

    def history(self, entry_id: str) -> list[MemoryChange]:
        from lightmem.streams.kafka.changes import memory_history

        # A memory still stored says its scope: read its scope's partition only. A deleted
        # one does not: every partition is read (record keys select its changes).
        entry = self.get(entry_id)
        scope = {"tenant": entry.tenant, "user": entry.user} if entry is not None else {}
        return memory_history(self.settings, entry_id, self.topics, **scope)

    def delete(self, entry: MemoryEntry, change: MemoryChange) -> None:
        from lightmem.streams.kafka.change_log import ChangeRouter, produce_change

        self.store.delete(entry.id, expected_version=entry.version)
        with self._produce_lock:
            if self._changes is None:
                self._changes = ChangeRouter(self.settings)
            produce_change(self.producer, self.topics.memory_changes, change, self._changes,
                           label=f"delete {entry.id}")
            self.producer.flush(timeout_s=30.0)
        # Searches and lists see the delete at once (the index is near real time).
        self.store.refresh()

    def retrieve(self, tenant: str, user: str, vector: Sequence[float], plan: Plan
                 ) -> list[ScoredEntry]:
        from .retrieval import retrieve_elasticsearch

        # One _msearch for every candidate list, then the winners (see .retrieval).
        return retrieve_elasticsearch(self, tenant, user, vector, plan)

    def erasure_status(self, tenant: str, user: str | None) -> ErasureReport | None:
        from lightmem.streams.erasure.forget import erasure_status

        return erasure_status(self.settings, tenant, user, stream=True, topics=self.topics,
                              store=self.store)

    def count_entries(self) -> dict[tuple[str, str], int]:
        return self.store.count_entries()

    def erase(self, tenant: str, user: str | None, *, requested_by: str,
              reason: str = "memory service: delete all of the user") -> ErasureReport:
        from lightmem.streams.erasure.forget import forget_stream, new_request

        request = new_request(tenant, user, reason=reason, requested_by=requested_by)
        # The workers confirm their part asynchronously: wait a little, report the rest.
        return forget_stream(self.settings, request, topics=self.topics, store=self.store,
                             wait_s=self.erase_wait_s)

    def readiness(self) -> dict[str, str]:
        checks: dict[str, str] = {}
        try:
            checks["elasticsearch"] = ("ok" if self.store.current_index() is not None
                                       else f"alias {self.settings.es_alias!r} not found")
        except Exception as exc:  # noqa: BLE001
            checks["elasticsearch"] = f"{type(exc).__name__}: {exc}"
        try:
            missing = self._missing_topics(timeout_s=5.0)
            checks["kafka"] = "ok" if not missing else f"missing topics {missing}"
        except Exception as exc:  # noqa: BLE001
            checks["kafka"] = f"{type(exc).__name__}: {exc}"
        return checks

    def close(self) -> None:
        try:
            self.producer.flush(timeout_s=10.0)
        finally:
            self.client.close()
