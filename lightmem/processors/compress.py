"""Sensory pre-compression: keep about a fraction ``rate`` of each message's words.

LightMem compresses every message before buffering it, with a token-retention model and no
LLM call. Three backends implement the :class:`CompressionBackend` protocol:

- :class:`EntropyBackend`: a small causal LM scores each word by its self-information
  ``-log p(word | preceding text)``; the most informative ``rate`` of the words survive, in
  their original order.
- :class:`~lightmem.processors.retention.MiniLMRetentionBackend` (``minilm``): a small
  retention head on the MiniLM encoder's token states, trained on the entropy backend's
  choices (``lightmem train retention``); several times faster on a CPU.
- :class:`LLMLingua2Backend`: an LLMLingua-2 token classifier (``P(keep)`` per token), run
  through llmlingua's own compression, when a user has those weights.

:class:`IdentityBackend` ("none") passes texts through. :class:`SensoryCompressor` is the
processor: it validates the rate, keeps the original text beside the compressed one and lets
blank messages pass untouched.

Compression is deterministic per text: a text keeps the same words whatever else is in
its call or batch and, up to ties closer than fp32 rounding, on whatever CPU kernel path
(AMX, AVX-512 bf16, AVX2): replays and backfills rebuild the same memories. Hence fp32
models and windows scored alone (see :class:`EntropyBackend`).

Everything here is pure: models come in as constructor arguments (``lightmem.streams.
causal_lm`` loads them), and nothing reads the disk, the network or the clock.

Exceptions::

    ValueError      an invalid rate, window size or model dtype (the message names it)
    RuntimeError    torch set to run fp32 matmuls at reduced precision (bf16/tf32)
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from llmlingua import PromptCompressor
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "Compressed",
    "CompressionBackend",
    "EntropyBackend",
    "LLMLingua2Backend",
    "IdentityBackend",
    "SensoryCompressor",
    "SHORT_TEXT_WORDS",
    "keep_count",
    "validate_rate",
]

#: Texts with at most this many words are kept whole: dropping a word from "Hey Mel!"
#: saves nothing worth the lost meaning, and the keep rule is noisy on tiny inputs.
SHORT_TEXT_WORDS = 3

_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class Compressed:
    """One message after pre-compression, with its original text kept beside it."""

    #: The text as given (kept for audit, replay and evaluation).
    original: str
    #: The compressed text (equal to ``original`` when nothing was compressed).
    compressed: str
    #: Whitespace-delimited words in ``compressed``.
    kept_words: int
    #: Whitespace-delimited words in ``original``.
    total_words: int


class CompressionBackend(Protocol):
    """A token-retention model that keeps about a fraction ``rate`` of each text."""

    #: Short backend name for logs and metrics ("entropy", "llmlingua2", "none").
    name: str

    def compress(self, texts: Sequence[str], rate: float) -> list[str]:
        """Compress each text, keeping about ``rate`` of it; one output per input, in order."""
        ...

    def forward_pass(self, texts: Sequence[str]) -> int:
        """Run only the bare model forward pass over the tokens and batches ``compress`` uses.

        No scoring or word selection: a benchmark compares this against :meth:`compress`
        to see what the pipeline costs beyond the model. Returns the tokens processed.
        """
        ...


def validate_rate(rate: float) -> float:
    """Check a compression rate.

    Args:
        rate: Fraction of the words to keep.

    Returns:
        ``rate`` as a float.

    Raises:
        ValueError: ``rate`` is not in ``(0, 1]`` (NaN included); the message shows it.
    """
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate <= 1:
        raise ValueError(f"compression rate must be a number in (0, 1]; got {rate!r}")
    return float(rate)


def keep_count(total: int, rate: float) -> int:
    """How many of ``total`` words a text keeps at ``rate``.

    Args:
        total: Number of words in the text.
        rate: Fraction to keep, in ``(0, 1]``.

    Returns:
        ``round(rate * total)`` with halves rounded up (Python's ``round`` would round
        2.5 to 2), clamped to ``[1, total]``; 0 for an empty text.
    """
    if total <= 0:
        return 0
    return max(1, min(total, math.floor(rate * total + 0.5)))


class IdentityBackend:
    """No compression: every text comes back unchanged (tests, and the "none" mode)."""

    name = "none"

    def compress(self, texts: Sequence[str], rate: float) -> list[str]:
        """Return ``texts`` unchanged, whatever the rate."""
        return list(texts)

    def forward_pass(self, texts: Sequence[str]) -> int:
        """No model: processes no tokens."""
        return 0


def _check_fp32_matmuls() -> None:
    # torch.set_float32_matmul_precision("medium"/"high") lets oneDNN run fp32 matmuls in
    # bf16 (or tf32) where the CPU has the instructions: the scores would depend on the
    # CPU again. Refuse instead of silently scoring differently from another machine.
    mkldnn = torch.backends.mkldnn
    for where, value in (
        ("torch.backends.mkldnn.matmul.fp32_precision", mkldnn.matmul.fp32_precision),
        ("torch.backends.mkldnn.fp32_precision", mkldnn.fp32_precision),
    ):
        if value not in ("none", "ieee"):
            raise RuntimeError(
                f"sensory compression needs IEEE fp32 matmuls; {where} is {value!r} "
                "(set by torch.set_float32_matmul_precision?): scores would depend on the CPU"
            )


@dataclass
class _Row:
    """One model input: a window of a text's tokens, with the word each token belongs to."""

    text_index: int
    #: Token ids, starting with the context token (BOS).
    input_ids: list[int]
    #: Word index of each of ``input_ids[1:]``; -1 for whitespace-only tokens.
    token_words: list[int]


class EntropyBackend:
    """Keep the most informative words by a causal LM's self-information.

    Each token's surprisal is ``-log p(x_t | x_<t)`` under the model, with the model's BOS
    token prepended so the first token has a context too. A word's score is the **sum** of
    its sub-token surprisals, i.e. the self-information of the whole word,
    ``-log p(word | preceding text)``: a rare name split into four tokens carries more
    information than a common word that is one token, and mean or max would hide that. The
    top ``keep_count(n, rate)`` words survive (ties go to the earlier word), in their
    original order, joined with single spaces. Texts with at most :data:`SHORT_TEXT_WORDS`
    words are kept whole.

    **Deterministic per text.** A replay or backfill must make the same memories from the
    same turns, whatever batch a turn lands in and whatever CPU runs it. So:

    - every window is scored *alone* (a batch of one, no padding, no attention mask): its
      computation depends on its own tokens only. Padded batches do not: padding changes
      the attention reductions, and the kernels chosen for a batch's shape (AMX tiles
      especially) round differently. Measured here on 48 LoCoMo turns, padded batches of
      16 against one by one: 1 turn's scores moved 0.014 nat in bf16, 4 turns' 1e-5 in fp32.
    - the model runs in **float32** (the constructor refuses another dtype). In bf16 the
      CPU's kernel path decides: on 192 LoCoMo turns at r=0.6, this CPU's avx512_bf16
      kernels against oneDNN capped at AVX2 (emulated bf16) changed the kept text of 25
      turns (scores up to 0.64 nat apart), against AVX512_CORE 17. In fp32: 0 and 0, scores
      <= 6e-5 nat apart, while the closest keep/drop pair was 8e-4 nat apart; only words
      tied closer than ~1e-4 nat could still swap between CPUs. On one machine a turn's
      result is bit-identical whatever its batch. Cost, 1 thread: fp32 ~2x bf16 and the
      batch of one ~1.25x on top (``lightmem bench pipeline``: 8-10 -> 4.2-4.5 turns/s).

    Texts longer than ``max_tokens`` tokens are scored in independent windows (each with its
    own BOS), which bounds memory on very long messages.

    Args:
        model: A causal LM in eval mode, **float32** (``lightmem.streams.models.causal_lm.
            load_causal_lm`` loads one).
        tokenizer: Its *fast* tokenizer (character offsets map tokens to words).
        max_tokens: Longest window, BOS included (default 512).
        context_token_id: Token prepended to every window; default the tokenizer's BOS,
            else its EOS.

    Raises:
        ValueError: a model that is not float32/float64, a slow tokenizer, a tokenizer
            with neither BOS nor EOS, or ``max_tokens < 2``.
    """

    name = "entropy"

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_tokens: int = 512,
        context_token_id: int | None = None,
    ) -> None:
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2; got {max_tokens!r}")
        dtype = getattr(model, "dtype", None)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"EntropyBackend needs a float32 model, got {dtype}: in bf16/fp16 the "
                "CPU's kernel path changes which words survive (load it with "
                "dtype=torch.float32)"
            )
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("EntropyBackend needs a fast tokenizer (offset mapping)")
        if context_token_id is None:
            context_token_id = tokenizer.bos_token_id
        if context_token_id is None:
            context_token_id = tokenizer.eos_token_id
        if context_token_id is None:
            raise ValueError("tokenizer has neither BOS nor EOS; pass context_token_id")
        self.model = model
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.context_token_id = int(context_token_id)

    # -- planning: the same rows for compress() and forward_pass() ------------------------

    def _rows(self, texts: Sequence[str]) -> list[_Row]:
        rows: list[_Row] = []
        for index, text in enumerate(texts):
            words = list(_WORD.finditer(text))
            if len(words) <= SHORT_TEXT_WORDS:
                continue  # kept whole, never scored
            # Character -> word index, so each token is credited to the word holding its
            # last character (byte-level BPE tokens carry their leading space).
            char_word = [-1] * len(text)
            for w, match in enumerate(words):
                char_word[match.start() : match.end()] = [w] * (match.end() - match.start())
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            token_words = [
                char_word[end - 1] if end > start else -1 for start, end in enc["offset_mapping"]
            ]
            ids = list(enc["input_ids"])
            step = self.max_tokens - 1
            for lo in range(0, len(ids), step):
                rows.append(
                    _Row(
                        text_index=index,
                        input_ids=[self.context_token_id, *ids[lo : lo + step]],
                        token_words=token_words[lo : lo + step],
                    )
                )
        return rows

    def _forward(self, row: _Row) -> torch.Tensor:
        """The logits of one window, computed alone (shape ``len(input_ids) x vocab``)."""
        # No padding and no attention mask: the window's scores are a function of its own
        # tokens, never of the batch it arrived in (see the class docstring).
        input_ids = torch.tensor([row.input_ids], dtype=torch.long)
        logits: torch.Tensor = self.model(input_ids=input_ids).logits
        return logits[0]

    # -- public API -------------------------------------------------------------------

    def surprisals(self, texts: Sequence[str]) -> list[list[float] | None]:
        """Self-information (nats) of every whitespace-delimited word of each text.

        Args:
            texts: The texts to score.

        Returns:
            Per text, one score per word (sum of its tokens' ``-log p``), or ``None`` for
            texts with at most :data:`SHORT_TEXT_WORDS` words (not scored). A text's
            scores do not depend on the other texts of the call.

        Raises:
            RuntimeError: torch is set to run fp32 matmuls at reduced precision.
        """
        _check_fp32_matmuls()
        scores: list[list[float] | None] = [None] * len(texts)
        for index, text in enumerate(texts):
            n = len(_WORD.findall(text))
            if n > SHORT_TEXT_WORDS:
                scores[index] = [0.0] * n
        with torch.inference_mode():
            for row in self._rows(texts):
                logits = self._forward(row)
                n = len(row.input_ids)
                # Position t predicts token t+1.
                logprobs = torch.log_softmax(logits[: n - 1].float(), dim=-1)
                targets = torch.tensor(row.input_ids[1:], dtype=torch.long)
                token_scores = (-logprobs.gather(1, targets[:, None])[:, 0]).tolist()
                text_scores = scores[row.text_index]
                assert text_scores is not None
                for word, value in zip(row.token_words, token_scores, strict=True):
                    if word >= 0:
                        text_scores[word] += value
        return scores

    def compress(self, texts: Sequence[str], rate: float) -> list[str]:
        """Keep the top ``rate`` of each text's words by self-information, in order.

        Args:
            texts: The texts to compress.
            rate: Fraction of words to keep, in ``(0, 1]``; exactly
                :func:`keep_count` words survive.

        Returns:
            One string per text: the kept words joined with single spaces. A text's result
            does not depend on the other texts of the call.
        """
        rate = validate_rate(rate)
        scores = self.surprisals(texts)
        out: list[str] = []
        for text, text_scores in zip(texts, scores, strict=True):
            words = text.split()
            if text_scores is None:
                out.append(" ".join(words))
                continue
            k = keep_count(len(words), rate)
            ranked = sorted(range(len(words)), key=lambda i: (-text_scores[i], i))
            out.append(" ".join(words[i] for i in sorted(ranked[:k])))
        return out

    def forward_pass(self, texts: Sequence[str]) -> int:
        """Run the model over exactly the windows :meth:`compress` would, scoring nothing.

        Args:
            texts: The texts (short ones are skipped, as in ``compress``).

        Returns:
            Tokens processed (BOS included).
        """
        tokens = 0
        with torch.inference_mode():
            for row in self._rows(texts):
                self._forward(row)
                tokens += len(row.input_ids)
        return tokens


class LLMLingua2Backend:
    """LLMLingua-2 through llmlingua's own ``compress_prompt_llmlingua2``.

    llmlingua scores each token with ``P(keep) = softmax(logits)[1]``, averages it over the
    word's tokens, and keeps the words above the ``(1 - rate)`` percentile, counted in
    GPT (tiktoken) tokens: so about ``rate`` of the *tokens* survive, not exactly ``rate``
    of the words. The kept words come back as the classifier's tokenizer spells them; the
    tokenizer's clean-up then re-attaches punctuation (BERT's ``"it ' s ,"`` -> ``"it's,"``).
    All texts of a call go through one llmlingua call, which batches them
    (``max_batch_size`` chunks per forward pass, every chunk padded to 512 tokens).

    Deterministic per text: every chunk has the same 512-position shape whatever its batch,
    the keep threshold is a percentile within the chunk, and the classifier runs in fp32
    (llmlingua's CPU default; the constructor checks it). Measured with the MiniLM
    classifier on 130 turns: batches of 1, 4 and 50 and one text per call give identical
    text, on the AVX-512 and on the forced AVX2 kernel paths alike.

    Args:
        compressor: ``PromptCompressor(model_name=..., use_llmlingua2=True,
            device_map="cpu")`` (see ``lightmem.streams.models.causal_lm.load_llmlingua2``).
    """

    name = "llmlingua2"

    def __init__(self, compressor: PromptCompressor) -> None:
        if not getattr(compressor, "use_llmlingua2", False):
            raise ValueError("LLMLingua2Backend needs a PromptCompressor(use_llmlingua2=True)")
        dtype = getattr(getattr(compressor, "model", None), "dtype", None)
        if dtype not in (torch.float32, torch.float64):
            # bf16/fp16 (llmlingua's "auto" on CUDA) would make the kept words depend on
            # the kernel path, as in EntropyBackend.
            raise ValueError(f"LLMLingua2Backend needs a float32 classifier, got {dtype}")
        self.compressor = compressor

    def compress(self, texts: Sequence[str], rate: float) -> list[str]:
        """Compress each text with LLMLingua-2 at ``rate``.

        Args:
            texts: The texts to compress.
            rate: Target fraction of tokens to keep, in ``(0, 1]``.

        Returns:
            One compressed string per text, in order.

        Raises:
            RuntimeError: torch is set to run fp32 matmuls at reduced precision.
        """
        rate = validate_rate(rate)
        _check_fp32_matmuls()
        out = [" ".join(text.split()) for text in texts]
        # Tiny texts are kept whole (as in EntropyBackend); this also spares llmlingua a
        # percentile over no words for texts made only of special/unknown tokens.
        todo = [i for i, text in enumerate(texts) if len(text.split()) > SHORT_TEXT_WORDS]
        if not todo or rate >= 1:
            return out
        result: dict[str, Any] = self.compressor.compress_prompt_llmlingua2(
            [texts[i] for i in todo], rate=rate, use_context_level_filter=False
        )
        compressed = result["compressed_prompt_list"]
        if len(compressed) != len(todo):
            raise RuntimeError(f"llmlingua returned {len(compressed)} texts for {len(todo)} inputs")
        clean = self.compressor.tokenizer.clean_up_tokenization
        for i, text in zip(todo, compressed, strict=True):
            out[i] = " ".join(clean(text).split())
        return out

    def forward_pass(self, texts: Sequence[str]) -> int:
        """Run the token classifier over llmlingua's chunks and batches, scoring nothing.

        Args:
            texts: The texts (short ones are skipped, as in ``compress``).

        Returns:
            Real (non-padding) tokens processed, [CLS]/[SEP] included. llmlingua pads
            every chunk to 512 positions, so the model does more work than this counts.
        """
        from llmlingua.utils import TokenClfDataset
        from torch.utils.data import DataLoader

        pc = self.compressor
        chunks: list[str] = []
        for text in texts:
            if len(text.split()) > SHORT_TEXT_WORDS:
                # llmlingua 0.2.2 (pinned) has no public chunker; this is the private one
                # compress_prompt_llmlingua2 itself calls, with its default end tokens.
                chunks.extend(pc._PromptCompressor__chunk_context(text, {".", "\n"}))
        if not chunks:
            return 0
        dataset = TokenClfDataset(chunks, tokenizer=pc.tokenizer, max_len=pc.max_seq_len)
        loader = DataLoader(dataset, batch_size=pc.max_batch_size, shuffle=False)
        tokens = 0
        with torch.no_grad():  # what llmlingua uses
            for batch in loader:
                mask = batch["mask"].to(pc.device) == 1
                pc.model(input_ids=batch["ids"].to(pc.device), attention_mask=mask)
                tokens += int(mask.sum())
        return tokens


class SensoryCompressor:
    """The pre-compression processor: texts in, :class:`Compressed` records out.

    Args:
        backend: The token-retention model (:class:`EntropyBackend`,
            :class:`LLMLingua2Backend`, :class:`IdentityBackend` or a test fake).
        rate: Fraction of each message to keep, in ``(0, 1]`` (default 0.6; the paper's
            best settings are 0.6-0.8). At 1 nothing is compressed and no model runs.

    Raises:
        ValueError: ``rate`` outside ``(0, 1]``.
    """

    def __init__(self, backend: CompressionBackend, rate: float = 0.6) -> None:
        self.backend = backend
        self.rate = validate_rate(rate)

    def compress(self, texts: Sequence[str]) -> list[Compressed]:
        """Compress a batch of messages.

        Args:
            texts: Message texts, in any number; the backend batches them.

        Returns:
            One :class:`Compressed` per text, in order. Blank texts, and every text when
            ``rate`` is 1, pass through with ``compressed == original``.
        """
        compressed = list(texts)
        todo = [i for i, text in enumerate(texts) if text.strip()] if self.rate < 1 else []
        if todo:
            results = self.backend.compress([texts[i] for i in todo], self.rate)
            if len(results) != len(todo):
                raise RuntimeError(
                    f"backend {self.backend.name!r} returned {len(results)} texts "
                    f"for {len(todo)} inputs"
                )
            for i, result in zip(todo, results, strict=True):
                compressed[i] = result
        return [
            Compressed(
                original=original,
                compressed=short,
                kept_words=len(short.split()),
                total_words=len(original.split()),
            )
            for original, short in zip(texts, compressed, strict=True)
        ]
