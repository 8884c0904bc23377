"""Retrieval: embed the query, kNN within the user's scope, render, answer.

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

from lightmem.processors.llm import ChatMessage, ChatModel
from lightmem.processors.store import MemoryStore, ScoredEntry
from lightmem.schemas import MemoryEntry

__all__ = ["render", "render_date", "Answer", "Retriever", "NO_MEMORIES"]

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


def render(entry: MemoryEntry) -> str:
    """Render a memory for a prompt: ``[2023-05-08, Monday] fact``.

    Args:
        entry: The memory; its ``event_time`` gives the date and weekday.

    Returns:
        One line (newlines in the fact are folded to spaces so one memory stays one line).
    """
    fact = " ".join(entry.fact.split())
    return f"[{render_date(entry.event_time)}] {fact}"


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
    """

    def __init__(
        self,
        store: MemoryStore,
        embed: Callable[[Sequence[str]], np.ndarray],
        k: int = 20,
        *,
        extractive_n: int = 5,
        max_tokens: int = 256,
    ) -> None:
        if k < 1:
            raise ValueError(f"k: must be >= 1 (got {k!r})")
        if extractive_n < 1:
            raise ValueError(f"extractive_n: must be >= 1 (got {extractive_n!r})")
        self.store = store
        self.embed = embed
        self.k = k
        self.extractive_n = extractive_n
        self.max_tokens = max_tokens

    def search(
        self,
        tenant: str,
        user: str,
        query: str,
        k: int | None = None,
        *,
        not_after: datetime | None = None,
    ) -> list[ScoredEntry]:
        """kNN over the (tenant, user) scope.

        Args:
            tenant: Tenant of the scope.
            user: User of the scope; other users' memories are never returned.
            query: The question or search text. Blank queries return no hits.
            k: Number of hits (default: the retriever's ``k``).
            not_after: Only memories whose event time is at or before this (None = all).

        Returns:
            Hits best first, each with its cosine similarity.
        """
        k = self.k if k is None else k
        if k < 1:
            raise ValueError(f"k: must be >= 1 (got {k!r})")
        if not query.strip():
            return []
        vector = np.asarray(self.embed([query]), dtype=np.float32)[0]
        hits = self.store.search(tenant, user, vector.tolist(), k, not_after=not_after)
        # The store enforces the scope; re-checking is cheap and makes a store bug unable
        # to leak another user's memories into an answer.
        hits = [h for h in hits if h.entry.tenant == tenant and h.entry.user == user]
        return _unique_hits(hits)

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

        With a chat model: ONE call (stage ``answer``, counted under ``tenant``) whose prompt
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
            memories = [render(e) for e in top]
            return Answer(
                text="\n".join(memories),
                mode="extractive",
                memories=memories,
                memory_ids=[e.id for e in top],
            )
        entries = sorted((h.entry for h in ranked), key=lambda e: (e.event_time, e.id))
        memories = [render(e) for e in entries]
        lines = ["Memories (oldest first):", *(f"- {m}" for m in memories), ""]
        if asked_at is not None:
            lines.append(f"Today is {render_date(asked_at)}.")
        lines += [f"Question: {question.strip()}", "Answer:"]
        completion = chat.complete(
            [
                ChatMessage("system", ANSWER_SYSTEM_PROMPT),
                ChatMessage("user", "\n".join(lines)),
            ],
            stage="answer",
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
