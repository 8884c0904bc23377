"""A token-retention head on a BERT-size encoder: the ``minilm`` pre-compression backend.

LightMem's pre-compression is LLMLingua-2's formulation: a token classifier gives each token
a keep score, and the top ``rate`` of the words survive, in order. Here the classifier is a
small head (:class:`RetentionHead`, an MLP) over the token states of the encoder the project
already runs for segmentation (all-MiniLM-L6-v2), trained to reproduce the entropy
backend's choices (SmolLM2 self-information, see :class:`~lightmem.processors.compress.
EntropyBackend`): one 22M-parameter encoder pass per turn instead of a 135M causal LM.

- A word's score is the **max** of its tokens' head outputs (a word is kept when any of its
  pieces is worth keeping: a rare name split in four pieces is as salient as its rarest
  piece); the top :func:`~lightmem.processors.compress.keep_count` words survive, ties to
  the earlier word, in their original order (:func:`select_words`, the rule the entropy
  backend uses too). Texts of at most :data:`~lightmem.processors.compress.SHORT_TEXT_WORDS`
  words are kept whole.
- Training (:func:`train_head`) ranks the words of each text like the teacher does: a
  pairwise logistic loss over the word pairs the teacher orders, on frozen encoder states.
  :func:`agreement` measures the kept sets against the teacher's (F1, Jaccard).

**Deterministic per text**, as the entropy backend: the encoder runs in float32 and every
window is computed as if alone (packed with the others, no padding: see
:class:`~lightmem.processors.packed_encoder.PackedEncoder`), so a turn keeps the same words
whatever batch it arrives in; see :class:`MiniLMRetentionBackend`.

Everything here is pure: the encoder, tokenizer and head come in as arguments
(``lightmem.streams.models.retention`` loads them from the package); nothing reads the
disk, the network or the clock.

Exceptions::

    ValueError      an invalid rate, a head that does not fit the encoder, a float16/bf16
                    encoder, a slow tokenizer (the message names it)
    RuntimeError    torch set to run fp32 matmuls at reduced precision (bf16/tf32)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .compress import SHORT_TEXT_WORDS, _check_fp32_matmuls, keep_count, validate_rate
from .packed_encoder import PackedEncoder
from .turn_embeddings import TurnEmbeddings

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "RetentionHead",
    "TextStates",
    "MiniLMRetentionBackend",
    "word_scores",
    "select_words",
    "kept_indices",
    "agreement",
    "train_head",
    "predict_scores",
]

_WORD = re.compile(r"\S+")


class RetentionHead(nn.Module):
    """P(keep) logits per token from encoder token states: ``Linear -> GELU -> Linear``.

    Args:
        dim: Width of its input: the encoder's hidden size times ``len(layers)``.
        hidden: Width of the hidden layer; 0 makes the head a single linear layer.
        layers: Which of the encoder's hidden states feed it, concatenated (0 = the
            embedding layer's output, 6 = all-MiniLM-L6-v2's last layer). The embedding
            layer carries the token's identity (rare words are surprising), the last layer
            its context.
    """

    def __init__(self, dim: int, hidden: int = 256, layers: Sequence[int] = (6,)) -> None:
        super().__init__()
        if not layers:
            raise ValueError("layers: the head needs at least one hidden state")
        self.dim = dim
        self.hidden = hidden
        self.layers = tuple(int(x) for x in layers)
        if hidden > 0:
            self.net: nn.Module = nn.Sequential(
                nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1)
            )
        else:
            self.net = nn.Linear(dim, 1)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """Logits, one per token: ``states[..., dim] -> logits[...]``."""
        out: torch.Tensor = self.net(states)
        return out.squeeze(-1)


@dataclass(frozen=True)
class TextStates:
    """One text's encoder token states, with the word each token belongs to."""

    #: ``(tokens, dim)`` float32 states of the text's tokens (special tokens dropped).
    states: torch.Tensor
    #: Word index of each token; -1 for tokens outside any word.
    token_words: list[int]
    #: Whitespace-delimited words of the text.
    words: list[str]


def word_scores(
    token_logits: torch.Tensor, token_words: Sequence[int], n_words: int
) -> list[float]:
    """Each word's score: the max of its tokens' logits (``-inf`` for a word with none).

    Args:
        token_logits: One logit per token.
        token_words: Word index per token (-1: none).
        n_words: Number of words.

    Returns:
        ``n_words`` scores.
    """
    scores = [float("-inf")] * n_words
    for word, value in zip(token_words, token_logits.tolist(), strict=True):
        if word >= 0 and value > scores[word]:
            scores[word] = value
    return scores


def kept_indices(scores: Sequence[float], rate: float) -> list[int]:
    """Indices of the words kept at ``rate``: the top :func:`keep_count` by score, ties to
    the earlier word, in their original order (the entropy backend's rule)."""
    k = keep_count(len(scores), rate)
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(ranked[:k])


def select_words(words: Sequence[str], scores: Sequence[float], rate: float) -> str:
    """The kept words of a text, in order, joined with single spaces.

    Args:
        words: The text's whitespace-delimited words.
        scores: One score per word.
        rate: Fraction to keep, in ``(0, 1]``.

    Returns:
        The compressed text; the whole text when it has at most ``SHORT_TEXT_WORDS`` words.
    """
    if len(words) <= SHORT_TEXT_WORDS:
        return " ".join(words)
    return " ".join(words[i] for i in kept_indices(scores, rate))


def agreement(
    predicted: Sequence[Sequence[float]], teacher: Sequence[Sequence[float]], rate: float
) -> dict[str, float]:
    """How well predicted word scores reproduce the teacher's kept sets at ``rate``.

    Args:
        predicted: Per text, one score per word.
        teacher: Per text, the teacher's scores for the same words.
        rate: Fraction kept.

    Returns:
        ``{"f1": ..., "jaccard": ...}``, each the mean over texts of the kept-word sets'
        F1 and Jaccard (texts of at most ``SHORT_TEXT_WORDS`` words are skipped: both keep
        them whole).
    """
    f1s: list[float] = []
    jaccards: list[float] = []
    for pred, gold in zip(predicted, teacher, strict=True):
        if len(gold) <= SHORT_TEXT_WORDS:
            continue
        a, b = set(kept_indices(pred, rate)), set(kept_indices(gold, rate))
        both = len(a & b)
        f1s.append(2 * both / (len(a) + len(b)))
        jaccards.append(both / len(a | b))
    if not f1s:
        return {"f1": float("nan"), "jaccard": float("nan")}
    return {"f1": sum(f1s) / len(f1s), "jaccard": sum(jaccards) / len(jaccards)}


class MiniLMRetentionBackend:
    """The ``minilm`` compression backend: a :class:`RetentionHead` over encoder states.

    **Deterministic per text.** The encoder must be float32 (the constructor refuses
    another dtype) and every window is computed as if alone: the windows of a call are
    packed into one pass without padding, attention runs per window with a lone pass's
    shapes (:class:`~lightmem.processors.packed_encoder.PackedEncoder`), so a turn's kept
    words are a function of its own text (as in :class:`~lightmem.processors.compress.
    EntropyBackend`), bit for bit the same as one forward call per window. Packing is what
    makes it fast: a LoCoMo turn is ~40 tokens, too few rows for the CPU's matmuls alone
    (300 turns, 2 threads: ~64 turns/s one by one, ~148 packed).

    Texts longer than the encoder's window are scored in independent windows of
    ``max_tokens - 2`` tokens, each between [CLS] and [SEP].

    Args:
        encoder: A BERT-style ``AutoModel`` (the segmenter's MiniLM), float32, eval mode.
        tokenizer: Its *fast* tokenizer (offsets map tokens to words).
        head: The trained head; its input width must equal the encoder's hidden size.
        max_tokens: The encoder's window, special tokens included (default 512).

    Raises:
        ValueError: a head of another width, a non-float32 encoder or a slow tokenizer.
    """

    name = "minilm"

    def __init__(
        self,
        encoder: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        head: RetentionHead,
        *,
        max_tokens: int = 512,
    ) -> None:
        width = int(getattr(encoder.config, "hidden_size", -1))
        depth = int(getattr(encoder.config, "num_hidden_layers", -1))
        if head.dim != width * len(head.layers) or not all(0 <= x <= depth for x in head.layers):
            raise ValueError(
                f"retention head expects {head.dim}-wide states from layers {list(head.layers)}, "
                f"the encoder has {depth} layers of width {width}"
            )
        dtype = getattr(encoder, "dtype", None)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"MiniLMRetentionBackend needs a float32 encoder, got {dtype}: in bf16 the "
                "CPU's kernel path changes which words survive"
            )
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("MiniLMRetentionBackend needs a fast tokenizer (offset mapping)")
        if max_tokens < 3:
            raise ValueError(f"max_tokens must be >= 3; got {max_tokens!r}")
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.head = head.eval()
        self.max_tokens = max_tokens
        self.packed = PackedEncoder(encoder)
        #: Where the pass's per-turn sentence embeddings go (B2 reads them; see
        #: :class:`~lightmem.processors.turn_embeddings.TurnEmbeddings`); None: nowhere.
        self.turn_embeddings: TurnEmbeddings | None = None

    def _windows(self, text: str) -> tuple[list[str], list[tuple[list[int], list[int]]]]:
        """The text's words and its windows: (input ids with [CLS]/[SEP], token words)."""
        words = list(_WORD.finditer(text))
        char_word = [-1] * len(text)
        for w, match in enumerate(words):
            char_word[match.start() : match.end()] = [w] * (match.end() - match.start())
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        # A WordPiece token lies inside one whitespace word: its first character names it.
        token_words = [
            char_word[start] if end > start else -1 for start, end in enc["offset_mapping"]
        ]
        ids = list(enc["input_ids"])
        step = self.max_tokens - 2
        cls, sep = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        windows = [
            ([cls, *ids[lo : lo + step], sep], token_words[lo : lo + step])
            for lo in range(0, len(ids), step)
        ]
        return [m.group() for m in words], windows

    def _states(self, texts: Sequence[str]) -> list[TextStates]:
        """The head's input for every text: all windows of the call in one packed pass,
        each computed as if alone; the chosen layers' states concatenated, special
        positions dropped, a text's windows joined."""
        plans = [self._windows(text) for text in texts]
        flat = [ids for _, windows in plans for ids, _ in windows]
        sink = self.turn_embeddings
        last = self.packed.depth
        # The segmenter's turn embeddings come from the same pass: its last layer.
        layers = (*self.head.layers, last) if sink is not None else self.head.layers
        width = len(self.head.layers)
        per_window = self.packed.hidden_states(flat, layers) if flat else []
        out: list[TextStates] = []
        at = 0
        for text, (words, windows) in zip(texts, plans, strict=True):
            mine = per_window[at : at + len(windows)]
            at += len(windows)
            if sink is not None and mine:
                sink.put(text, [window[-1] for window in mine])
            parts = [
                torch.cat([layer[1:-1] for layer in window[:width]], dim=-1).float()
                for window in mine
            ]
            token_words = [word for _, tw in windows for word in tw]
            states = torch.cat(parts) if parts else torch.zeros((0, self.head.dim))
            out.append(TextStates(states=states, token_words=token_words, words=words))
        return out

    def text_states(self, text: str) -> TextStates:
        """The encoder's token states for one text (the head's input; also for training).

        Args:
            text: The text.

        Returns:
            Its :class:`TextStates` (windows concatenated).

        Raises:
            RuntimeError: torch is set to run fp32 matmuls at reduced precision.
        """
        _check_fp32_matmuls()
        return self._states([text])[0]

    def scores(self, texts: Sequence[str]) -> list[list[float] | None]:
        """Each word's keep score (max of its tokens' head logits).

        Args:
            texts: The texts.

        Returns:
            Per text, one score per word, or ``None`` for texts with at most
            ``SHORT_TEXT_WORDS`` words (kept whole, never scored). A text's scores do not
            depend on the other texts of the call.

        Raises:
            RuntimeError: torch is set to run fp32 matmuls at reduced precision.
        """
        _check_fp32_matmuls()
        out: list[list[float] | None] = [None] * len(texts)
        todo = [i for i, text in enumerate(texts) if len(text.split()) > SHORT_TEXT_WORDS]
        with torch.inference_mode():
            for i, ts in zip(todo, self._states([texts[i] for i in todo]), strict=True):
                # The head runs per text: its matmuls have the text's own shape.
                out[i] = word_scores(self.head(ts.states), ts.token_words, len(ts.words))
        return out

    def compress(self, texts: Sequence[str], rate: float) -> list[str]:
        """Keep the top ``rate`` of each text's words by the head's score, in order.

        Args:
            texts: The texts to compress.
            rate: Fraction of words to keep, in ``(0, 1]``; exactly :func:`keep_count`
                words survive.

        Returns:
            One string per text; a text's result does not depend on the other texts.
        """
        rate = validate_rate(rate)
        result: list[str] = []
        for text, scores in zip(texts, self.scores(texts), strict=True):
            words = text.split()
            result.append(" ".join(words) if scores is None else select_words(words, scores, rate))
        return result

    def forward_pass(self, texts: Sequence[str]) -> int:
        """Run the encoder over exactly the windows :meth:`compress` would, scoring nothing.

        Returns:
            Token positions processed ([CLS]/[SEP] included).
        """
        flat = [
            ids
            for text in texts
            if len(text.split()) > SHORT_TEXT_WORDS
            for ids, _ in self._windows(text)[1]
        ]
        if flat:
            self.packed.hidden_states(flat, self.head.layers)
        return sum(len(ids) for ids in flat)


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def _pack(
    items: Sequence[tuple[TextStates, Sequence[float]]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad a batch: states (B, T, D), token words (B, T; -1 pad), targets (B, W; nan pad)."""
    t_max = max(1, max(it[0].states.shape[0] for it in items))
    w_max = max(1, max(len(it[1]) for it in items))
    dim = items[0][0].states.shape[1]
    states = torch.zeros((len(items), t_max, dim))
    words = torch.full((len(items), t_max), -1, dtype=torch.long)
    targets = torch.full((len(items), w_max), float("nan"))
    for b, (ts, target) in enumerate(items):
        n = ts.states.shape[0]
        states[b, :n] = ts.states
        words[b, :n] = torch.tensor(ts.token_words, dtype=torch.long)
        targets[b, : len(target)] = torch.tensor(list(target), dtype=torch.float32)
    return states, words, targets


def _word_logits(logits: torch.Tensor, words: torch.Tensor, w_max: int) -> torch.Tensor:
    """Max of token logits per word: (B, T) -> (B, W), ``-inf`` where a word has no token."""
    out = torch.full((logits.shape[0], w_max + 1), float("-inf"))
    # Tokens outside any word (-1) go to a spare last column, dropped below.
    index = torch.where(words >= 0, words, torch.full_like(words, w_max))
    out = out.scatter_reduce(1, index, logits, reduce="amax", include_self=True)
    return out[:, :w_max]


def _pairwise_loss(word_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean logistic loss over the word pairs the teacher orders (within each text)."""
    valid = ~torch.isnan(targets) & torch.isfinite(word_logits)
    t = torch.nan_to_num(targets, nan=0.0)
    z = torch.where(valid, word_logits, torch.zeros_like(word_logits))
    better = (t[:, :, None] > t[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    margin = z[:, :, None] - z[:, None, :]
    losses = nn.functional.softplus(-margin)[better]
    return losses.mean() if losses.numel() else word_logits.sum() * 0.0


def train_head(
    train: Sequence[tuple[TextStates, Sequence[float]]],
    *,
    dim: int,
    hidden: int = 256,
    layers: Sequence[int] = (6,),
    epochs: int = 30,
    batch_size: int = 32,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    on_epoch: Callable[[int, float], Any] | None = None,
) -> RetentionHead:
    """Train a :class:`RetentionHead` to rank each text's words like the teacher.

    Args:
        train: ``(states, teacher scores per word)`` pairs (texts of at most
            ``SHORT_TEXT_WORDS`` words carry no ranking and should be left out).
        dim: Width of the token states.
        hidden: Hidden width of the head (0: linear).
        layers: The encoder layers the states come from (recorded on the head).
        epochs: Passes over ``train``.
        batch_size: Texts per step.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        seed: Seeds the initial weights and the shuffling (same seed, same head).
        on_epoch: Called after each epoch with ``(epoch, mean loss)`` (a progress bar).

    Returns:
        The trained head, in eval mode.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = RetentionHead(dim, hidden, layers)
    if not train:
        return head.eval()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(train) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
    head.train()
    for epoch in range(epochs):
        order = torch.randperm(len(train), generator=generator).tolist()
        total, count = 0.0, 0
        for lo in range(0, len(order), batch_size):
            states, words, targets = _pack([train[i] for i in order[lo : lo + batch_size]])
            logits = _word_logits(head(states), words, targets.shape[1])
            loss = _pairwise_loss(logits, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(targets)
            count += len(targets)
        if on_epoch is not None:
            on_epoch(epoch, total / max(1, count))
    return head.eval()


def predict_scores(head: RetentionHead, items: Sequence[TextStates]) -> list[list[float]]:
    """Word scores from precomputed states (evaluation without re-running the encoder)."""
    with torch.inference_mode():
        return [word_scores(head(ts.states), ts.token_words, len(ts.words)) for ts in items]
