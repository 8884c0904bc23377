"""Sleep-time consolidation on the streaming deployment: windows and the worker.

::

    lightmem sleep open [--for 30m] [--tenant T]   open a window (until closed, or for a while)
    lightmem sleep close [--tenant T]              close it (also a scheduled/auto one now)
    lightmem sleep schedule 'CRON' --for 1h [--tenant T] | --clear
                                                   windows on a cron schedule (UTC)
    lightmem sleep status [--log]                  the window now, its sources, the group lag
    lightmem sleep-worker [--metrics-port N]      run one member of the sleep consumer group

Commands go to the compacted topic ``lightmem.sleep-control.v1``; every worker follows it.
Exit codes: 0 success, 1 the operation failed, 2 usage error (a malformed command).
"""

from __future__ import annotations

import logging
import os
import signal
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

# One definition of the shared options and helpers: the stream commands'.
from lightmem.ops.commands.stream import (
    LogFormatOpt,
    MetricsPortOpt,
    PrefixOpt,
    _err,
    _settings,
    _topics,
)

__all__ = ["app", "sleep_worker", "stream_history"]

windows_app = typer.Typer(help="Sleep windows: when the sleep-time workers consolidate memories.",
                  no_args_is_help=True)

TenantOpt = Annotated[
    str | None, typer.Option("--tenant", help="Only this tenant (default: every tenant)"),
]
ByOpt = Annotated[str, typer.Option("--by", help="Who issues the command (audit)")]


def _send(action: str, *, tenant: str | None, topic_prefix: str | None, by: str,
          until: datetime | None = None, cron: str | None = None,
          duration_s: int | None = None) -> None:
    from lightmem.processors.sleep_windows import CommandError, command_key
    from lightmem.schemas import SchemaError
    from lightmem.streams.kafka.producer import DeliveryError
    from lightmem.streams.sleep.windows import new_command, send_command

    settings = _settings()
    try:
        cmd = new_command(action, tenant=tenant, until=until, cron=cron,
                          duration_s=duration_s, issued_by=by)
    except (SchemaError, CommandError) as exc:
        _err().print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    try:
        send_command(settings, cmd, _topics(settings, topic_prefix))
    except DeliveryError as exc:
        _err().print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    _err().print(f"sent {cmd.action.value} ({command_key(cmd)}) id {cmd.command_id}",
                 highlight=False)


def _duration(text: str | None) -> int | None:
    from lightmem.processors.sleep_windows import parse_duration

    if text is None:
        return None
    try:
        return int(parse_duration(text).total_seconds())
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--for") from None


@windows_app.command("open")
def open_(
    for_: Annotated[str | None, typer.Option("--for", help="Close by itself after this "
                                             "long: 90s, 30m, 2h, 1h30m")] = None,
    tenant: TenantOpt = None,
    by: ByOpt = "ops",
    topic_prefix: PrefixOpt = None,
) -> None:
    """Open a sleep window now: the sleep workers start consolidating."""
    seconds = _duration(for_)
    until = None
    if seconds is not None:
        from datetime import timedelta

        until = datetime.now(UTC) + timedelta(seconds=seconds)
    _send("open", tenant=tenant, until=until, by=by, topic_prefix=topic_prefix)


@windows_app.command("close")
def close(tenant: TenantOpt = None, by: ByOpt = "ops", topic_prefix: PrefixOpt = None) -> None:
    """Close the window now: workers finish the targets in flight, commit and pause."""
    _send("close", tenant=tenant, by=by, topic_prefix=topic_prefix)


@windows_app.command("schedule")
def schedule(
    cron: Annotated[str | None, typer.Argument(help="minute hour day-of-month month "
                                               "day-of-week (UTC), e.g. '0 2 * * *'")] = None,
    for_: Annotated[str | None, typer.Option("--for", help="Window length, e.g. 2h")] = None,
    clear: Annotated[bool, typer.Option(help="Remove the schedule")] = False,
    tenant: TenantOpt = None,
    by: ByOpt = "ops",
    topic_prefix: PrefixOpt = None,
) -> None:
    """Open windows on a cron schedule (kept on the control topic)."""
    if clear == (cron is not None):
        _err().print("[red]error:[/red] give a CRON expression with --for, or --clear")
        raise typer.Exit(2)
    _send("schedule", tenant=tenant, cron=cron, duration_s=_duration(for_), by=by,
          topic_prefix=topic_prefix)


@windows_app.command("status")
def status(
    log_: Annotated[bool, typer.Option("--log", help="Also list every control record")]
    = False,
    topic_prefix: PrefixOpt = None,
) -> None:
    """The window now (from the control topic and the config) and the sleep group's lag."""
    from lightmem.streams.sleep.windows import ControlFollower, describe_records

    settings = _settings()
    topics = _topics(settings, topic_prefix)
    follower = ControlFollower(settings, topics, dead_letters=False)
    try:
        records = follower.read_to_end()
    except (LookupError, TimeoutError) as exc:
        _err().print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    finally:
        follower.close()
    now = datetime.now(UTC)
    out = Console()
    for line in follower.state.describe(now):
        out.print(line, markup=False, highlight=False)
    if log_:
        for line in describe_records(records):
            out.print(line, markup=False, highlight=False)
    rejected = [r for r in records if r.command is None]
    if rejected:
        _err().print(f"[yellow]{len(rejected)} control record(s) rejected[/yellow] "
                     "(dead-lettered by the workers; see --log)")
    try:
        from lightmem.streams.kafka.lag import LagReader

        reader = LagReader(settings, settings.sleep_group)
        lags = reader.read([topics.entries])
    except Exception as exc:  # noqa: BLE001 - lag is extra information; the state is shown
        _err().print(f"[yellow]lag unavailable:[/yellow] {exc}", highlight=False)
        return
    table = Table(title=f"group {settings.sleep_group} on {topics.entries}")
    for col in ("partition", "committed", "end", "entries to replay"):
        table.add_column(col, justify="right")
    for lag in lags:
        table.add_row(str(lag.partition), "-" if lag.committed is None else str(lag.committed),
                      str(lag.high), str(lag.lag))
    _err().print(table)


def sleep_worker(
    ctx: typer.Context,
    topic_prefix: PrefixOpt = None,
    concurrency: Annotated[int | None, typer.Option(min=1, help="Targets in flight "
                                                    "(env LIGHTMEM_SLEEP_CONCURRENCY)")] = None,
    group: Annotated[str | None, typer.Option(help="Consumer group (env "
                                              "LIGHTMEM_SLEEP_GROUP)")] = None,
    ingest_group: Annotated[str | None, typer.Option(
        "--ingest-group", "--app-id", help="The ingest workers' consumer group, whose backlog "
        "this worker yields to (--app-id: old name) (env LIGHTMEM_INGEST_GROUP)")] = None,
    yield_lag: Annotated[int | None, typer.Option(
        min=0, help="Start no new target while the ingest group has more records waiting "
        "(0 = never yield) (env LIGHTMEM_SLEEP_YIELD_LAG)")] = None,
    loglevel: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
    metrics_port: MetricsPortOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Run one sleep-time worker: consumes lightmem.entries.v1 while a window is open and
    the ingest workers have no backlog (ingest first).

    Stops cleanly on SIGTERM/SIGINT: the targets in flight finish and are committed.
    The Prometheus endpoint is off unless --metrics-port / LIGHTMEM_METRICS_PORT is set
    (then bound to 127.0.0.1 unless LIGHTMEM_METRICS_ADDR).
    """
    from lightmem.processors.llm import LLMConfigError
    from lightmem.streams.kafka.topics import TopicAdminError
    from lightmem.streams.observe import metrics
    from lightmem.streams.observe.logs import configure_logging, quiet_progress_bars, secrets_of
    from lightmem.streams.sleep.worker import SleepWorker

    if log_format is None and isinstance(ctx.obj, dict):  # `lightmem --log-format X sleep-worker`
        log_format = ctx.obj.get("log_format")
    settings = _settings(sleep_concurrency=concurrency, sleep_group=group,
                         ingest_group=ingest_group,
                         sleep_yield_lag=yield_lag, metrics_port=metrics_port,
                         log_format=log_format)
    # As the stream worker: secrets redacted; json = one object per line on stderr.
    configure_logging(settings.log_format, level=loglevel.upper(),
                      secrets=secrets_of(settings))
    logging.getLogger("lightmem").setLevel(loglevel.upper())  # text, root handler set before
    if settings.log_format == "json":
        quiet_progress_bars()
    log = logging.getLogger("lightmem.sleep")
    if not settings.llm_configured:
        _err().print("[red]error:[/red] the sleep worker needs an LLM: set "
                     "LIGHTMEM_LLM_BASE_URL")
        raise typer.Exit(2)
    if settings.sleep_nice:
        # Background work: yield the CPU to the ingest workers on a shared host.
        os.nice(settings.sleep_nice)
    worker = SleepWorker(settings, topics=_topics(settings, topic_prefix))

    def on_signal(signum: int, frame: object) -> None:
        worker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = None
    if settings.metrics_port:
        # Bound before anything else starts: a port conflict fails the start at once.
        try:
            server = metrics.start_metrics_server(settings.metrics_port, settings.metrics_addr)
        except metrics.MetricsServerError as exc:
            _err().print(f"[red]error:[/red] {exc}: set another LIGHTMEM_METRICS_PORT / "
                         "--metrics-port (0 = off)", highlight=False)
            raise typer.Exit(1) from None
        log.info("metrics at %s", server.url)
    try:
        worker.run(ready=lambda: log.info("sleep worker ready"))
    except (LLMConfigError, LookupError, TopicAdminError) as exc:
        _err().print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    finally:
        if server is not None:
            server.close()
    s = worker.stats
    _err().print(f"sleep worker stopped: {s.batches} batches, {s.entries} entries, "
                 f"{s.targets} targets, {s.updated} updated, {s.deleted} deleted, "
                 f"{s.failed} failed, {s.recovered} recovered")


def stream_history(memory_id: str, topic_prefix: str | None = None) -> list[Any]:
    """Changes of one memory from the memory-changes topic (``lightmem history --stream``).

    Exits with 1 when the topic cannot be read.
    """
    from lightmem.streams.kafka.changes import memory_history

    settings = _settings()
    try:
        return memory_history(settings, memory_id, _topics(settings, topic_prefix))
    except (LookupError, TimeoutError) as exc:
        _err().print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None


#: ``lightmem sleep ...`` (the windows) and ``lightmem sleep-worker``, merged at the top level.
app = typer.Typer()
app.command("sleep-worker")(sleep_worker)
app.add_typer(windows_app, name="sleep")
