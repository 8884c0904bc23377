"""The operator's command line: ``lightmem ...``.

Exit codes: 0 success, 1 the operation failed (or some input was rejected), 2 usage error.
Progress and errors go to stderr (rich); data (entries, search hits, JSON) goes to stdout.
"""

from __future__ import annotations

import typer
from rich.console import Console

from lightmem.settings import load_settings

from .commands import bench, dlq, embedded, forget, memories, schemas, serve, sleep, stream, train

app = typer.Typer(
    name="lightmem",
    help="LightMem Stream: long-term memory for LLM chat platforms.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
# A sub-app added without a name puts its commands at the top level (`lightmem worker`).
app.add_typer(stream.app)  # the streaming deployment: produce, flush, worker, replay, topics
app.add_typer(dlq.app)  # dlq list | replay
app.add_typer(forget.app)  # erasure on request, embedded or --stream
app.add_typer(memories.app)  # memories list | get | delete: operator housekeeping
app.add_typer(sleep.app)  # sleep windows and the sleep-time worker
app.add_typer(serve.app)  # the HTTP memory service, its keys and OpenAPI document
app.add_typer(embedded.app)  # ingest, search, consolidate, stats, history, demo
app.add_typer(schemas.app, name="schemas")
app.add_typer(bench.app, name="bench")
app.add_typer(train.app, name="train")  # the small models the pipeline ships
try:  # the services launcher and index admin need the streaming extras; embedded does not
    from .commands import index, services

    app.add_typer(services.app, name="services")
    app.add_typer(index.app, name="index")
except ImportError:  # pragma: no cover - only without the [stream] extra
    pass

err = Console(stderr=True)


@app.callback()
def _configure(
    ctx: typer.Context,
    log_format: stream.LogFormatOpt = None,
) -> None:
    """LightMem Stream: long-term memory for LLM chat platforms."""
    from lightmem.streams.observe.logs import configure_logging, secrets_of

    try:
        settings = load_settings(log_format=log_format)
    except ValueError as exc:  # pydantic's ValidationError: a bad value in the environment
        err.print(f"[red]error:[/red] invalid settings: {exc}", highlight=False)
        raise typer.Exit(2) from None
    # Every command's log records: secrets redacted; with json, one object per line.
    configure_logging(settings.log_format, secrets=secrets_of(settings))
    ctx.obj = {"log_format": log_format}  # `lightmem --log-format json worker` too


def main() -> None:  # pragma: no cover
    app()
