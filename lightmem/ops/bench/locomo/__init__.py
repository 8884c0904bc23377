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
runtime's parts are wrapped to time each phase. The sensory stage (compress + segment) only
depends on the compression rate, so its results are computed once per rate and reused by
every system with that rate; the reused phase is charged the time it took when computed
(reported as ``shared_phases``).

Each system's memory is searched with every retrieval mode asked for (``--retrieval``,
default both): ``knn`` (vector only) and ``hybrid`` (kNN + BM25 fused, see
:mod:`lightmem.processors.retrieve`); memory is built once per system and searched per mode.
The extractive system is built once per ``--embed-text`` choice (what the index embeds: the
compressed turn or the original one) and its hits scored with every ``--render-text``
choice (what the lines show); ``--topic-context N`` scores the same hits with N memories of
each hit's topic segment after each of the best ``--context-hits`` hits (LightMem systems;
see :mod:`lightmem.processors.entry_text` and :mod:`lightmem.processors.topic_context`).
Variants of one build searched one way share one search per question (and its latency).

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
  time per phase (compress, segment, summarize/extract, embed+index, retrieve);
- the ratios LightMem / per-turn for calls and tokens.

``--answer`` also answers each question from the memories within ``--answer-words`` and has
the LLM judge the answer CORRECT/WRONG against the gold one; it needs a real endpoint.

Evidence ids are normalised (``"D8:6; D9:17"`` is two ids, ``"D:11:26"`` is ``D11:26``);
ids naming no turn of the conversation are dropped, and questions left with no evidence are
skipped (both counted in the report).

The package: :mod:`.data` (questions and evidence), :mod:`.recall` (the metrics and answer
judging), :mod:`.systems` (the compared systems, their timed builds, their results),
:mod:`.report` (aims, markdown, JSON, plot), :mod:`.run` (the run and the CLI command). Wall
time is kept per *phase* (compress, segment, summarize, embed+index, retrieve): "stage"
names the pipeline's stages.
"""

from __future__ import annotations

from lightmem.ops.bench.locomo.data import (
    CATEGORIES,
    Question,
    QuestionStats,
    load_questions,
    parse_evidence,
    select_questions,
    unit_segments,
)
from lightmem.ops.bench.locomo.probes import PHASES, PhaseClock
from lightmem.ops.bench.locomo.recall import (
    BUDGET_RULE,
    CONTENT_RULE,
    DEFAULT_BUDGETS,
    DEFAULT_KS,
    RecallAccumulator,
    Retrieved,
    content_recall,
    content_recall_at_budget,
    evidence_recall,
    judge_answer,
    parse_verdict,
    recall_at_budget,
    recall_at_k,
    session_of,
    session_recall,
    session_recall_at_k,
    top_k,
    within_budget,
)
from lightmem.ops.bench.locomo.report import BenchReport, render_markdown, write_outputs
from lightmem.ops.bench.locomo.run import StubRefused, locomo_command, run_locomo_bench
from lightmem.ops.bench.locomo.systems import (
    DEFAULT_RETRIEVAL,
    SYSTEM_KINDS,
    BenchConfig,
    SystemBuilder,
    SystemResult,
    SystemSpec,
)

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
    "PHASES",
    "PhaseClock",
    "CONTENT_RULE",
    "load_questions",
    "unit_segments",
    "QuestionStats",
    "SystemBuilder",
    "RecallAccumulator",
    "DEFAULT_RETRIEVAL",
    "SYSTEM_KINDS",
]
