"""What is embedded and what is shown of a memory (``embed_text`` / ``render_text``): an
extractive memory as written can read as its original turn; LLM facts and rewritten
memories are always their fact; the embedder, ``render`` and the retriever's answers follow
the choice."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from lightmem.processors.embed import Embedder
from lightmem.processors.entry_text import (
    DEFAULT_EMBED_TEXT,
    DEFAULT_RENDER_TEXT,
    ENTRY_TEXTS,
    entry_text,
    shows_original,
)
from lightmem.processors.retrieve import Retriever, render
from lightmem.processors.store import ScoredEntry
from lightmem.schemas import EntryMode, MemoryEntry
from lightmem.settings import Settings

T0 = datetime(2023, 5, 8, 14, 0, tzinfo=UTC)  # a Monday
ORIGINAL = "I went to the LGBTQ support group\nyesterday and it was so powerful."
COMPRESSED = "went LGBTQ support group yesterday powerful"


def memory(*, mode: EntryMode = EntryMode.extractive, version: int = 1,
           original: str = ORIGINAL, id: str = "m1") -> MemoryEntry:
    return MemoryEntry(
        id=id, tenant="acme", user="u1", conversation="c1", topic_id="t1",
        speaker="Caroline", fact=f"Caroline: {COMPRESSED}", event_time=T0, ingest_time=T0,
        source_turn_ids=["D1:3"], turn_seq=3, original_text=original,
        compressed_text=COMPRESSED, mode=mode, version=version,
    )


def test_an_extractive_memory_reads_as_its_original_turn_on_request() -> None:
    m = memory()
    assert entry_text(m, "compressed") == f"Caroline: {COMPRESSED}"
    # The original turn, speaker first like the fact, on one line.
    assert entry_text(m, "original") == (
        "Caroline: I went to the LGBTQ support group yesterday and it was so powerful.")
    assert shows_original(m, "original") and not shows_original(m, "compressed")


@pytest.mark.parametrize("m", [
    memory(mode=EntryMode.llm),  # an LLM fact is the memory; its turn is source material
    memory(version=2),  # a sleep-time update rewrote the fact: the turn no longer says it
    memory(original="   "),  # nothing to show instead
], ids=["llm-fact", "rewritten", "blank-original"])
def test_facts_that_are_not_the_turn_stay_their_fact(m: MemoryEntry) -> None:
    assert entry_text(m, "original") == m.fact
    assert not shows_original(m, "original")


def test_an_unknown_choice_is_refused() -> None:
    with pytest.raises(ValueError, match="text"):
        entry_text(memory(), "summary")  # type: ignore[arg-type]
    assert ENTRY_TEXTS == ("compressed", "original")


def test_render_shows_the_chosen_text_with_its_date() -> None:
    assert render(memory(), "compressed") == f"[2023-05-08, Monday] Caroline: {COMPRESSED}"
    assert render(memory(), "original").startswith(
        "[2023-05-08, Monday] Caroline: I went to the LGBTQ support group yesterday")


class TextModel:
    """An encoder that remembers what it was asked to embed."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def encode(self, sentences: Any, **kwargs: Any) -> np.ndarray:
        self.seen += list(sentences)
        return np.ones((len(sentences), 3), dtype=np.float32) / np.sqrt(3)


@pytest.mark.parametrize("text", ENTRY_TEXTS)
def test_the_embedder_embeds_the_chosen_text(text: str) -> None:
    model = TextModel()
    llm = memory(mode=EntryMode.llm, id="m2")
    out = Embedder(model, text=text).embed_entries([memory(), llm])  # type: ignore[arg-type]
    assert model.seen == [entry_text(memory(), text), llm.fact]  # type: ignore[arg-type]
    assert all(e.embedding is not None for e in out)
    # The stored memory is unchanged: only what the index embeds differs.
    assert out[0].fact == memory().fact


def test_the_embedder_refuses_an_unknown_choice() -> None:
    with pytest.raises(ValueError, match="text"):
        Embedder(TextModel(), text="summary")  # type: ignore[arg-type]


def test_extractive_answers_show_the_chosen_text() -> None:
    hits = [ScoredEntry(entry=memory(), score=0.9)]
    shown = Retriever(object(), lambda t: np.zeros((len(t), 3)),  # type: ignore[arg-type]
                      render_text="original").answer("q", hits, None, tenant="acme")
    assert shown.memories == [render(memory(), "original")]
    default = Retriever(object(), lambda t: np.zeros((len(t), 3))  # type: ignore[arg-type]
                        ).answer("q", hits, None, tenant="acme")
    assert default.memories == [render(memory())]


def test_settings_read_the_choices_from_the_environment(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    # Unset, the settings are the measured defaults the pure functions use too.
    monkeypatch.delenv("LIGHTMEM_EMBED_TEXT", raising=False)
    monkeypatch.delenv("LIGHTMEM_RENDER_TEXT", raising=False)
    assert (Settings().embed_text, Settings().render_text) == (DEFAULT_EMBED_TEXT,
                                                               DEFAULT_RENDER_TEXT)
    monkeypatch.setenv("LIGHTMEM_EMBED_TEXT", "original")
    monkeypatch.setenv("LIGHTMEM_RENDER_TEXT", "original")
    s = Settings()
    assert (s.embed_text, s.render_text) == ("original", "original")
    monkeypatch.setenv("LIGHTMEM_RENDER_TEXT", "summary")
    with pytest.raises(ValueError):
        Settings()
