"""``lightmem services up|down|status``: local Kafka and Elasticsearch for tests and development.

Progress, tables and errors go to stderr; ``status --json`` writes data to stdout.
Exit codes: 0 success, 1 a server failed (or is unhealthy, for ``status``), 2 usage error.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from lightmem.ops.services import launcher as services

__all__ = ["app"]

app = typer.Typer(
    help="Run Kafka (KRaft) and Elasticsearch as local processes on 127.0.0.1 (no Docker).",
    no_args_is_help=True,
)

KafkaOpt = Annotated[bool, typer.Option("--kafka/--no-kafka", help="Include Kafka.")]
EsOpt = Annotated[bool, typer.Option("--es/--no-es", help="Include Elasticsearch.")]


def _console() -> Console:
    # Built per call so that CliRunner's captured stderr is the one written to.
    return Console(stderr=True)


def _config(console: Console) -> services.ServicesConfig:
    try:
        return services.ServicesConfig.from_env()
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=2) from exc


def _mib(value: int | None) -> str:
    return f"{value / 2**20:.0f} MiB" if value is not None else "-"


def _print_statuses(console: Console, statuses: list[services.ServiceStatus]) -> None:
    table = Table(title="lightmem services")
    for column in ("service", "state", "address", "pid", "version", "rss"):
        table.add_column(column, no_wrap=column in ("service", "address"))
    for st in statuses:
        if st.healthy:
            state = "[green]healthy[/green]"
        elif st.running:
            state = "[yellow]unhealthy[/yellow]"
        else:
            state = "[red]down[/red]"
        table.add_row(
            st.name,
            f"{state} ({st.detail})" if st.detail else state,
            st.address,
            str(st.pid) if st.pid else "-",
            st.version or "-",
            _mib(st.rss_bytes),
        )
    console.print(table)
    for st in statuses:
        if st.log_path:
            console.print(f"{st.name} log: {st.log_path}", highlight=False, soft_wrap=True)


@app.command()
def up(kafka: KafkaOpt = True, es: EsOpt = True) -> None:
    """Download (first time), start and wait for the servers; no-op for healthy ones."""
    console = _console()
    config = _config(console)
    failed = False
    try:
        services.up(
            config, kafka=kafka, es=es, progress=lambda msg: console.print(msg, soft_wrap=True)
        )
    except services.ServiceError as exc:
        failed = True
        console.print(Text.assemble(("error: ", "bold red"), str(exc)), soft_wrap=True)
    _print_statuses(console, services.status(config, kafka=kafka, es=es))
    if failed:
        raise typer.Exit(code=1)


@app.command()
def down(
    kafka: KafkaOpt = True,
    es: EsOpt = True,
    purge: Annotated[
        bool, typer.Option("--purge", help="Also delete data and logs (downloads stay).")
    ] = False,
) -> None:
    """Stop the servers started by `up` (SIGTERM, then SIGKILL); safe when none runs."""
    console = _console()
    config = _config(console)
    failed = 0
    for server in services.servers(config, kafka=kafka, es=es):
        try:
            stopped = server.stop()
            console.print(f"{server.name}: {'stopped' if stopped else 'not running'}")
            if purge:
                server.purge()
                console.print(f"{server.name}: deleted {server.run_dir}")
        except services.ServiceError as exc:
            failed += 1
            console.print(Text.assemble(("error: ", "bold red"), str(exc)), soft_wrap=True)
    if failed:
        raise typer.Exit(code=1)


@app.command()
def status(
    kafka: KafkaOpt = True,
    es: EsOpt = True,
    as_json: Annotated[
        bool, typer.Option("--json", help="Write the statuses as JSON to stdout.")
    ] = False,
) -> None:
    """Report each server; exit 0 when all selected servers are healthy, else 1."""
    console = _console()
    config = _config(console)
    statuses = services.status(config, kafka=kafka, es=es)
    if as_json:
        typer.echo(json.dumps([st.to_dict() for st in statuses], indent=2))
    else:
        _print_statuses(console, statuses)
    if not all(st.healthy for st in statuses):
        raise typer.Exit(code=1)
