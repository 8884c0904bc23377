"""Words for lexical search and for the content-aware recall metric: one tokenizer.

The same rule turns a query into BM25 terms (both stores) and a text into the content words
that ``bench locomo`` credits, so every system is measured with one tokenizer:

- lower-case; words are runs of ASCII letters and digits (``[a-z0-9]+``), everything else
  separates, apostrophes included (``Caroline's`` -> ``caroline`` ``s``, ``don't`` -> ``don``
  ``t``), as SQLite FTS5's ``unicode61`` tokenizer splits them, so a possessive matches the
  bare name;
- English stop words (:data:`STOP_WORDS`, function words and contraction forms) are removed.

Pure functions, no I/O.
"""

from __future__ import annotations

import re

__all__ = ["STOP_WORDS", "words", "content_words", "query_terms"]

#: Function words that carry no content: articles, pronouns, auxiliaries, prepositions,
#: conjunctions, common adverbs and their contracted forms (apostrophes dropped).
STOP_WORDS: frozenset[str] = frozenset(
    """
    a about above after again against ain all am an and any are aren as at be because been
    before being below between both but by can cannot could couldn d did didn do does doesn
    doing don down during each few for from further had hadn has hasn have haven having he
    her here hers herself him himself his how i if in into is isn it its itself just ll let
    m ma me more most mustn my myself needn no nor not now o of off on once only or other
    ought our ours ourselves out over own re s same shan she should shouldn so some such t
    than that the their theirs them themselves then there these they this those through to
    too under until up ve very was wasn we were weren what when where which while who whom
    why will with won would wouldn y you your yours yourself yourselves
    """.split()
)

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Every word of ``text`` by the module's rule, stop words included, in order."""
    return _WORD.findall(text.lower())


def content_words(text: str) -> set[str]:
    """The distinct words of ``text`` that are not stop words."""
    return {w for w in words(text) if w not in STOP_WORDS}


def query_terms(text: str, *, limit: int = 64) -> list[str]:
    """BM25 terms of a query: its content words, first occurrence order, at most ``limit``.

    A query of stop words only (``"what did she do?"``) has no terms: lexical search then
    returns nothing and retrieval rests on the vector side.
    """
    out = [w for w in dict.fromkeys(words(text)) if w not in STOP_WORDS]
    return out[:limit]
