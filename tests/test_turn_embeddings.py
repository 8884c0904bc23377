"""B2 on turns (issue 16): one MiniLM embedding per original turn, shared with the minilm
compressor's pass; an exchange is the mean of its turns' embeddings.

The segmenter's arithmetic runs on fakes; tests marked ``models`` load the real
all-MiniLM-L6-v2 and the shipped retention head.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from test_segment import MatrixAttention, TopicEncoder, conversation, state_of

from lightmem.processors.segment import B2_TAU_START, TopicSegmenter, group_exchanges

TURNS = [
    "ok",
    "Hi! I finally did it, I adopted a dog last weekend from the shelter in Cambridge.",
    "Congratulations! What kind of dog is it, and what did you name it?",
    "She's a three-year-old beagle mix called Pepper, and she already owns the sofa.",
    "We're thinking about going camping in the mountains on 20 July 2023 with the family.",
]


def test_turns_mode_embeds_original_turns_and_averages_each_exchange() -> None:
    encoder = TopicEncoder()
    seg = TopicSegmenter(MatrixAttention(), encoder, b2_input="turns")
    turns = conversation(["dog", "dog", "camping", "camping"])
    # Compressed texts differ from the originals: B2 must read the originals.
    turns = [t.model_copy(update={"compressed_text": "zzz"}) for t in turns]
    units = group_exchanges(turns)
    rows = seg.embed(units)
    assert encoder.calls == [[t.original_text for t in turns]]
    assert rows.shape == (4, 2)
    # Each exchange: its user and assistant turns share the topic word -> the same one-hot.
    assert np.allclose(rows[0], rows[1]) and not np.allclose(rows[1], rows[2])
    assert seg.boundaries(units) == [2]
    segments, _ = seg.cut(state_of(turns), flush=True)
    assert [len(s.turns) for s in segments] == [4, 4]


def test_turns_mode_has_its_own_first_threshold() -> None:
    assert TopicSegmenter(MatrixAttention(), TopicEncoder()).tau_start == 0.2
    seg = TopicSegmenter(MatrixAttention(), TopicEncoder(), b2_input="turns")
    assert seg.tau_start == B2_TAU_START["turns"] == 0.3
    assert TopicSegmenter(MatrixAttention(), TopicEncoder(), tau_start=0.25).tau_start == 0.25
    with pytest.raises(ValueError, match="b2_input"):
        TopicSegmenter(MatrixAttention(), TopicEncoder(), b2_input="words")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def minilm() -> Any:
    from lightmem.streams.models.encoder import load_encoder

    return load_encoder()


@pytest.mark.models
def test_turn_embeddings_are_the_sentence_embeddings(minilm: Any) -> None:
    from lightmem.processors.turn_embeddings import TurnEmbeddings

    embed = TurnEmbeddings(minilm.attention_model, minilm.tokenizer)
    rows = embed(TURNS)
    ref = minilm.sentence_model.encode(TURNS, convert_to_numpy=True)
    assert rows.shape == ref.shape
    assert np.allclose(rows, ref, atol=1e-5)
    assert embed.computed == len(TURNS)
    again = embed(list(reversed(TURNS)))  # cached: nothing computed again
    assert embed.computed == len(TURNS)
    assert np.array_equal(again, rows[::-1])


@pytest.mark.models
def test_the_compressor_pass_fills_the_cache_with_the_same_bits(minilm: Any) -> None:
    from lightmem.processors.turn_embeddings import TurnEmbeddings
    from lightmem.streams.models.retention import load_minilm_backend

    backend = load_minilm_backend()
    shared = TurnEmbeddings(minilm.attention_model, minilm.tokenizer)
    alone = TurnEmbeddings(minilm.attention_model, minilm.tokenizer)
    old = backend.turn_embeddings
    backend.turn_embeddings = shared
    try:
        plain = _compress_without_sink(backend, TURNS)
        assert backend.compress(TURNS, 0.6) == plain  # the sink changes no kept word
    finally:
        backend.turn_embeddings = old
    rows = shared(TURNS)
    # Only the short turn ("ok": kept whole, never scored) had to be computed here.
    assert shared.computed == 1
    assert np.array_equal(rows, alone(TURNS))  # the compressor's pass = a lone computation


def _compress_without_sink(backend: Any, texts: Sequence[str]) -> list[str]:
    keep = backend.turn_embeddings
    backend.turn_embeddings = None
    try:
        return list(backend.compress(texts, 0.6))
    finally:
        backend.turn_embeddings = keep
