"""The ``minilm`` compressor: a token-retention head on MiniLM (issue 16).

Pure selection and training first (no models); tests marked ``models`` load the real
all-MiniLM-L6-v2 from its package and the head shipped with lightmem; the training smoke
test also labels a tiny corpus with the real SmolLM2 teacher.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lightmem.processors.compress import SHORT_TEXT_WORDS, SensoryCompressor, keep_count
from lightmem.processors.retention import (
    MiniLMRetentionBackend,
    RetentionHead,
    TextStates,
    agreement,
    kept_indices,
    predict_scores,
    select_words,
    train_head,
    word_scores,
)

REPO = Path(__file__).resolve().parent.parent

TURNS = [
    "Hey Mel!",
    "Hi! I finally did it, I adopted a dog last weekend from the shelter in Cambridge.",
    "Congratulations! What kind of dog is it, and what did you name it?",
    "She's a three-year-old beagle mix called Pepper, and she already owns the sofa.",
    "I went to the LGBTQ support group yesterday and it was so powerful.",
    "We're thinking about going camping in the mountains on 20 July 2023 with the whole family.",
    "My kids love pottery, so we signed up for a class at the community center downtown.",
    "Counseling and mental health jobs appeal to me; I want to help people who went through "
    "the same things I did.",
]
RATES = (0.5, 0.6, 0.7)


def is_subsequence(needle: Sequence[str], haystack: Sequence[str]) -> bool:
    """True when ``needle`` appears in ``haystack`` in order (gaps allowed)."""
    it = iter(haystack)
    return all(any(word == candidate for candidate in it) for word in needle)


# -- no models ------------------------------------------------------------------------------


@given(
    st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=40),
    st.sampled_from([0.1, 0.5, 0.6, 0.7, 1.0]),
)
def test_selection_keeps_the_top_rate_of_words_in_order(scores: list[float], rate: float) -> None:
    words = [f"w{i}" for i in range(len(scores))]
    kept = select_words(words, scores, rate).split()
    if len(words) <= SHORT_TEXT_WORDS:
        assert kept == words
        return
    assert len(kept) == keep_count(len(words), rate)
    assert is_subsequence(kept, words)
    index = [int(w[1:]) for w in kept]
    dropped = [i for i in range(len(words)) if i not in index]
    # Every kept word scores at least as high as every dropped one.
    assert not dropped or min(scores[i] for i in index) >= max(scores[i] for i in dropped)


def test_ties_go_to_the_earlier_word() -> None:
    assert kept_indices([1.0, 1.0, 1.0, 1.0], 0.5) == [0, 1]


def test_word_score_is_the_max_of_its_tokens() -> None:
    logits = torch.tensor([0.1, 2.0, -1.0, 0.5, 3.0])
    assert word_scores(logits, [0, 0, 1, -1, 2], 4) == [2.0, -1.0, 3.0, float("-inf")]


def test_agreement_counts_kept_set_overlap() -> None:
    teacher = [[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]]
    assert agreement(teacher, teacher, 0.5) == {"f1": 1.0, "jaccard": 1.0}
    reverse = [[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]]
    assert agreement(reverse, teacher, 0.5) == {"f1": 0.0, "jaccard": 0.0}
    # Short texts are kept whole by both sides: no signal, skipped.
    assert math.isnan(agreement([[1.0, 2.0]], [[2.0, 1.0]], 0.5)["f1"])


def _synthetic(n: int, seed: int) -> list[tuple[TextStates, list[float]]]:
    """Texts whose teacher score is a fixed linear function of their token states."""
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(8, generator=torch.Generator().manual_seed(99))
    items = []
    for _ in range(n):
        words = int(torch.randint(5, 12, (1,), generator=gen))
        states = torch.randn(words, 8, generator=gen)
        teacher = (states @ direction).tolist()
        items.append((TextStates(states, list(range(words)), ["w"] * words), teacher))
    return items


def test_training_is_seeded_and_learns_a_ranking() -> None:
    train = _synthetic(64, seed=1)
    held = _synthetic(32, seed=2)
    a = train_head(train, dim=8, hidden=16, epochs=40, lr=1e-2, seed=3)
    b = train_head(train, dim=8, hidden=16, epochs=40, lr=1e-2, seed=3)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    predicted = predict_scores(a, [ts for ts, _ in held])
    assert agreement(predicted, [t for _, t in held], 0.6)["f1"] > 0.9


def test_backend_refuses_a_head_of_another_width_and_a_bf16_encoder() -> None:
    config = SimpleNamespace(hidden_size=384, num_hidden_layers=6)
    tokenizer = SimpleNamespace(is_fast=True)
    fp32 = SimpleNamespace(config=config, dtype=torch.float32)
    with pytest.raises(ValueError, match="expects 32-wide states"):
        MiniLMRetentionBackend(fp32, tokenizer, RetentionHead(32, 0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="layers"):
        MiniLMRetentionBackend(fp32, tokenizer, RetentionHead(384, 0, (7,)))  # type: ignore[arg-type]
    bf16 = SimpleNamespace(config=config, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        MiniLMRetentionBackend(bf16, tokenizer, RetentionHead(384, 0))  # type: ignore[arg-type]


# -- real MiniLM and the shipped head --------------------------------------------------------


@pytest.fixture(scope="session")
def minilm() -> Any:
    from lightmem.streams.models.encoder import load_encoder

    return load_encoder()


@pytest.fixture(scope="session")
def backend(minilm: Any) -> MiniLMRetentionBackend:
    from lightmem.streams.models.retention import load_minilm_backend

    return load_minilm_backend()


@pytest.mark.models
@pytest.mark.parametrize("rate", RATES)
def test_minilm_keeps_about_rate_of_the_words_in_order(
    backend: MiniLMRetentionBackend, rate: float
) -> None:
    out = backend.compress(TURNS, rate)
    assert len(out) == len(TURNS)
    for text, short in zip(TURNS, out, strict=True):
        words = text.split()
        if len(words) <= SHORT_TEXT_WORDS:
            assert short == text
            continue
        assert len(short.split()) == keep_count(len(words), rate)
        assert is_subsequence(short.split(), words)


@pytest.mark.models
def test_minilm_shares_the_segmenter_encoder(backend: MiniLMRetentionBackend, minilm: Any) -> None:
    # One MiniLM copy per process: the compressor runs the segmenter's model.
    assert backend.encoder is minilm.attention_model


@pytest.mark.models
def test_minilm_same_turn_same_text_whatever_the_batch(backend: MiniLMRetentionBackend) -> None:
    alone = [backend.compress([t], 0.6)[0] for t in TURNS]
    alone_scores = [backend.scores([t])[0] for t in TURNS]
    rng = random.Random(7)
    for _ in range(3):
        order = list(range(len(TURNS)))
        rng.shuffle(order)
        batch = [TURNS[i] for i in order] + ["Padding text that is much longer than the rest " * 8]
        got = backend.compress(batch, 0.6)
        scores = backend.scores(batch)
        for position, i in enumerate(order):
            assert got[position] == alone[i]
            assert scores[position] == alone_scores[i]  # bit-identical, not just close
    # Through the processor (blank texts skipped, originals kept) too.
    records = SensoryCompressor(backend, rate=0.6).compress(["", *TURNS])
    assert [r.compressed for r in records[1:]] == alone
    assert [r.original for r in records] == ["", *TURNS]


@pytest.mark.models
def test_minilm_keeps_the_same_words_on_another_cpu_kernel_path(
    backend: MiniLMRetentionBackend,
) -> None:
    code = f"""
import json, sys, torch
from lightmem.streams.models.retention import load_minilm_backend
sys.path.insert(0, {str(REPO / "tests")!r})
from test_retention import RATES, TURNS
backend = load_minilm_backend()
print(json.dumps({{"capability": torch.backends.cpu.get_cpu_capability(),
                  "kept": {{str(r): backend.compress(TURNS, r) for r in RATES}},
                  "scores": backend.scores(TURNS)}}))
"""
    caps = {
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ATEN_CPU_CAPABILITY": "avx2",
    }
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **caps, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    other = json.loads(result.stdout.strip().splitlines()[-1])
    assert other["capability"] == "AVX2"
    assert other["kept"] == {str(r): backend.compress(TURNS, r) for r in RATES}
    for a, b in zip(backend.scores(TURNS), other["scores"], strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert a == pytest.approx(b, abs=1e-4)


@pytest.mark.models
def test_long_text_is_scored_in_windows(backend: MiniLMRetentionBackend) -> None:
    windowed = MiniLMRetentionBackend(
        backend.encoder, backend.tokenizer, backend.head, max_tokens=12
    )
    text = " ".join(TURNS[1:5])
    [scores] = windowed.scores([text])
    assert scores is not None and len(scores) == len(text.split())
    assert all(s > float("-inf") for s in scores)
    [out] = windowed.compress([text], 0.5)
    assert len(out.split()) == keep_count(len(text.split()), 0.5)
    assert is_subsequence(out.split(), text.split())


@pytest.mark.models
def test_missing_head_file_fails_with_one_clear_line(tmp_path: Path, minilm: Any) -> None:
    from lightmem.streams.models.retention import RetentionHeadError, load_minilm_backend

    missing = tmp_path / "nope.safetensors"
    with pytest.raises(RetentionHeadError) as caught:
        load_minilm_backend(missing)
    message = str(caught.value)
    assert "\n" not in message
    assert str(missing) in message and "lightmem train retention" in message


@pytest.mark.models
def test_head_of_another_encoder_fails_with_one_clear_line(tmp_path: Path, minilm: Any) -> None:
    from transformers import BertConfig, BertModel

    from lightmem.streams.models.retention import RetentionHeadError, load_head, save_head

    # Same shape as MiniLM, other weights: only the fingerprint can tell.
    torch.manual_seed(0)
    config = minilm.attention_model.config
    other = BertModel(BertConfig(**{**config.to_dict(), "architectures": None})).eval()
    path, _ = save_head(
        RetentionHead(768, 8, (0, 6)), tmp_path / "h.safetensors", encoder=other, info={}
    )
    with pytest.raises(RetentionHeadError) as caught:
        load_head(path, minilm.attention_model)
    assert "does not match the encoder" in str(caught.value)
    assert "\n" not in str(caught.value)
    # ... and the same head loads against the encoder it was made for.
    assert load_head(path, other).layers == (0, 6)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(RetentionHeadError, match="unreadable") as caught:
        load_head(garbage, minilm.attention_model)
    assert "\n" not in str(caught.value)


@pytest.mark.models
def test_train_retention_smoke(tmp_path: Path, minilm: Any) -> None:
    from typer.testing import CliRunner

    from lightmem.ops.cli import app
    from lightmem.streams.models.retention import load_head

    corpus = tmp_path / "tiny.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": t, "group": f"g{i % 4}"}) + "\n" for i, t in enumerate(TURNS))
    )
    out = tmp_path / "head.safetensors"
    args = [
        "train",
        "retention",
        "--out",
        str(out),
        "--no-locomo",
        "--no-demo",
        "--corpus",
        str(corpus),
        "--epochs",
        "2",
        "--hidden",
        "8",
        "--heldout",
        "0.25",
        "--label-cache",
        str(tmp_path / "labels.jsonl"),
        "--seed",
        "5",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["seed"] == 5 and len(info["data_sha256"]) == 64
    assert info["command"].startswith("lightmem train retention --out")
    assert set(info["agreement_heldout"]) == {"0.5", "0.6", "0.7"}
    # The labels were cached: a second run labels nothing (no SmolLM2 load) and gives the
    # same head (seeded).
    labels = (tmp_path / "labels.jsonl").read_text().splitlines()
    assert len(labels) == len([t for t in TURNS if len(t.split()) > SHORT_TEXT_WORDS])
    again = tmp_path / "again.safetensors"
    result = CliRunner().invoke(app, [*args[:3], str(again), *args[4:]])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "labels.jsonl").read_text().splitlines() == labels
    from safetensors.torch import load_file

    first, second = load_file(str(out)), load_file(str(again))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    head = load_head(out, minilm.attention_model)
    compressed = MiniLMRetentionBackend(minilm.attention_model, minilm.tokenizer, head).compress(
        TURNS, 0.6
    )
    assert all(is_subsequence(c.split(), t.split()) for c, t in zip(compressed, TURNS, strict=True))


@pytest.mark.models
def test_bench_pipeline_runs_several_compressors_each_beside_its_bare_passes(
    tmp_path: Path, locomo_path: Path, backend: MiniLMRetentionBackend
) -> None:
    from typer.testing import CliRunner

    from lightmem.ops.commands.bench import app

    out = tmp_path / "pipeline.json"
    args = [
        "pipeline",
        "--data",
        str(locomo_path),
        "--limit",
        "24",
        "--compressor",
        "none,minilm",
        "--json",
        str(out),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    runs = json.loads(out.read_text())
    assert [r["compressor"] for r in runs] == ["none", "minilm"]
    assert all(r["turns"] == 24 for r in runs)
    assert runs[0]["bare_compress_s"] == 0  # no compressor model to run bare
    assert runs[1]["bare_compress_s"] > 0
    bad = CliRunner().invoke(app, ["pipeline", "--compressor", "entropy,bogus"])
    assert bad.exit_code == 2
