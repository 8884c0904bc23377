"""``lightmem memories list | get | delete``: memory housekeeping for operators (issue 14).

The commands call the memory service's own operations (:class:`~lightmem.service.core.
MemoryService` ``iter_all``/``get``/``delete``) over the same backends ``lightmem serve``
uses, in-process: the embedded store (``--data-dir``) or, with ``--stream``, the
Elasticsearch alias and the memory-changes topic. So what an operator sees and deletes is
exactly what the HTTP routes see and delete: every read is scoped to ``--tenant`` (another
tenant's memory id is "not found"), and a delete records a ``delete`` change (history, the
changes topic) like ``DELETE /v1/memories/{id}``. To forget a whole user use
``lightmem forget``.

Exit codes: 0 success, 1 not found / the store is unreachable / the memory kept changing,
2 usage error. Data (memories as JSON or lines) goes to stdout, messages to stderr.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from lightmem.settings import load_settings

if TYPE_CHECKING:
    from lightmem.service.core import MemoryService

__all__ = ["app", "memories_app"]

err = Console(stderr=True)

Tenant = Annotated[str, typer.Option("--tenant", help="Tenant of the memory scope")]
DataDir = Annotated[Path | None, typer.Option(
    "--data-dir", help="Embedded data directory (env LIGHTMEM_DATA_DIR)")]
Stream = Annotated[bool, typer.Option(
    "--stream", help="The streaming deployment (the Elasticsearch alias, the memory-changes "
    "topic) instead of the embedded store")]
Alias = Annotated[str | None, typer.Option(
    "--alias", help="--stream: the index alias (env LIGHTMEM_ES_ALIAS)")]
Prefix = Annotated[str | None, typer.Option(
    "--topic-prefix", help="--stream: prefix of every topic name "
    "(env LIGHTMEM_KAFKA_TOPIC_PREFIX)")]


@contextmanager
def _service(*, stream: bool, data_dir: Path | None, alias: str | None,
             topic_prefix: str | None) -> Iterator[MemoryService]:
    """The memory service's operations over the embedded store or the deployment (exit 1
    when the deployment is not there: missing alias or topics, unreachable servers)."""
    from lightmem.service.backends import EmbeddedBackend, StartupError, StreamBackend
    from lightmem.service.core import MemoryService

    # One-shot commands: no query batching thread (nothing is searched here).
    settings = load_settings(data_dir=data_dir, es_alias=alias, kafka_topic_prefix=topic_prefix,
                             serve_batch_queries=False)
    try:
        backend = StreamBackend(settings) if stream else EmbeddedBackend(settings)
    except StartupError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    service = MemoryService(backend, settings)
    try:
        yield service
    finally:
        service.close()


def _fail(exc: Exception, tenant: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {exc} in tenant {tenant!r}", highlight=False)
    return typer.Exit(1)


memories_app = typer.Typer(help="Memory housekeeping: list, get and delete single memories "
                           "(embedded or --stream), on the memory service's operations.",
                           no_args_is_help=True)


@memories_app.command("list")
def list_memories(
    user: Annotated[str, typer.Option("--user", help="User of the memory scope")],
    tenant: Tenant = "default",
    as_json: Annotated[bool, typer.Option(
        "--json", help="One JSON object per memory per line (the service's memory item)")]
    = False,
    limit: Annotated[int | None, typer.Option(
        "--limit", min=1, help="At most this many (oldest first); default all")] = None,
    stream: Stream = False,
    data_dir: DataDir = None,
    alias: Alias = None,
    topic_prefix: Prefix = None,
) -> None:
    """Every memory of one user, oldest first (exit 0 also when there is none)."""
    from lightmem.service.models import MemoryItem

    n = 0
    with _service(stream=stream, data_dir=data_dir, alias=alias,
                  topic_prefix=topic_prefix) as service:
        for entry in service.iter_all(tenant, user):
            if limit is not None and n >= limit:
                break
            item = MemoryItem.of(entry)
            if as_json:
                typer.echo(item.model_dump_json())
            else:
                typer.echo(f"{item.id}  {item.rendered}")
            n += 1
    err.print(f"{n} memor{'y' if n == 1 else 'ies'} of {tenant}/{user}", highlight=False)


@memories_app.command("get")
def get_memory(
    memory_id: Annotated[str, typer.Argument(help="Memory id")],
    tenant: Tenant = "default",
    stream: Stream = False,
    data_dir: DataDir = None,
    alias: Alias = None,
    topic_prefix: Prefix = None,
) -> None:
    """One memory of the tenant as JSON on stdout (exit 1: no such memory in the tenant)."""
    from lightmem.service.errors import NotFound

    with _service(stream=stream, data_dir=data_dir, alias=alias,
                  topic_prefix=topic_prefix) as service:
        try:
            item = service.get(tenant, memory_id)
        except NotFound as exc:
            raise _fail(exc, tenant) from None
    typer.echo(item.model_dump_json())


@memories_app.command("delete")
def delete_memory(
    memory_id: Annotated[str, typer.Argument(help="Memory id")],
    tenant: Tenant = "default",
    reason: Annotated[str, typer.Option(help="Kept on the delete change (history)")]
    = "deleted by an operator (lightmem memories delete)",
    stream: Stream = False,
    data_dir: DataDir = None,
    alias: Alias = None,
    topic_prefix: Prefix = None,
) -> None:
    """Delete one memory of the tenant and record the delete in its history.

    Exit 1 when the tenant has no such memory (nothing is deleted) or it kept changing
    (a sleep-time consolidation rewrote it meanwhile: run it again).
    """
    from lightmem.service.errors import Conflict, NotFound

    with _service(stream=stream, data_dir=data_dir, alias=alias,
                  topic_prefix=topic_prefix) as service:
        try:
            done = service.delete(tenant, memory_id, reason=reason)
        except (NotFound, Conflict) as exc:
            raise _fail(exc, tenant) from None
    err.print(f"deleted {memory_id} of tenant {tenant}", highlight=False)
    typer.echo(json.dumps(done.model_dump(mode="json")))


#: ``lightmem memories ...``, merged at the top level.
app = typer.Typer()
app.add_typer(memories_app, name="memories")
