"""The dead-letter topic's commands.

::

    lightmem dlq list [--json]           every dead letter: step, reason, source position
    lightmem dlq replay --offset N ... | --step S | --all
                                         re-produce the original bytes to their source

Exit codes: 0 success, 1 the operation failed, 2 usage error. Data (``dlq list``) goes to
stdout, progress and errors to stderr.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from lightmem.ops.commands.stream import BootstrapOpt, PrefixOpt, _err, _settings, _topics
from lightmem.settings import Settings

__all__ = ["app", "dlq_app"]

dlq_app = typer.Typer(help="The dead-letter topic: list and replay.", no_args_is_help=True)


def _dead_letters(settings: Settings, topics: Any) -> list[Any]:
    """Every record of the DLQ topic; exit 1 with the reason when it cannot be read."""
    from lightmem.streams.kafka.dlq import read_dead_letters

    try:
        return read_dead_letters(settings, topics)
    except (LookupError, TimeoutError) as exc:
        _err().print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None


@dlq_app.command("list")
def dlq_list(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line on "
                                          "stdout")] = False,
    step: Annotated[str | None, typer.Option("--step", "--stage",
                                             help="Only this failed step (parse, compress, "
                                                  "summarize, ...); --stage: old name")] = None,
    topic_prefix: PrefixOpt = None,
    bootstrap: BootstrapOpt = None,
) -> None:
    """Every dead letter, oldest first: DLQ offset, step, source position, reason."""
    settings = _settings(kafka_bootstrap=bootstrap)
    topics = _topics(settings, topic_prefix)
    records = _dead_letters(settings, topics)
    if step is not None:
        records = [r for r in records if r.letter is not None and r.letter.step == step]
    if as_json:
        for r in records:
            body = {"dlq_partition": r.partition, "dlq_offset": r.offset,
                    "key": r.key.decode("utf-8", "replace") if r.key is not None else None}
            if r.letter is not None:
                body.update(r.letter.model_dump(mode="json", exclude={"raw_b64"}))
            else:
                body["error"] = r.error
            typer.echo(json.dumps(body))
        return
    table = Table(title=f"dead letters on {topics.dlq} ({len(records)})")
    for col in ("offset", "step", "source", "partition", "src offset", "error", "reason"):
        table.add_column(col, overflow="fold")
    for r in records:
        x = r.letter
        if x is None:
            table.add_row(str(r.offset), "?", "?", "", "", "undecodable", r.error or "")
            continue
        table.add_row(str(r.offset), x.step, x.source,
                      "" if x.partition is None else str(x.partition),
                      "" if x.offset is None else str(x.offset), x.error_type, x.reason)
    Console().print(table)


@dlq_app.command("replay")
def dlq_replay(
    offset: Annotated[list[int] | None, typer.Option("--offset", help="DLQ offset to replay "
                                                     "(repeatable)")] = None,
    step: Annotated[str | None, typer.Option("--step", "--stage",
                                             help="Every dead letter of this failed step; "
                                                  "--stage: old name")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every dead letter")] = False,
    dry_run: Annotated[bool, typer.Option(help="Show what would be sent")] = False,
    topic_prefix: PrefixOpt = None,
    bootstrap: BootstrapOpt = None,
) -> None:
    """Re-produce the original bytes of selected dead letters to their source topic.

    The original key goes with them; events that are still bad are dead-lettered again.
    """
    from lightmem.streams.kafka.dlq import plan_replay, replay_dead_letters
    from lightmem.streams.kafka.producer import DeliveryError

    if not (offset or step or all_):
        _err().print("[red]error:[/red] select dead letters: --offset N, --step S or --all")
        raise typer.Exit(2)
    settings = _settings(kafka_bootstrap=bootstrap)
    topics = _topics(settings, topic_prefix)
    records = _dead_letters(settings, topics)
    wanted = set(offset or [])
    chosen = [r for r in records if all_ or r.offset in wanted or (
        step is not None and r.letter is not None and r.letter.step == step)]
    missing = wanted - {r.offset for r in records}
    plans = plan_replay(chosen, topics)
    err = _err()
    for plan in plans:
        if plan.topic is None:
            err.print(f"[yellow]skip[/yellow] offset {plan.record.offset}: {plan.problem}",
                      highlight=False)
        else:
            err.print(f"{'would send' if dry_run else 'send'} offset {plan.record.offset} -> "
                      f"{plan.topic} ({len(plan.records)} record(s))", highlight=False)
    for m in sorted(missing):
        err.print(f"[red]no dead letter at offset {m}[/red]")
    sent = 0
    if not dry_run:
        try:
            sent = replay_dead_letters(settings, plans, topics)
        except DeliveryError as exc:
            err.print(f"[red]error:[/red] {exc}", highlight=False)
            raise typer.Exit(1) from None
    err.print(f"{len(chosen)} dead letter(s) selected, {sent} record(s) sent")
    failed = missing or any(p.topic is None for p in plans)
    raise typer.Exit(1 if failed else 0)


#: ``lightmem dlq ...``, merged at the top level of ``lightmem``.
app = typer.Typer()
app.add_typer(dlq_app, name="dlq")
