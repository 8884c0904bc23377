"""``lightmem serve`` (the HTTP memory service), ``lightmem keys`` (its API keys) and
``lightmem openapi`` (its checked-in OpenAPI document).

Exit codes: 0 success (or the service stopped), 1 the service cannot start (missing index or
topics, address in use: one line on stderr) or the document is stale, 2 a usage error.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from lightmem.settings import Settings, load_settings

__all__ = ["serve", "keys_app", "openapi_app"]

keys_app = typer.Typer(help="API keys of the memory service (each bound to one tenant, or an "
                       "admin key for the ops routes).",
                       no_args_is_help=True)
openapi_app = typer.Typer(help="The memory service's OpenAPI document.", no_args_is_help=True)


def _err() -> Console:
    # soft_wrap: a refusal to start stays one line, whatever the terminal's width.
    return Console(stderr=True, soft_wrap=True)


def _settings(**overrides: object) -> Settings:
    try:
        return load_settings(**overrides)
    except ValueError as exc:
        _err().print(f"[red]error:[/red] invalid settings: {exc}", highlight=False)
        raise typer.Exit(2) from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    stream: Annotated[bool, typer.Option(
        "--stream", help="Serve the streaming deployment: reads from the Elasticsearch alias "
        "(env LIGHTMEM_ES_URL, LIGHTMEM_ES_ALIAS), writes turns to the turns topic "
        "(env LIGHTMEM_KAFKA_BOOTSTRAP, LIGHTMEM_KAFKA_TOPIC_PREFIX). Default: the embedded "
        "store under --data-dir")] = False,
    data_dir: Annotated[Path | None, typer.Option(
        "--data-dir", help="Embedded data directory; also holds the AML request ledger and "
        "the default keys file (env LIGHTMEM_DATA_DIR, default .lightmem)")] = None,
    host: Annotated[str | None, typer.Option(
        "--host", help="Address to bind; not loopback: API keys are required "
        "(env LIGHTMEM_SERVE_HOST, default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(
        "--port", help="TCP port (env LIGHTMEM_SERVE_PORT, default 8420)")] = None,
    keys_file: Annotated[Path | None, typer.Option(
        "--keys-file", help="Hashed API keys (`lightmem keys create`) (env "
        "LIGHTMEM_API_KEYS_FILE, default DATA_DIR/api-keys.json)")] = None,
    rate: Annotated[float | None, typer.Option(
        "--rate", help="Requests per second per key, 0 = no limit (env "
        "LIGHTMEM_API_RATE_PER_S, default 50)")] = None,
    burst: Annotated[int | None, typer.Option(
        "--burst", help="Burst per key (env LIGHTMEM_API_RATE_BURST, default 100)")] = None,
    alias: Annotated[str | None, typer.Option(
        "--alias", help="With --stream: the index alias to read (env LIGHTMEM_ES_ALIAS)")
    ] = None,
    topic_prefix: Annotated[str | None, typer.Option(
        "--topic-prefix", help="With --stream: prefix of the topic names "
        "(env LIGHTMEM_KAFKA_TOPIC_PREFIX)")] = None,
    dev_tenant: Annotated[str, typer.Option(
        "--dev-tenant", help="Without any API key (dev mode, loopback only): the tenant of "
        "every request")] = "default",
) -> None:
    """Serve memories over HTTP (FastAPI + uvicorn): /v1 routes, the Agent Memory
    Leaderboard contract (/add, /search), /health, /ready and /metrics.

    Every option also reads its LIGHTMEM_* variable; LLM answers use LIGHTMEM_LLM_BASE_URL
    (extractive without it); searches rank by LIGHTMEM_RETRIEVAL (hybrid or knn; a request
    may choose); the encoder runs on LIGHTMEM_TORCH_THREADS threads, 1 unless set (the
    service's parallelism is its concurrent requests, batched into one encoder call).
    SIGTERM/SIGINT finish the requests in flight, then stop (the process ends by that
    signal, as uvicorn re-raises it). Exit status 1: could not start.
    """
    import uvicorn

    from lightmem.service import (
        Auth,
        EmbeddedBackend,
        KeyRing,
        MemoryService,
        RateLimiter,
        StartupError,
        StreamBackend,
        create_app,
    )

    settings = _settings(data_dir=data_dir, serve_host=host, serve_port=port,
                         api_keys_file=keys_file, api_rate_per_s=rate, api_rate_burst=burst,
                         es_alias=alias, kafka_topic_prefix=topic_prefix)
    if settings.torch_threads is None:
        # Concurrent searches share one encoder call (the batcher); intra-op threads would
        # only fight the request threads and Elasticsearch for the cores.
        settings = settings.model_copy(update={"torch_threads": 1})
    err = _err()
    try:
        keys = KeyRing.load(settings.keys_file)
    except ValueError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    dev = None
    if not len(keys):
        if not _is_loopback(settings.serve_host):
            err.print(f"[red]error:[/red] no API keys in {settings.keys_file} and "
                      f"{settings.serve_host} is not loopback: create one with `lightmem keys "
                      "create --tenant T` (dev mode without keys is for 127.0.0.1 only)",
                      highlight=False)
            raise typer.Exit(1)
        dev = dev_tenant
        err.print(f"[yellow]dev mode:[/yellow] no API keys in {settings.keys_file}; every "
                  f"request is tenant {dev!r}, served on {settings.serve_host} only",
                  highlight=False)
    try:
        backend = StreamBackend(settings) if stream else EmbeddedBackend(settings)
    except StartupError as exc:
        err.print(f"[red]error:[/red] cannot start: {exc}", highlight=False)
        raise typer.Exit(1) from None
    service = MemoryService(backend, settings)
    app = create_app(service, Auth(keys=keys, limiter=RateLimiter(settings.api_rate_per_s,
                                                                  settings.api_rate_burst),
                                   dev_tenant=dev))
    err.print(f"serving the {backend.name} store at http://{settings.serve_host}:"
              f"{settings.serve_port} ({len(keys)} API key(s))", highlight=False)
    config = uvicorn.Config(app, host=settings.serve_host, port=settings.serve_port,
                            log_level="info", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    server.run()
    if not server.started:  # the port could not be bound, or the lifespan failed
        raise typer.Exit(1)


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str | None, typer.Option(
        "--tenant", help="The tenant the key acts for")] = None,
    admin: Annotated[bool, typer.Option(
        "--admin", help="An admin key instead: bound to no tenant, it may call the ops "
        "routes (/v1/admin/...: erase a user of a tenant, erasure status, tenants' "
        "counts) and no route of a tenant's data")] = False,
    keys_file: Annotated[Path | None, typer.Option(
        "--keys-file", help="(env LIGHTMEM_API_KEYS_FILE, default DATA_DIR/api-keys.json)")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir",
                                                  help="(env LIGHTMEM_DATA_DIR)")] = None,
) -> None:
    """Make a new API key for --tenant T (or an --admin key): prints it once (stdout); only
    its hash is stored."""
    from lightmem.service.auth import create_key

    if (tenant is None) == (not admin):
        _err().print("[red]error:[/red] give --tenant T (a tenant's key) or --admin (an ops "
                     "key bound to no tenant), one of the two")
        raise typer.Exit(2)
    if tenant is not None and not tenant.strip():
        _err().print("[red]error:[/red] --tenant: must not be blank")
        raise typer.Exit(2)
    settings = _settings(api_keys_file=keys_file, data_dir=data_dir)
    try:
        key, record = create_key(settings.keys_file, tenant.strip() if tenant else None,
                                 admin=admin)
    except (OSError, ValueError) as exc:
        _err().print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    what = "an admin key" if admin else f"for tenant {record.tenant!r}"
    _err().print(f"key {record.key_id} {what} added to {settings.keys_file}; it is shown "
                 "only now:", highlight=False)
    typer.echo(key)


@keys_app.command("list")
def keys_list(
    keys_file: Annotated[Path | None, typer.Option("--keys-file")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir")] = None,
) -> None:
    """Key ids and their tenants, ``(admin)`` for admin keys (never the keys: only hashes
    are stored)."""
    from lightmem.service.auth import KeysFile

    settings = _settings(api_keys_file=keys_file, data_dir=data_dir)
    path = settings.keys_file
    records = KeysFile.model_validate_json(path.read_bytes()).keys if path.exists() else []
    for r in records:
        typer.echo(f"{r.key_id}\t{'(admin)' if r.admin else r.tenant}\t"
                   f"{r.created_at.isoformat()}")


@openapi_app.command("export")
def openapi_export(
    path: Annotated[Path | None, typer.Option(help="Where to write it")] = None,
) -> None:
    """Write the OpenAPI document (default lightmem/service/openapi.json)."""
    from lightmem.service.openapi import OPENAPI_PATH, export_openapi

    _err().print(f"wrote {export_openapi(path or OPENAPI_PATH)}")


@openapi_app.command("check")
def openapi_check(
    path: Annotated[Path | None, typer.Option(help="The checked-in document")] = None,
) -> None:
    """Fail (exit 1) when the checked-in document differs from the app's."""
    from lightmem.service.openapi import OPENAPI_PATH, render_openapi

    target = path or OPENAPI_PATH
    if not target.exists() or target.read_text() != render_openapi():
        _err().print(f"[red]stale[/red] {target}: run `lightmem openapi export`")
        raise typer.Exit(1)


#: ``lightmem serve``, ``lightmem keys ...`` and ``lightmem openapi ...``, merged at the top level.
app = typer.Typer()
app.command()(serve)
app.add_typer(keys_app, name="keys")
app.add_typer(openapi_app, name="openapi")
