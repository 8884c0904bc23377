"""``bench locomo``'s run: every system built and searched every way, and the CLI command."""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lightmem.ops.bench.locomo_data import DEFAULT_LOCOMO
from lightmem.processors.entry_text import ENTRY_TEXTS, EntryText
from lightmem.processors.llm import ChatModel
from lightmem.settings import Settings, load_settings

if TYPE_CHECKING:
    pass

from lightmem.ops.bench.locomo.data import load_questions
from lightmem.ops.bench.locomo.report import BenchReport, render_markdown, write_outputs
from lightmem.ops.bench.locomo.systems import (
    DEFAULT_RETRIEVAL,
    SYSTEM_KINDS,
    BenchConfig,
    SystemBuilder,
    SystemResult,
    settings_summary,
)

STUB_NOTE = (
    "no LLM endpoint configured (LIGHTMEM_LLM_BASE_URL): the LLM systems ran against the "
    "in-repo OpenAIStubServer with fact_extraction_responder, whose 'facts' restate each "
    "turn (`<speaker> said: <text>`). Their recall measures the protocol, not extraction "
    "quality; calls are real HTTP calls; tokens are counted in words by the stub."
)


class StubRefused(RuntimeError):
    """``--answer`` was asked for with no real LLM endpoint configured."""


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


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
        "compressor": config.compressors[0] if config.compressors else settings.compressor,
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

    samples, questions, qstats = load_questions(
        config.data, limit_conversations=config.limit_conversations,
        limit_turns=config.limit_turns, limit_questions=config.limit_questions)
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
        eval_chat = eval_chat_model(settings) if config.answer else None
        bench = SystemBuilder(config, settings, workdir, console)
        backend_names = bench.compressor_backends
        results: list[SystemResult] = []
        with progress_bar(console) as progress:
            for spec in specs:
                rt, built = bench.build(spec, samples, progress)
                try:
                    for mode in config.retrieval:
                        # Same memory, searched another way: the build figures are shared.
                        variants = [v for v in config.variants(built) if v.retrieval == mode]
                        bench.evaluate(rt, variants, samples, questions, progress, eval_chat)
                        results += variants
                        for result in variants:
                            console.print(  # plain text: "[knn]" is not rich markup
                                f"{result.name}: {result.entries} entries, "
                                f"{result.llm.calls} LLM calls, "
                                f"R@10 {result.recall_at_k.get(10, float('nan')):.3f}, "
                                f"C@512w "
                                f"{result.content_recall_at_words.get(512, float('nan')):.3f}"
                                f" ({result.build_wall_s:.1f} s build, search p50 "
                                f"{result.search_ms.get('p50', float('nan')):.1f} ms)",
                                markup=False,
                            )
                finally:
                    rt.store.close()
    return BenchReport(
        config=config,
        settings=settings_summary(settings, config, backend_names),
        llm=llm,
        conversations=[s.sample_id for s in samples],
        turns=sum(len(s.turns) for s in samples),
        question_stats=qstats,
        systems=results,
        wall_s=time.perf_counter() - t0,
        eval_llm=None if eval_chat is None else eval_chat.meter.total(),
    )


def eval_chat_model(settings: Settings) -> ChatModel:
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


def _texts(text: str, name: str) -> tuple[EntryText, ...]:
    values = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    if not values or any(v not in ENTRY_TEXTS for v in values):
        raise typer.BadParameter(f"expected {' and/or '.join(ENTRY_TEXTS)}, got {text!r}",
                                 param_hint=name)
    return values  # type: ignore[return-value]


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
        str | None, typer.Option(help="Compressors, comma-separated, each LightMem system built "
                                    "with each: minilm | entropy | llmlingua2 | none (default: "
                                    "the setting, LIGHTMEM_COMPRESSOR)")
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
    embed_text: Annotated[
        str | None, typer.Option(help="What the extractive system embeds, side by side: "
                                      "compressed,original (default: settings)")
    ] = None,
    render_text: Annotated[
        str | None, typer.Option(help="What the extractive system shows, side by side: "
                                      "compressed,original (default: settings)")
    ] = None,
    topic_context: Annotated[
        str, typer.Option(help="Topic-context memories per hit, side by side, e.g. 0,2 "
                               "(LightMem systems)")
    ] = "0",
    context_hits: Annotated[
        int, typer.Option(min=1, help="How many of the best hits bring topic context")
    ] = 3,
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
    from lightmem.streams.models.causal_lm import COMPRESSION_BACKENDS

    compressors = tuple(dict.fromkeys(
        c.strip() for c in (compressor or "").split(",") if c.strip()))
    if compressor is not None and (
        not compressors or any(c not in COMPRESSION_BACKENDS for c in compressors)
    ):
        raise typer.BadParameter(f"expected some of {', '.join(COMPRESSION_BACKENDS)}; got "
                                 f"{compressor!r}", param_hint="--compressor")
    modes = tuple(dict.fromkeys(m.strip() for m in retrieval.split(",") if m.strip()))
    if not modes or any(m not in ("knn", "hybrid") for m in modes):
        raise typer.BadParameter(f"expected knn and/or hybrid, got {retrieval!r}",
                                 param_hint="--retrieval")
    embed_texts = _texts(embed_text, "--embed-text") if embed_text else (base.embed_text,)
    render_texts = _texts(render_text, "--render-text") if render_text else (base.render_text,)
    contexts = tuple(dict.fromkeys(_ints(topic_context, "--topic-context", low=0)))
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
        compressors=compressors,
        systems=kinds,
        per_turn_unit="turn" if per_turn_unit == "turn" else "exchange",
        answer=answer,
        answer_words=answer_words,
        threads=threads,
        retrieval=tuple(m for m in modes if m in ("knn", "hybrid")),  # type: ignore[misc]
        embed_texts=embed_texts,
        render_texts=render_texts,
        topic_context=contexts,
        context_hits=context_hits,
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

