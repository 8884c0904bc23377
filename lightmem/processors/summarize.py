"""Short-term memory: the per-conversation topic buffer and topic-aware summarization.

Topic segments (from the sensory stage) accumulate in a :class:`TopicBuffer` until adding
the next one would push the buffered *compressed* text past ``threshold_tokens`` (LightMem's
``th``, 512 by default). The flushed segments then go to :meth:`Summarizer.summarize`:

- LLM mode: ONE chat call for all flushed segments, one ``--- Topic k ---`` block per
  segment, each line ``[timestamp, weekday] idx.speaker: text``; the model answers
  ``{"data": [{"source_id": idx, "fact": "standalone sentence"}]}`` and each fact becomes a
  :class:`~lightmem.schemas.MemoryEntry` tied to its source turn.
- Extractive mode (no chat model): one entry per turn, the compressed turn itself.

Everything here is pure: the chat model and the clock (``now``) come in as arguments; the
buffer is state-in, state-out so the caller can keep it in a changelog-backed table.

Failure sorting (nothing is silently dropped):

- a fact naming an unknown ``source_id`` or missing fields: that fact is dropped and
  listed in :attr:`SummaryResult.dropped`; the rest of the batch stands;
- an answer cut at the output cap (``finish_reason == "length"``, on the first call or on
  the repair): the batch is split in two and each half asked again, recursively: whole
  topics while the batch has several, then the lines of a single topic; one line whose
  answer is still cut is dead-lettered (:class:`SummaryTruncatedError`);
- output that is not the JSON asked for: one repair call, then a dead letter;
- :class:`~lightmem.processors.llm.LLMPermanentError`: a dead letter;
- :class:`~lightmem.processors.llm.LLMTransientError`: re-raised, the runtime retries.

After a split, a failure dead-letters only the part that failed (its segments, or the lines
of a segment); the other parts' entries stand.

Exceptions::

    ValueError
     ├── FactParseError         model output is not the fact JSON (becomes a dead letter)
     ├── SummaryTruncatedError  one line's answer exceeds the cap (becomes a dead letter)
     └── (plain)                segments from different conversations/scopes: a caller bug
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lightmem.processors.llm import ChatMessage, ChatModel, LLMPermanentError
from lightmem.schemas import (
    DeadLetter,
    EntryMode,
    MemoryEntry,
    Segment,
    SegmentTurn,
    scope_key,
    stable_id,
)

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_THRESHOLD_TOKENS",
    "SUMMARIZE_PURPOSE",
    "ExtractedFact",
    "FactParseError",
    "SummaryResult",
    "SummaryTruncatedError",
    "Summarizer",
    "TopicBuffer",
    "TopicBufferState",
    "build_extraction_messages",
    "parse_facts",
]

#: LightMem's ``th``: tokens of compressed text per summarization call (paper: 256..1024).
DEFAULT_THRESHOLD_TOKENS = 512
#: Completion-token cap per summarization call: 4 x th (``Settings.summary_token_cap`` says
#: why); a call cut at the cap is split, so this bounds one call, not the facts of a flush.
DEFAULT_MAX_TOKENS = 4 * DEFAULT_THRESHOLD_TOKENS
#: Stage name for metering and dead letters.
SUMMARIZE_PURPOSE = "summarize"
#: ``DeadLetter.source`` for summarization failures (they have no single source offset).
_DEAD_LETTER_SOURCE = "summarizer"


# -- topic buffer -----------------------------------------------------------------------


class TopicBufferState(BaseModel):
    """The buffered topic segments of one conversation (JSON-serialisable table value)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: str
    user: str
    conversation: str
    #: Buffered segments, oldest first.
    segments: list[Segment] = Field(default_factory=list)

    @classmethod
    def for_segment(cls, segment: Segment) -> TopicBufferState:
        """An empty buffer for ``segment``'s conversation."""
        return cls(tenant=segment.tenant, user=segment.user, conversation=segment.conversation)

    @property
    def is_empty(self) -> bool:
        return not self.segments


class TopicBuffer:
    """Rules of the topic buffer: when it flushes. Holds no state itself.

    Args:
        count_tokens: Token counter applied to compressed text (the encoder's tokenizer,
            or a word count).
        threshold_tokens: ``th``: a buffer flushes before it would exceed this many tokens
            (default 512).
    """

    def __init__(
        self,
        count_tokens: Callable[[str], int],
        threshold_tokens: int = DEFAULT_THRESHOLD_TOKENS,
    ) -> None:
        if threshold_tokens < 1:
            raise ValueError(f"threshold_tokens: must be >= 1 (got {threshold_tokens!r})")
        self.count_tokens = count_tokens
        self.threshold_tokens = threshold_tokens

    def segment_tokens(self, segment: Segment) -> int:
        """Tokens of a segment's compressed text (what the summarization prompt carries)."""
        return self.count_tokens("\n".join(t.compressed_text for t in segment.turns))

    def tokens(self, state: TopicBufferState) -> int:
        """Tokens of everything buffered."""
        return sum(self.segment_tokens(s) for s in state.segments)

    def would_overflow(self, state: TopicBufferState, segment: Segment) -> bool:
        """Whether adding ``segment`` would push a non-empty buffer past the threshold.

        An empty buffer never overflows: a single segment larger than ``th`` is still
        summarized, in a call of its own.
        """
        if state.is_empty:
            return False
        return self.tokens(state) + self.segment_tokens(segment) > self.threshold_tokens

    def is_full(self, state: TopicBufferState) -> bool:
        """Whether the buffer has reached the threshold (any further segment overflows)."""
        return not state.is_empty and self.tokens(state) >= self.threshold_tokens

    def add(self, state: TopicBufferState, segment: Segment) -> TopicBufferState:
        """Append ``segment`` without any flush decision.

        A segment already buffered (same ``segment_id``, e.g. redelivered after a worker
        restart) is not added twice.

        Raises:
            ValueError: ``segment`` belongs to another tenant or conversation.
        """
        _check_same_conversation(state, segment)
        if any(s.segment_id == segment.segment_id for s in state.segments):
            return state
        return state.model_copy(update={"segments": [*state.segments, segment]})

    def drain(self, state: TopicBufferState) -> tuple[list[Segment], TopicBufferState]:
        """Take everything out (explicit flush: session end, idle timeout, shutdown).

        Returns:
            The buffered segments (oldest first) and the empty state.
        """
        return list(state.segments), state.model_copy(update={"segments": []})

    def push(
        self, state: TopicBufferState, segment: Segment
    ) -> tuple[TopicBufferState, list[list[Segment]]]:
        """Add ``segment``, flushing as the threshold rule says.

        If the segment would overflow the buffer, the buffered segments are flushed first
        and the segment starts a new buffer. If the buffer is then full (a segment of
        ``th`` tokens or more on its own), it is flushed at once rather than waiting for a
        next segment that could only overflow it.

        Returns:
            The new state and the batches to summarize, oldest first: zero, one or two
            lists of segments, each meant for ONE summarization call.
        """
        _check_same_conversation(state, segment)
        if any(s.segment_id == segment.segment_id for s in state.segments):
            return state, []
        batches: list[list[Segment]] = []
        if self.would_overflow(state, segment):
            flushed, state = self.drain(state)
            batches.append(flushed)
        state = self.add(state, segment)
        if self.is_full(state):
            flushed, state = self.drain(state)
            batches.append(flushed)
        return state, batches


def _check_same_conversation(state: TopicBufferState, segment: Segment) -> None:
    errors = [
        f"{name}: segment {segment.segment_id!r} has {getattr(segment, name)!r}, "
        f"buffer holds {getattr(state, name)!r}"
        # Not the user: a conversation may have several (each entry takes its turn's user).
        for name in ("tenant", "conversation")
        if getattr(segment, name) != getattr(state, name)
    ]
    if errors:
        raise ValueError("segment does not belong to this topic buffer: " + "; ".join(errors))


# -- prompt and parsing -------------------------------------------------------------------

_SYSTEM_PROMPT = """\
You extract long-term memories from a conversation. The user message holds excerpts of \
the conversation grouped into topics. Each line is:
[timestamp, weekday] source_id.speaker: message
Messages may be compressed (some words dropped).

Write down the facts worth remembering about the speakers: personal details, events, \
plans, preferences, opinions, relationships, possessions, dates.
Rules:
- Each fact is ONE standalone sentence that makes sense without the conversation: use \
names, never "I", "you" or "he" without a name.
- Resolve relative time ("yesterday", "next month") to absolute dates using the line's \
timestamp.
- source_id is the number of the line the fact comes from. A line may give several facts; \
small talk gives none.
- Use only what the lines say. Do not invent.

Answer with ONLY a JSON object, no prose, no code fences:
{"data": [{"source_id": <int>, "fact": "<standalone sentence>"}]}
If nothing is worth remembering, answer {"data": []}."""

_REPAIR_PROMPT = """\
Your reply was not the JSON asked for ({problem}). Answer again with ONLY a JSON object \
of the form {{"data": [{{"source_id": <int>, "fact": "<standalone sentence>"}}]}}: no \
prose, no code fences."""


def _one_line(text: str) -> str:
    # A newline inside a message would start a fake turn line in the prompt.
    return " ".join(text.split())


def _turn_line(idx: int, turn: SegmentTurn) -> str:
    when = turn.event_time.isoformat(sep=" ", timespec="minutes")
    weekday = turn.event_time.strftime("%A")
    return f"[{when}, {weekday}] {idx}.{_one_line(turn.speaker)}: {_one_line(turn.compressed_text)}"


def _index_turns(segments: Sequence[Segment]) -> list[tuple[Segment, SegmentTurn]]:
    """The prompt's ``idx`` -> (segment, turn): a global, 0-based count over all blocks."""
    return [(segment, turn) for segment in segments for turn in segment.turns]


def build_extraction_messages(segments: Sequence[Segment]) -> list[ChatMessage]:
    """The fact-extraction prompt for one flush of the topic buffer.

    Args:
        segments: The flushed segments, oldest first.

    Returns:
        A system message (instructions and output format) and a user message with one
        ``--- Topic k ---`` block per segment (k from 1), each turn on a line
        ``[timestamp, weekday] idx.speaker: compressed text`` with ``idx`` counted from 0
        across all blocks.
    """
    lines: list[str] = []
    idx = 0
    for k, segment in enumerate(segments, start=1):
        lines.append(f"--- Topic {k} ---")
        for turn in segment.turns:
            lines.append(_turn_line(idx, turn))
            idx += 1
    return [
        ChatMessage(role="system", content=_SYSTEM_PROMPT),
        ChatMessage(role="user", content="\n".join(lines)),
    ]


class FactParseError(ValueError):
    """The model's output is not the fact JSON that was asked for."""


class SummaryTruncatedError(ValueError):
    """The answer for a single line still exceeds the output cap: nothing left to split."""


@dataclass(frozen=True)
class ExtractedFact:
    """One fact as the model gave it."""

    source_id: int
    fact: str


_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)```", re.DOTALL)
_OPENING = re.compile(r"[{\[]")
_MAX_DECODE_STARTS = 32


def _load_json(text: str) -> Any:
    """The first JSON value in ``text``, tolerating code fences and prose around it."""
    stripped = text.strip()
    fenced = _FENCE.search(stripped)
    candidates = [fenced.group(1).strip()] if fenced else []
    candidates.append(stripped)
    first_error: json.JSONDecodeError | None = None
    decoder = json.JSONDecoder()
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except json.JSONDecodeError as exc:
            first_error = first_error or exc
        # Small models like to wrap the object in prose ("Here are the facts: {...} Hope
        # this helps"): decode from each opening bracket in turn, ignoring what trails.
        # Bounded, because the output is bounded by max_tokens anyway.
        starts = [m.start() for m in _OPENING.finditer(candidate)][:_MAX_DECODE_STARTS]
        for start in starts:
            try:
                value, _ = decoder.raw_decode(candidate, start)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict | list):
                return value
    assert first_error is not None
    snippet = text.strip()[:80]
    raise FactParseError(f"not valid JSON: {first_error.msg} (output starts {snippet!r})")


def _as_source_id(value: Any) -> int | None:
    if isinstance(value, bool):  # bool is an int subclass; True is not a line number
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    if isinstance(value, list) and len(value) == 1:
        return _as_source_id(value[0])
    return None


def parse_facts(text: str) -> tuple[list[ExtractedFact], list[str]]:
    """Parse the model's answer into facts, robustly.

    Accepted shapes: ``{"data": [...]}`` (or ``"facts"``), a single fact object, or a bare
    list of fact objects, optionally inside a code fence or surrounded by prose. A
    ``source_id`` may be an int, a digit string or a one-element list.

    Args:
        text: The raw completion text.

    Returns:
        The well-formed facts in output order, and one reason per malformed item
        (dropped, not fatal).

    Raises:
        FactParseError: No JSON value, one of an unrecognised shape, or items none of
            which is a fact.
    """
    value = _load_json(text)
    items: Any
    if isinstance(value, dict) and ("data" in value or "facts" in value):
        items = value["data"] if "data" in value else value["facts"]
        if isinstance(items, dict):
            items = [items]
    elif isinstance(value, dict) and "fact" in value:
        items = [value]
    elif isinstance(value, list):
        items = value
    else:
        got = f"object with keys {sorted(value)!r}" if isinstance(value, dict) else repr(value)
        raise FactParseError(f'expected {{"data": [...]}}, got {got[:80]}')
    if not isinstance(items, list):
        raise FactParseError(f'"data": expected a list of facts, got {items!r:.80}')

    facts: list[ExtractedFact] = []
    malformed: list[str] = []
    for position, item in enumerate(items):
        if not isinstance(item, dict):
            malformed.append(f"data[{position}]: not an object ({item!r:.60})")
            continue
        source_id = _as_source_id(item.get("source_id"))
        fact = item.get("fact")
        problems = []
        if source_id is None:
            problems.append(f"source_id is not a line number ({item.get('source_id')!r:.40})")
        if not isinstance(fact, str) or not fact.strip():
            problems.append(f"fact is not a non-empty string ({fact!r:.40})")
        if problems or source_id is None or not isinstance(fact, str):
            malformed.append(f"data[{position}]: " + "; ".join(problems))
            continue
        facts.append(ExtractedFact(source_id=source_id, fact=fact.strip()))
    if items and not facts:
        # Nothing usable at all is a format problem (worth the repair call), not a few
        # bad items in an otherwise good answer.
        raise FactParseError(
            f"none of the {len(items)} items is a fact object: {'; '.join(malformed)[:160]}"
        )
    return facts, malformed


# -- summarizer ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SummaryResult:
    """What one flush produced."""

    #: The memory entries, in prompt (conversation) order.
    entries: list[MemoryEntry]
    #: Set when (part of) the flush could not be summarized; it carries exactly the
    #: segments, or lines of a segment, that failed. Empty ``entries`` unless a split let
    #: other parts through.
    dead_letter: DeadLetter | None = None
    #: One reason per fact or turn that was dropped while the rest of the batch stood.
    dropped: list[str] = field(default_factory=list)
    #: ``source_id`` values the model named that are not lines of the prompt.
    unknown_source_ids: list[int] = field(default_factory=list)
    #: Chat calls made, every one counted: 0 extractive, 1 normally, +1 per repair, and
    #: the truncated calls plus both halves' calls of every split.
    llm_calls: int = 0
    #: True when a first answer was invalid and the repair call fixed it.
    repaired: bool = False
    #: Times an answer cut at ``max_tokens`` made the batch split in two.
    splits: int = 0


@dataclass
class _Failure:
    """A part of the flush that could not be summarized."""

    segments: list[Segment]
    error: Exception
    outputs: list[str]


@dataclass
class _Tally:
    """What the (possibly split) calls of one flush gathered, in prompt order."""

    entries: list[MemoryEntry] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    unknown: list[int] = field(default_factory=list)
    failures: list[_Failure] = field(default_factory=list)
    calls: int = 0
    repaired: bool = False
    splits: int = 0


class _Truncated(Exception):
    """Internal: the answer (first or repaired) was cut at ``max_tokens``."""


class Summarizer:
    """Turns one flush of the topic buffer into memory entries.

    Args:
        chat: The LLM; None selects extractive mode (one entry per turn, no LLM).
        max_tokens: Completion-token cap per call (default :data:`DEFAULT_MAX_TOKENS`,
            4 x th; the runtime passes ``Settings.summary_token_cap``). An answer cut at
            the cap is not lost: the batch is split and asked again in smaller calls.
    """

    def __init__(self, chat: ChatModel | None, *, max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1 (got {max_tokens!r})")
        self.chat = chat
        self.max_tokens = max_tokens

    @property
    def mode(self) -> EntryMode:
        return EntryMode.extractive if self.chat is None else EntryMode.llm

    def summarize(self, segments: Sequence[Segment], *, now: datetime) -> SummaryResult:
        """Summarize the flushed segments of one conversation.

        Args:
            segments: The flushed segments, oldest first, all of one conversation.
            now: Timezone-aware time stamped as every entry's ``ingest_time`` (and on a
                dead letter).

        Returns:
            Entries (ids deterministic: the same segments always give the same ids, split
            or not), and a dead letter for what stayed unusable: output that is not JSON
            after a repair, a rejected request, or one line whose answer exceeds the cap.

        Raises:
            LLMTransientError: The endpoint is unavailable; retry the same segments later.
            ValueError: ``segments`` mix conversations (a caller bug).
        """
        if not segments:
            return SummaryResult(entries=[])
        _check_one_conversation(segments)
        if self.chat is None:
            return _extractive(segments, now)
        tally = _Tally()
        self._extract(self.chat, list(segments), now, tally)
        return SummaryResult(
            entries=tally.entries,
            dead_letter=_dead_letter(tally.failures, now) if tally.failures else None,
            dropped=tally.dropped,
            unknown_source_ids=tally.unknown,
            llm_calls=tally.calls,
            repaired=tally.repaired,
            splits=tally.splits,
        )

    def _extract(
        self, chat: ChatModel, segments: list[Segment], now: datetime, tally: _Tally
    ) -> None:
        """One call (plus repair) for ``segments``; on truncation, each half in turn."""
        outputs: list[str] = []
        try:
            facts, malformed, repaired = self._ask(chat, segments, outputs, tally)
        except _Truncated:
            halves = _split(segments)
            if halves is None:
                turn = segments[0].turns[0]
                error = SummaryTruncatedError(
                    f"the answer for the single line of turn {turn.turn_id!r} was cut at "
                    f"max_tokens={self.max_tokens} (finish_reason 'length'); raise the "
                    f"summary output cap (setting summary_max_tokens)"
                )
                tally.failures.append(_Failure(segments, error, outputs))
                return
            tally.splits += 1
            for half in halves:
                self._extract(chat, half, now, tally)
            return
        except (FactParseError, LLMPermanentError) as exc:
            tally.failures.append(_Failure(segments, exc, outputs))
            return
        entries, dropped, unknown = _facts_to_entries(facts, _index_turns(segments), now)
        tally.entries.extend(entries)
        tally.dropped.extend([*malformed, *dropped])
        tally.unknown.extend(unknown)
        tally.repaired = tally.repaired or repaired

    def _ask(
        self, chat: ChatModel, segments: Sequence[Segment], outputs: list[str], tally: _Tally
    ) -> tuple[list[ExtractedFact], list[str], bool]:
        """Facts for ``segments`` from one call, or two with the repair.

        Raises:
            _Truncated: An answer was cut at ``max_tokens``. Checked before parsing: a cut
                answer must not be parsed, since the lenient parser could take the first
                complete fact object inside it for the whole answer and lose the rest.
            FactParseError: Not fact JSON even after the repair call.
            LLMPermanentError: The request was rejected.
            LLMTransientError: Propagated on purpose: nothing is lost, the runtime keeps
                the buffer and retries the whole flush.
        """
        tenant = segments[0].tenant
        messages = build_extraction_messages(segments)

        def call(msgs: Sequence[ChatMessage]) -> str:
            tally.calls += 1  # before the call: a rejected request was still a call
            completion = chat.complete(
                msgs,
                purpose=SUMMARIZE_PURPOSE,
                tenant=tenant,
                json_mode=True,
                max_tokens=self.max_tokens,
            )
            outputs.append(completion.text)
            if completion.truncated:
                raise _Truncated
            return completion.text

        raw = call(messages)
        try:
            facts, malformed = parse_facts(raw)
            return facts, malformed, False
        except FactParseError as first:
            # One repair round: small models often get the JSON almost right, and
            # showing them their own output is cheaper than re-extracting.
            repair = [
                *messages,
                ChatMessage(role="assistant", content=raw),
                ChatMessage(role="user", content=_REPAIR_PROMPT.format(problem=first)),
            ]
            raw = call(repair)
            try:
                facts, malformed = parse_facts(raw)
            except FactParseError as second:
                raise FactParseError(
                    f"model output is not valid fact JSON after one repair retry: "
                    f"first answer: {first}; repaired answer: {second}"
                ) from second
            return facts, malformed, True


def _split(segments: Sequence[Segment]) -> tuple[list[Segment], list[Segment]] | None:
    """Two halves of a batch whose answer did not fit, or None for a single line.

    Whole topics while there are several (cut where the line counts balance best, since
    the answer grows with the lines), else the lines of the one topic: each half keeps
    the segment (same ``segment_id``), so entry ids do not depend on the split.
    """
    if len(segments) > 1:
        sizes = [len(s.turns) for s in segments]
        total = sum(sizes)
        cuts = range(1, len(segments))
        cut = min(cuts, key=lambda k: abs(total - 2 * sum(sizes[:k])))
        return list(segments[:cut]), list(segments[cut:])
    (only,) = segments
    if len(only.turns) < 2:
        return None
    half = (len(only.turns) + 1) // 2
    return (
        [only.model_copy(update={"turns": only.turns[:half]})],
        [only.model_copy(update={"turns": only.turns[half:]})],
    )


def _check_one_conversation(segments: Sequence[Segment]) -> None:
    first = segments[0]
    errors = [
        f"segments[{i}].{name}: {getattr(s, name)!r} differs from segments[0]'s "
        f"{getattr(first, name)!r}"
        for i, s in enumerate(segments)
        for name in ("tenant", "conversation")  # users may differ: see _turn_user
        if getattr(s, name) != getattr(first, name)
    ]
    if errors:
        raise ValueError("segments must come from one conversation: " + "; ".join(errors))


def _entry_id(segment: Segment, turn: SegmentTurn, mode: EntryMode, ordinal: int) -> str:
    # (scope, segment, source turn, mode, k-th fact of that turn): a replay of the same
    # segments upserts the same ids. The ordinal is per turn, not per batch, so a fact
    # dropped elsewhere does not shift every later id.
    scope = scope_key(segment.tenant, _turn_user(segment, turn))
    return stable_id(scope, segment.segment_id, turn.turn_id, mode.value, ordinal)


def _turn_user(segment: Segment, turn: SegmentTurn) -> str:
    """The user a turn's memories are filed under: its own (several users may share a
    conversation, hence a segment); the segment's for turns written before turns had one."""
    return turn.user or segment.user


def _entry(
    segment: Segment,
    turn: SegmentTurn,
    *,
    fact: str,
    mode: EntryMode,
    ordinal: int,
    now: datetime,
) -> MemoryEntry:
    return MemoryEntry(
        id=_entry_id(segment, turn, mode, ordinal),
        tenant=segment.tenant,
        user=_turn_user(segment, turn),
        conversation=segment.conversation,
        topic_id=segment.segment_id,
        speaker=turn.speaker,
        fact=fact,
        event_time=turn.event_time,
        ingest_time=now,
        source_turn_ids=[turn.turn_id],
        turn_seq=turn.seq,
        original_text=turn.original_text,
        compressed_text=turn.compressed_text,
        mode=mode,
    )


def _facts_to_entries(
    facts: Sequence[ExtractedFact],
    index: Sequence[tuple[Segment, SegmentTurn]],
    now: datetime,
) -> tuple[list[MemoryEntry], list[str], list[int]]:
    entries: list[MemoryEntry] = []
    dropped: list[str] = []
    unknown: list[int] = []
    per_turn: dict[int, int] = {}
    for fact in facts:
        if not 0 <= fact.source_id < len(index):
            unknown.append(fact.source_id)
            dropped.append(
                f"source_id {fact.source_id}: no such line (0..{len(index) - 1}); "
                f"fact {fact.fact!r:.60} dropped"
            )
            continue
        segment, turn = index[fact.source_id]
        ordinal = per_turn.get(fact.source_id, 0)
        per_turn[fact.source_id] = ordinal + 1
        entries.append(
            _entry(segment, turn, fact=fact.fact, mode=EntryMode.llm, ordinal=ordinal, now=now)
        )
    return entries, dropped, unknown


def _extractive(segments: Sequence[Segment], now: datetime) -> SummaryResult:
    entries: list[MemoryEntry] = []
    dropped: list[str] = []
    for segment in segments:
        for turn in segment.turns:
            # Compression can in principle keep nothing; the original text is then the
            # better memory than an empty one.
            text = _one_line(turn.compressed_text) or _one_line(turn.original_text)
            if not text:
                dropped.append(f"turn {turn.turn_id!r}: empty text")
                continue
            entries.append(
                _entry(
                    segment,
                    turn,
                    fact=f"{turn.speaker}: {text}",
                    mode=EntryMode.extractive,
                    ordinal=0,
                    now=now,
                )
            )
    return SummaryResult(entries=entries, dropped=dropped)


def _dead_letter(failures: Sequence[_Failure], now: datetime) -> DeadLetter:
    """One dead letter for the failed parts: the model's raw output(s) and what to replay.

    Parts that are lines of one segment are joined back into that segment (its failed
    turns, in order), so a replay buffers each segment id once.
    """
    merged: dict[str, Segment] = {}
    for failure in failures:
        for segment in failure.segments:
            held = merged.get(segment.segment_id)
            merged[segment.segment_id] = (
                segment
                if held is None
                else held.model_copy(update={"turns": [*held.turns, *segment.turns]})
            )
    segments = list(merged.values())
    payload = {
        "segment_ids": [s.segment_id for s in segments],
        "model_outputs": [o for failure in failures for o in failure.outputs],
        # The segments themselves, so the dead letter alone is enough to replay the flush.
        "segments": [s.model_dump(mode="json") for s in segments],
    }
    raw = json.dumps(payload, ensure_ascii=False).encode()
    reason = "; ".join(
        f"{f.error} (segments {', '.join(dict.fromkeys(s.segment_id for s in f.segments))})"
        for f in failures
    )
    return DeadLetter(
        step="summarize",
        reason=reason,
        error_type=type(failures[0].error).__name__,
        source=_DEAD_LETTER_SOURCE,
        raw=raw.decode(),
        raw_b64=base64.b64encode(raw).decode(),
        at=now,
    )
