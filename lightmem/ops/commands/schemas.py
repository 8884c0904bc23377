"""``lightmem schemas``: export and check the versioned JSON Schema files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from lightmem.schemas import RECORDS, SCHEMA_DIR, export_schemas, render_schema, schema_file_name

app = typer.Typer(help="Event contracts (JSON Schema files).", no_args_is_help=True)
err = Console(stderr=True)


@app.command()
def export(
    directory: Annotated[Path, typer.Option(help="Where to write the files")] = SCHEMA_DIR,
) -> None:
    """Write every record's JSON Schema file."""
    for path in export_schemas(directory):
        err.print(f"wrote {path}")


@app.command()
def check(
    directory: Annotated[Path, typer.Option(help="Where the files are")] = SCHEMA_DIR,
) -> None:
    """Fail (exit 1) when a schema file differs from its model."""
    stale = [
        schema_file_name(r)
        for r in RECORDS
        if not (directory / schema_file_name(r)).exists()
        or (directory / schema_file_name(r)).read_text() != render_schema(r)
    ]
    for name in stale:
        err.print(f"[red]stale[/red] {directory / name}: run `lightmem schemas export`")
    raise typer.Exit(1 if stale else 0)
