"""Retrieval: embed the query, search the user's scope, render, answer.

Search is ``knn`` (vector only) or ``hybrid``: kNN and BM25 (the store's
:class:`~lightmem.processors.store.LexicalStore` side, over the same scope and time bounds)
each rank up to ``candidates`` memories, and reciprocal rank fusion merges the two lists:

    ``score(d) = w / (c + rank_knn(d)) + (1 - w) / (c + rank_bm25(d))``

(ranks from 1; a list that misses ``d`` adds nothing). Ranks, not scores, are fused because
a cosine and a BM25 score have no common scale. ``w`` (:data:`DEFAULT_VECTOR_WEIGHT`) and
``c`` (:data:`DEFAULT_RRF_K`) were measured on the LoCoMo dev file (``bench locomo``), not
guessed; a small ``c`` lets the first ranks of either list dominate.

Each hit is rendered as ``[event date, weekday] fact`` so the answering model can reason
about time ("last Tuesday" relative to the memory's date). The store, the encoder and the
chat model all come in as arguments: this module does no I/O of its own.

Exceptions: none of its own; :class:`~lightmem.processors.llm.LLMError` from the chat model
propagates (transient ones may be retried by the caller).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

import numpy as np

from lightmem.processors.entry_text import DEFAULT_RENDER_TEXT, EntryText, entry_text
from lightmem.processors.lexical import query_terms
from lightmem.processors.llm import ChatMessage, ChatModel
from lightmem.processors.store import LexicalStore, MemoryStore, ScoredEntry
from lightmem.schemas import MemoryEntry

__all__ = [
    "render",
    "render_date",
    "fuse_rankings",
    "Answer",
    "Retriever",
    "RetrievalMode",
    "NO_MEMORIES",
    "DEFAULT_VECTOR_WEIGHT",
    "DEFAULT_RRF_K",
    "DEFAULT_CANDIDATES",
]

RetrievalMode = Literal["knn", "hybrid"]
#: Weight of the kNN list in the fusion (1 - it is BM25's). Measured on the dev file.
DEFAULT_VECTOR_WEIGHT = 0.5
#: The rank constant ``c`` of reciprocal rank fusion. Measured on the dev file.
DEFAULT_RRF_K = 5
#: Memories each side ranks before fusion (at least the ``k`` asked for).
DEFAULT_CANDIDATES = 100

# Fixed English names: strftime("%A") follows the process locale, and the rendered text is
# part of prompts and tests, so it must not change with the machine's settings.
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

#: The answer text when nothing was retrieved (no LLM call is made then).
NO_MEMORIES = "No relevant memories found."

ANSWER_SYSTEM_PROMPT = (
    "You answer questions about a user from their long-term memories. Each memory starts "
    "with the date it happened and its weekday, [YYYY-MM-DD, Weekday]; use these dates to "
    "resolve relative times such as 'yesterday' or 'last week', and prefer the most recent "
    "memory when memories disagree. Use only the memories. If they do not contain the "
    "answer, say that you do not know. Answer briefly."
)


def render_date(when: datetime) -> str:
    """``2023-05-08, Monday`` for ``when``, in ``when``'s own timezone (the user's local day)."""
    return f"{when:%Y-%m-%d}, {_WEEKDAYS[when.weekday()]}"


def render(entry: MemoryEntry, text: EntryText = DEFAULT_RENDER_TEXT) -> str:
    """Render a memory for a prompt: ``[2023-05-08, Monday] fact``.

    Args:
        entry: The memory; its ``event_time`` gives the date and weekday.
        text: ``compressed`` shows the fact; ``original`` shows an extractive memory's
            source turn instead (``Settings.render_text``; see
            :func:`~lightmem.processors.entry_text.entry_text`). Default: the measured
            :data:`~lightmem.processors.entry_text.DEFAULT_RENDER_TEXT`.

    Returns:
        One line (newlines in the text are folded to spaces so one memory stays one line).
    """
    return f"[{render_date(entry.event_time)}] {entry_text(entry, text)}"


@dataclass(frozen=True)
class Answer:
    """An answer to a question and the memories it rests on."""

    #: The answer text (the model's, or the rendered memories when extractive).
    text: str
    #: ``llm``: a chat model wrote ``text``; ``extractive``: ``text`` is the memories as-is.
    mode: Literal["llm", "extractive"]
    #: Rendered memories given to the model (chronological) or returned (best first).
    memories: list[str] = field(default_factory=list)
    #: Ids of those memories, in the same order.
    memory_ids: list[str] = field(default_factory=list)


def fuse_rankings(
    rankings: Sequence[Sequence[ScoredEntry]],
    weights: Sequence[float],
    *,
    rrf_k: float = DEFAULT_RRF_K,
) -> list[ScoredEntry]:
    """Weighted reciprocal rank fusion of several best-first hit lists.

    Args:
        rankings: Hit lists, each best first (a memory repeated in one list counts at its
            best rank).
        weights: One weight per list.
        rrf_k: The rank constant ``c`` (> 0).

    Returns:
        Every memory of any list once, by fused score ``sum w / (c + rank)`` (ranks from 1),
        best first; ties broken by id so the order is deterministic.
    """
    entries: dict[str, MemoryEntry] = {}
    for hits in rankings:
        for hit in hits:
            entries.setdefault(hit.entry.id, hit.entry)
    fused = _rrf([[h.entry.id for h in hits] for hits in rankings], weights, rrf_k)
    return [ScoredEntry(entry=entries[i], score=score) for i, score in fused]


def _rrf(rankings: Sequence[Sequence[str]], weights: Sequence[float], rrf_k: float
         ) -> list[tuple[str, float]]:
    """:func:`fuse_rankings` on ids: ``(id, fused score)`` best first."""
    if len(rankings) != len(weights):
        raise ValueError(f"weights: one per ranking ({len(rankings)}), got {len(weights)}")
    if rrf_k <= 0:
        raise ValueError(f"rrf_k: must be > 0 (got {rrf_k!r})")
    scores: dict[str, float] = {}
    for ids, weight in zip(rankings, weights, strict=True):
        seen: set[str] = set()
        for rank, entry_id in enumerate(ids, start=1):
            if entry_id in seen:
                continue
            seen.add(entry_id)
            scores[entry_id] = scores.get(entry_id, 0.0) + weight / (rrf_k + rank)
    return sorted(scores.items(), key=lambda item: (-item[1], item[0]))


def _unique_hits(hits: Sequence[ScoredEntry]) -> list[ScoredEntry]:
    # A store may return one entry twice (e.g. across shards); keep its best score.
    best: dict[str, ScoredEntry] = {}
    for hit in hits:
        seen = best.get(hit.entry.id)
        if seen is None or hit.score > seen.score:
            best[hit.entry.id] = hit
    return sorted(best.values(), key=lambda h: (-h.score, h.entry.id))


class Retriever:
    """Searches a user's memories and answers questions from them.

    Args:
        store: The memory store (embedded or Elasticsearch) behind the processors' protocol.
        embed: Texts to an ``(n, d)`` array, e.g. an :class:`~lightmem.processors.embed.Embedder`;
            must match the model that embedded the stored entries.
        k: Hits per search (default 20; the design uses 20-60).
        extractive_n: Memories returned by :meth:`answer` without a chat model (default 5).
        max_tokens: Completion limit for the answer call (default 256).
        mode: ``knn`` or ``hybrid`` (kNN + BM25, fused; see the module docstring). A store
            without lexical search is searched by kNN whatever the mode.
        vector_weight: Weight of the kNN list in the fusion, in [0, 1].
        rrf_k: Rank constant of the fusion.
        candidates: Memories each side ranks before fusion (raised to ``k`` when smaller).
        render_text: What :meth:`answer` shows of an extractive memory (see :func:`render`).
    """

    def __init__(
        self,
        store: MemoryStore,
        embed: Callable[[Sequence[str]], np.ndarray],
        k: int = 20,
        *,
        extractive_n: int = 5,
        max_tokens: int = 256,
        mode: RetrievalMode = "knn",
        vector_weight: float = DEFAULT_VECTOR_WEIGHT,
        rrf_k: float = DEFAULT_RRF_K,
        candidates: int = DEFAULT_CANDIDATES,
        render_text: EntryText = DEFAULT_RENDER_TEXT,
    ) -> None:
        if k < 1:
            raise ValueError(f"k: must be >= 1 (got {k!r})")
        if extractive_n < 1:
            raise ValueError(f"extractive_n: must be >= 1 (got {extractive_n!r})")
        if mode not in ("knn", "hybrid"):
            raise ValueError(f"mode: must be 'knn' or 'hybrid' (got {mode!r})")
        if not 0.0 <= vector_weight <= 1.0:
            raise ValueError(f"vector_weight: must be in [0, 1] (got {vector_weight!r})")
        if rrf_k <= 0:
            raise ValueError(f"rrf_k: must be > 0 (got {rrf_k!r})")
        if candidates < 1:
            raise ValueError(f"candidates: must be >= 1 (got {candidates!r})")
        self.store = store
        self.embed = embed
        self.k = k
        self.extractive_n = extractive_n
        self.max_tokens = max_tokens
        self.mode: RetrievalMode = mode
        self.vector_weight = vector_weight
        self.rrf_k = rrf_k
        self.candidates = candidates
        self.render_text: EntryText = render_text

    @property
    def hybrid(self) -> bool:
        """Whether searches fuse BM25 with kNN (hybrid mode and a store that can)."""
        return self.mode == "hybrid" and isinstance(self.store, LexicalStore)

    def search(
        self,
        tenant: str,
        user: str,
        query: str,
        k: int | None = None,
        *,
        not_after: datetime | None = None,
    ) -> list[ScoredEntry]:
        """Search the (tenant, user) scope: kNN, or kNN + BM25 fused (:attr:`hybrid`).

        Args:
            tenant: Tenant of the scope.
            user: User of the scope; other users' memories are never returned.
            query: The question or search text. Blank queries return no hits.
            k: Number of hits (default: the retriever's ``k``).
            not_after: Only memories whose event time is at or before this (None = all).

        Returns:
            Hits best first, each with its cosine similarity (kNN) or its fused score
            (hybrid: comparable only with other hybrid scores of the same query).
        """
        k = self.k if k is None else k
        if k < 1:
            raise ValueError(f"k: must be >= 1 (got {k!r})")
        if not query.strip():
            return []
        vector = np.asarray(self.embed([query]), dtype=np.float32)[0]
        if self.hybrid:
            hits = self._hybrid(tenant, user, query, vector.tolist(), k, not_after=not_after)
        else:
            hits = self.store.search(tenant, user, vector.tolist(), k, not_after=not_after)
        # The store enforces the scope; re-checking is cheap and makes a store bug unable
        # to leak another user's memories into an answer.
        hits = [h for h in hits if h.entry.tenant == tenant and h.entry.user == user]
        return _unique_hits(hits)

    def _hybrid(
        self,
        tenant: str,
        user: str,
        query: str,
        vector: list[float],
        k: int,
        *,
        not_after: datetime | None,
    ) -> list[ScoredEntry]:
        store = self.store
        assert isinstance(store, LexicalStore)
        n = max(k, self.candidates)
        terms = query_terms(query)
        weights = [self.vector_weight, 1.0 - self.vector_weight]
        ranks_ids = getattr(store, "rank_ids", None)
        if ranks_ids is not None:
            # Ids first, entries for the fused top k only: reading and validating 2 x n
            # entries cost more than both searches on the embedded store.
            dense_ids, lexical_ids = ranks_ids(tenant, user, vector, terms, n,
                                               not_after=not_after)
            fused_ids = _rrf([dense_ids, lexical_ids], weights, self.rrf_k)[:k]
            by_id = {e.id: e for e in store.get([i for i, _ in fused_ids])}
            return [ScoredEntry(entry=by_id[i], score=score)
                    for i, score in fused_ids if i in by_id]
        dense = store.search(tenant, user, vector, n, not_after=not_after)
        lexical = (store.lexical_search(tenant, user, terms, n, not_after=not_after)
                   if terms else [])
        return fuse_rankings([dense, lexical], weights, rrf_k=self.rrf_k)[:k]

    def answer(
        self,
        question: str,
        hits: Sequence[ScoredEntry],
        chat: ChatModel | None,
        *,
        tenant: str,
        asked_at: datetime | None = None,
    ) -> Answer:
        """Answer ``question`` from ``hits``.

        With a chat model: ONE call (purpose ``answer``, counted under ``tenant``) whose prompt
        lists every hit rendered, oldest first, so the model reads the story in order.
        Without one, or with no hits: no call; the answer is the rendered best
        ``extractive_n`` hits (best first), marked ``extractive``; nothing is invented.

        Args:
            question: The user's question.
            hits: What :meth:`search` returned.
            chat: The chat model, or None for extractive answers.
            tenant: Tenant the call is billed to.
            asked_at: When the question is asked; given to the model as "today" so that
                "how long ago" questions can be answered (None = not stated).

        Returns:
            The :class:`Answer`.
        """
        ranked = _unique_hits(hits)
        if not ranked:
            return Answer(text=NO_MEMORIES, mode="extractive")
        if chat is None:
            top = [h.entry for h in ranked[: self.extractive_n]]
            memories = [render(e, self.render_text) for e in top]
            return Answer(
                text="\n".join(memories),
                mode="extractive",
                memories=memories,
                memory_ids=[e.id for e in top],
            )
        entries = sorted((h.entry for h in ranked), key=lambda e: (e.event_time, e.id))
        memories = [render(e, self.render_text) for e in entries]
        lines = ["Memories (oldest first):", *(f"- {m}" for m in memories), ""]
        if asked_at is not None:
            lines.append(f"Today is {render_date(asked_at)}.")
        lines += [f"Question: {question.strip()}", "Answer:"]
        completion = chat.complete(
            [
                ChatMessage("system", ANSWER_SYSTEM_PROMPT),
                ChatMessage("user", "\n".join(lines)),
            ],
            purpose="answer",
            tenant=tenant,
            max_tokens=self.max_tokens,
        )
        return Answer(
            text=completion.text.strip(),
            mode="llm",
            memories=memories,
            memory_ids=[e.id for e in entries],
        )

    def ask(
        self,
        tenant: str,
        user: str,
        question: str,
        chat: ChatModel | None,
        *,
        k: int | None = None,
        asked_at: datetime | None = None,
    ) -> Answer:
        """:meth:`search` then :meth:`answer`, the whole retrieval stage in one call.

        Args:
            tenant: Tenant of the scope (and of the billed call).
            user: User of the scope.
            question: The question; it is also the search query.
            chat: The chat model, or None for extractive answers.
            k: Number of hits (default: the retriever's ``k``).
            asked_at: When the question is asked (see :meth:`answer`).

        Returns:
            The :class:`Answer`.
        """
        hits = self.search(tenant, user, question, k)
        return self.answer(question, hits, chat, tenant=tenant, asked_at=asked_at)
