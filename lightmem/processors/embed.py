"""Sentence embeddings for memory entries and queries.

The model comes in as an argument (anything with sentence-transformers' ``encode``), so this
module never loads weights, reads disk or touches the network; launchers load
all-MiniLM-L6-v2 offline from its package directory and pass it in. Tests may pass a fake.

Exceptions: none of its own. A model error propagates, except out-of-memory, which is
retried with half the batch size (down to 1) before it propagates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from lightmem.processors.entry_text import DEFAULT_EMBED_TEXT, EntryText, entry_text
from lightmem.schemas import MemoryEntry

__all__ = ["SentenceEncoder", "TextEncoder", "Embedder"]


class SentenceEncoder(Protocol):
    """The slice of ``sentence_transformers.SentenceTransformer`` the embedder uses."""

    def encode(
        self,
        sentences: Any,
        *,
        batch_size: int,
        normalize_embeddings: bool,
        convert_to_numpy: bool,
        show_progress_bar: bool,
    ) -> Any: ...


class TextEncoder(Protocol):
    """Texts in, an ``(n, d)`` float32 matrix out, one L2-normalised row per text: what
    retrieval, consolidation and the segmenter's B2 need."""

    def __call__(self, texts: Sequence[str]) -> np.ndarray: ...


def _is_out_of_memory(exc: BaseException) -> bool:
    # torch.OutOfMemoryError subclasses RuntimeError and says "out of memory"; matching the
    # message keeps torch out of this module and also covers other backends' wording.
    return isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


class Embedder:
    """Turns texts into float32 sentence vectors with a sentence-transformers model.

    Args:
        model: Any object with sentence-transformers' ``encode`` (see :class:`SentenceEncoder`).
        batch_size: Texts per forward pass (default 64). Halved on out-of-memory errors.
        normalize: L2-normalise the vectors (default True), so a dot product is the cosine.
        text: What :meth:`embed_entries` embeds of an extractive memory: ``compressed`` (its
            fact) or ``original`` (its source turn; see
            :func:`~lightmem.processors.entry_text.entry_text`); default: the measured
            :data:`~lightmem.processors.entry_text.DEFAULT_EMBED_TEXT`.

    Example::

        model = SentenceTransformer(str(MODEL_DIR), device="cpu", local_files_only=True)
        embed = Embedder(model, batch_size=64)
        vectors = embed(["Caroline moved to Seattle."])  # shape (1, 384)
    """

    def __init__(self, model: SentenceEncoder, *, batch_size: int = 64, normalize: bool = True,
                 text: EntryText = DEFAULT_EMBED_TEXT):
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1 (got {batch_size!r})")
        if text not in ("compressed", "original"):
            raise ValueError(f"text: expected 'compressed' or 'original' (got {text!r})")
        self.text: EntryText = text
        self.model = model
        self.batch_size = batch_size
        self.normalize = normalize
        self._dim: int | None = None

    @property
    def dim(self) -> int:
        """Dimension of the vectors (384 for all-MiniLM-L6-v2)."""
        if self._dim is None:
            self._dim = self._model_dim()
        return self._dim

    def _model_dim(self) -> int:
        # sentence-transformers >= 6 renamed the method (the old name warns); older releases
        # only have the old one. Fall back to encoding one probe text for other encoders.
        for name in ("get_embedding_dimension", "get_sentence_embedding_dimension"):
            method = getattr(self.model, name, None)
            if callable(method):
                dim = method()
                if isinstance(dim, int) and dim > 0:
                    return dim
        return int(self._encode(["dimension probe"]).shape[1])

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts``.

        Args:
            texts: The texts, in order. A bare ``str`` is rejected: it would be embedded
                character by character by some encoders.

        Returns:
            A C-contiguous float32 array of shape ``(len(texts), dim)``, rows in input order.
        """
        if isinstance(texts, str):
            raise TypeError("texts: expected a sequence of strings, got a single str")
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self._encode(texts)
        if vectors.shape[0] != len(texts):
            raise ValueError(f"encode returned {vectors.shape[0]} vectors for {len(texts)} texts")
        if self._dim is None:
            self._dim = int(vectors.shape[1])
        return vectors

    def _encode(self, texts: list[str]) -> np.ndarray:
        batch_size = self.batch_size
        while True:
            try:
                raw = self.model.encode(
                    texts,
                    batch_size=batch_size,
                    normalize_embeddings=self.normalize,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                )
                break
            except (RuntimeError, MemoryError) as exc:
                # A batch that does not fit is a capacity problem, not a bad input: retry
                # with smaller batches (the results are identical), give up only at 1.
                if not _is_out_of_memory(exc) or batch_size == 1:
                    raise
                batch_size = max(1, batch_size // 2)
        vectors = np.ascontiguousarray(np.asarray(raw, dtype=np.float32))
        if vectors.ndim == 1:
            vectors = vectors.reshape(1, -1)
        return vectors

    def embed_entries(self, entries: Sequence[MemoryEntry]) -> list[MemoryEntry]:
        """Embed each entry's text in one batched pass: its ``fact``, or for an extractive
        memory with ``text="original"`` its source turn (:func:`entry_text`).

        Args:
            entries: Entries to embed; they are not modified (records are frozen).

        Returns:
            Copies of ``entries``, in order, with ``embedding`` set to that text's vector.
        """
        if not entries:
            return []
        vectors = self([entry_text(e, self.text) for e in entries])
        return [
            e.model_copy(update={"embedding": v.tolist()})
            for e, v in zip(entries, vectors, strict=True)
        ]
