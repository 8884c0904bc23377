"""Which text of a memory is embedded and which is shown: compressed or original.

An extractive memory (no LLM) is a compressed turn, ``speaker: <compressed text>``, and it
keeps its source turn's original text beside it (:attr:`MemoryEntry.original_text`). Two
settings choose, independently, what the vector index embeds (``embed_text``) and what a
search renders into a prompt or a result (``render_text``):

- ``compressed``: the memory's ``fact`` (the compressed turn), as written;
- ``original``: ``speaker: <original turn text>``.

The choice applies only where the two differ in kind: an extractive memory still as it was
written (version 1). A fact an LLM wrote, and a memory a sleep-time update rewrote, are
their ``fact`` whatever the setting (their original text is source material, not the
memory). The stored memory is the same either way; only what the index and the reader see
changes (a store keeps the vectors it was written with: re-ingest to re-embed).

Both defaults are ``original``, measured on the whole LoCoMo dev file (7 conversations,
4,124 turns, 1,033 questions of categories 1-4, MiniLM compressor r = 0.6, hybrid retrieval;
``lightmem bench locomo --systems naive,extractive,lightmem --compressor minilm
--embed-text compressed,original --render-text compressed,original --topic-context 0,2``),
LightMem extractive R@10 / content-aware recall at 512 words (C@512w):

===================  ==================  ================
embeds \\ shows       compressed          original
===================  ==================  ================
compressed           0.627 / 0.623       0.627 / 0.692
original             0.642 / 0.627       0.642 / 0.711
===================  ==================  ================

(NaiveRAG: kNN 0.479 / 0.571, hybrid 0.642 / 0.708.) Showing the compressed line caps the
content-aware credit: the words compression dropped are what the question asks about.

Pure: no I/O.
"""

from __future__ import annotations

from typing import Literal, get_args

from lightmem.schemas import EntryMode, MemoryEntry

__all__ = [
    "EntryText",
    "ENTRY_TEXTS",
    "DEFAULT_EMBED_TEXT",
    "DEFAULT_RENDER_TEXT",
    "entry_text",
    "shows_original",
]

EntryText = Literal["compressed", "original"]
#: The choices, in the order the bench and the docs list them.
ENTRY_TEXTS: tuple[EntryText, ...] = get_args(EntryText)
#: What the vector index embeds by default (measured, see the module docstring).
DEFAULT_EMBED_TEXT: EntryText = "original"
#: What a search shows by default (measured, see the module docstring).
DEFAULT_RENDER_TEXT: EntryText = "original"


def shows_original(entry: MemoryEntry, text: EntryText) -> bool:
    """Whether ``entry`` reads as its original turn under the choice ``text``: an
    extractive memory at version 1 with a non-blank original, and ``text == "original"``."""
    return (
        text == "original"
        and entry.mode == EntryMode.extractive
        and entry.version == 1
        and bool(entry.original_text.strip())
    )


def entry_text(entry: MemoryEntry, text: EntryText = DEFAULT_RENDER_TEXT) -> str:
    """The memory's text under the choice ``text``, on one line.

    Args:
        entry: The memory.
        text: ``compressed`` (its fact) or ``original`` (``speaker: <original turn>`` for an
            extractive memory as written; its fact otherwise, see :func:`shows_original`).

    Returns:
        One line: newlines and runs of spaces are folded, so one memory stays one line.

    Raises:
        ValueError: ``text`` is neither choice.
    """
    if text not in ENTRY_TEXTS:
        raise ValueError(f"text: expected one of {ENTRY_TEXTS}, got {text!r}")
    if shows_original(entry, text):
        return f"{entry.speaker}: {' '.join(entry.original_text.split())}"
    return " ".join(entry.fact.split())
