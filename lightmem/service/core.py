"""The memory service's operations, for one tenant at a time, over either backend.

The HTTP routes (:mod:`lightmem.service.app`) and the in-process SDK
(:class:`~lightmem.service.sdk.Memory`) both call :class:`MemoryService`; the tenant is an
argument that the routes take from the API key only. Every read checks the tenant of what it
found: another tenant's memory id is "not found" (404), never "forbidden", so ids leak
nothing.

Idempotency of ``POST /add`` (the Agent Memory Leaderboard contract) is kept in a small
SQLite ledger (:class:`RequestLedger`, ``DATA_DIR/service-requests.db``): the first answer
to a ``(tenant, request_id)`` is stored with a digest of its payload; the same payload gets
the same answer, another payload a 409. Turn ids are derived from the request id, so even a
retry that reaches another replica adds no turn twice.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError

from lightmem.processors.entry_text import EntryText
from lightmem.processors.lexical import query_terms
from lightmem.processors.retrieve import DEFAULT_CANDIDATES, Retriever
from lightmem.processors.store import ScoredEntry, VersionConflict
from lightmem.schemas import (
    MemoryEntry,
    SchemaError,
    TurnEvent,
    check_event_time,
    stable_id,
    utc_now,
)
from lightmem.settings import Settings

from .backends import Backend, PageKey, delete_change
from .batching import QueryBatcher
from .errors import Conflict, InvalidInput, NotFound
from .models import (
    AddRequest,
    AddResponse,
    AmlAddRequest,
    AmlAddResponse,
    AmlSearchItem,
    AmlSearchRequest,
    AmlSearchResponse,
    AnswerRequest,
    AnswerResponse,
    ChangeItem,
    DeleteAllResponse,
    DeleteResponse,
    ErasureSink,
    HistoryResponse,
    MemoryItem,
    MemoryPage,
    MessageIn,
    ReadyResponse,
    SearchHit,
    SearchRequest,
    SearchResponse,
)
from .retrieval import Plan

__all__ = ["MemoryService", "RequestLedger", "erase_user", "MAX_PAGE"]

#: Largest page of ``GET /v1/memories``.
MAX_PAGE = 1000


def _digest(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":"),
                                     default=str).encode()).hexdigest()


class RequestLedger:
    """``(tenant, request_id) -> (payload digest, answer)`` in a SQLite file."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS requests (tenant TEXT NOT NULL, "
                         "request_id TEXT NOT NULL, digest TEXT NOT NULL, answer TEXT NOT NULL, "
                         "PRIMARY KEY (tenant, request_id))")
        self.lock = threading.RLock()

    def find(self, tenant: str, request_id: str) -> tuple[str, str] | None:
        row = self._db.execute("SELECT digest, answer FROM requests WHERE tenant=? AND "
                               "request_id=?", (tenant, request_id)).fetchone()
        return None if row is None else (row[0], row[1])

    def record(self, tenant: str, request_id: str, digest: str, answer: str) -> None:
        self._db.execute("INSERT OR IGNORE INTO requests VALUES (?,?,?,?)",
                         (tenant, request_id, digest, answer))

    def close(self) -> None:
        self._db.close()


def _encode_cursor(key: PageKey) -> str:
    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> PageKey:
    try:
        key = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error):
        key = None
    if not isinstance(key, list) or len(key) != 2:
        raise InvalidInput(f"not a cursor this service returned: {cursor[:80]!r}",
                           loc=("query", "cursor"))
    return key


def _aml_time(value: str | None, now: datetime, loc: tuple[str | int, ...]) -> datetime:
    """An AML timestamp: RFC 3339, or ``YYYY-MM-DD[ HH:MM[:SS]]`` taken as UTC."""
    if value is None:
        return now
    text = value.strip()
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        text += "T00:00:00"
    try:
        when = datetime.fromisoformat(text.replace(" ", "T", 1).replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(f"not a date-time: {value[:64]!r} (use RFC 3339, e.g. "
                           "2024-05-01T09:00:00Z)", loc=loc) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


class MemoryService:
    """Tenant-scoped memory operations over a :class:`~lightmem.service.backends.Backend`.

    Args:
        backend: The store served.
        settings: Limits (``max_event_bytes``, ``max_event_time_skew_s``), ``retrieve_k``
            and ``data_dir`` (where the request ledger lives).
        clock: Now, for turn times without a timestamp and for change records.
    """

    def __init__(self, backend: Backend, settings: Settings, *,
                 clock: Callable[[], datetime] = utc_now) -> None:
        self.backend = backend
        self.settings = settings
        self.clock = clock
        self.retriever = Retriever(_NoStore(), backend.embed, k=settings.retrieve_k,
                                   render_text=settings.render_text)
        #: Query embeddings, batched across concurrent requests (see .batching).
        self.batcher = QueryBatcher(backend.embed) if settings.serve_batch_queries else None
        self._ledger: RequestLedger | None = None
        #: How long ``POST /add`` waits for its turns to be searchable (stream backend).
        self.aml_wait_s = 30.0

    @property
    def ledger(self) -> RequestLedger:
        if self._ledger is None:
            self._ledger = RequestLedger(self.settings.data_dir / "service-requests.db")
        return self._ledger

    def warm_up(self) -> None:
        """Load the models now (the first request does not pay for it)."""
        self.backend.warm_up()

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        self.backend.close()
        if self._ledger is not None:
            self._ledger.close()

    # -- writes

    def _turns(self, tenant: str, user: str, conversation: str, session: str,
               messages: list[MessageIn], *, id_seed: str, now: datetime,
               loc: str = "messages") -> list[TurnEvent]:
        turns, errors = [], []
        for i, m in enumerate(messages):
            try:
                turn = TurnEvent(
                    tenant=tenant, user=user, conversation=conversation, session=session,
                    turn_id=m.turn_id or f"{id_seed[:20]}-{i}", role=m.role,
                    speaker=m.speaker or (user if m.role == "user" else "assistant"),
                    text=m.content, event_time=m.timestamp or now, metadata=m.metadata)
                check_event_time(turn, now=now,
                                 max_future_s=self.settings.max_event_time_skew_s)
            except SchemaError as exc:
                errors += [{"loc": ["body", loc, i, "timestamp"], "msg": f"{reason} (got {value})",
                            "type": "value_error"} for _, reason, value in exc.errors]
                continue
            except ValidationError as exc:
                errors += [{"loc": ["body", loc, i, *e["loc"]], "msg": e["msg"],
                            "type": e["type"]} for e in exc.errors(include_url=False)]
                continue
            size = len(turn.to_bytes())
            if size > self.settings.max_event_bytes:
                errors.append({"loc": ["body", loc, i, "content"],
                               "msg": f"the turn is {size} bytes, larger than max_event_bytes="
                                      f"{self.settings.max_event_bytes}",
                               "type": "value_error"})
                continue
            turns.append(turn)
        if errors:
            raise InvalidInput("invalid messages", errors=errors)
        return turns

    def add(self, tenant: str, request: AddRequest, *, wait_s: float | None = None
            ) -> AddResponse:
        """Add chat turns; nothing is written when any message is invalid.

        ``wait_s``: flush the conversations and wait up to that long until the turns are
        searchable (the stream backend says which are not, when the time is up).
        """
        conversation = request.conversation or request.session or "default"
        session = request.session or conversation
        now = self.clock()
        # Default turn ids come from the request, so a retried request adds nothing twice.
        # A message with neither id nor timestamp cannot be told from the same words said
        # again later ("ok"): its id also takes the time the request was received.
        undated = any(m.turn_id is None and m.timestamp is None for m in request.messages)
        seed = stable_id(tenant, request.user, conversation, session,
                         *(m.model_dump_json() for m in request.messages),
                         *([now.isoformat()] if undated else []))
        turns = self._turns(tenant, request.user, conversation, session,
                            list(request.messages), id_seed=seed, now=now)
        written = self.backend.write_turns(turns, flush=request.flush, wait_s=wait_s)
        return AddResponse(status="applied" if written.status == "applied" else "queued",
                           turn_ids=[t.turn_id for t in turns], skipped=written.skipped,
                           memories=written.memories, searchable=written.searchable,
                           not_searchable=written.not_searchable)

    # -- reads

    def _hits(self, tenant: str, user: str, query: str, k: int, *,
              conversation: str | None = None, after: datetime | None = None,
              before: datetime | None = None, retrieval: str | None = None,
              events: bool = True) -> list[ScoredEntry]:
        if not query.strip():
            return []
        vector = [float(x) for x in (self.batcher or self.backend.embed)([query])[0]]
        # The request's retrieval mode, else the server's (LIGHTMEM_RETRIEVAL).
        hybrid = (retrieval or self.settings.retrieval) == "hybrid"
        weight = self.retriever.vector_weight
        # The Retriever's fusion under hybrid: cosine ranks (memories and events) beside
        # BM25 ranks, over the same number of candidates each.
        plan = Plan(k=k, n=max(k, DEFAULT_CANDIDATES) if hybrid else k, hybrid=hybrid,
                    terms=tuple(query_terms(query)) if hybrid else (), events=events,
                    weights=(weight, 1.0 - weight), rrf_k=self.retriever.rrf_k,
                    conversation=conversation, not_before=after, not_after=before)
        hits = self.backend.retrieve(tenant, user, vector, plan)
        # The backend filters by scope; re-checking makes a store bug unable to leak.
        return [h for h in hits if h.entry.tenant == tenant and h.entry.user == user][:k]

    def search(self, tenant: str, request: SearchRequest) -> SearchResponse:
        hits = self._hits(tenant, request.user, request.query, request.k,
                          conversation=request.conversation, after=request.after,
                          before=request.before, retrieval=request.mode,
                          events=request.include_events)
        return SearchResponse(results=[_hit(h, self.settings.render_text) for h in hits])

    def answer(self, tenant: str, request: AnswerRequest) -> AnswerResponse:
        hits = self._hits(tenant, request.user, request.question, request.k,
                          retrieval=request.retrieval)
        answer = self.retriever.answer(request.question, hits, self.backend.chat,
                                       tenant=tenant, asked_at=self.clock())
        by_id = {h.entry.id: h for h in hits}
        return AnswerResponse(answer=answer.text, mode=answer.mode,
                              memories=[_hit(by_id[i], self.settings.render_text)
                                        for i in answer.memory_ids if i in by_id])

    def list(self, tenant: str, user: str, *, limit: int = 100, cursor: str | None = None,
             include_events: bool = False) -> MemoryPage:
        """One page of ``user``'s memories, oldest first; ``next_cursor`` while more remain.

        ``include_events``: also the turns not summarized yet (provisional, ``kind: event``),
        in the same order. A turn summarized between two pages may show as an event on one
        and as its memory on a later one (a different id).
        """
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidInput(f"must be between 1 and {MAX_PAGE} (got {limit})",
                               loc=("query", "limit"))
        after = None if cursor is None else _decode_cursor(cursor)
        rows = self.backend.page(tenant, user, after=after, limit=limit + 1,
                                 events=include_events)
        more = len(rows) > limit
        rows = rows[:limit]
        return MemoryPage(results=[MemoryItem.of(e, self.settings.render_text) for e, _ in rows],
                          next_cursor=_encode_cursor(rows[-1][1]) if more else None)

    def iter_all(self, tenant: str, user: str, *, page_size: int = 500
                 ) -> Iterator[MemoryEntry]:
        after: PageKey | None = None
        while True:
            rows = self.backend.page(tenant, user, after=after, limit=page_size)
            for entry, _ in rows:
                yield entry
            if len(rows) < page_size:
                return
            after = rows[-1][1]

    def _entry(self, tenant: str, memory_id: str) -> MemoryEntry:
        entry = self.backend.get(memory_id)
        if entry is None or entry.tenant != tenant:
            raise NotFound(f"no memory {memory_id!r}", loc=("path", "memory_id"))
        return entry

    def get(self, tenant: str, memory_id: str) -> MemoryItem:
        return MemoryItem.of(self._entry(tenant, memory_id), self.settings.render_text)

    def history(self, tenant: str, memory_id: str) -> HistoryResponse:
        """Every change of one memory, deleted ones included (404 for another tenant's)."""
        changes = [c for c in self.backend.history(memory_id) if c.tenant == tenant]
        if not changes:
            self._entry(tenant, memory_id)  # 404 unless it exists (written before history)
        return HistoryResponse(results=[ChangeItem.of(c, self.settings.render_text)
                                        for c in changes])

    # -- deletes

    def delete(self, tenant: str, memory_id: str, *, reason: str = "deleted through the API"
               ) -> DeleteResponse:
        """Delete one memory and record a ``delete`` change (store history / changes topic)."""
        for _ in range(3):
            entry = self._entry(tenant, memory_id)
            try:
                self.backend.delete(entry, delete_change(entry, at=self.clock(), reason=reason))
            except VersionConflict:
                continue  # a consolidation changed it meanwhile: read it again
            return DeleteResponse(id=memory_id)
        raise Conflict(f"memory {memory_id!r} keeps changing; try again",
                       loc=("path", "memory_id"))

    def delete_all(self, tenant: str, user: str) -> DeleteAllResponse:
        """Delete every memory of ``(tenant, user)``: see :func:`erase_user`."""
        return erase_user(self, tenant, user)

    # -- the Agent Memory Leaderboard contract

    def aml_add(self, tenant: str, request: AmlAddRequest) -> AmlAddResponse:
        """``POST /add``: idempotent by ``request_id``; searchable when it returns (embedded)."""
        digest = _digest(request.model_dump(mode="json"))
        with self.ledger.lock:
            known = self.ledger.find(tenant, request.request_id)
            if known is not None:
                if known[0] != digest:
                    raise Conflict(f"request_id {request.request_id!r} was used for another "
                                   "payload", loc=("body", "request_id"))
                return AmlAddResponse.model_validate_json(known[1])
            now = self.clock()
            messages = [MessageIn(role=m.role, content=m.content,
                                  timestamp=_aml_time(m.timestamp, now,
                                                      ("body", "messages", i, "timestamp")))
                        for i, m in enumerate(request.messages)]
            turns = self._turns(tenant, request.user_id, request.session_id, request.session_id,
                                messages, id_seed=stable_id("aml", request.request_id),
                                now=now)
            written = self.backend.write_turns(turns, flush=True, wait_s=self.aml_wait_s)
            answer = AmlAddResponse(request_id=request.request_id,
                                    turn_ids=[t.turn_id for t in turns],
                                    memories=written.memories, searchable=written.searchable,
                                    not_searchable=written.not_searchable)
            self.ledger.record(tenant, request.request_id, digest, answer.model_dump_json())
            return answer

    def aml_search(self, tenant: str, request: AmlSearchRequest) -> AmlSearchResponse:
        hits = self._hits(tenant, request.user_id, request.query, request.top_k)
        return AmlSearchResponse(data=[
            AmlSearchItem(id=h.entry.id, content=_hit(h, self.settings.render_text).rendered,
                          score=h.score, created_at=h.entry.event_time) for h in hits])

    # -- health

    def ready(self) -> ReadyResponse:
        checks = self.backend.readiness()
        return ReadyResponse(ready=all(v == "ok" for v in checks.values()), checks=checks)


def erase_user(service: MemoryService, tenant: str, user: str, *,
               requested_by: str = "memory service") -> DeleteAllResponse:
    """Forget ``(tenant, user)``: the one place the service erases a user.

    Calls the erasure of issue 14 (:func:`lightmem.streams.erasure.forget.forget`) on the store the
    service serves: memories, change history, open buffers, turn ledger and dead letters of
    the scope, the request kept in the erasure ledger so replays do not bring them back, and
    one content-free ``erase`` change for audit. What a store could not remove (yet) comes
    back in ``not_erased``, e.g. raw turns until the turns topic's retention, or the
    workers' buffers while no ingest worker confirmed the erasure.
    """
    report = service.backend.erase(tenant, user, requested_by=requested_by)
    sinks = [ErasureSink(**s.as_json()) for s in report.sinks]
    memories = next((s for s in sinks if s.sink in ("memories", "elasticsearch")), None)
    return DeleteAllResponse(
        user=user, deleted=0 if memories is None else memories.removed.get("memories", 0),
        confirmed=report.confirmed, erasure_id=report.request.erasure_id,
        not_erased=[f"{s.sink}: {p}" for s in sinks for p in s.pending]
        + [f"{s.sink}: not confirmed" for s in sinks if not s.confirmed and not s.pending],
        sinks=sinks)


def _hit(h: ScoredEntry, render_text: EntryText) -> SearchHit:
    return SearchHit(**MemoryItem.of(h.entry, render_text).model_dump(), score=h.score)


class _NoStore:
    """The service's Retriever only answers (searches go through the backend)."""

    def search(self, *args: object, **kwargs: object) -> list[ScoredEntry]:
        raise NotImplementedError
