"""The recall metrics of ``bench locomo`` (evidence recall at k, session recall, recall at word
budgets with content-aware and whole-turn credit) and answer-mode judging."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from lightmem.processors.entry_text import EntryText
from lightmem.processors.lexical import content_words
from lightmem.processors.llm import ChatMessage, ChatModel
from lightmem.processors.retrieve import render
from lightmem.processors.store import ScoredEntry

if TYPE_CHECKING:
    from lightmem.ops.bench.locomo.systems import SystemResult

from lightmem.ops.bench.locomo.data import CATEGORIES, Question

DEFAULT_KS: tuple[int, ...] = (5, 10, 20)


DEFAULT_BUDGETS: tuple[int, ...] = (256, 512, 1024, 2048)


#: How a word budget is filled (written into every report).
BUDGET_RULE = (
    "hits are taken best first while the words of their rendered line ('[date, weekday] "
    "fact', date prefix included) fit the budget; the first hit that would cross it is "
    "excluded and the scan stops there"
)


#: How the content-aware budget credit is computed (written into every report).
CONTENT_RULE = (
    "per evidence turn, the share of its content words (lower-cased [a-z0-9]+ words minus "
    "English stop words, one tokenizer for every system) found in the taken lines that cite "
    "that turn; mean over the question's evidence turns, then over questions"
)


def word_count(text: str) -> int:
    """Whitespace-separated words: the unit of the context budgets and of "words stored"."""
    return len(text.split())


@dataclass(frozen=True)
class Retrieved:
    """A search hit as the recall metrics see it: the turns it comes from, the words its
    rendered line is charged, and the content words that line says."""

    turn_ids: frozenset[str]
    words: int
    #: Content words of the rendered line (:func:`~lightmem.processors.lexical.content_words`).
    content: frozenset[str] = frozenset()
    #: A topic-context line brought by a hit: charged at a budget, no credit at k.
    context: bool = False

    @classmethod
    def from_hit(cls, hit: ScoredEntry, *, context: bool = False,
                 text: EntryText = "compressed") -> Retrieved:
        """The hit's rendered line (``[date, weekday] text``, ``text`` as in
        :func:`~lightmem.processors.retrieve.render`): charged and credited."""
        line = render(hit.entry, text)
        return cls(frozenset(hit.entry.source_turn_ids), word_count(line),
                   frozenset(content_words(line)), context)


def evidence_recall(evidence: Collection[str], hits: Iterable[Retrieved]) -> float:
    """Fraction of the evidence turns covered by the hits' source turns.

    Raises:
        ValueError: ``evidence`` is empty (such a question cannot be scored).
    """
    wanted = set(evidence)
    if not wanted:
        raise ValueError("evidence: a question needs at least one evidence turn")
    covered: set[str] = set()
    for hit in hits:
        covered |= hit.turn_ids
    return len(wanted & covered) / len(wanted)


def session_of(turn_id: str) -> str:
    """The session of a LoCoMo turn id: ``D3:7`` -> ``D3``."""
    return turn_id.split(":", 1)[0]


def session_recall(evidence: Collection[str], hits: Iterable[Retrieved]) -> float:
    """Fraction of the evidence turns' sessions that some hit's source turn falls in.

    Raises:
        ValueError: ``evidence`` is empty.
    """
    wanted = {session_of(t) for t in evidence}
    if not wanted:
        raise ValueError("evidence: a question needs at least one evidence turn")
    covered = {session_of(t) for hit in hits for t in hit.turn_ids}
    return len(wanted & covered) / len(wanted)


def content_recall(
    evidence: Sequence[str],
    evidence_words: Sequence[Collection[str]],
    hits: Iterable[Retrieved],
) -> float:
    """Content-aware evidence recall: credit only for what the retrieved lines still say.

    For each evidence turn, the share of its content words found in the lines that cite it
    (a line cites its source turns); a turn without content words earns 1 when cited. The
    mean over evidence turns. A compressed line that lost the answer earns less than the
    whole turn; a line citing another turn earns nothing for this one.

    Args:
        evidence: Evidence turn ids.
        evidence_words: Content words of each evidence turn, in ``evidence`` order; empty
            falls back to whole-turn credit (:func:`evidence_recall`).
        hits: The retrieved lines.

    Raises:
        ValueError: ``evidence`` is empty, or ``evidence_words`` has another length.
    """
    if not evidence:
        raise ValueError("evidence: a question needs at least one evidence turn")
    hits = list(hits)
    if not evidence_words:
        return evidence_recall(evidence, hits)
    if len(evidence_words) != len(evidence):
        raise ValueError(f"evidence_words: one per evidence turn ({len(evidence)}), "
                         f"got {len(evidence_words)}")
    said: dict[str, set[str]] = {}
    for hit in hits:
        for turn_id in hit.turn_ids:
            said.setdefault(turn_id, set()).update(hit.content)
    credit = 0.0
    for turn_id, words in zip(evidence, evidence_words, strict=True):
        if turn_id not in said:
            continue
        credit += len(set(words) & said[turn_id]) / len(words) if words else 1.0
    return credit / len(evidence)


def top_k(hits: Sequence[Retrieved], k: int) -> list[Retrieved]:
    """The best ``k`` hits (hits come best first); topic-context lines are not hits."""
    if k < 1:
        raise ValueError(f"k: must be >= 1 (got {k!r})")
    return [h for h in hits if not h.context][:k]


def within_budget(hits: Iterable[Retrieved], words: int) -> list[Retrieved]:
    """The best hits whose texts fit in ``words`` words, by :data:`BUDGET_RULE`: taken best
    first; the first hit that would cross the budget is excluded and the scan stops."""
    if words < 1:
        raise ValueError(f"words: must be >= 1 (got {words!r})")
    taken: list[Retrieved] = []
    used = 0
    for hit in hits:
        if used + hit.words > words:
            break
        taken.append(hit)
        used += hit.words
    return taken


def recall_at_k(evidence: Collection[str], hits: Sequence[Retrieved], k: int) -> float:
    """Evidence recall of the best ``k`` hits."""
    return evidence_recall(evidence, top_k(hits, k))


def session_recall_at_k(evidence: Collection[str], hits: Sequence[Retrieved], k: int) -> float:
    """Session recall of the best ``k`` hits."""
    return session_recall(evidence, top_k(hits, k))


def recall_at_budget(evidence: Collection[str], hits: Sequence[Retrieved], words: int) -> float:
    """Whole-turn evidence recall of the lines within a ``words`` budget (see
    :func:`within_budget`)."""
    return evidence_recall(evidence, within_budget(hits, words))


def content_recall_at_budget(question: Question, hits: Sequence[Retrieved], words: int) -> float:
    """Content-aware recall (:func:`content_recall`) of the lines within a ``words`` budget."""
    return content_recall(question.evidence, question.evidence_words,
                          within_budget(hits, words))


_JUDGE_SYSTEM = (
    "You grade answers to questions about a long conversation. You get the question, the "
    "gold answer and a generated answer. The generated answer is CORRECT when it states the "
    "same thing as the gold answer, even if it is worded differently, longer, or gives a "
    "date in another format; it is WRONG when it contradicts the gold answer, misses its "
    "point, or says it does not know. Reply with exactly one word: CORRECT or WRONG."
)


_VERDICT = re.compile(r"\b(CORRECT|WRONG|INCORRECT)\b", re.IGNORECASE)


def parse_verdict(text: str) -> bool | None:
    """``True`` for CORRECT, ``False`` for WRONG/INCORRECT (first one said wins), else None."""
    m = _VERDICT.search(text)
    if m is None:
        return None
    return m[1].upper() == "CORRECT"


def judge_answer(
    chat: ChatModel, question: Question, generated: str, *, tenant: str
) -> bool | None:
    """One judge call (purpose ``judge``): is ``generated`` CORRECT against the gold answer?

    Returns:
        True/False, or None when the judge's reply names neither verdict.
    """
    prompt = (
        f"Question: {question.question}\nGold answer: {question.answer}\n"
        f"Generated answer: {generated}\nVerdict:"
    )
    completion = chat.complete(
        [ChatMessage("system", _JUDGE_SYSTEM), ChatMessage("user", prompt)],
        purpose="judge",
        tenant=tenant,
        max_tokens=8,
    )
    return parse_verdict(completion.text)


@dataclass
class AnswerScore:
    """Answer-mode results of one system."""

    judged: int = 0
    correct: int = 0
    #: Judge replies that named neither verdict (scored as wrong).
    unparsable: int = 0
    by_category: dict[int, list[int]] = field(default_factory=dict)

    def add(self, category: int, verdict: bool | None) -> None:
        self.judged += 1
        self.correct += verdict is True
        self.unparsable += verdict is None
        cell = self.by_category.setdefault(category, [0, 0])
        cell[0] += verdict is True
        cell[1] += 1

    def as_json(self) -> dict[str, Any]:
        return {
            "judged": self.judged,
            "correct": self.correct,
            "accuracy": ratio(self.correct, self.judged),
            "unparsable_verdicts": self.unparsable,
            "by_category": {
                CATEGORIES.get(c, str(c)): ratio(ok, n)
                for c, (ok, n) in sorted(self.by_category.items())
            },
        }


@dataclass
class RecallAccumulator:
    """Per-question recall values, grouped for the breakdowns."""

    ks: Sequence[int]
    budgets: Sequence[int]
    rows: list[tuple[Question, dict[str, float]]] = field(default_factory=list)

    def add(self, question: Question, hits: Sequence[Retrieved]) -> None:
        values = {f"k@{k}": recall_at_k(question.evidence, hits, k) for k in self.ks}
        values |= {f"s@{k}": session_recall_at_k(question.evidence, hits, k) for k in self.ks}
        for w in self.budgets:
            taken = within_budget(hits, w)
            values[f"w@{w}"] = evidence_recall(question.evidence, taken)
            values[f"c@{w}"] = content_recall(question.evidence, question.evidence_words, taken)
            values[f"words@{w}"] = float(sum(h.words for h in taken))
        self.rows.append((question, values))

    def mean(self, key: str, where: Callable[[Question], bool] = lambda q: True) -> float:
        vals = [v[key] for q, v in self.rows if where(q)]
        return float(np.mean(vals)) if vals else float("nan")

    def fill(self, result: SystemResult) -> None:
        result.questions = len(self.rows)
        result.recall_at_k = {k: self.mean(f"k@{k}") for k in self.ks}
        result.session_recall_at_k = {k: self.mean(f"s@{k}") for k in self.ks}
        result.recall_at_words = {w: self.mean(f"w@{w}") for w in self.budgets}
        result.content_recall_at_words = {w: self.mean(f"c@{w}") for w in self.budgets}
        result.context_words = {w: self.mean(f"words@{w}") for w in self.budgets}
        keys = ([f"k@{k}" for k in self.ks] + [f"s@{k}" for k in self.ks]
                + [f"c@{w}" for w in self.budgets] + [f"w@{w}" for w in self.budgets])
        for cat, label in CATEGORIES.items():
            n = sum(q.category == cat for q, _ in self.rows)
            if n:
                result.by_category[label] = {"questions": n} | {
                    key: round(self.mean(key, lambda q, c=cat: q.category == c), 4)
                    for key in keys
                }
        for conv in dict.fromkeys(q.conversation for q, _ in self.rows):
            n = sum(q.conversation == conv for q, _ in self.rows)
            result.by_conversation[conv] = {"questions": n} | {
                key: round(self.mean(key, lambda q, c=conv: q.conversation == c), 4)
                for key in keys
            }


def ratio(a: float, b: float) -> float | None:
    return None if not b else round(a / b, 4)

