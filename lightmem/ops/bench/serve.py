"""``lightmem bench serve``: the memory service's search and freshness, beside the bare path.

For each store (``embedded``: SQLite + sqlite-vec under a fresh data directory;
``elasticsearch``: a private alias and topics on the configured servers), in one run:

1. **Corpus.** ``--memories`` memories of ``--users`` users (one tenant) are written straight
   into the store (the pipeline is far too slow to build 100,000 on a laptop): short synthetic
   facts with **random unit vectors** (seeded), not the encoder's vectors of those facts. The
   kNN's cost depends on the number of vectors per scope and their dimension, not on what
   they say; queries are embedded by the real encoder.
2. **Search.** A real ``lightmem serve`` process (``--stream`` for Elasticsearch) on a free
   port; the same ``--queries`` (user, question) pairs are run at each of ``--clients``
   concurrent clients over HTTP (``POST /v1/search``, k = ``--k``, events included) and,
   in the same run and in this process, on the **bare path**: the query's embedding by the
   same encoder (one at a time under one lock: one model) plus the store's kNN called
   directly (embedded: under the same lock, one SQLite connection, as the service holds
   them; Elasticsearch: concurrent); with ``LIGHTMEM_RETRIEVAL=hybrid`` also the store's BM25
   over as many candidates as the service asks for. Printed: queries/s, p50/p95/p99 ms, and
   service / bare. Both sides use the same settings (``LIGHTMEM_TORCH_THREADS``: on a loaded
   2-core machine 1 thread is far faster than 2 for one short query).
3. **Freshness.** Turns of ``--fresh-users`` users are added through the service
   (``POST /v1/memories``, one turn a request) at ``--fresh-rate`` turns/s for
   ``--fresh-turns`` turns, then nothing more: the stream goes quiet. Each turn's latency runs
   from the moment its add was sent to the first search through the service (query = the
   turn's text) that returns a hit, memory or provisional event, whose ``source_turn_ids``
   holds it. Reported separately: the turns while traffic flows, and the last turn of every
   user (nothing comes after it). A turn not found within ``--fresh-timeout`` seconds is
   counted as such. On Elasticsearch a ``lightmem worker`` runs on the private topics (it
   builds the memories); the service's idle flush fires on wall-clock silence after
   ``LIGHTMEM_IDLE_TIMEOUT_S``.

The corpus is kept under ``--work-dir`` (embedded) between runs of the same size and seed;
the Elasticsearch deployment is removed at the end, unless ``--keep-corpus``: then the
corpus goes into the alias ``lmbench-serve-<memories>-<users>-<seed>-mem``, stays after the
run (the freshness turns' memories and events removed), and a later run with the same size
and seed finds it complete and reuses it (loading 100,000 memories takes minutes).

The corpus is built by :mod:`.serve_corpus`, the service process and the load by
:mod:`.serve_load`; this module runs both stores and prints the report.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from lightmem.ops.bench.serve_corpus import (
    TENANT,
    build_elasticsearch,
    build_embedded,
    corpus_docs,
    drop_non_corpus,
    kept_alias,
    synthetic_memories,
)
from lightmem.ops.bench.serve_load import (
    BENCH_SERVE_ARGS,
    Service,
    bench_queries,
    freshness,
    measure,
    search_rounds,
)
from lightmem.ops.bench.stream import (
    StreamDeployment,
    _check_servers,
    _env,
    _group_ready,
    _start_worker,
    _stop_worker,
    _tail,
)
from lightmem.settings import Settings, load_settings

__all__ = ["serve_command", "synthetic_memories", "measure", "Service"]

err = Console(stderr=True, width=max(120, Console(stderr=True).width))
out = Console()

STORES = ("embedded", "elasticsearch")


# -- the two stores ----------------------------------------------------------------------------


def _service_env(settings: Settings, extra: dict[str, Any]) -> dict[str, str]:
    return _env({"kafka_bootstrap": settings.kafka_bootstrap, "es_url": settings.es_url,
                 "api_keys_file": None, **extra})


def run_store(store_name: str, settings: Settings, *, memories: int, users: int,
              queries: list[tuple[str, str]], clients: list[int], k: int, seed: int,
              work_dir: Path, embed: Callable[[list[str]], Any], fresh: dict[str, Any],
              keep_corpus: bool = False) -> dict[str, Any]:
    """Build (or reuse) the corpus, start the service, measure search and freshness.

    ``keep_corpus`` (Elasticsearch): the corpus lives in :func:`kept_alias`, is reused when
    complete and stays after the run.
    """
    keys = work_dir / "no-keys.json"  # dev mode on loopback: no key files of the user's
    if store_name == "embedded":
        data_dir = work_dir / f"embedded-{memories}-{users}-{seed}"
        build_s = build_embedded(data_dir, memories, users, seed)
        settings = settings.model_copy(update={"data_dir": data_dir})
        service = Service.start([*BENCH_SERVE_ARGS, "--data-dir", str(data_dir),
                                 "--keys-file", str(keys), "--dev-tenant", TENANT],
                                env=_service_env(settings, {}), log=work_dir / "serve.log")
        try:
            rows = search_rounds(store_name, settings, service, queries=queries,
                                 clients=clients, k=k, embed=embed)
            fresh_result = (freshness(service.url, **fresh, seed=seed)
                            if fresh["turns"] else None)
        finally:
            service.stop()
        return {"store": store_name, "build_s": round(build_s, 1), "search": rows,
                "freshness": fresh_result}

    from lightmem.streams.elastic.store import es_client
    from lightmem.streams.kafka.teardown import remove_deployment
    from lightmem.streams.kafka.topics import Topics, create_topics

    deployment = StreamDeployment.new()
    alias = kept_alias(memories, users, seed) if keep_corpus else deployment.alias
    settings = settings.model_copy(update={"es_alias": alias,
                                           "kafka_topic_prefix": deployment.prefix,
                                           "ingest_group": deployment.ingest_group,
                                           "data_dir": work_dir / f"es-{deployment.run}"})
    env = _service_env(settings, {"es_alias": alias,
                                  "kafka_topic_prefix": deployment.prefix,
                                  "ingest_group": deployment.ingest_group})
    worker = None
    try:
        create_topics(settings, Topics.from_settings(settings))
        if keep_corpus and corpus_docs(settings) == memories:
            err.print(f"elasticsearch: reusing the {memories} memories in {alias}")
            build_s = 0.0
        else:
            if keep_corpus:  # an incomplete corpus (an interrupted load): start again
                es = es_client(settings)
                try:
                    remove_deployment(settings, alias=alias, es=es)
                finally:
                    es.close()
            err.print(f"elasticsearch: loading {memories} memories into {alias} ...")
            build_s = build_elasticsearch(settings, memories, users, seed)
        service = Service.start([*BENCH_SERVE_ARGS, "--stream", "--data-dir",
                                 str(settings.data_dir),
                                 "--keys-file", str(keys), "--dev-tenant", TENANT],
                                env=env, log=work_dir / "serve-es.log")
        try:
            rows = search_rounds(store_name, settings, service, queries=queries,
                                 clients=clients, k=k, embed=embed)
            fresh_result = None
            if fresh["turns"]:
                # The worker builds memories (and, where it writes them, events) from the
                # added turns; it starts after the search rounds so as not to share the CPU.
                from confluent_kafka.admin import AdminClient

                from lightmem.streams.kafka.topics import kafka_config

                worker = _start_worker(deployment.prefix, env, work_dir / "worker.log")
                admin = AdminClient(kafka_config(settings))
                deadline = time.monotonic() + 600
                turns_topic = Topics.from_settings(settings).turns
                while not _group_ready(admin, deployment.ingest_group, turns_topic,
                                       settings.kafka_partitions):
                    if worker.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("the worker did not join its group:\n"
                                           f"{_tail(work_dir / 'worker.log')}")
                    time.sleep(1.0)  # group-join polling interval
                fresh_result = freshness(service.url, **fresh, seed=seed)
        finally:
            service.stop()
        return {"store": store_name, "build_s": round(build_s, 1), "search": rows,
                "freshness": fresh_result}
    finally:
        if worker is not None:
            _stop_worker(worker)
        es = es_client(settings)
        try:
            remove_deployment(settings,
                              topic_prefixes=[deployment.prefix, deployment.ingest_group],
                              groups=[deployment.ingest_group],
                              alias=None if keep_corpus else alias, es=es)
        finally:
            es.close()
        if keep_corpus:
            drop_non_corpus(settings)


def _ints(value: str) -> list[int]:
    try:
        levels = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"comma-separated integers, got {value!r}") from None
    if not levels or min(levels) < 1:
        raise typer.BadParameter(f"at least one level, each >= 1 (got {value!r})")
    return levels


def _stores(value: str) -> list[str]:
    names = [x.strip() for x in value.split(",") if x.strip()]
    bad = [n for n in names if n not in STORES]
    if not names or bad:
        raise typer.BadParameter(f"choose from {', '.join(STORES)} (got {value!r})")
    return names


def serve_command(
    memories: Annotated[int, typer.Option(min=1, help="Memories in the corpus")] = 100_000,
    users: Annotated[int, typer.Option(min=1, help="Users they are spread over")] = 1_000,
    store: Annotated[str, typer.Option(help="embedded, elasticsearch or both, "
                                            "comma-separated")] = "embedded,elasticsearch",
    queries: Annotated[int, typer.Option(min=1, help="Searches per level")] = 300,
    clients: Annotated[str, typer.Option(help="Concurrency levels")] = "1,8,32",
    k: Annotated[int, typer.Option(min=1, max=1000, help="Hits per search")] = 10,
    fresh_turns: Annotated[int, typer.Option(
        min=0, help="Turns added for the freshness measure (0: skip it)")] = 40,
    fresh_users: Annotated[int, typer.Option(min=1, help="Users those turns belong to")] = 4,
    fresh_rate: Annotated[float, typer.Option(min=0.1, help="Turns/s offered")] = 2.0,
    fresh_timeout: Annotated[float, typer.Option(
        min=1.0, help="Seconds after the last turn before a turn counts as not "
        "searchable")] = 60.0,
    seed: Annotated[int, typer.Option(help="Corpus and query seed")] = 0,
    work_dir: Annotated[Path | None, typer.Option(
        help="Embedded corpora and logs (default: a new temporary directory)")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write JSON here")
                        ] = None,
    keep_corpus: Annotated[bool, typer.Option(
        "--keep-corpus", help="Elasticsearch: keep the corpus in the alias "
        "lmbench-serve-<memories>-<users>-<seed>-mem after the run and reuse it when a "
        "later run finds it complete (remove it with `curl -XDELETE "
        "$LIGHTMEM_ES_URL/lmbench-serve-*`)")] = False,
) -> None:
    """Search q/s and p50/p95/p99 of `lightmem serve` at 1/8/32 clients beside the bare path
    (query embedding + the store's kNN in process), and produce -> searchable latency."""
    stores, levels = _stores(store), _ints(clients)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # SIGTERM unwinds like Ctrl-C: the service, the worker and the private topics and
    # indices are removed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    settings = load_settings()
    if "elasticsearch" in stores:
        _check_servers(settings)
    work = work_dir or Path(tempfile.mkdtemp(prefix="lightmem-bench-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    from lightmem.streams.models.components import Components

    err.print("loading the encoder (the bare path's) ...")
    components = Components(settings)
    embed = components.embedder
    embed(["warm up"])
    qs = bench_queries(queries, users, seed)
    fresh = {"users": fresh_users, "turns": fresh_turns, "rate": fresh_rate,
             "timeout_s": fresh_timeout}
    results = []
    for name in stores:
        err.print(f"[bold]{name}[/bold]: {memories} memories of {users} users "
                  "(random unit vectors) ...")
        results.append(run_store(name, settings, memories=memories, users=users, queries=qs,
                                 clients=levels, k=k, seed=seed, work_dir=work, embed=embed,
                                 fresh=fresh, keep_corpus=keep_corpus))
    report = {"memories": memories, "users": users, "queries": queries, "k": k,
              "vectors": "random unit vectors (seeded); queries by the real encoder",
              "retrieval": settings.retrieval,
              "batch_queries": settings.serve_batch_queries,
              "idle_timeout_s": settings.idle_timeout_s, "results": results}
    _print(report)
    out.print_json(data=report)
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2) + "\n")


def _print(report: dict[str, Any]) -> None:
    table = Table(title=f"bench serve: {report['memories']} memories of {report['users']} "
                        f"users, {report['queries']} searches per level, k={report['k']}, "
                        f"retrieval {report['retrieval']}")
    for col in ("store", "clients", "service q/s", "p50 ms", "p95 ms", "p99 ms",
                "bare q/s", "bare p50", "bare p95", "bare p99", "service / bare"):
        table.add_column(col, justify="right")
    for res in report["results"]:
        for row in res["search"]:
            s, b = row["service"], row["bare"]
            table.add_row(res["store"], str(row["clients"]), f"{s['qps']:.1f}",
                          f"{s['p50_ms']:.1f}", f"{s['p95_ms']:.1f}", f"{s['p99_ms']:.1f}",
                          f"{b['qps']:.1f}", f"{b['p50_ms']:.1f}", f"{b['p95_ms']:.1f}",
                          f"{b['p99_ms']:.1f}", str(row["ratio"]))
    err.print(table)
    fresh = Table(title="produce -> searchable (through the service, events included)")
    for col in ("store", "turns", "searchable", "as event", "p50 s", "p95 s"):
        fresh.add_column(col, justify="right")
    for res in report["results"]:
        f = res["freshness"]
        if f is None:
            continue
        for label in ("flowing", "quiet"):
            part = f[label]
            fresh.add_row(f"{res['store']} ({label})", str(part["turns"]),
                          str(part["searchable"]), str(part["as_event"]),
                          str(part["p50_s"]), str(part["p95_s"]))
    err.print(fresh)
