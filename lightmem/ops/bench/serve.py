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
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from lightmem.ops.bench.stream import (
    StreamDeployment,
    _check_servers,
    _env,
    _group_ready,
    _percentile,
    _start_worker,
    _stop_worker,
    _tail,
)
from lightmem.schemas import EntryMode, MemoryEntry
from lightmem.settings import Settings, load_settings

__all__ = ["serve_command", "synthetic_memories", "measure", "Service"]

err = Console(stderr=True, width=max(120, Console(stderr=True).width))
out = Console()

#: The tenant of the benchmark's memories (dev mode: the service's --dev-tenant).
TENANT = "bench"
WORDS = ("dog cat kayak cello Lisbon Porto marathon risotto peanuts maps garden piano "
         "sister brother violin tennis sushi Berlin hiking chess novel bakery ferry tulips "
         "yoga jazz camera lemon castle harbor").split()
STORES = ("embedded", "elasticsearch")


# -- corpus ------------------------------------------------------------------------------------


def synthetic_memories(n: int, users: int, *, dim: int = 384, seed: int = 0,
                       tenant: str = TENANT) -> Iterator[MemoryEntry]:
    """``n`` memories spread evenly over ``users`` users, each with a random unit vector.

    Args:
        n: Memories in all.
        users: Users ``u0``..``u{users-1}``; memory ``i`` belongs to ``u{i % users}``.
        dim: Embedding dimension (384: all-MiniLM-L6-v2).
        seed: The same seed gives the same memories and vectors.
        tenant: Their tenant.

    Yields:
        Entries with their embedding, ids ``bench-<i>``, event times a minute apart.
    """
    rng = np.random.default_rng(seed)
    words = random.Random(seed)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    for lo in range(0, n, 1000):
        block = rng.standard_normal((min(1000, n - lo), dim)).astype(np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        for j, vector in enumerate(block):
            i = lo + j
            user = f"u{i % users}"
            when = start + timedelta(minutes=i)
            fact = (f"{user}: I like the {words.choice(WORDS)} and the {words.choice(WORDS)} "
                    f"(note {i})")
            yield MemoryEntry(
                id=f"bench-{i}", tenant=tenant, user=user, conversation=f"c-{user}",
                topic_id=f"t{i // 10}", speaker=user, fact=fact, event_time=when,
                ingest_time=when, source_turn_ids=[f"turn-{i}"], original_text=fact,
                compressed_text=fact, mode=EntryMode.extractive,
                embedding=vector.tolist())


def _chunks(entries: Iterator[MemoryEntry], size: int) -> Iterator[list[MemoryEntry]]:
    chunk: list[MemoryEntry] = []
    for e in entries:
        chunk.append(e)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def build_embedded(data_dir: Path, memories: int, users: int, seed: int) -> float:
    """Fill ``data_dir``'s store (skipped when it holds this corpus); returns seconds."""
    from lightmem.streams.embedded.store import EmbeddedStore
    from lightmem.streams.models.encoder import MINILM_DIM

    marker = data_dir / "bench-corpus.json"
    corpus = {"memories": memories, "users": users, "seed": seed}
    if marker.exists() and json.loads(marker.read_text()) == corpus:
        err.print(f"embedded: reusing the corpus in {data_dir}")
        return 0.0
    data_dir.mkdir(parents=True, exist_ok=True)
    for name in ("lightmem.db", "lightmem.db-wal", "lightmem.db-shm"):
        (data_dir / name).unlink(missing_ok=True)
    store = EmbeddedStore(data_dir / "lightmem.db", dim=MINILM_DIM)
    started = time.perf_counter()
    try:
        for chunk in _chunks(synthetic_memories(memories, users, seed=seed), 5000):
            store.upsert(chunk)
    finally:
        store.close()
    marker.write_text(json.dumps(corpus))
    return time.perf_counter() - started


def kept_alias(memories: int, users: int, seed: int) -> str:
    """The alias of the Elasticsearch corpus ``--keep-corpus`` keeps and reuses."""
    return f"lmbench-serve-{memories}-{users}-{seed}-mem"


def _corpus_docs(settings: Settings) -> int:
    """Corpus memories (ids ``bench-*``) behind ``settings.es_alias``; 0 when it is missing."""
    from lightmem.streams.elastic.store import es_client

    es = es_client(settings)
    try:
        if not es.indices.exists_alias(name=settings.es_alias):
            return 0
        es.indices.refresh(index=settings.es_alias)
        return int(es.count(index=settings.es_alias,
                            query={"prefix": {"id": "bench-"}})["count"])
    finally:
        es.close()


def _drop_non_corpus(settings: Settings) -> None:
    """Leave only the corpus behind a kept alias: the freshness turns' memories and the
    events index go."""
    from lightmem.streams.elastic.events import events_index
    from lightmem.streams.elastic.store import es_client

    es = es_client(settings)
    try:
        es.indices.delete(index=events_index(settings.es_alias), ignore_unavailable=True)
        # Search + bulk delete: the integ-test distribution has no _delete_by_query.
        resp = es.search(index=settings.es_alias, size=10_000, source=False,
                         query={"bool": {"must_not": {"prefix": {"id": "bench-"}}}})
        hits = resp["hits"]["hits"]
        if hits:
            es.bulk(operations=[{"delete": {"_index": h["_index"], "_id": h["_id"]}}
                                for h in hits], refresh=True)
    finally:
        es.close()


def build_elasticsearch(settings: Settings, memories: int, users: int, seed: int) -> float:
    """Create the alias's index and bulk-load the corpus; returns seconds (refresh included)."""
    from lightmem.streams.elastic.store import ElasticsearchStore, es_client

    es = es_client(settings)
    try:
        store = ElasticsearchStore(es, alias=settings.es_alias)
        store.ensure_index()
        started = time.perf_counter()
        for chunk in _chunks(synthetic_memories(memories, users, seed=seed), 2000):
            store.bulk_upsert(chunk)
        store.refresh()
        return time.perf_counter() - started
    finally:
        es.close()


# -- the service as a process ------------------------------------------------------------------

#: The bench's own service options: loopback only, no per-key rate limit (it measures capacity).
_BENCH_SERVE_ARGS = ("--host", "127.0.0.1", "--rate", "0")


@dataclass
class Service:
    """A ``lightmem serve`` subprocess on a free loopback port (the bench's and the service
    tests')."""

    url: str
    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        """The end of the process's log (its last 4,000 characters)."""
        return self.log.read_text(errors="replace")[-4000:]

    @classmethod
    def start(cls, args: Sequence[str], *, env: dict[str, str], log: Path,
              timeout_s: float = 600.0) -> Service:
        """Start ``python -m lightmem serve ARGS``; return once ``/ready`` answers 200."""
        import httpx

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        with log.open("wb") as f:
            proc = subprocess.Popen(
                [sys.executable, "-m", "lightmem", "serve", "--port", str(port), *args],
                env=env, stdout=f, stderr=subprocess.STDOUT)
        service = cls(url=f"http://127.0.0.1:{port}", proc=proc, log=log)
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"lightmem serve exited {proc.returncode}:\n{_tail(log)}")
            try:
                if httpx.get(f"{service.url}/ready", timeout=2.0).status_code == 200:
                    return service
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                service.stop()
                raise RuntimeError(f"lightmem serve not ready in {timeout_s:.0f}s:\n"
                                   f"{_tail(log)}")
            time.sleep(0.2)  # readiness polling interval (models load in the lifespan)

    def stop(self) -> int:
        """SIGTERM (requests in flight finish), then wait; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


# -- measuring ---------------------------------------------------------------------------------


def measure(fn: Callable[[tuple[str, str]], None], queries: Sequence[tuple[str, str]],
            clients: int) -> dict[str, float]:
    """Run ``queries`` split over ``clients`` threads; queries/s and latency percentiles (ms)."""
    latencies: list[float] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def client(part: Sequence[tuple[str, str]]) -> None:
        for q in part:
            t0 = time.perf_counter()
            try:
                fn(q)
            except Exception as exc:  # noqa: BLE001 - counted and re-raised below
                with lock:
                    failures.append(exc)
                return
            with lock:
                latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client, args=(queries[i::clients],), daemon=True)
               for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{len(failures)} searches failed, first: {failures[0]!r}")
    ms = [x * 1000 for x in latencies]
    return {"qps": round(len(ms) / wall, 1),
            **{f"p{q}_ms": round(_percentile(ms, q) or 0.0, 1) for q in (50, 95, 99)}}


def _queries(n: int, users: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed + 1)
    return [(f"u{rng.randrange(users)}", f"what about the {rng.choice(WORDS)} and the "
             f"{rng.choice(WORDS)}?") for _ in range(n)]


def _http_search(url: str, k: int) -> Callable[[tuple[str, str]], None]:
    import httpx

    local = threading.local()

    def search(q: tuple[str, str]) -> None:
        if not hasattr(local, "client"):  # one connection per client thread
            local.client = httpx.Client(base_url=url, timeout=120.0)
        r = local.client.post("/v1/search", json={"user": q[0], "query": q[1], "k": k})
        r.raise_for_status()

    return search


def _bare_search(store_name: str, settings: Settings, embed: Callable[[list[str]], Any],
                 k: int) -> tuple[Callable[[tuple[str, str]], None], Callable[[], None]]:
    """The bare path (query embedding + the store's kNN, in process) and its closer.

    With ``LIGHTMEM_RETRIEVAL=hybrid`` (the service then also ranks BM25 and fuses), the
    bare path does the same store work: kNN and BM25 over the same number of candidates.
    """
    from lightmem.processors.lexical import query_terms
    from lightmem.processors.retrieve import DEFAULT_CANDIDATES

    hybrid = settings.retrieval == "hybrid"
    n = max(k, DEFAULT_CANDIDATES) if hybrid else k
    model_lock = threading.Lock()
    if store_name == "embedded":
        from lightmem.streams.embedded.store import EmbeddedStore
        from lightmem.streams.models.encoder import MINILM_DIM

        store = EmbeddedStore(settings.data_dir / "lightmem.db", dim=MINILM_DIM)

        def bare(q: tuple[str, str]) -> None:
            with model_lock:  # one SQLite connection and one model, as the service holds them
                vector = embed([q[1]])[0]
                store.search(TENANT, q[0], vector.tolist(), n)
                if hybrid and (terms := query_terms(q[1])):
                    store.lexical_search(TENANT, q[0], terms, n)

        return bare, store.close
    from lightmem.streams.elastic.store import ElasticsearchStore, es_client

    es = es_client(settings)
    es_store = ElasticsearchStore(es, alias=settings.es_alias)

    def bare_es(q: tuple[str, str]) -> None:
        with model_lock:  # one model; the kNN requests run concurrently
            vector = embed([q[1]])[0]
        es_store.search(TENANT, q[0], vector.tolist(), n)
        if hybrid and (terms := query_terms(q[1])):
            es_store.lexical_search(TENANT, q[0], terms, n)

    return bare_es, es.close


def search_rounds(store_name: str, settings: Settings, service: Service, *,
                  queries: list[tuple[str, str]], clients: list[int], k: int,
                  embed: Callable[[list[str]], Any]) -> list[dict[str, Any]]:
    """Bare and service, level after level, on the same queries."""
    bare, close = _bare_search(store_name, settings, embed, k)
    http = _http_search(service.url, k)
    try:
        for q in queries[:5]:  # warm-up: connections, caches, first kernels
            bare(q)
            http(q)
        rows = []
        for n in clients:
            b = measure(bare, queries, n)
            s = measure(http, queries, n)
            row = {"store": store_name, "clients": n, "bare": b, "service": s,
                   "ratio": round(s["qps"] / b["qps"], 2) if b["qps"] else None}
            err.print(f"{store_name} {n:2d} clients: service {s['qps']:.1f} q/s p95 "
                      f"{s['p95_ms']:.0f} ms, bare {b['qps']:.1f} q/s -> {row['ratio']}")
            rows.append(row)
        return rows
    finally:
        close()


def freshness(url: str, *, users: int, turns: int, rate: float, timeout_s: float,
              seed: int) -> dict[str, Any]:
    """Add turns at ``rate``/s through the service, then go quiet; time each to searchable."""
    import httpx

    rng = random.Random(seed + 2)
    run = f"{rng.randrange(16**6):06x}"
    plan = []
    for i in range(turns):
        user = f"fresh-{run}-{i % users}"
        text = (f"I booked a {rng.choice(WORDS)} lesson with my {rng.choice(WORDS)} friend "
                f"number {i} in {rng.choice(WORDS)}")
        plan.append((i, user, text))
    last_of_user = {user: i for i, user, _ in plan}  # nothing comes after these turns
    sent: dict[int, float] = {}
    found: dict[int, float] = {}
    turn_ids: dict[int, str] = {}
    kinds: dict[int, str] = {}
    lock = threading.Lock()
    done = threading.Event()
    errors: list[str] = []

    def poll() -> None:
        client = httpx.Client(base_url=url, timeout=60.0)
        while not done.is_set():
            with lock:
                pending = [(i, turn_ids[i]) for i in turn_ids if i not in found]
            for i, turn_id in pending:
                _, user, text = plan[i]
                r = client.post("/v1/search", json={"user": user, "query": text, "k": 10})
                if r.status_code != 200:
                    errors.append(f"search {r.status_code}: {r.text[:200]}")
                    continue
                for hit in r.json()["results"]:
                    if turn_id in hit["source_turn_ids"]:
                        with lock:
                            found[i] = time.monotonic()
                            kinds[i] = hit["kind"]
                        break
            if not pending:
                time.sleep(0.02)  # nothing to look for yet

    poller = threading.Thread(target=poll, name="bench-fresh-poll", daemon=True)
    poller.start()
    client = httpx.Client(base_url=url, timeout=120.0)
    t0 = time.monotonic()
    try:
        for i, user, text in plan:
            wait = t0 + i / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            at = time.monotonic()
            r = client.post("/v1/memories", json={
                "user": user, "conversation": f"c-{user}", "messages": [{
                    "role": "user", "content": text,
                    "timestamp": datetime.now(UTC).isoformat()}]})
            r.raise_for_status()
            with lock:
                sent[i] = at
                turn_ids[i] = r.json()["turn_ids"][0]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with lock:
                if len(found) == len(plan):
                    break
            time.sleep(0.1)
    finally:
        done.set()
        poller.join(60)
    quiet = set(last_of_user.values())

    def summary(ids: set[int]) -> dict[str, Any]:
        lat = sorted(found[i] - sent[i] for i in ids if i in found)
        return {"turns": len(ids), "searchable": len(lat),
                "p50_s": None if not lat else round(_percentile(lat, 50) or 0.0, 2),
                "p95_s": None if not lat else round(_percentile(lat, 95) or 0.0, 2),
                "as_event": sum(1 for i in ids if kinds.get(i) == "event")}

    return {"rate": rate, "users": users, "timeout_s": timeout_s,
            "flowing": summary(set(range(turns)) - quiet), "quiet": summary(quiet),
            "search_errors": errors[:3]}


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
        service = Service.start([*_BENCH_SERVE_ARGS, "--data-dir", str(data_dir),
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
        if keep_corpus and _corpus_docs(settings) == memories:
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
        service = Service.start([*_BENCH_SERVE_ARGS, "--stream", "--data-dir",
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
            _drop_non_corpus(settings)


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
    qs = _queries(queries, users, seed)
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
