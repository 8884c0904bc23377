"""Sensory pre-compression: keep about a fraction ``rate`` of each message's words.

LightMem compresses every message before buffering it, with a token-retention model and no
LLM call. Two backends implement the :class:`CompressionBackend` protocol:

- :class:`EntropyBackend`: a small causal LM scores each word by its self-information
  ``-log p(word | preceding text)``; the most informative ``rate`` of the words survive, in
  their original order.
- :class:`LLMLingua2Backend`: an LLMLingua-2 token classifier (``P(keep)`` per token), run
  through llmlingua's own compression, when a user has those weights.

:class:`IdentityBackend` ("none") passes texts through. :class:`SensoryCompressor` is the
processor: it validates the rate, keeps the original text beside the compressed one and lets
blank messages pass untouched.

Everything here is pure: models come in as constructor arguments (``lightmem.streams.
causal_lm`` loads them), and nothing reads the disk, the network or the clock.

Exceptions::

    ValueError      an invalid rate or batch size (the message names the value)
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
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


def _is_out_of_memory(exc: RuntimeError) -> bool:
    # CPU allocation failures are plain RuntimeErrors ("DefaultCPUAllocator: can't
    # allocate memory"); CUDA ones are torch.OutOfMemoryError.
    text = str(exc)
    return (
        isinstance(exc, torch.OutOfMemoryError)
        or "can't allocate memory" in text
        or "out of memory" in text
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

    Texts longer than ``max_tokens`` tokens are scored in independent windows (each with its
    own BOS), which bounds memory on very long messages. Windows are sorted by length and
    batched with right padding and an attention mask, so padding stays small; results are
    put back in input order. Give it a model loaded with ``attn_implementation="eager"``
    (``lightmem.streams.causal_lm.load_causal_lm`` does): in bf16 on CPU, sdpa takes a
    different kernel for padded batches and scores move by ~0.1 nat, so batching could
    change which near-tied words survive; with eager they are bit-identical.

    Args:
        model: A causal LM in eval mode (bf16 on CPU is about 2x fp32 here).
        tokenizer: Its *fast* tokenizer (character offsets map tokens to words).
        batch_size: Windows per forward pass (default 16).
        max_tokens: Longest window, BOS included (default 512).
        context_token_id: Token prepended to every window; default the tokenizer's BOS,
            else its EOS.
    """

    name = "entropy"

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 16,
        *,
        max_tokens: int = 512,
        context_token_id: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size!r}")
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2; got {max_tokens!r}")
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
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.context_token_id = int(context_token_id)
        pad = tokenizer.pad_token_id
        # Padded positions are masked out and never scored, so any id will do.
        self.pad_token_id = int(pad if pad is not None else self.context_token_id)

    # -- planning: the same rows and batches for compress() and forward_pass() -----------

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

    def _batches(self, rows: list[_Row]) -> Iterator[list[_Row]]:
        # Longest first: similar lengths share a batch (little padding), and a memory
        # problem shows on the first batch rather than after minutes of work.
        ordered = sorted(rows, key=lambda r: len(r.input_ids), reverse=True)
        for lo in range(0, len(ordered), self.batch_size):
            yield ordered[lo : lo + self.batch_size]

    def _tensors(self, batch: list[_Row]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r.input_ids) for r in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, row in enumerate(batch):
            n = len(row.input_ids)
            input_ids[b, :n] = torch.tensor(row.input_ids, dtype=torch.long)
            attention_mask[b, :n] = 1
        return input_ids, attention_mask

    def _forward(self, batch: list[_Row]) -> Iterator[tuple[_Row, torch.Tensor]]:
        """Yield each row with its logits, halving the batch when memory runs out."""
        input_ids, attention_mask = self._tensors(batch)
        try:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError too
            if len(batch) == 1 or not _is_out_of_memory(exc):
                raise
            logits = None
        if logits is None:
            # The logits alone are batch x length x vocab; a smaller batch usually fits.
            half = len(batch) // 2
            yield from self._forward(batch[:half])
            yield from self._forward(batch[half:])
            return
        for b, row in enumerate(batch):
            yield row, logits[b]

    # -- public API -------------------------------------------------------------------

    def surprisals(self, texts: Sequence[str]) -> list[list[float] | None]:
        """Self-information (nats) of every whitespace-delimited word of each text.

        Args:
            texts: The texts to score.

        Returns:
            Per text, one score per word (sum of its tokens' ``-log p``), or ``None`` for
            texts with at most :data:`SHORT_TEXT_WORDS` words (not scored).
        """
        scores: list[list[float] | None] = [None] * len(texts)
        for index, text in enumerate(texts):
            n = len(_WORD.findall(text))
            if n > SHORT_TEXT_WORDS:
                scores[index] = [0.0] * n
        with torch.inference_mode():
            for batch in self._batches(self._rows(texts)):
                for row, logits in self._forward(batch):
                    n = len(row.input_ids)
                    # Position t predicts token t+1; float32 for a stable log-softmax. One
                    # row at a time keeps the fp32 copy of the logits small.
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
            One string per text: the kept words joined with single spaces.
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
        """Run the model over exactly the batches :meth:`compress` would, scoring nothing.

        Args:
            texts: The texts (short ones are skipped, as in ``compress``).

        Returns:
            Tokens processed (BOS included, padding excluded).
        """
        tokens = 0
        with torch.inference_mode():
            for batch in self._batches(self._rows(texts)):
                for row, _logits in self._forward(batch):
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

    Args:
        compressor: ``PromptCompressor(model_name=..., use_llmlingua2=True,
            device_map="cpu")`` (see ``lightmem.streams.causal_lm.load_llmlingua2``).
    """

    name = "llmlingua2"

    def __init__(self, compressor: PromptCompressor) -> None:
        if not getattr(compressor, "use_llmlingua2", False):
            raise ValueError("LLMLingua2Backend needs a PromptCompressor(use_llmlingua2=True)")
        self.compressor = compressor

    def compress(self, texts: Sequence[str], rate: float) -> list[str]:
        """Compress each text with LLMLingua-2 at ``rate``.

        Args:
            texts: The texts to compress.
            rate: Target fraction of tokens to keep, in ``(0, 1]``.

        Returns:
            One compressed string per text, in order.
        """
        rate = validate_rate(rate)
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
