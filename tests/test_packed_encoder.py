"""The packed MiniLM forward pass (issue 16): many turns in one pass, each as if alone.

Runs the real all-MiniLM-L6-v2 from its package: the packed states must be bit-identical
whatever a sequence is packed with, and equal to the transformers forward pass.
"""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from lightmem.processors.packed_encoder import PackedEncoder, mean_pool

TEXTS = [
    "Hey Mel!",
    "Hi! I finally did it, I adopted a dog last weekend from the shelter in Cambridge.",
    "Congratulations! What kind of dog is it, and what did you name it?",
    "She's a three-year-old beagle mix called Pepper, and she already owns the sofa.",
    "I went to the LGBTQ support group yesterday and it was so powerful.",
    "We're thinking about going camping in the mountains on 20 July 2023 with the family.",
    "ok",
    "Counseling and mental health jobs appeal to me; I want to help people who went through "
    "the same things I did. " * 3,
]


@pytest.fixture(scope="module")
def minilm() -> Any:
    from lightmem.streams.models.encoder import load_encoder

    return load_encoder()


def _ids(minilm: Any, text: str) -> list[int]:
    return list(minilm.tokenizer(text)["input_ids"])


@pytest.mark.models
def test_packed_states_equal_the_transformers_forward_pass(minilm: Any) -> None:
    model = minilm.attention_model
    packed = PackedEncoder(model)
    seqs = [_ids(minilm, t) for t in TEXTS]
    got = packed.hidden_states(seqs, layers=(0, 3, 6))
    with torch.inference_mode():
        for seq, states in zip(seqs, got, strict=True):
            ids = torch.tensor([seq])
            ref = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                        output_hidden_states=True).hidden_states
            for layer, mine in zip((0, 3, 6), states, strict=True):
                assert mine.shape == (len(seq), model.config.hidden_size)
                torch.testing.assert_close(mine, ref[layer][0], rtol=0, atol=1e-5)


@pytest.mark.models
def test_a_sequence_gets_the_same_bits_whatever_it_is_packed_with(minilm: Any) -> None:
    packed = PackedEncoder(minilm.attention_model)
    seqs = [_ids(minilm, t) for t in TEXTS]
    alone = [packed.hidden_states([s], layers=(0, 6))[0] for s in seqs]
    rng = random.Random(3)
    for max_rows in (2048, 64):  # one pack, and packs split by the row budget
        small = PackedEncoder(minilm.attention_model, max_rows=max_rows)
        for _ in range(4):
            order = list(range(len(seqs)))
            rng.shuffle(order)
            got = small.hidden_states([seqs[i] for i in order], layers=(0, 6))
            for position, i in enumerate(order):
                for a, b in zip(got[position], alone[i], strict=True):
                    assert torch.equal(a, b)  # bit-identical, not just close


@pytest.mark.models
def test_mean_pool_is_the_sentence_transformers_embedding(minilm: Any) -> None:
    packed = PackedEncoder(minilm.attention_model)
    seqs = [_ids(minilm, t) for t in TEXTS[:6]]
    mine = torch.stack([mean_pool(s[0]) for s in packed.hidden_states(seqs, layers=(6,))])
    ref = torch.tensor(minilm.sentence_model.encode(TEXTS[:6], convert_to_numpy=True))
    torch.testing.assert_close(mine, ref, rtol=0, atol=1e-5)


@pytest.mark.models
def test_refuses_bad_input(minilm: Any) -> None:
    packed = PackedEncoder(minilm.attention_model)
    with pytest.raises(ValueError, match="1..512"):
        packed.hidden_states([[101] * 513], layers=(6,))
    with pytest.raises(ValueError, match="1..512"):
        packed.hidden_states([[]], layers=(6,))
    with pytest.raises(ValueError, match="layers"):
        packed.hidden_states([[101, 102]], layers=(7,))
    not_bert = SimpleNamespace(config=SimpleNamespace(model_type="gpt2"))
    with pytest.raises(ValueError, match="BERT-style"):
        PackedEncoder(not_bert)
