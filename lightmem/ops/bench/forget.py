"""``lightmem bench forget``: what an erasure costs (issue 14), in one run, side by side.

1. **Time to erase one user among many**: ``--memories`` memories (default 100,000) spread
   evenly over ``--users`` users (default 1,000) of one tenant are written straight into
   both stores (random unit vectors, no pipeline or LLM: the erasure does not care what the
   text says), then one user is forgotten with the same function ``lightmem forget`` calls:
   the embedded store (:func:`~lightmem.streams.erasure.forget.forget`, one SQLite
   transaction) and the streaming deployment (:func:`~lightmem.streams.erasure.forget.
   forget_stream` on a throwaway alias and topics: the ledger record, two delete-by-query
   passes over every memory index, the sleep outbox, the buffer and DLQ checks, the audit
   change). Beside each, the same user's memories deleted alone (Elasticsearch: one
   delete-by-query pass; embedded: the per-id deletes of the store), so the overhead of
   the erasure's guarantees is visible. Every other user's memories are counted afterwards
   (nothing else may go).
2. **Ingest throughput while the ledger is consulted**: the same LoCoMo turns through a real
   ``lightmem worker`` (``bench stream``'s measurement: first turn produced -> last turn
   searchable) on a deployment with no erasure on record, and on one whose erasure ledger
   holds ``--ledger`` records (default 1,000) of the same tenant: the turns' own users erased
   a day before the run (every record is looked up and kept: turns produced after an
   erasure are a new beginning) and other users. The ratio ledger / none is the issue's
   aim (>= 0.95). ``--rounds 2`` runs none, ledger, ledger, none (drift cancels out).
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from lightmem.ops.bench.locomo_data import DEFAULT_LOCOMO, load_locomo
from lightmem.ops.bench.stream import StreamDeployment, interleave, run_stream
from lightmem.schemas import EntryMode, ErasureRequest, MemoryEntry
from lightmem.settings import Settings, load_settings

__all__ = ["forget_command", "synthetic_memories"]

err = Console(stderr=True, width=max(120, Console(stderr=True).width))
out = Console()

TENANT = "bench"
DIM = 384
T0 = datetime(2024, 1, 1, tzinfo=UTC)


def _user(i: int) -> str:
    return f"u{i:05d}"


def synthetic_memories(users: int, memories: int, *, chunk: int = 2000, seed: int = 0
                       ) -> Iterator[list[MemoryEntry]]:
    """``memories`` memories of tenant ``bench``, memory ``i`` of user ``i % users``, with
    random unit vectors (rounded to 5 decimals: smaller bulk requests), ``chunk`` at a time."""
    rng = np.random.default_rng(seed)
    for start in range(0, memories, chunk):
        n = min(chunk, memories - start)
        vectors = rng.standard_normal((n, DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        batch = []
        for j, vector in enumerate(np.round(vectors, 5).tolist()):
            i = start + j
            user = _user(i % users)
            when = T0 + timedelta(minutes=i)
            fact = f"{user}: remembered fact number {i} about topic {i % 97}"
            batch.append(MemoryEntry(
                id=f"m{i:07d}", tenant=TENANT, user=user, conversation=f"c-{user}",
                topic_id=f"t{i % 97}", speaker=user, fact=fact, event_time=when,
                ingest_time=when, source_turn_ids=[f"turn-{i}"], original_text=fact,
                compressed_text=fact, mode=EntryMode.extractive, embedding=vector))
        yield batch


# -- 1. erase one user ---------------------------------------------------------------------------


class _Stores:
    """The embedded store and a throwaway streaming deployment, filled with the same
    memories; removed by :meth:`close`."""

    def __init__(self, base: Settings, *, es: bool) -> None:
        self.run = uuid.uuid4().hex[:8]
        self.data_dir = Path(tempfile.mkdtemp(prefix="lightmem-bench-forget-"))
        self.settings = base.model_copy(update={
            "data_dir": self.data_dir, "es_alias": f"lmbench-{self.run}-mem",
            "kafka_topic_prefix": f"lmbench-{self.run}.", "ingest_group": f"lmbench-{self.run}"})
        from lightmem.streams.embedded.runtime import EmbeddedRuntime

        self.runtime = EmbeddedRuntime(self.settings)
        self.es: Any = None
        self.store: Any = None
        self.topics: Any = None
        if es:
            from lightmem.streams.elastic.store import ElasticsearchStore, es_client
            from lightmem.streams.kafka.topics import Topics, create_topics

            self.es = es_client(self.settings)
            self.store = ElasticsearchStore(self.es, alias=self.settings.es_alias)
            self.store.ensure_index()
            self.topics = Topics.from_settings(self.settings)
            create_topics(self.settings, self.topics)

    def fill(self, users: int, memories: int) -> dict[str, float]:
        """Write the memories into both stores; seconds per store."""
        spent = {"embedded": 0.0, "elasticsearch": 0.0}
        done = 0
        for batch in synthetic_memories(users, memories):
            t0 = time.perf_counter()
            self.runtime.store.upsert(batch)
            spent["embedded"] += time.perf_counter() - t0
            if self.store is not None:
                t0 = time.perf_counter()
                self.store.bulk_upsert(batch, refresh=False)
                spent["elasticsearch"] += time.perf_counter() - t0
            done += len(batch)
            if done % 20_000 < len(batch) or done == memories:
                err.print(f"  {done}/{memories} memories written", highlight=False)
        if self.store is not None:
            self.store.refresh()
        return spent

    def es_count(self, user: str | None = None) -> int:
        query: dict[str, Any] = {"bool": {"filter": [{"term": {"tenant": TENANT}}] + (
            [{"term": {"user": user}}] if user is not None else [])}}
        self.es.indices.refresh(index=self.store.target)
        return int(self.es.count(index=self.store.target, query=query)["count"])

    def close(self) -> None:
        import shutil

        if "store" in vars(self.runtime):
            self.runtime.store.close()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        if self.es is not None:
            from lightmem.streams.kafka.teardown import remove_deployment

            remove_deployment(self.settings, topic_prefixes=[self.settings.kafka_topic_prefix],
                              alias=self.settings.es_alias, es=self.es)
            self.es.close()


def _erase_embedded(stores: _Stores, users: int, memories: int, erased: int,
                    alone: int) -> dict[str, Any]:
    from lightmem.streams.erasure.forget import forget

    store = stores.runtime.store
    user = _user(erased)
    t0 = time.perf_counter()
    report = forget(stores.settings, TENANT, user, reason="bench",
                    requested_by="bench forget", runtime=stores.runtime)
    seconds = time.perf_counter() - t0
    removed = report.sink("memories").removed.get("memories", 0)
    # Baseline: another user's memories deleted one by one through the store, in one
    # transaction (what a loop over `memories delete` would do, without the history).
    victims = list(store.iter_entries(TENANT, _user(alone)))
    t0 = time.perf_counter()
    with store.transaction():
        for e in victims:
            store.delete(e.id, expected_version=e.version)
    alone_s = time.perf_counter() - t0
    left = sum(store.count_entries().values())
    return {"forget_s": round(seconds, 3), "removed": removed, "confirmed": report.confirmed,
            "delete_alone_s": round(alone_s, 3), "deleted_alone": len(victims),
            "others_intact": left == memories - removed - len(victims)}


def _erase_es(stores: _Stores, users: int, memories: int, erased: int,
              alone: int) -> dict[str, Any]:
    from lightmem.streams.erasure.forget import erase_elasticsearch, forget_stream, new_request

    user = _user(erased)
    t0 = time.perf_counter()
    report = forget_stream(stores.settings, new_request(TENANT, user, reason="bench",
                                                        requested_by="bench forget"),
                           topics=stores.topics, store=stores.store, wait_s=30.0)
    seconds = time.perf_counter() - t0
    es = report.sink("elasticsearch")
    # Baseline: one delete-by-query pass over the memory indices for another user, alone.
    t0 = time.perf_counter()
    deleted = erase_elasticsearch(stores.store, TENANT, _user(alone))
    alone_s = time.perf_counter() - t0
    left = stores.es_count()
    removed = es.removed.get("memories", 0)
    return {"forget_s": round(seconds, 3), "removed": removed, "confirmed": report.confirmed,
            "pending": [f"{s.sink}: {p}" for s in report.sinks for p in s.pending
                        if not s.confirmed],
            "delete_alone_s": round(alone_s, 3), "deleted_alone": sum(deleted.values()),
            "others_intact": left == memories - removed - sum(deleted.values())}


# -- 2. ingest with the ledger consulted -------------------------------------------------------


def _record_ledger(settings: Settings, deployment: StreamDeployment, scopes: list[str],
                   n: int, at: datetime) -> int:
    """Create the deployment's topics and record ``n`` erasures of tenant ``locomo``: the
    turns' own users (``scopes``) first, then other users; all at ``at``."""
    from lightmem.ops.bench.locomo_data import TENANT as LOCOMO
    from lightmem.streams.kafka.producer import RecordProducer
    from lightmem.streams.kafka.topics import Topics, create_topics

    topics = Topics(prefix=deployment.prefix)
    create_topics(settings, topics)
    users = list(dict.fromkeys(scopes)) + [f"erased-{i:05d}" for i in range(n)]
    with RecordProducer(settings, topics) as producer:
        for i, user in enumerate(users[:n]):
            request = ErasureRequest(erasure_id=f"bench-{i}", tenant=LOCOMO, user=user,
                                     requested_at=at, requested_by="bench forget")
            producer.produce(topics.erasures, request.to_bytes(), key=request.key.encode())
        producer.flush()
    return min(n, len(users))


def _lookup_cost(turns: list[Any], n: int) -> dict[str, float]:
    """In-process cost of the check every stage makes per record: ``ErasureLedger.drops``
    with ``n`` erasures on record (the turns' users among them) beside an empty ledger."""
    from lightmem.processors.erasure import ErasureLedger, to_ms

    at = datetime.now(UTC) - timedelta(days=1)
    users = list(dict.fromkeys(t.user for t in turns)) + [f"erased-{i:05d}" for i in range(n)]
    full = ErasureLedger([ErasureRequest(erasure_id=f"b{i}", tenant=turns[0].tenant, user=u,
                                         requested_at=at) for i, u in enumerate(users[:n])])
    now = to_ms(datetime.now(UTC))
    out = {}
    for name, ledger in (("empty", ErasureLedger()), ("ledger", full)):
        t0 = time.perf_counter()
        for _ in range(max(1, 200_000 // len(turns))):
            for t in turns:
                ledger.drops(t.tenant, t.user, now)
        calls = max(1, 200_000 // len(turns)) * len(turns)
        out[f"{name}_us_per_record"] = round((time.perf_counter() - t0) / calls * 1e6, 3)
    return out


def _ingest_pair(turns: list[Any], *, ledger: int, rate: float, rounds: int,
                 compressor: str) -> dict[str, Any]:
    overrides: dict[str, Any] = {"compressor": compressor, "llm_base_url": None,
                                 "data_dir": tempfile.mkdtemp(prefix="lightmem-bench-forget-")}
    settings = load_settings(compressor=compressor).model_copy(update={"llm_base_url": None})
    order = ["none", "ledger"] if rounds == 1 else ["none", "ledger", "ledger", "none"]
    runs: dict[str, list[dict[str, Any]]] = {"none": [], "ledger": []}
    recorded = 0
    for i, kind in enumerate(order):
        deployment = StreamDeployment.new()
        if kind == "ledger":
            recorded = _record_ledger(settings, deployment, [t.user for t in turns], ledger,
                                      datetime.now(UTC) - timedelta(days=1))
        runs[kind].append(run_stream(settings, overrides, turns, rate,
                                     label=f"{kind} ({i + 1}/{len(order)})",
                                     deployment=deployment))
    mean = {k: sum(r["turns_per_s"] for r in v) / len(v) for k, v in runs.items()}
    return {"turns": len(turns), "ledger_records": recorded, "offered_rate": rate,
            "compressor": compressor, "lookup": _lookup_cost(turns, ledger),
            "none": runs["none"], "ledger": runs["ledger"],
            "turns_per_s": {k: round(v, 2) for k, v in mean.items()},
            "searchable": {k: [r["searchable_turns"] for r in v] for k, v in runs.items()},
            "ratio_ledger_over_none": round(mean["ledger"] / mean["none"], 3)}


# -- command -------------------------------------------------------------------------------------


def forget_command(
    users: Annotated[int, typer.Option(min=2, help="Users of the tenant")] = 1000,
    memories: Annotated[int, typer.Option(
        min=2, help="Memories in all, spread evenly over the users")] = 100_000,
    turns: Annotated[int, typer.Option(
        min=0, help="LoCoMo turns for the ingest comparison (0: skip it)")] = 300,
    ledger: Annotated[int, typer.Option(
        min=1, help="Erasures on record in the ledger run")] = 1000,
    rate: Annotated[float, typer.Option(
        min=0.1, help="Turns/s offered (above capacity: the result is the capacity)")] = 60.0,
    rounds: Annotated[int, typer.Option(
        min=1, max=2, help="1: none, ledger; 2: none, ledger, ledger, none")] = 2,
    compressor: Annotated[str, typer.Option(
        help="entropy | minilm | llmlingua2 | none (default none: the fastest worker, so the "
        "ledger's share of the time is the largest it can be)")] = "none",
    stream: Annotated[bool, typer.Option(
        help="Also the streaming deployment (Kafka + Elasticsearch); --no-stream: the "
        "embedded store only")] = True,
    data: Annotated[Path, typer.Option(help="LoCoMo JSON file")] = DEFAULT_LOCOMO,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write JSON here")]
    = None,
) -> None:
    """Time to erase one user among many (Elasticsearch and embedded), and the stream's
    ingest throughput with the erasure ledger consulted beside none on record."""
    base = load_settings()
    if stream:
        from lightmem.ops.bench.stream import _check_servers

        _check_servers(base)
    result: dict[str, Any] = {"users": users, "memories": memories,
                              "per_user": memories // users}
    stores = _Stores(base, es=stream)
    try:
        err.print(f"writing {memories} memories of {users} users (random unit vectors) "
                  f"into the embedded store{' and Elasticsearch' if stream else ''} ...")
        result["fill_s"] = {k: round(v, 1) for k, v in stores.fill(users, memories).items()}
        erased, alone = users // 2, users // 2 + 1
        err.print(f"forget {TENANT}/{_user(erased)} (and delete {_user(alone)}'s memories "
                  "alone, the baseline) ...")
        result["embedded"] = _erase_embedded(stores, users, memories, erased, alone)
        if stream:
            result["elasticsearch"] = _erase_es(stores, users, memories, erased, alone)
    finally:
        stores.close()
    if stream and turns:
        try:
            samples = load_locomo(data)
        except FileNotFoundError as exc:
            err.print(f"[red]{exc}[/red]")
            raise typer.Exit(1) from None
        result["ingest"] = _ingest_pair(interleave(samples, turns), ledger=ledger, rate=rate,
                                        rounds=rounds, compressor=compressor)
    _print(result)
    out.print_json(data=result)
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2) + "\n")


def _print(result: dict[str, Any]) -> None:
    table = Table(title=f"bench forget: erase one user of {result['users']} "
                  f"({result['per_user']} memories each, {result['memories']} in all)")
    for col in ("store", "forget s", "removed", "confirmed", "delete alone s", "deleted",
                "others intact", "fill s"):
        table.add_column(col, justify="left" if col == "store" else "right")
    for name in ("embedded", "elasticsearch"):
        r = result.get(name)
        if r is None:
            continue
        table.add_row(name, f"{r['forget_s']:.2f}", str(r["removed"]), str(r["confirmed"]),
                      f"{r['delete_alone_s']:.2f}", str(r["deleted_alone"]),
                      str(r["others_intact"]), f"{result['fill_s'][name]:.0f}")
    err.print(table)
    ingest = result.get("ingest")
    if ingest:
        t = Table(title=f"ingest through a real worker, {ingest['turns']} LoCoMo turns: no "
                  f"erasure on record vs {ingest['ledger_records']} in the ledger")
        for col in ("ledger", "turns/s (mean)", "runs turns/s", "searchable", "ratio"):
            t.add_column(col, justify="left" if col == "ledger" else "right")
        for kind in ("none", "ledger"):
            t.add_row(kind, f"{ingest['turns_per_s'][kind]:.2f}",
                      " ".join(f"{r['turns_per_s']:.2f}" for r in ingest[kind]),
                      " ".join(map(str, ingest["searchable"][kind])),
                      "" if kind == "none" else f"{ingest['ratio_ledger_over_none']:.3f}")
        err.print(t)
        lookup = ingest["lookup"]
        err.print(f"ledger check per record, in process: {lookup['ledger_us_per_record']:.2f} "
                  f"µs with {ingest['ledger_records']} erasures on record, "
                  f"{lookup['empty_us_per_record']:.2f} µs with none", highlight=False)
