"""LoCoMo questions for ``bench locomo``: evidence ids normalised, questions selected,
conversations cut into per-turn units."""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lightmem.ops.bench.locomo_data import LocomoSample, load_locomo
from lightmem.processors.lexical import content_words
from lightmem.processors.segment import group_exchanges, to_segment_turn
from lightmem.schemas import Role, Segment, TurnEvent, stable_id

if TYPE_CHECKING:
    pass



#: LoCoMo question categories evaluated (5, adversarial, has no evidence turns).
CATEGORIES: dict[int, str] = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop"}


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


def load_questions(
    data: Path,
    *,
    limit_conversations: int | None = None,
    limit_turns: int | None = None,
    limit_questions: int | None = None,
) -> tuple[list[LocomoSample], list[list[Question]], QuestionStats]:
    """The conversations of a LoCoMo file (each cut to ``limit_turns`` turns) and their
    evaluable questions, with the selection counts."""
    samples = load_locomo(data, limit=limit_conversations)
    kept: list[LocomoSample] = []
    questions: list[list[Question]] = []
    stats = QuestionStats()
    for sample in samples:
        all_ids = [t.turn_id for t in sample.turns]
        turns = sample.turns[:limit_turns] if limit_turns else sample.turns
        qs, st = select_questions(
            sample,
            all_turn_ids=all_ids,
            kept_turn_ids=[t.turn_id for t in turns],
            limit=limit_questions,
        )
        stats.add(st)
        kept.append(LocomoSample(sample.sample_id, turns, sample.qa))
        questions.append(qs)
    return kept, questions, stats


def unit_segments(
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

