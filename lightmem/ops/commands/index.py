"""``lightmem index create|promote|list``: the Elasticsearch memory indices behind the alias.

Blue/green reindexing: ``index create`` makes a new versioned index (``<alias>-v2``), a
backfill fills it (``lightmem replay --index <alias>-v2``), and ``index promote`` switches the
alias to it in one atomic ``_aliases`` call, so searches move from the old index to the new one
with no gap and no overlap. The old index stays until an operator deletes it (roll back by
promoting it again).

Connection and credentials come from the settings (``LIGHTMEM_ES_URL``, ``LIGHTMEM_ES_API_KEY``,
``LIGHTMEM_ES_USERNAME``/``LIGHTMEM_ES_PASSWORD``, ``LIGHTMEM_ES_CA_CERTS``); ``--es-url`` and
``--alias`` override them. Data (``list``) goes to stdout; progress and errors to stderr.
Exit codes: 0 success, 1 the operation failed (missing index, Elasticsearch error or
unreachable), 2 usage error (bad option, conflicting settings).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, TypeVar

import typer
from elasticsearch import ApiError, TransportError
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from lightmem.settings import load_settings
from lightmem.streams.elastic.store import ElasticsearchStore, EsStoreError, es_client, redact_url
from lightmem.streams.models.encoder import MINILM_DIM

__all__ = ["app"]

app = typer.Typer(
    help="Elasticsearch memory indices: versioned names behind one alias (blue/green).",
    no_args_is_help=True,
)

AliasOpt = Annotated[
    str | None,
    typer.Option("--alias", help="Alias the workers use (env LIGHTMEM_ES_ALIAS)."),
]
UrlOpt = Annotated[
    str | None,
    typer.Option("--es-url", help="Elasticsearch URL (env LIGHTMEM_ES_URL)."),
]
DimOpt = Annotated[
    int,
    typer.Option(
        "--dim",
        min=1,
        max=4096,
        help="Embedding dimension; promote refuses an index of another (all-MiniLM-L6-v2: 384).",
    ),
]
NameArg = Annotated[str, typer.Argument(help="Concrete index name, by convention <alias>-v<N>.")]

T = TypeVar("T")


def _err() -> Console:
    # Built per call so that CliRunner's captured streams are the ones written to.
    return Console(stderr=True)


@contextmanager
def _store(url: str | None, alias: str | None, dim: int) -> Iterator[ElasticsearchStore]:
    console = _err()
    try:
        settings = load_settings(es_url=url, es_alias=alias)
        client = es_client(settings)
    except (ValidationError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None
    try:
        yield ElasticsearchStore(client, alias=settings.es_alias, dim=dim)
    finally:
        client.close()


def _run(what: str, url: str | None, action: Callable[[], T]) -> T:
    """Run ``action``; report an Elasticsearch or store failure on stderr and exit 1."""
    try:
        return action()
    except EsStoreError as exc:
        _err().print(f"[red]error:[/red] {what}: {exc}", highlight=False, soft_wrap=True)
    except ApiError as exc:
        # str(ApiError) names the status, the error type and the root cause.
        _err().print(f"[red]error:[/red] {what}: {exc}", highlight=False, soft_wrap=True)
    except TransportError as exc:
        where = redact_url(url) if url else "the configured Elasticsearch"
        _err().print(
            f"[red]error:[/red] {what}: cannot reach {where}: {exc.message}",
            highlight=False,
            soft_wrap=True,
        )
    raise typer.Exit(code=1)


@app.command()
def create(
    name: NameArg, alias: AliasOpt = None, es_url: UrlOpt = None, dim: DimOpt = MINILM_DIM
) -> None:
    """Create a memory index (mapping, HNSW vectors); the alias is not moved."""
    with _store(es_url, alias, dim) as store:
        _run(f"create {name!r}", es_url, lambda: store.create_index(name))
        note = ""
        if not name.startswith(f"{store.alias}-"):
            note = f" (outside {store.alias}-*: `index list` shows it once it is promoted)"
        _err().print(f"created index {name}{note}", highlight=False, soft_wrap=True)


@app.command()
def promote(
    name: NameArg, alias: AliasOpt = None, es_url: UrlOpt = None, dim: DimOpt = MINILM_DIM
) -> None:
    """Point the alias at an existing index, atomically (one _aliases call)."""
    with _store(es_url, alias, dim) as store:
        previous = _run(f"promote {name!r}", es_url, lambda: store.promote(name))
        was = f" (was {previous})" if previous else " (new alias)"
        _err().print(f"alias {store.alias} -> {name}{was}", highlight=False, soft_wrap=True)


@app.command("list")
def list_(
    alias: AliasOpt = None,
    es_url: UrlOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Write JSON to stdout.")] = False,
) -> None:
    """Memory indices under <alias>-* with their document counts; marks the alias target."""
    with _store(es_url, alias, MINILM_DIM) as store:
        infos = _run("list", es_url, store.list_indices)
        if as_json:
            rows = [
                {"index": i.name, "docs": i.docs, "dims": i.dims, "alias": i.current} for i in infos
            ]
            typer.echo(json.dumps({"alias": store.alias, "indices": rows}))
            return
        if not infos:
            _err().print(f"no indices under {store.alias}-* and no alias {store.alias}")
            return
        table = Table(title=f"memory indices (* = alias {store.alias})")
        table.add_column("index", overflow="fold")
        for column in ("docs", "dims", "alias"):
            table.add_column(column, justify="right" if column != "alias" else "center")
        for i in infos:
            dims = str(i.dims) if i.dims is not None else "-"
            table.add_row(i.name, str(i.docs), dims, "*" if i.current else "")
        Console(soft_wrap=True).print(table)
