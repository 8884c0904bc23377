"""The streaming deployment's commands: topics, producing, the worker, flushes, backfill
(the dead-letter topic's in :mod:`.dlq`).

::

    lightmem topics create               create the pipeline topics (idempotent)
    lightmem topics migrate-changes [--dry-run] [--delete-old]
                                         copy the memory-changes topic v1 into v2 (erasable)
    lightmem produce FILE.jsonl          produce turn events (bad lines -> DLQ, exit 1)
    lightmem flush [--tenant --conversation]
                                         in-band flush command on the turns topic
    lightmem worker                      run the ingest worker (all three stages)
    lightmem dlq list | replay           the dead-letter topic (:mod:`.dlq`)
    lightmem replay --from earliest|ISO --index NEW
                                         backfill a new index; then `lightmem index promote`

Connection and security settings come from the environment (``LIGHTMEM_KAFKA_*``,
``LIGHTMEM_ES_*``, see ``lightmem.settings``). ``--topic-prefix`` puts every topic under a
prefix (one deployment or test run per prefix).

Exit codes: 0 success, 1 the operation failed (or some input was rejected), 2 usage error.
Progress and errors go to stderr; data (``dlq list``) to stdout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lightmem.settings import Settings, load_settings

__all__ = ["topics_app", "produce", "flush", "worker", "replay"]

topics_app = typer.Typer(help="Kafka topics of the pipeline.", no_args_is_help=True)

PrefixOpt = Annotated[
    str | None,
    typer.Option("--topic-prefix", help="Prefix of every topic name (env "
                 "LIGHTMEM_KAFKA_TOPIC_PREFIX)."),
]
BootstrapOpt = Annotated[
    str | None, typer.Option("--bootstrap", help="Kafka bootstrap servers (env "
                             "LIGHTMEM_KAFKA_BOOTSTRAP)."),
]
MetricsPortOpt = Annotated[
    int | None, typer.Option("--metrics-port", min=0, max=65535,
                             help="Serve Prometheus /metrics on this port (127.0.0.1 unless "
                             "LIGHTMEM_METRICS_ADDR); 0 = off (env LIGHTMEM_METRICS_PORT)."),
]
LogFormatOpt = Annotated[
    str | None, typer.Option("--log-format", help="text | json (one JSON object per line) "
                             "(env LIGHTMEM_LOG_FORMAT)."),
]


def _err() -> Console:
    # Built per call so that CliRunner's captured stderr is the one written to.
    return Console(stderr=True)


def _settings(**overrides: object) -> Settings:
    try:
        return load_settings(**overrides)
    except ValidationError as exc:
        _err().print(f"[red]error:[/red] invalid settings: {exc}", highlight=False)
        raise typer.Exit(2) from None


def _topics(settings: Settings, prefix: str | None):  # noqa: ANN202 - lazy import
    from lightmem.streams.kafka.topics import Topics

    return Topics.from_settings(settings, prefix)


# -- topics ----------------------------------------------------------------------------------


@topics_app.command("create")
def topics_create(topic_prefix: PrefixOpt = None, bootstrap: BootstrapOpt = None) -> None:
    """Create every pipeline topic with its partitions and configs; existing ones are kept."""
    from lightmem.streams.kafka.topics import TopicAdminError, create_topics

    settings = _settings(kafka_bootstrap=bootstrap)
    topics = _topics(settings, topic_prefix)
    try:
        result = create_topics(settings, topics)
    except TopicAdminError as exc:
        for name, reason in sorted(exc.failures.items()):
            _err().print(f"[red]failed[/red] {name}: {reason}", highlight=False)
        raise typer.Exit(1) from None
    for name in result.created:
        _err().print(f"created {name}", highlight=False)
    for name in result.existed:
        note = result.mismatched.get(name)
        _err().print(f"exists  {name}" + (f" [yellow]({note})[/yellow]" if note else ""),
                     highlight=False)
    for name, change in sorted(result.altered.items()):
        _err().print(f"altered {name}: {change}", highlight=False)
    from lightmem.streams.kafka.change_log import legacy_changes_topic

    legacy = legacy_changes_topic(settings, topics)
    if legacy is not None:
        _err().print(f"[yellow]note[/yellow] {legacy} (the memory changes of an earlier "
                     f"version) exists: workers now write {topics.memory_changes}; run "
                     f"`lightmem topics migrate-changes` to copy the history over",
                     highlight=False)


@topics_app.command("migrate-changes")
def topics_migrate_changes(
    topic_prefix: PrefixOpt = None,
    bootstrap: BootstrapOpt = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Count what would be copied; produce and delete nothing")] = False,
    delete_old: Annotated[bool, typer.Option(
        "--delete-old", help="After the copy, delete the v1 topic (it still holds the text "
        "of scopes erased before the upgrade)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="The report as JSON on stdout")]
    = False,
) -> None:
    """Copy the memory-changes topic v1 into v2 (one key per change, compacted: erasable),
    leaving out the changes an erasure covers.

    Run `lightmem topics create` first (it creates v2). Changes v2 already holds are
    skipped, so running it again copies nothing twice. Exit 1 when v2 is missing or a copy
    was not delivered (nothing is deleted then).
    """
    from lightmem.streams.kafka.change_log import migrate_changes
    from lightmem.streams.kafka.producer import DeliveryError
    from lightmem.streams.kafka.topics import TopicAdminError

    settings = _settings(kafka_bootstrap=bootstrap)
    topics = _topics(settings, topic_prefix)
    err = _err()
    try:
        report = migrate_changes(settings, topics, dry_run=dry_run, delete_source=delete_old)
    except (LookupError, TimeoutError, DeliveryError, TopicAdminError) as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    if not report.source_exists:
        err.print(f"{report.source} does not exist: nothing to migrate", highlight=False)
    else:
        verb = "would copy" if dry_run else "copied"
        err.print(f"{report.source} -> {report.target}: read {report.read}, {verb} "
                  f"{report.copied}, already there {report.already}, left out as erased "
                  f"{report.erased}, duplicates {report.duplicates}, undecodable "
                  f"{report.undecodable}", highlight=False)
        if report.deleted_source:
            err.print(f"deleted {report.source}", highlight=False)
        elif not dry_run:
            err.print(f"{report.source} is kept and no longer read; it still holds the text "
                      f"of scopes erased before: delete it with --delete-old",
                      highlight=False)
    if as_json:
        typer.echo(json.dumps(report.as_json()))


# -- produce / flush -------------------------------------------------------------------------


def produce(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="TurnEvent JSONL")],
    topic_prefix: PrefixOpt = None,
    bootstrap: BootstrapOpt = None,
) -> None:
    """Produce turn events from a JSONL file, keyed tenant/conversation.

    Bad lines are reported (line: reason) and sent to the DLQ topic; the valid lines are
    produced all the same; the exit code is 1 when any line was rejected. A line larger than
    LIGHTMEM_MAX_EVENT_BYTES (256000) is a bad line, refused before it is sent; a UTF-8
    byte-order mark at the start of the file is ignored.
    """
    from lightmem.streams.kafka.producer import DeliveryError, produce_file

    settings = _settings(kafka_bootstrap=bootstrap)
    topics = _topics(settings, topic_prefix)
    total = sum(1 for _ in file.open("rb"))
    err = _err()
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=err) as progress:
            task = progress.add_task(f"produce {file.name}", total=total)
            report = produce_file(file, settings, topics=topics,
                                  on_progress=lambda n: progress.update(task, advance=n))
    except DeliveryError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    for bad in report.rejected:
        err.print(f"[red]{file}:{bad.line}[/red] {bad.reason}", highlight=False)
    err.print(f"lines {report.lines}: produced {report.produced} to {topics.turns}, rejected "
              f"{len(report.rejected)} (dead letters on {topics.dlq}), blank {report.blank}",
              highlight=False)
    raise typer.Exit(1 if report.rejected else 0)


def flush(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's conversations")] = None,
    conversation: Annotated[str | None, typer.Option(help="Only this conversation (needs "
                                                     "--tenant)")] = None,
    topic_prefix: PrefixOpt = None,
    bootstrap: BootstrapOpt = None,
) -> None:
    """Flush buffers now (an in-band command on the turns topic).

    It is applied in order after the turns produced before it: one conversation
    (--tenant --conversation), one tenant's, or every conversation.
    """
    from lightmem.streams.kafka.producer import DeliveryError, send_flush

    if conversation is not None and tenant is None:
        _err().print("[red]error:[/red] --conversation needs --tenant (the key is "
                     "tenant/conversation)")
        raise typer.Exit(2)
    settings = _settings(kafka_bootstrap=bootstrap)
    try:
        n = send_flush(settings, tenant=tenant, conversation=conversation,
                       topics=_topics(settings, topic_prefix))
    except DeliveryError as exc:
        _err().print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    _err().print(f"flush command sent ({n} record(s))")


# -- worker ----------------------------------------------------------------------------------


def worker(
    ctx: typer.Context,
    ingest_group: Annotated[str | None, typer.Option(
        "--ingest-group", "--app-id", help="The ingest workers' consumer group, also part of the "
        "transactional ids and changelog topic names (--app-id: old name) "
        "(env LIGHTMEM_INGEST_GROUP)")] = None,
    index: Annotated[str | None, typer.Option(help="Write this index instead of the alias "
                                              "(env LIGHTMEM_ES_ALIAS)")] = None,
    topic_prefix: PrefixOpt = None,
    loglevel: Annotated[str, typer.Option(help="worker log level")] = "info",
    instance: Annotated[str | None, typer.Option(
        "--instance", help="this worker's stable name in the group (transactional id "
        "<ingest group>-<instance>): a restart with the same name aborts its predecessor's open "
        "transaction at once; never give two live workers one name [default: random]")] = None,
    replay_run: Annotated[str | None, typer.Option(hidden=True)] = None,
    stop_offsets: Annotated[str | None, typer.Option(hidden=True)] = None,
    idle_timer: Annotated[bool, typer.Option(hidden=True)] = True,
    metrics_port: MetricsPortOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Run the streaming worker: sensory stage, short-term stage and index sink.

    One Kafka transaction per batch: output, stage state and input offsets commit together.
    Stops cleanly on SIGTERM/SIGINT (finishes and commits the batch at hand). The Prometheus
    endpoint is off unless --metrics-port / LIGHTMEM_METRICS_PORT is set. Exit status: 0
    stopped, 1 could not start, 70 a bug in a stage, 75 a fatal Kafka error (restart it).
    """
    from lightmem.streams.ingest import WorkerOptions, run_worker

    if log_format is None and isinstance(ctx.obj, dict):  # `lightmem --log-format X worker`
        log_format = ctx.obj.get("log_format")
    settings = _settings(ingest_group=ingest_group, metrics_port=metrics_port,
                         log_format=log_format)
    topics = _topics(settings, topic_prefix)
    if replay_run:
        topics = topics.for_replay(replay_run)
    stops = None
    if stop_offsets:
        try:
            stops = {int(p): int(o) for p, o in json.loads(stop_offsets).items()}
        except (ValueError, AttributeError) as exc:
            _err().print(f"[red]error:[/red] --stop-offsets: not a JSON object of "
                         f"partition -> offset: {exc}")
            raise typer.Exit(2) from None
    options = WorkerOptions.from_settings(settings, topics=topics, index=index,
                                          stop_offsets=stops, idle_timer=idle_timer,
                                          instance=instance)
    raise typer.Exit(run_worker(settings, options, loglevel=loglevel))


# -- stats -----------------------------------------------------------------------------------


def print_stream_stats(*, topic_prefix: str | None, ingest_group: str | None,
                       metrics_urls: list[str]) -> None:
    """``lightmem stats --stream``: tables on stderr, JSON on stdout (exit 1 when a server
    does not answer)."""
    from lightmem.streams.observe.stats import stream_stats

    settings = _settings(ingest_group=ingest_group)
    topics = _topics(settings, topic_prefix)
    err = _err()
    try:
        s = stream_stats(settings, topics, metrics_urls=metrics_urls)
    except Exception as exc:  # noqa: BLE001 - Kafka, Elasticsearch or HTTP: report, exit 1
        err.print(f"[red]error:[/red] {type(exc).__name__}: {exc}", highlight=False)
        raise typer.Exit(1) from None
    table = Table(title=f"per tenant (index {s.index}, group {s.group})")
    for col in ("tenant", "users", "memories", "LLM calls", "prompt tok", "completion tok",
                "LLM errors", "lag sensory", "lag short-term", "lag index"):
        table.add_column(col, justify="left" if col == "tenant" else "right")
    for t in s.tenants():
        table.add_row(t.tenant, str(t.users), str(t.memories), str(t.llm_calls),
                      str(t.prompt_tokens), str(t.completion_tokens), str(t.llm_errors),
                      *(str(t.lag.get(stage, 0)) for stage in ("sensory", "short-term",
                                                                "index")))
    err.print(table)
    if not metrics_urls:
        err.print("LLM spend: pass the workers' --metrics-url to include it")
    if not s.tenant_lag_complete:
        err.print("[yellow]per-tenant lag counts only the first records of each partition's "
                  "backlog[/yellow]")
    lag = Table(title=f"consumer lag of group {s.group}")
    for col in ("stage", "topic", "partition", "committed", "end", "lag"):
        lag.add_column(col, justify="left" if col in ("stage", "topic") else "right")
    for stage, p in s.lag:
        lag.add_row(stage, p.topic, str(p.partition),
                    "-" if p.committed is None else str(p.committed), str(p.high), str(p.lag))
    err.print(lag)
    typer.echo(json.dumps(s.as_json()))


# -- replay (backfill) -------------------------------------------------------------------------


def _retriable(exc: Exception) -> bool:
    """A Kafka error that a later poll may not meet (leader election, timeout)."""
    from confluent_kafka import KafkaError

    error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
    return error is not None and (error.retriable() or error.code() in {
        KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._TIMED_OUT})


def _parse_from(value: str) -> datetime | None:
    if value == "earliest":
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"--from: 'earliest' or an ISO 8601 time (got {value!r})"
                                 ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def replay(
    index: Annotated[str, typer.Option("--index", help="The NEW Elasticsearch index to fill")],
    from_: Annotated[str, typer.Option("--from", help="'earliest' or an ISO 8601 time "
                                       "(naive = UTC)")] = "earliest",
    run: Annotated[str | None, typer.Option(help="Run id (default: time + random)")] = None,
    timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds")]
    = None,
    keep_topics: Annotated[bool, typer.Option(help="Keep the run's private topics")] = False,
    topic_prefix: PrefixOpt = None,
    metrics_port: Annotated[int, typer.Option(
        "--metrics-port", min=0, max=65535,
        help="Prometheus /metrics of the backfill worker; 0 = off (the live worker's "
        "LIGHTMEM_METRICS_PORT is not inherited: the port would clash)")] = 0,
) -> None:
    """Backfill a new index: re-run the pipeline from the turns topic under a new group.

    Then `lightmem index promote INDEX` switches the alias.
    """
    from confluent_kafka import KafkaException

    from lightmem.streams.kafka.backfill import (
        backfill_progress,
        cleanup_backfill,
        plan_backfill,
        prepare_backfill,
        worker_args,
    )
    from lightmem.streams.kafka.lag import LagReader

    since = _parse_from(from_)
    settings = _settings()
    topics = _topics(settings, topic_prefix)
    err = _err()
    try:
        plan = plan_backfill(settings, index=index, since=since, topics=topics, run=run)
    except (LookupError, ValueError) as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1 if isinstance(exc, LookupError) else 2) from None
    err.print(f"backfill {plan.run}: {plan.total} turn record(s) from {topics.turns} into "
              f"index {index} (group {plan.ingest_group})", highlight=False)
    prepare_backfill(settings, plan)
    cmd = [sys.executable, "-m", "lightmem", *worker_args(plan, topic_prefix=topics.prefix),
           "--metrics-port", str(metrics_port)]
    proc = subprocess.Popen(cmd, env=os.environ.copy(), start_new_session=True)
    code = 1
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[lag]}"), TimeElapsedColumn(),
                      console=err) as progress, LagReader(settings, plan.ingest_group) as reader:
            task = progress.add_task("replay turns", total=plan.total, lag="")
            while True:
                try:
                    state = backfill_progress(settings, plan, reader=reader)
                except KafkaException as exc:
                    # A leader election or a timeout: ask again at the next tick.
                    if not _retriable(exc):
                        raise
                    err.print(f"[yellow]lag not readable yet:[/yellow] {exc.args[0].str()}",
                              highlight=False)
                    time.sleep(1.0)
                    continue
                progress.update(task, completed=state.turns_done,
                                lag=f"lag: segments {state.segments_lag}, "
                                    f"entries {state.entries_lag}")
                if state.finished:
                    code = 0
                    break
                if proc.poll() is not None:
                    err.print(f"[red]error:[/red] the backfill worker exited with "
                              f"{proc.returncode}")
                    break
                if deadline is not None and time.monotonic() > deadline:
                    err.print(f"[red]error:[/red] not finished after {timeout:.0f}s")
                    break
                time.sleep(1.0)  # polling interval of the progress display
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if not keep_topics:
        cleanup_backfill(settings, plan)
    if code == 0:
        err.print(f"backfill done: promote with `lightmem index promote {index}`",
                  highlight=False)
    raise typer.Exit(code)


#: The streaming deployment's commands, merged at the top level of ``lightmem``.
app = typer.Typer()
for _command in (produce, flush, worker, replay):
    app.command()(_command)
app.add_typer(topics_app, name="topics")
