"""``lightmem forget``: erase a user (or a whole tenant) from every store, and keep them erased.

Exit codes: 0 every sink confirmed (also: nothing of the scope was found), 1 a sink could not
confirm (e.g. no ingest worker deleted its buffer slots in time), 2 a malformed name.
The report goes to stderr (one line per sink), the JSON report to stdout with ``--json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from lightmem.settings import load_settings

__all__ = ["forget"]


def forget(
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant of the scope to erase")],
    user: Annotated[str | None, typer.Option(
        "--user", help="User to erase; without it, the WHOLE tenant")] = None,
    reason: Annotated[str, typer.Option(help="Why (kept with the request, e.g. a ticket)")]
    = "",
    requested_by: Annotated[str, typer.Option("--by", help="Who asks")] = "ops",
    stream: Annotated[bool, typer.Option(
        "--stream", help="The streaming deployment (Kafka + Elasticsearch) instead of the "
        "embedded store")] = False,
    topic_prefix: Annotated[str | None, typer.Option(
        "--topic-prefix", help="--stream: prefix of every topic name")] = None,
    wait: Annotated[float, typer.Option(
        help="--stream: seconds to wait for the ingest workers to pass the erasure")] = 120.0,
    data_dir: Annotated[Path | None, typer.Option(
        "--data-dir", help="Embedded data directory (env LIGHTMEM_DATA_DIR)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The report as JSON on stdout")]
    = False,
    status: Annotated[bool, typer.Option(
        "--status", help="Erase nothing: what is left of the scope's recorded erasure "
        "(exit 0: nothing from before it is left; 1: something is, or no erasure recorded)")]
    = False,
) -> None:
    """Forget a user (--tenant T --user U) or a whole tenant (--tenant T) everywhere.

    Memories, provisional events, open buffers, change history and dead letters of the
    scope are erased; the request is recorded in the erasure ledger so that no stage,
    sleep worker or replay brings back anything produced before it. Turns produced after
    it are a new beginning.
    """
    from lightmem.schemas import SchemaError
    from lightmem.streams.erasure.forget import erasure_status, new_request
    from lightmem.streams.erasure.forget import forget as forget_scope

    err = Console(stderr=True)
    settings = load_settings(data_dir=data_dir)
    topics = None
    if stream:
        from lightmem.streams.kafka.topics import Topics

        topics = Topics.from_settings(settings, topic_prefix)
    scope = f"tenant {tenant!r}" + (f", user {user!r}" if user is not None else " (all users)")
    try:
        if status:
            new_request(tenant, user)  # the same name checks
            found = erasure_status(settings, tenant, user, stream=stream, topics=topics)
            if found is None:
                err.print(f"no erasure of {scope} is recorded", highlight=False)
                raise typer.Exit(1)
            report = found
        else:
            report = forget_scope(settings, tenant, user, reason=reason,
                                  requested_by=requested_by, stream=stream, topics=topics,
                                  wait_s=wait)
    except SchemaError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    err.print(f"erasure {report.request.erasure_id} of {scope} at "
              f"{report.request.requested_at.isoformat()}", highlight=False)
    for s in report.sinks:
        mark = "[green]ok[/green]" if s.confirmed else "[red]pending[/red]"
        removed = ", ".join(f"{k} {v}" for k, v in s.removed.items() if v) or "nothing"
        err.print(f"  {mark} {s.sink}: removed {removed}", highlight=False)
        for note in s.pending:
            err.print(f"       pending: {note}", highlight=False)
    if not report.found and not status:
        err.print(f"nothing of {scope} was found: nothing to do (the request is recorded, "
                  f"so nothing produced before it can come back)", highlight=False)
    if as_json:
        typer.echo(json.dumps(report.as_json(), ensure_ascii=False))
    raise typer.Exit(0 if report.confirmed else 1)


#: ``lightmem forget``, merged at the top level.
app = typer.Typer()
app.command("forget")(forget)
