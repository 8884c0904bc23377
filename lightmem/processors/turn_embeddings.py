"""Per-turn MiniLM sentence embeddings, shared between the compressor's pass and B2.

With the ``minilm`` compressor every buffered turn already goes through MiniLM once (the
retention head reads its token states). The topic segmenter's similarity detector (B2)
needs MiniLM embeddings too; computing them from the *same* pass costs nothing more than a
mean. So B2 can read one embedding per original turn (:class:`TurnEmbeddings`), an
exchange being the normalised mean of its turns' embeddings (see
:class:`~lightmem.processors.segment.TopicSegmenter`, ``b2_input="turns"``), instead of
a second MiniLM pass over every exchange's compressed text, repeated for the exchanges a
cut leaves buffered.

A turn's embedding is :func:`~lightmem.processors.packed_encoder.mean_pool` over the last
layer's states of all positions of its windows (``[CLS] ... [SEP]`` windows of at most
``max_tokens`` positions, the compressor's own windows), each window computed as if alone:
a function of the turn's text only, whichever call computed it (the compressor's or a
cache miss here), so a replay cuts where the live run did.

Everything here is pure: the encoder and tokenizer come in as arguments.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .packed_encoder import PackedEncoder, mean_pool

__all__ = ["TurnEmbeddings", "turn_windows"]


def turn_windows(tokenizer: Any, text: str, max_tokens: int = 512) -> list[list[int]]:
    """A text's encoder windows: its tokens in runs of ``max_tokens - 2``, each between
    [CLS] and [SEP] (one ``[CLS] [SEP]`` window for a text without tokens).

    Args:
        tokenizer: A BERT tokenizer.
        text: The text.
        max_tokens: Window size, special tokens included.

    Returns:
        The windows' token ids.
    """
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    step = max_tokens - 2
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    return [[cls, *ids[lo : lo + step], sep] for lo in range(0, max(len(ids), 1), step)]


class TurnEmbeddings:
    """Sentence embeddings of original turns, cached by text (a bounded LRU).

    Callable as a :class:`~lightmem.processors.embed.TextEncoder`: texts in, one unit row
    per text out. The ``minilm`` compressor fills the cache from its own pass
    (:meth:`put`); texts it did not see (short turns it keeps whole, a buffer restored
    after a restart) are computed here, packed, on first use.

    Args:
        encoder: The MiniLM ``BertModel`` (float32).
        tokenizer: Its tokenizer.
        max_tokens: Window size, special tokens included (default 512, as the compressor).
        capacity: Embeddings kept (default 8192: a few sensory buffers per conversation
            of the partitions a worker holds; 1.5 KiB each).
    """

    def __init__(
        self, encoder: Any, tokenizer: Any, *, max_tokens: int = 512, capacity: int = 8192
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1; got {capacity!r}")
        self.packed = PackedEncoder(encoder)
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.capacity = capacity
        self.layer = self.packed.depth
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        #: Texts embedded here (cache misses), for benchmarks and tests.
        self.computed = 0

    def clear(self) -> None:
        """Forget every cached embedding (benchmarks start cold)."""
        self._cache.clear()
        self.computed = 0

    def put(self, text: str, window_states: Sequence[torch.Tensor]) -> np.ndarray:
        """Record a turn's embedding from the last-layer states of its windows.

        Args:
            text: The turn's text.
            window_states: ``(positions, hidden)`` last-layer states of each of
                :func:`turn_windows` ``(text)``, special positions included.

        Returns:
            The embedding.
        """
        vector = mean_pool(torch.cat(list(window_states))).numpy().astype(np.float32)
        self._cache[text] = vector
        self._cache.move_to_end(text)
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return vector

    def compute(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Embed ``texts`` (one packed pass for all their windows) into the cache.

        Returns:
            The embeddings by text.
        """
        plans = [turn_windows(self.tokenizer, t, self.max_tokens) for t in texts]
        flat = [w for windows in plans for w in windows]
        states = self.packed.hidden_states(flat, (self.layer,)) if flat else []
        at = 0
        out: dict[str, np.ndarray] = {}
        for text, windows in zip(texts, plans, strict=True):
            out[text] = self.put(text, [states[at + i][0] for i in range(len(windows))])
            at += len(windows)
        self.computed += len(texts)
        return out

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """One L2-normalised row per text, ``(len(texts), hidden)`` float32."""
        found = {t: self._cache[t] for t in dict.fromkeys(texts) if t in self._cache}
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        if missing:
            found.update(self.compute(missing))
        rows = [found[t] for t in texts]
        for t in found:
            if t in self._cache:
                self._cache.move_to_end(t)
        if not rows:
            return np.zeros((0, int(self.packed.model.config.hidden_size)), dtype=np.float32)
        return np.stack(rows)
