"""The embedded runtime: the LightMem processors driven in-process, no servers.

Same processors as the Kafka deployment; the in-process loop stands in for the topics and
:class:`~lightmem.streams.embedded.store.EmbeddedStore` for both the stream tables (buffers)
and Elasticsearch (memories).

Why one module of ~550 lines: ingest, search, consolidation and stats share the one SQLite
transaction per batch described below; the store's SQL is in :mod:`.store`, erasure in
:mod:`.erasure`.

Delivery semantics: turns are applied in batches, each batch in ONE SQLite transaction that
writes the sensory/topic buffers, the memories, the memory changes, the ledger of processed
turns and the LLM usage together. A crash rolls the batch back; a re-run skips what the
ledger holds and re-processes the rest, and deterministic memory ids make any repeated write
an idempotent upsert. Dead letters are the exception: they are appended to the dead-letter
file as soon as they are found, so nothing rejected is ever lost. Each has an identity (its
source, position and exact bytes: :func:`~lightmem.streams.embedded.store.dead_letter_id`):
one already in the file (a re-run over the same bad line, or a batch replayed after a crash)
is counted in the report but not appended again, and the database keeps one row per id.

Keys: buffers and the turn ledger are keyed by ``conversation_key(tenant, conversation)`` and
memories are partitioned by ``scope_key(tenant, user)`` (:mod:`lightmem.schemas.keys`), so
``/`` in a name can merge neither two conversations nor two scopes; a conversation with
several users files each turn's memories under that turn's own user.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from lightmem.processors.consolidate import consolidate_pending
from lightmem.processors.llm import ChatModel, LLMError, UsageMeter, UsageTotals
from lightmem.processors.retrieve import Answer, Retriever
from lightmem.processors.segment import (
    SensoryBufferState,
    push,
    should_flush,
    to_segment_turn,
)
from lightmem.processors.store import ScoredEntry, VersionConflict
from lightmem.processors.summarize import TopicBufferState
from lightmem.processors.update import (
    Consolidator,
    UpdateQueueBuilder,
    added_change,
    build_queues,
    targets_from_queues,
)
from lightmem.schemas import (
    ChangeOp,
    DeadLetter,
    MemoryEntry,
    RejectedLine,
    SchemaError,
    Segment,
    TurnEvent,
    parse_turn,
    utc_now,
)
from lightmem.settings import Settings
from lightmem.streams.embedded.store import EmbeddedStore, dead_letter_id
from lightmem.streams.models.components import Components
from lightmem.streams.models.encoder import MINILM_DIM

__all__ = [
    "EmbeddedRuntime",
    "IngestReport",
    "ConsolidationReport",
    "RuntimeStats",
]

log = logging.getLogger(__name__)

SENSORY = "sensory"
TOPIC = "topic"

@dataclass
class IngestReport:
    """What one ingest did."""

    mode: str
    lines: int = 0
    processed: int = 0
    skipped: int = 0
    #: Of ``skipped``: turns of a scope erased after their event time (``lightmem forget``).
    erased: int = 0
    rejected: list[RejectedLine] = field(default_factory=list)
    segments: int = 0
    entries: int = 0
    #: Dead letters this run found, rejected lines included.
    dead_letters: int = 0
    #: Of those, already in the dead-letter file (an earlier run's): not appended again.
    dead_letters_known: int = 0
    dead_letter_path: Path | None = None
    compressed_words: int = 0
    original_words: int = 0
    #: Ids of the letters in the dead-letter file (read at the first dead letter).
    _letter_ids: set[str] | None = field(default=None, repr=False)


@dataclass
class ConsolidationReport:
    entries: int = 0
    targets: int = 0
    updated: int = 0
    deleted: int = 0
    ignored: int = 0
    #: Targets that already reflect every newer entry (an earlier run merged them): no call.
    reflected: int = 0
    failed: int = 0


@dataclass
class RuntimeStats:
    path: Path
    entries: dict[tuple[str, str], int]
    usage: dict[tuple[str, str], UsageTotals]
    turns: int
    open_buffers: int
    dead_letters: int
    changes: dict[str, int]

    def as_json(self) -> dict[str, Any]:
        return {
            "data": str(self.path),
            "memories": [{"tenant": t, "user": u, "count": n} for (t, u), n in
                         sorted(self.entries.items())],
            "llm_usage": [{"purpose": s, "tenant": t, **vars(v)} for (s, t), v in
                          sorted(self.usage.items())],
            "turns_processed": self.turns,
            "open_buffers": self.open_buffers,
            "dead_letters": self.dead_letters,
            "changes": self.changes,
        }



class EmbeddedRuntime(Components):
    """LightMem in one process over one SQLite file under ``settings.data_dir``.

    Models load lazily: ``stats`` and ``history`` never touch them, ``search`` loads only
    the encoder.

    Args:
        settings: Configuration.
        chat: A chat model to use instead of the one ``settings`` describes (tests).
        clock: Source of "now" for ingest times and changes.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        chat: ChatModel | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        super().__init__(settings, chat=chat)
        self.clock = clock
        self._persisted_usage: dict[tuple[str, str], UsageTotals] = {}

    # -- lazily built parts

    @cached_property
    def store(self) -> EmbeddedStore:
        return EmbeddedStore(self.settings.data_dir / "lightmem.db", dim=MINILM_DIM)

    @property
    def mode(self) -> str:
        return self.summarizer.mode.value

    # -- ingest

    def ingest_file(
        self,
        path: Path,
        *,
        flush: bool = True,
        dead_letter_path: Path | None = None,
        on_progress: Callable[[int], None] = lambda n: None,
    ) -> IngestReport:
        """Ingest a JSONL file of turn events.

        Args:
            path: One TurnEvent JSON object per line (blank lines are ignored).
            flush: Flush every conversation's buffers at the end (default True).
            dead_letter_path: Where rejected lines go (default ``DATA_DIR/dead-letters.jsonl``).
            on_progress: Called with the number of lines just handled.

        Returns:
            The report; ``rejected`` lists every bad line with its reason.
        """
        with path.open("rb") as f:
            return self.ingest_lines(
                enumerate(f, start=1),
                # Absolute: a dead letter's identity includes its source file, whatever the
                # directory the command ran from.
                source=str(path.resolve()),
                flush=flush,
                dead_letter_path=dead_letter_path,
                on_progress=on_progress,
            )

    def ingest_lines(
        self,
        lines: Iterable[tuple[int, bytes]],
        *,
        source: str,
        flush: bool = True,
        dead_letter_path: Path | None = None,
        on_progress: Callable[[int], None] = lambda n: None,
    ) -> IngestReport:
        """Ingest numbered raw lines (see :meth:`ingest_file`)."""
        report = IngestReport(mode=self.mode)
        report.dead_letter_path = dead_letter_path or self.settings.data_dir / "dead-letters.jsonl"
        batch: list[TurnEvent] = []
        for number, raw in lines:
            report.lines += 1
            if raw.strip():
                try:
                    batch.append(parse_turn(raw, now=self.clock(),
                                            max_future_s=self.settings.max_event_time_skew_s))
                except SchemaError as exc:
                    report.rejected.append(RejectedLine(number, str(exc)))
                    self._dead_letter(
                        report,
                        DeadLetter.from_raw(raw.rstrip(b"\r\n"), step="parse", error=exc,
                                            source=source, offset=number, at=self.clock()),
                    )
            if len(batch) >= self.settings.ingest_batch_turns:
                self._apply_batch(batch, report)
                on_progress(len(batch))
                batch = []
        if batch:
            self._apply_batch(batch, report)
            on_progress(len(batch))
        # Rejected and blank lines advance the bar too.
        on_progress(report.lines - report.processed - report.skipped)
        if flush:
            self.flush(report)
        return report

    def _dead_letter(self, report: IngestReport, letter: DeadLetter) -> None:
        report.dead_letters += 1
        path = report.dead_letter_path or self.settings.data_dir / "dead-letters.jsonl"
        if report._letter_ids is None:
            report._letter_ids = _letter_ids_in(path)
        letter_id = dead_letter_id(letter)
        if letter_id in report._letter_ids:
            report.dead_letters_known += 1
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as f:
                f.write(letter.to_json() + "\n")
            report._letter_ids.add(letter_id)
        # Also in the database (once per id), for `lightmem stats`; parse failures happen
        # outside a batch transaction and commit on their own.
        self.store.add_dead_letter(letter)

    def _apply_batch(self, batch: Sequence[TurnEvent], report: IngestReport) -> None:
        from lightmem.processors.erasure import ErasureLedger, to_ms
        from lightmem.streams.embedded.erasure import erasures_of

        # Erased scopes stay erased: a turn of one, written (event time) before its erasure,
        # is dropped (re-ingesting an old file does not bring it back); later turns are a
        # new beginning. The embedded store has no produce time: the event time stands in.
        erasures = ErasureLedger(erasures_of(self.store))
        fresh: list[TurnEvent] = []
        in_batch: set[tuple[str, str]] = set()
        for ev in batch:
            key = (ev.conversation_key, ev.turn_id)
            if erasures and erasures.drops(ev.tenant, ev.user, to_ms(ev.event_time)):
                report.skipped += 1
                report.erased += 1
            elif key in in_batch or self.store.seen(*key):
                report.skipped += 1
            else:
                in_batch.add(key)
                fresh.append(ev)
        if not fresh:
            return
        # Compression is the expensive model step: batched across every turn of the batch.
        compressed = self.compressor.compress([ev.text for ev in fresh])
        # Arrival order of the turns (SegmentTurn.seq): the ledger only grows, so its count
        # numbers every turn ever ingested here.
        first_seq = self.store.turns_seen()
        with self.store.transaction():
            states: dict[str, SensoryBufferState | None] = {}
            for i, (ev, comp) in enumerate(zip(fresh, compressed, strict=True)):
                key = ev.conversation_key
                if key not in states:
                    states[key] = self._load_sensory(key)
                segments, states[key] = push(
                    states[key],
                    ev,
                    to_segment_turn(ev, comp.compressed, seq=first_seq + i),
                    buffer=self.sensory_buffer,
                    segmenter=self.segmenter,
                    idle_timeout=self.idle_timeout,
                )
                for segment in segments:
                    self._short_term(segment, report)
                self.store.mark_seen(key, ev.turn_id)
                report.processed += 1
                report.original_words += len(comp.original.split())
                report.compressed_words += len(comp.compressed.split())
            for key, state in states.items():
                self._save_sensory(key, state)
            self._flush_idle(max(ev.event_time for ev in fresh), exclude=set(states), report=report)
            self._persist_usage()

    def _short_term(self, segment: Segment, report: IngestReport) -> None:
        """Topic buffer for one closed segment; summarize whatever it releases."""
        report.segments += 1
        key = segment.conversation_key
        state = self._load_topic(key) or TopicBufferState.for_segment(segment)
        state, batches = self.topic_buffer.push(state, segment)
        for segments in batches:
            self._summarize(segments, report)
        self._save_topic(key, state)

    def _summarize(self, segments: Sequence[Segment], report: IngestReport) -> None:
        now = self.clock()
        result = self.summarizer.summarize(segments, now=now)
        if result.dead_letter is not None:
            self._dead_letter(report, result.dead_letter)
        if result.entries:
            entries = self.embedder.embed_entries(result.entries)
            self.store.upsert(entries)
            self.store.append_changes([added_change(e, now) for e in entries])
            report.entries += len(entries)

    def _flush_idle(self, stream_time: datetime, *, exclude: set[str],
                    report: IngestReport) -> None:
        """Close conversations silent for longer than the idle timeout (in event time)."""
        for key in self.store.buffer_keys(SENSORY):
            if key in exclude:
                continue
            state = self._load_sensory(key)
            if state is not None and should_flush(
                state, now=stream_time, idle_timeout=self.idle_timeout
            ):
                self._flush_conversation(key, report)

    def flush(self, report: IngestReport | None = None, *,
              conversations: Iterable[str] | None = None) -> IngestReport:
        """Explicit flush: close every conversation's sensory and topic buffers (only those
        of the conversation keys in ``conversations``, when given)."""
        report = report or IngestReport(mode=self.mode)
        with self.store.transaction():
            keys = set(self.store.buffer_keys(SENSORY)) | set(self.store.buffer_keys(TOPIC))
            if conversations is not None:
                keys &= set(conversations)
            for key in sorted(keys):
                self._flush_conversation(key, report)
            self._persist_usage()
        return report

    def _flush_conversation(self, key: str, report: IngestReport) -> None:
        state = self._load_sensory(key)
        if state is not None and state.turns:
            segments, state = self.segmenter.cut(state, flush=True)
            for segment in segments:
                self._short_term(segment, report)
        self._save_sensory(key, None)
        topic = self._load_topic(key)
        if topic is not None:
            segments, _ = self.topic_buffer.drain(topic)
            if segments:
                self._summarize(segments, report)
        self._save_topic(key, None)

    # -- buffer persistence

    def _load_sensory(self, key: str) -> SensoryBufferState | None:
        body = self.store.load_buffer(SENSORY, key)
        return None if body is None else SensoryBufferState.model_validate_json(body)

    def _save_sensory(self, key: str, state: SensoryBufferState | None) -> None:
        empty = state is None or not state.turns
        self.store.save_buffer(SENSORY, key, None if empty else state.model_dump_json())

    def _load_topic(self, key: str) -> TopicBufferState | None:
        body = self.store.load_buffer(TOPIC, key)
        return None if body is None else TopicBufferState.model_validate_json(body)

    def _save_topic(self, key: str, state: TopicBufferState | None) -> None:
        empty = state is None or state.is_empty
        self.store.save_buffer(TOPIC, key, None if empty else state.model_dump_json())

    def _persist_usage(self) -> None:
        """Write the usage recorded since the last call (inside the caller's transaction)."""
        chat = self.chat
        if chat is None:
            return
        delta = UsageMeter()
        for key, now in chat.meter.by_key().items():
            before = self._persisted_usage.get(key, UsageTotals())
            delta.merge(*key, UsageTotals(
                calls=now.calls - before.calls,
                prompt_tokens=now.prompt_tokens - before.prompt_tokens,
                completion_tokens=now.completion_tokens - before.completion_tokens,
                latency_s=now.latency_s - before.latency_s,
                errors=now.errors - before.errors,
            ))
        self.store.add_usage(delta)
        self._persisted_usage = chat.meter.by_key()

    def usage_this_run(self) -> dict[tuple[str, str], UsageTotals]:
        """LLM usage recorded by this process so far."""
        return {} if self.chat is None else self.chat.meter.by_key()

    # -- retrieval

    @cached_property
    def retriever(self) -> Retriever:
        return Retriever(self.store, self.embedder, k=self.settings.retrieve_k,
                         mode=self.settings.retrieval, render_text=self.settings.render_text)

    def search(self, tenant: str, user: str, query: str, k: int | None = None) -> list[ScoredEntry]:
        """Search (tenant, user) the configured way (LIGHTMEM_RETRIEVAL: knn or hybrid)."""
        return self.retriever.search(tenant, user, query, k)

    def answer(self, tenant: str, user: str, question: str,
               hits: Sequence[ScoredEntry]) -> Answer:
        """Answer from the hits (LLM when configured, else the best memories, labelled)."""
        answer = self.retriever.answer(question, hits, self.chat, tenant=tenant)
        with self.store.transaction():
            self._persist_usage()
        return answer

    # -- sleep-time consolidation

    def consolidate(
        self,
        *,
        tenant: str | None = None,
        on_total: Callable[[int], None] = lambda n: None,
        on_progress: Callable[[int], None] = lambda n: None,
    ) -> ConsolidationReport:
        """Build update queues for every entry, then revisit each target once (one LLM
        call per target), applying update/delete/ignore with optimistic concurrency.

        Args:
            tenant: Only this tenant's scopes (None = all).
            on_total: Called once with the number of targets.
            on_progress: Called per target done.
        """
        if self.chat is None:
            raise RuntimeError("consolidation needs an LLM endpoint (LIGHTMEM_LLM_BASE_URL)")
        consolidator = Consolidator(self.chat, threshold=self.settings.update_threshold)
        builder = UpdateQueueBuilder(self.settings.update_top_k, self.settings.update_keep)
        report = ConsolidationReport()
        work: list[tuple[str, list[str]]] = []
        for scope_entries in self._scopes(tenant):
            report.entries += len(scope_entries)
            queues = build_queues(self.store, builder, scope_entries, self.embedder)
            by_id = {e.id: e for e in scope_entries}
            targets = targets_from_queues(queues, by_id, self.settings.update_threshold)
            work += [(t, [n for n, _ in newer]) for t, newer in targets.items()]
        report.targets = len(work)
        on_total(len(work))
        for target_id, newer_ids in work:
            try:
                # The sleep workers' function: a second run does not merge an entry again.
                outcome = consolidate_pending(self.store, consolidator, self.embedder,
                                              target_id, newer_ids, self.clock())
            except (LLMError, VersionConflict) as exc:
                # One target's failure must not stop the others; it is retried next window.
                log.warning("consolidation of %s failed: %s", target_id, exc)
                report.failed += 1
                change = None
            else:
                change = outcome.change
                if outcome.skipped == "reflected":
                    report.reflected += 1
                elif change is None:
                    report.ignored += 1
                elif change.op is ChangeOp.update:
                    report.updated += 1
                else:
                    report.deleted += 1
            with self.store.transaction():
                if change is not None:
                    self.store.append_changes([change])
                self._persist_usage()
            on_progress(1)
        return report

    def _scopes(self, tenant: str | None) -> Iterator[list[MemoryEntry]]:
        for t, u in sorted(self.store.count_entries()):
            if tenant is None or t == tenant:
                yield list(self.store.iter_entries(t, u, with_embedding=True))

    # -- stats

    def stats(self) -> RuntimeStats:
        """Memories, LLM usage, buffers and dead letters recorded in the data directory."""
        return RuntimeStats(
            path=self.store.path,
            entries=self.store.count_entries(),
            usage=self.store.usage(),
            turns=self.store.turns_seen(),
            open_buffers=len(self.store.buffer_keys(SENSORY)),
            dead_letters=len(self.store.dead_letters()),
            changes=self.store.change_counts(),
        )


def _letter_ids_in(path: Path) -> set[str]:
    """Ids of the dead letters a dead-letter file holds (lines that are not one: skipped)."""
    ids: set[str] = set()
    if not path.exists():
        return ids
    with path.open("rb") as f:
        for line in f:
            try:
                ids.add(dead_letter_id(DeadLetter.parse(line)))
            except SchemaError:
                continue
    return ids
