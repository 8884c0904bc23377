"""The embedded runtime's commands: ``lightmem ingest | search | consolidate | stats | history |
demo`` (one process over SQLite, no servers; ``--stream`` variants reach Kafka/Elasticsearch).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lightmem.settings import Settings, load_settings

from . import sleep as sleep_cli
from . import stream as stream_cli

app = typer.Typer()

err = Console(stderr=True)
out = Console()


DataDir = Annotated[
    Path | None, typer.Option("--data-dir", help="Embedded data directory (env LIGHTMEM_DATA_DIR)")
]
LlmUrl = Annotated[
    str | None,
    typer.Option(
        "--llm-base-url",
        help="OpenAI-compatible endpoint; none = extractive mode (env LIGHTMEM_LLM_BASE_URL)",
    ),
]
Tenant = Annotated[str, typer.Option("--tenant", help="Tenant of the memory scope")]


def _runtime(settings: Settings):  # noqa: ANN202 - imported lazily: keeps `--help` fast
    from lightmem.streams.embedded.runtime import EmbeddedRuntime

    return EmbeddedRuntime(settings)


def _progress() -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    )


def _print_usage(usage: dict, title: str = "LLM usage") -> None:
    table = Table(title=title)
    for col in ("purpose", "tenant", "calls", "prompt tok", "completion tok", "latency s",
                "errors"):
        table.add_column(col)
    for (purpose, tenant), t in sorted(usage.items()):
        table.add_row(purpose, tenant, str(t.calls), str(t.prompt_tokens),
                      str(t.completion_tokens), f"{t.latency_s:.2f}", str(t.errors))
    if not usage:
        table.add_row("-", "-", "0", "0", "0", "0.00", "0")
    err.print(table)


def _print_tenants(entries: dict, usage: dict) -> None:
    """Per tenant: users, memories, LLM calls and tokens (the embedded store has no lag:
    ingest is synchronous; buffered turns are reported below)."""
    rows: dict[str, list[int]] = {}
    for (tenant, _), n in entries.items():
        r = rows.setdefault(tenant, [0, 0, 0, 0, 0])
        r[0] += 1
        r[1] += n
    for (_, tenant), t in usage.items():
        r = rows.setdefault(tenant, [0, 0, 0, 0, 0])
        r[2] += t.calls
        r[3] += t.prompt_tokens
        r[4] += t.completion_tokens
    table = Table(title="per tenant")
    for col in ("tenant", "users", "memories", "LLM calls", "prompt tok", "completion tok"):
        table.add_column(col, justify="left" if col == "tenant" else "right")
    for tenant, r in sorted(rows.items()):
        table.add_row(tenant, *map(str, r))
    err.print(table)


def _ingest(runtime, path: Path, *, flush: bool, dead_letters: Path | None) -> int:  # noqa: ANN001
    """Ingest one JSONL file with a progress bar; return the process exit code."""
    from lightmem.processors.llm import LLMError

    total = sum(1 for _ in path.open("rb"))
    try:
        with _progress() as progress:
            task = progress.add_task(f"ingest {path.name}", total=total)
            report = runtime.ingest_file(
                path,
                flush=flush,
                dead_letter_path=dead_letters,
                on_progress=lambda n: progress.update(task, advance=n),
            )
    except LLMError as exc:
        # Transient (endpoint down) or configuration (bad key/model): the batch in flight
        # was rolled back, committed batches stay; a re-run continues from there.
        err.print(f"[red]ingest stopped[/red]: {type(exc).__name__}: {exc}")
        err.print("committed turns are kept; fix the endpoint and run the same command again")
        return 1
    for bad in report.rejected:
        err.print(f"[red]{path}:{bad.line}[/red] {bad.reason}")
    err.print(
        f"turns read {report.lines}, processed {report.processed}, already seen "
        f"{report.skipped}, rejected {len(report.rejected)}; segments {report.segments}, "
        f"memories written {report.entries}, dead letters {report.dead_letters} "
        f"[{report.mode} mode]"
    )
    if report.dead_letter_path is not None and report.dead_letters:
        new = report.dead_letters - report.dead_letters_known
        known = f" ({report.dead_letters_known} already there)" if report.dead_letters_known else ""
        err.print(f"dead letters appended to {report.dead_letter_path}: {new}{known}")
    return 1 if report.rejected or report.dead_letters else 0


@app.command()
def ingest(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="TurnEvent JSONL")],
    data_dir: DataDir = None,
    llm_base_url: LlmUrl = None,
    flush: Annotated[
        bool,
        typer.Option(help="Flush every conversation's buffers at the end of the file; "
                     "--no-flush keeps open buffers for the next ingest"),
    ] = True,
    dead_letters: Annotated[
        Path | None, typer.Option(help="Dead-letter JSONL [default: DATA_DIR/dead-letters.jsonl]")
    ] = None,
) -> None:
    """Ingest turn events from a JSONL file into the embedded memory (re-runs continue)."""
    runtime = _runtime(load_settings(data_dir=data_dir, llm_base_url=llm_base_url))
    code = _ingest(runtime, file, flush=flush, dead_letters=dead_letters)
    _print_usage(runtime.usage_this_run(), "LLM usage (this run)")
    raise typer.Exit(code)


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="What to look for")],
    user: Annotated[str, typer.Option("--user", help="User of the memory scope")],
    tenant: Tenant = "default",
    k: Annotated[int, typer.Option("-k", min=1, help="Memories to return")] = 10,
    answer: Annotated[bool, typer.Option(help="Answer the query from the memories")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines on stdout")] = False,
    data_dir: DataDir = None,
    llm_base_url: LlmUrl = None,
) -> None:
    """Search one user's memories (kNN within the tenant/user scope)."""
    runtime = _runtime(load_settings(data_dir=data_dir, llm_base_url=llm_base_url))
    hits = runtime.search(tenant, user, query, k=k)
    if as_json:
        # JSON lines, as the help says: one compact object per line, so `jq -c`, `wc -l` and
        # line-by-line readers work (rich's print_json indents over many lines).
        for h in hits:
            typer.echo(json.dumps({"score": h.score, **h.entry.model_dump(
                mode="json", exclude={"embedding"})}, ensure_ascii=False))
    else:
        from lightmem.processors.retrieve import render

        for h in hits:
            out.print(f"{h.score:.3f}  {render(h.entry, runtime.settings.render_text)}",
                      markup=False, highlight=False)
    if not hits:
        err.print(f"no memories for {tenant}/{user}")
    if answer:
        result = runtime.answer(tenant, user, query, hits)
        if as_json:  # the answer is one more line, so the output stays JSON lines
            typer.echo(json.dumps({"answer": result.text, "mode": result.mode},
                                  ensure_ascii=False))
        else:
            out.print(f"answer ({result.mode}): {result.text}", markup=False, highlight=False)


@app.command()
def consolidate(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant")] = None,
    threshold: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="Queue score to revisit a target")
    ] = None,
    data_dir: DataDir = None,
    llm_base_url: LlmUrl = None,
) -> None:
    """Consolidate the embedded memory (the sleep-time update): update queues, then one LLM
    call per target."""
    settings = load_settings(
        data_dir=data_dir, llm_base_url=llm_base_url, update_threshold=threshold
    )
    if not settings.llm_configured:
        err.print("[red]consolidate needs an LLM[/red]: set --llm-base-url or "
                  "LIGHTMEM_LLM_BASE_URL (extractive memories are never rewritten)")
        raise typer.Exit(1)
    runtime = _runtime(settings)
    with _progress() as progress:
        task = progress.add_task("consolidate", total=None)
        report = runtime.consolidate(
            tenant=tenant,
            on_total=lambda n: progress.update(task, total=n),
            on_progress=lambda n: progress.update(task, advance=n),
        )
    err.print(
        f"entries {report.entries}, targets {report.targets}, updated {report.updated}, "
        f"deleted {report.deleted}, ignored {report.ignored}, already merged "
        f"{report.reflected}, failed {report.failed}"
    )
    _print_usage(runtime.usage_this_run(), "LLM usage (this run)")
    raise typer.Exit(1 if report.failed else 0)


@app.command()
def stats(
    data_dir: DataDir = None,
    stream: Annotated[bool, typer.Option(
        "--stream", help="The streaming deployment (Elasticsearch, Kafka lag, the workers' "
        "/metrics) instead of the embedded store")] = False,
    topic_prefix: stream_cli.PrefixOpt = None,
    ingest_group: Annotated[str | None, typer.Option(
        "--ingest-group", "--app-id", help="--stream: the ingest workers' consumer group "
        "(--app-id: old name) (env LIGHTMEM_INGEST_GROUP)")]
    = None,
    metrics_url: Annotated[list[str] | None, typer.Option(
        "--metrics-url", help="--stream: a worker's /metrics URL (repeatable); LLM spend is "
        "summed over them")] = None,
) -> None:
    """Per tenant: memories, LLM spend and lag (the embedded store, or --stream).

    Also memories per scope, LLM spend per purpose, and buffered turns and dead letters
    (embedded) or the consumer lag per partition (--stream). Tables on stderr, JSON on stdout.
    """
    if stream:
        stream_cli.print_stream_stats(topic_prefix=topic_prefix, ingest_group=ingest_group,
                                      metrics_urls=metrics_url or [])
        return
    runtime = _runtime(load_settings(data_dir=data_dir))
    s = runtime.stats()
    _print_tenants(s.entries, s.usage)
    table = Table(title=f"memories ({s.path})")
    table.add_column("tenant")
    table.add_column("user")
    table.add_column("memories", justify="right")
    for (tenant, user), n in sorted(s.entries.items()):
        table.add_row(tenant, user, str(n))
    err.print(table)
    _print_usage(s.usage, "LLM usage (all runs)")
    err.print(
        f"turns processed {s.turns}, conversations with buffered turns {s.open_buffers}, "
        f"dead letters {s.dead_letters}, changes {s.changes}"
    )
    out.print_json(data=s.as_json())


@app.command()
def history(
    memory_id: Annotated[str, typer.Argument(help="Memory id")], data_dir: DataDir = None,
    stream: Annotated[bool, typer.Option(
        "--stream", help="Read the memory-changes topic of the streaming deployment "
        "(LIGHTMEM_KAFKA_*) instead of the embedded store")] = False,
    topic_prefix: Annotated[str | None, typer.Option(
        "--topic-prefix", help="Topic prefix (with --stream)")] = None,
) -> None:
    """Every recorded change (add/update/delete) of one memory, oldest first."""
    if stream:
        changes = sleep_cli.stream_history(memory_id, topic_prefix)
    else:
        changes = _runtime(load_settings(data_dir=data_dir)).store.history(memory_id)
    if not changes:
        err.print(f"no changes recorded for {memory_id}")
        raise typer.Exit(1)
    for c in changes:
        # One JSON object per line: rich would wrap long records at the terminal width.
        typer.echo(c.to_json())


@app.command()
def demo(
    data_dir: DataDir = None,
    llm_base_url: LlmUrl = None,
    keep: Annotated[bool, typer.Option(help="Keep the previous demo data instead of resetting")]
    = False,
) -> None:
    """Ingest the bundled sample conversation, print the memories, cost and a few answers."""
    from importlib.resources import files

    settings = load_settings(data_dir=data_dir or Path(".lightmem/demo"), llm_base_url=llm_base_url)
    if not keep and settings.data_dir.exists():
        shutil.rmtree(settings.data_dir)
    data = files("lightmem.ops") / "data"
    turns = Path(str(data / "demo_turns.jsonl"))
    questions = json.loads((data / "demo_questions.json").read_text())
    mode = "LLM fact extraction" if settings.llm_configured else "extractive (no LLM configured)"
    err.rule(f"LightMem demo: {mode}")
    runtime = _runtime(settings)
    code = _ingest(runtime, turns, flush=True, dead_letters=None)

    from lightmem.processors.retrieve import render

    err.rule("memory entries")
    for entry in runtime.store.iter_entries():
        out.print(f"{render(entry, settings.render_text)}   "
                  f"[dim]({entry.speaker}, topic {entry.topic_id[:8]})[/dim]", highlight=False)
    err.rule("LLM calls and tokens")
    _print_usage(runtime.usage_this_run())
    err.rule("questions answered from memory")
    for q in questions:
        hits = runtime.search("default", "alice", q["question"], k=3)
        result = runtime.answer("default", "alice", q["question"], hits)
        out.print(f"[bold]Q:[/bold] {q['question']}", highlight=False)
        out.print(f"A ({result.mode}): {result.text}", markup=False, highlight=False)
    err.print(f"data in {settings.data_dir}; try: lightmem search --user alice "
              f"--data-dir {settings.data_dir} \"dog\"")
    raise typer.Exit(code)
