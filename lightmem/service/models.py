"""Request and response bodies of the memory service (and the SDK's return types).

The same models are what :class:`~lightmem.service.sdk.Memory` (in-process) and
:class:`~lightmem.service.client.MemoryClient` (HTTP) return, so code moves between them
unchanged. Request bodies forbid unknown fields: a body that names a ``tenant`` is refused
(422), it never selects a tenant (the tenant always comes from the API key).

Names and text follow the event contracts (:mod:`lightmem.schemas.records`): names 1..256
characters and not blank, message text 1..100,000 characters and not blank.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from lightmem.processors.entry_text import DEFAULT_RENDER_TEXT, EntryText
from lightmem.schemas import MemoryChange, MemoryEntry
from lightmem.schemas.records import RFC3339_PATTERN

__all__ = [
    "Name",
    "MessageIn",
    "AddRequest",
    "AddResponse",
    "Retrieval",
    "SearchRequest",
    "MemoryItem",
    "SearchHit",
    "SearchResponse",
    "AnswerRequest",
    "AnswerResponse",
    "MemoryPage",
    "ChangeItem",
    "HistoryResponse",
    "DeleteResponse",
    "DeleteAllResponse",
    "ErasureSink",
    "HealthResponse",
    "ReadyResponse",
    "AmlMessage",
    "AmlAddRequest",
    "AmlAddResponse",
    "AmlSearchRequest",
    "AmlSearchItem",
    "AmlSearchResponse",
    "ErrorItem",
    "ErrorResponse",
    "MAX_MESSAGES",
    "MAX_K",
]

#: Messages per add request (a session at a time; larger imports use ``lightmem produce``).
MAX_MESSAGES = 1000
#: Most hits one search returns (the AML contract's ``top_k`` bound).
MAX_K = 1000

Name = Annotated[str, StringConstraints(min_length=1, max_length=256, strip_whitespace=True,
                                        pattern=r"\S")]
Text = Annotated[str, StringConstraints(min_length=1, max_length=100_000, pattern=r"\S")]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MessageIn(_Body):
    """One chat message of an add request."""

    #: ``user`` or ``assistant``.
    role: Literal["user", "assistant"]
    #: The message text.
    content: Text
    #: When it was written (RFC 3339 with an offset); default: when the service received it.
    timestamp: AwareDatetime | None = None
    #: Display name; default: the user id for ``user`` messages, ``assistant`` otherwise.
    speaker: Name | None = None
    #: Turn id, unique within the conversation; default: derived from the request, so the
    #: same request sent twice adds its turns once (when every message has a timestamp: an
    #: undated message's id also takes the time it was received).
    turn_id: Name | None = None
    #: Free-form platform metadata, carried through untouched.
    metadata: dict[str, object] | None = None


class AddRequest(_Body):
    """Add chat turns to one user's memory (``POST /v1/memories``)."""

    #: The end user whose memory the turns feed.
    user: Name
    #: Conversation id (default: the session, else ``default``).
    conversation: Name | None = None
    #: Session within the conversation (default: the conversation).
    session: Name | None = None
    messages: list[MessageIn] = Field(min_length=1, max_length=MAX_MESSAGES)
    #: Close the conversation's buffers after these turns, so their memories are made now
    #: and searchable when the call returns (embedded; one summarization call per flush
    #: with an LLM). Default False: memories appear when the topic buffer fills, the session
    #: changes or the conversation goes idle.
    flush: bool = False


class AddResponse(BaseModel):
    """What an add did."""

    #: ``applied`` (embedded: in the store when this returns) or ``queued`` (stream:
    #: acknowledged by Kafka, applied by the workers).
    status: Literal["applied", "queued"]
    #: Every turn id of the request, in order.
    turn_ids: list[str]
    #: Of those, turns added before (same conversation and turn id): not added again.
    skipped: list[str] = Field(default_factory=list)
    #: Memories written by this call (embedded only; 0 while turns wait in their buffers).
    memories: int = 0
    #: Whether the turns' memories are searchable now.
    searchable: bool
    #: With ``?wait=searchable``: the turns no memory covered when the wait ended (a turn
    #: the LLM found nothing in stays here; the others are still being processed).
    not_searchable: list[str] = Field(default_factory=list)


#: How a search ranks: ``knn`` (cosine similarity to the query) or ``hybrid`` (kNN and BM25
#: ranks merged by reciprocal rank fusion); None: the server's ``LIGHTMEM_RETRIEVAL``.
Retrieval = Literal["knn", "hybrid"] | None


class SearchRequest(_Body):
    """Search one user's memories (``POST /v1/search``)."""

    user: Name
    #: The question or search text.
    query: Text
    #: Number of hits (1..1000; default 20).
    k: int = Field(default=20, ge=1, le=MAX_K)
    #: Only memories of this conversation.
    conversation: Name | None = None
    #: Only memories whose event time is at or after this.
    after: AwareDatetime | None = None
    #: Only memories whose event time is at or before this.
    before: AwareDatetime | None = None
    #: ``knn``: cosine similarity to the query; ``hybrid``: kNN and BM25 ranks merged by
    #: reciprocal rank fusion (scores are then fused rank scores, comparable only within
    #: one search); null (default): the server's setting (LIGHTMEM_RETRIEVAL, hybrid
    #: unless configured otherwise). Both on either store.
    retrieval: Retrieval = None
    #: Deprecated (use ``retrieval``): true is ``retrieval: hybrid``; false says nothing.
    hybrid: bool = False
    #: Also return turns not summarized yet, as provisional events (``kind: event``).
    include_events: bool = True

    @model_validator(mode="after")
    def _one_mode(self) -> SearchRequest:
        if self.hybrid and self.retrieval == "knn":
            raise ValueError("hybrid: true contradicts retrieval: knn (hybrid is deprecated:"
                             " send retrieval alone)")
        return self

    @property
    def mode(self) -> str | None:
        """The retrieval asked for (``hybrid: true`` included), None: the server's."""
        return "hybrid" if self.hybrid else self.retrieval


class MemoryItem(BaseModel):
    """One memory as the service shows it."""

    id: str
    user: str
    conversation: str
    speaker: str
    #: The memory itself (a fact, or a compressed turn in extractive mode).
    text: str
    #: ``[YYYY-MM-DD, Weekday] text``: the line a prompt gets.
    rendered: str
    #: When its source turn happened.
    event_time: datetime
    #: When the memory was written.
    created_at: datetime
    source_turn_ids: list[str]
    #: ``memory``, or ``event``: a turn not summarized yet (provisional: its memories will
    #: replace it; embedded store only, for now). Events have ids starting ``event:``.
    kind: Literal["memory", "event"] = "memory"
    #: ``llm`` or ``extractive``.
    mode: str
    version: int

    @classmethod
    def of(cls, entry: MemoryEntry, render_text: EntryText = DEFAULT_RENDER_TEXT) -> MemoryItem:
        """The item for ``entry``; ``rendered`` shows what ``render_text`` says
        (``LIGHTMEM_RENDER_TEXT``)."""
        from lightmem.processors.retrieve import render

        return cls(id=entry.id, user=entry.user, conversation=entry.conversation,
                   speaker=entry.speaker, text=entry.fact, rendered=render(entry, render_text),
                   event_time=entry.event_time, created_at=entry.ingest_time,
                   source_turn_ids=list(entry.source_turn_ids), mode=entry.mode.value,
                   version=entry.version,
                   kind="event" if entry.id.startswith("event:") else "memory")


class SearchHit(MemoryItem):
    #: With kNN retrieval: the cosine similarity to the query (1 = identical). With hybrid
    #: retrieval: the reciprocal-rank-fusion score (weighted ``1 / (rrf_k + rank)`` summed
    #: over the kNN and BM25 rankings), comparable only within one search.
    score: float


class SearchResponse(BaseModel):
    results: list[SearchHit]


class AnswerRequest(_Body):
    """Answer a question from one user's memories (``POST /v1/answer``)."""

    user: Name
    question: Text
    k: int = Field(default=20, ge=1, le=MAX_K)
    #: ``knn``, ``hybrid``, or null (default): the server's setting (see ``SearchRequest``).
    retrieval: Retrieval = None


class AnswerResponse(BaseModel):
    answer: str
    #: ``llm`` (one call to the configured endpoint) or ``extractive`` (the best memories).
    mode: Literal["llm", "extractive"]
    #: The memories the answer rests on.
    memories: list[SearchHit]


class MemoryPage(BaseModel):
    """One page of a user's memories, oldest first (``GET /v1/memories``)."""

    results: list[MemoryItem]
    #: Pass as ``cursor`` for the next page; None on the last page.
    next_cursor: str | None = None


class ChangeItem(BaseModel):
    """One add/update/delete of a memory."""

    change_id: str
    #: ``add``, ``update`` or ``delete`` (the memory-changes topic's ops).
    op: str
    memory_id: str
    at: datetime
    reason: str
    before: MemoryItem | None = None
    after: MemoryItem | None = None

    @classmethod
    def of(cls, change: MemoryChange,
           render_text: EntryText = DEFAULT_RENDER_TEXT) -> ChangeItem:
        def item(e: MemoryEntry | None) -> MemoryItem | None:
            return None if e is None else MemoryItem.of(e, render_text)

        return cls(change_id=change.change_id, op=change.op.value, memory_id=change.memory_id,
                   at=change.at, reason=change.reason, before=item(change.before),
                   after=item(change.after))


class HistoryResponse(BaseModel):
    results: list[ChangeItem]


class DeleteResponse(BaseModel):
    id: str
    deleted: bool = True


class ErasureSink(BaseModel):
    """One store's part of an erasure."""

    #: ``memories``, ``history``, ``buffers``, ``elasticsearch``, ``turns``, ...
    sink: str
    #: The store did its part (``pending`` items may still be expected, e.g. compaction).
    confirmed: bool
    #: Records of the user found there (removed or hidden).
    found: int
    removed: dict[str, int]
    #: What is still there, and until when, in words.
    pending: list[str]


class DeleteAllResponse(BaseModel):
    """What deleting all of a user's memories did: the erasure of the user's scope
    (memories, change history, open buffers, turn ledger, dead letters) and what it did not
    erase yet."""

    user: str
    #: Memories deleted from the store this service serves.
    deleted: int
    #: Every store confirmed its part.
    confirmed: bool
    #: The erasure request's id (its content-free ``erase`` change names it).
    erasure_id: str
    #: What still holds the user's data, or did not confirm yet: ``sink: what``.
    not_erased: list[str]
    sinks: list[ErasureSink]


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    ready: bool
    #: Each dependency and ``ok`` or why it is not.
    checks: dict[str, str]


# -- the Agent Memory Leaderboard contract ------------------------------------------------------

Timestamp = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class AmlMessage(_Body):
    role: Literal["user", "assistant"]
    content: Text
    #: RFC 3339 (``2024-05-01T09:00:00Z``) or ``YYYY-MM-DD HH:MM[:SS]`` (taken as UTC).
    timestamp: Timestamp | None = None


class AmlAddRequest(_Body):
    """``POST /add``: idempotent by ``request_id``."""

    request_id: Name
    messages: list[AmlMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    user_id: Name
    session_id: Name


class AmlAddResponse(BaseModel):
    request_id: str
    status: Literal["ok"] = "ok"
    turn_ids: list[str]
    #: Memories written by the request.
    memories: int
    searchable: bool
    #: Turn ids not yet covered by a searchable memory (stream backend only).
    not_searchable: list[str] = Field(default_factory=list)


class AmlSearchRequest(_Body):
    query: Text
    user_id: Name
    top_k: int = Field(default=10, ge=1, le=MAX_K)


class AmlSearchItem(BaseModel):
    id: str
    #: The memory rendered with its date: ``[YYYY-MM-DD, Weekday] text``.
    content: str
    #: Cosine similarity, or the rank-fusion score under hybrid retrieval (the server's).
    score: float
    #: The memory's event time (when its source turn happened).
    created_at: datetime


class AmlSearchResponse(BaseModel):
    data: list[AmlSearchItem]


class ErrorItem(BaseModel):
    """One problem: where (``loc``), why (``msg``) and its kind (``type``)."""

    loc: list[str | int]
    msg: str
    type: str


class ErrorResponse(BaseModel):
    detail: list[ErrorItem]


#: Re-exported for callers that validate timestamps like the turn contract does.
RFC3339 = RFC3339_PATTERN
