"""``lightmem bench sleep``: sleep-time consolidation throughput with 1, 2, 4 workers.

Each run gets its own topics (``partitions = workers``), index and consumer group. The index
is seeded with synthetic memories whose vectors make exact pairs (target, newer entry) with
cosine ~0.95 and unrelated pairs ~0; the entries topic gets the same entries, spread evenly
over the partitions. The workers (threads in this process, one consumer each, sharing the
loaded encoder) start with the window closed; the clock starts when the window opens and
stops when every target is done. The LLM is an :class:`~.llm_stub.OpenAIStubServer` with a
fixed latency per call, answering update / delete / ignore by a fixed rule
(:func:`consolidation_responder`), so every run does the same work.

The other half, ingest throughput beside an open window, is in :mod:`.sleep_ingest`.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from lightmem.ops.bench.llm_stub import OpenAIStubServer
from lightmem.ops.bench.locomo_data import DEFAULT_LOCOMO
from lightmem.ops.bench.stream import (
    _check_servers,
)
from lightmem.schemas import MemoryEntry, stable_id
from lightmem.settings import Settings, load_settings

__all__ = ["consolidation_responder", "synthetic_pairs", "seed_pairs", "sleep", "Pair"]

err = Console(stderr=True)
# Wide enough for the tables when stdout is not a terminal (CI logs, files).
out = Console(width=max(120, Console().width))

T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
DIM = 384

_TARGET = re.compile(r"TARGET memory:\n\[[^\]]*\] (.*)")
_NEWER = re.compile(r"^\d+\. \[[^\]]*\] (.*)$", re.MULTILINE)


def consolidation_responder(request: dict[str, Any]) -> str:
    """A deterministic consolidation "model": newer facts with "moved" delete the target,
    with "also" update it (target + the newer detail), anything else is ignored."""
    prompt = str(request["messages"][-1]["content"])
    target = _TARGET.search(prompt)
    newer = _NEWER.findall(prompt)
    fact = target.group(1).strip() if target else ""
    if any("moved" in n for n in newer):
        return json.dumps({"action": "delete", "reason": "contradicted by a move"})
    extra = [n.strip() for n in newer if "also" in n]
    if extra:
        return json.dumps({"action": "update", "new_fact": f"{fact}; {'; '.join(extra)}",
                           "reason": "newer detail"})
    return json.dumps({"action": "ignore", "reason": "nothing new"})


@dataclass(frozen=True)
class Pair:
    """A target, its newer entry, and what the responder will do with the target."""

    scope_index: int
    target: MemoryEntry
    newer: MemoryEntry
    outcome: str  # update | delete | ignore


def _unit(v: np.ndarray) -> list[float]:
    return (v / np.linalg.norm(v)).astype(np.float32).tolist()


def _entry(tenant: str, user: str, name: str, fact: str, at: datetime,
           vector: list[float]) -> MemoryEntry:
    turn = f"{user}-{name}"
    return MemoryEntry(
        id=stable_id(tenant, user, name), tenant=tenant, user=user, conversation=f"c-{user}",
        topic_id=f"topic-{name}", speaker=user, fact=fact, event_time=at, ingest_time=at,
        source_turn_ids=[turn], original_text=fact, compressed_text=fact, mode="llm",
        embedding=vector)


_OUTCOME_FACTS = {
    "update": ("{u} likes tea number {i}", "{u} also likes green tea number {i}"),
    "delete": ("{u} lives in city number {i}", "{u} moved to another city number {i}"),
    "ignore": ("{u} has a cat number {i}", "{u} has a cat number {i} still"),
}


def synthetic_pairs(scopes: int, pairs_per_scope: int, *, tenant: str = "acme",
                    outcomes: tuple[str, ...] = ("update", "delete", "ignore"),
                    seed: int = 0) -> list[Pair]:
    """Pairs (older target, newer entry) per scope with cosine ~0.95 inside a pair and ~0
    between pairs; the pair's outcome cycles through ``outcomes``."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(scopes):
        user = f"user{s:03d}"
        for i in range(pairs_per_scope):
            outcome = outcomes[(s + i) % len(outcomes)]
            base = rng.standard_normal(DIM)
            near = base + 0.25 * rng.standard_normal(DIM)
            old_fact, new_fact = (f.format(u=user, i=i) for f in _OUTCOME_FACTS[outcome])
            at = T0 + timedelta(hours=i)
            target = _entry(tenant, user, f"p{i}-old", old_fact, at, _unit(base))
            newer = _entry(tenant, user, f"p{i}-new", new_fact, at + timedelta(days=1),
                           _unit(near))
            out.append(Pair(s, target, newer, outcome))
    return out


def expected_facts(pairs: list[Pair]) -> dict[str, tuple[str, int] | None]:
    """Final ``{id: (fact, version)}`` (None = deleted) after one full consolidation."""
    want: dict[str, tuple[str, int] | None] = {}
    for p in pairs:
        want[p.newer.id] = (p.newer.fact, 1)
        if p.outcome == "update":
            want[p.target.id] = (f"{p.target.fact}; {p.newer.fact}", 2)
        elif p.outcome == "delete":
            want[p.target.id] = None
        else:
            want[p.target.id] = (p.target.fact, 1)
    return want


# --------------------------------------------------------------------------- one run


@dataclass
class RunResult:
    workers: int
    partitions: int
    targets: int
    seconds: float
    targets_per_s: float
    llm_calls: int
    prompt_tokens: int
    completion_tokens: int
    updated: int
    deleted: int
    speedup: float = 1.0


def seed_pairs(settings: Settings, topics: Any, store: Any, pairs: list[Pair], partitions: int
          ) -> None:
    from lightmem.streams.kafka.producer import RecordProducer

    store.ensure_index()
    store.bulk_upsert([e for p in pairs for e in (p.target, p.newer)], refresh=True)
    with RecordProducer(settings, topics) as producer:
        for p in pairs:
            for e in (p.target, p.newer):
                wire = e.model_copy(update={"embedding": None})
                # Scopes spread evenly over the partitions (scope i -> partition i % n):
                # the comparison measures parallelism, not the hash's luck.
                producer.produce(topics.entries, wire.to_bytes(), key=e.scope.encode(),
                                 partition=p.scope_index % partitions)


def _run(base: Settings, n: int, pairs_per_worker: int, stub: OpenAIStubServer,
         concurrency: int, log: Callable[[str], None]) -> RunResult:
    from lightmem.streams.elastic.store import ElasticsearchStore, es_client
    from lightmem.streams.kafka.teardown import remove_deployment
    from lightmem.streams.kafka.topics import Topics, create_topics
    from lightmem.streams.models.components import Components
    from lightmem.streams.sleep.windows import new_command, send_command
    from lightmem.streams.sleep.worker import SleepWorker

    run = uuid.uuid4().hex[:8]
    settings = base.model_copy(update={
        "kafka_partitions": n, "es_alias": f"lmbench-{run}-mem",
        "sleep_group": f"lmbench-{run}-sleep", "sleep_concurrency": concurrency,
        "sleep_poll_s": 0.2, "llm_base_url": stub.base_url, "llm_max_retries": 0})
    topics = Topics(prefix=f"lmbench-{run}.")
    create_topics(settings, topics)
    client = es_client(settings)
    store = ElasticsearchStore(client, alias=settings.es_alias)
    scopes_per_partition = 2
    pairs = synthetic_pairs(n * scopes_per_partition,
                            max(1, pairs_per_worker // scopes_per_partition), seed=n)
    targets = len(pairs)
    try:
        seed_pairs(settings, topics, store, pairs, n)
        components = Components(settings)
        components.embedder([" warm-up "])  # model load is not consolidation time
        workers = [SleepWorker(settings, topics=topics, components=components, store=store,
                               name=f"w{i}") for i in range(n)]
        ready = threading.Semaphore(0)
        threads = [threading.Thread(target=w.run, kwargs={"ready": ready.release}, daemon=True)
                   for w in workers]
        for t in threads:
            t.start()
        for _ in workers:
            if not ready.acquire(timeout=120):
                raise RuntimeError("the sleep workers did not get their partitions in 120 s")
        calls_before = components.chat.meter.total() if components.chat else None
        t0 = time.perf_counter()
        send_command(settings, new_command("open", issued_by="bench"), topics)
        deadline = time.monotonic() + 600
        while sum(w.stats.targets for w in workers) < targets:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{n} workers: not done after 600 s")
            if not any(t.is_alive() for t in threads):
                raise RuntimeError(f"{n} workers: every worker stopped")
            time.sleep(0.02)  # completion polling interval (20 ms resolution)
        seconds = time.perf_counter() - t0
        for w in workers:
            w.stop()
        for t in threads:
            t.join(60)
        usage = components.chat.meter.total() if components.chat else None
        assert usage is not None and calls_before is not None
        log(f"{n} worker(s): {targets} targets in {seconds:.2f}s")
        return RunResult(
            workers=n, partitions=n, targets=targets, seconds=seconds,
            targets_per_s=targets / seconds, llm_calls=usage.calls - calls_before.calls,
            prompt_tokens=usage.prompt_tokens - calls_before.prompt_tokens,
            completion_tokens=usage.completion_tokens - calls_before.completion_tokens,
            updated=sum(w.stats.updated for w in workers),
            deleted=sum(w.stats.deleted for w in workers))
    finally:
        remove_deployment(settings, topic_prefixes=[topics.prefix],
                          groups=[settings.sleep_group, f"{settings.sleep_group}.control"],
                          alias=settings.es_alias, es=client)
        client.close()


def sleep(
    targets: Annotated[int, typer.Option(min=2, help="Targets per worker")] = 40,
    workers: Annotated[str, typer.Option(help="Worker counts to compare (= partitions)")]
    = "1,2,4",
    latency: Annotated[float, typer.Option(min=0.0, help="LLM latency per call (s)")] = 0.2,
    concurrency: Annotated[int, typer.Option(min=1, help="Targets in flight per worker")] = 1,
    json_out: Annotated[Path | None, typer.Option("--out", help="Also write JSON here")]
    = None,
    ingest_turns: Annotated[int, typer.Option(
        min=0, help="LoCoMo turns of the ingest comparison (window closed vs open); 0 = "
        "skip it")] = 400,
    ingest_data: Annotated[Path, typer.Option(help="LoCoMo JSON file")] = DEFAULT_LOCOMO,
    ingest_rate: Annotated[float, typer.Option(
        min=0.1, help="Turns/s offered (above capacity: turns/s is the capacity)")] = 200.0,
    ingest_compressor: Annotated[str, typer.Option(
        help="entropy | llmlingua2 | none (ingest comparison)")] = "none",
    ingest_targets: Annotated[int, typer.Option(
        min=10, help="Consolidation targets seeded beside each ingest run (same in every "
        "run; enough to keep the sleep worker busy throughout)")] = 2000,
    ingest_concurrency: Annotated[int, typer.Option(
        min=1, help="Targets in flight of the sleep worker during the ingest")] = 8,
) -> None:
    """Consolidation throughput (targets/s, LLM calls, tokens) with 1, 2, 4 workers, then
    stream ingest turns/s with the sleep window closed vs open (the sleep worker busy).

    The work grows with the workers (``--targets`` per worker), so each run takes about the
    same time and the speedup is throughput against one worker.
    """
    try:
        counts = sorted({int(x) for x in workers.split(",") if x.strip()})
    except ValueError:
        raise typer.BadParameter(f"not a list of integers: {workers!r}",
                                 param_hint="--workers") from None
    base = load_settings()
    if ingest_turns:
        _check_servers(base)
        if not ingest_data.exists():
            raise typer.BadParameter(f"no such file: {ingest_data}", param_hint="--ingest-data")
        if ingest_compressor not in ("entropy", "llmlingua2", "none"):
            raise typer.BadParameter(f"entropy, llmlingua2 or none (got {ingest_compressor!r})",
                                     param_hint="--ingest-compressor")
    results: list[RunResult] = []
    with OpenAIStubServer(consolidation_responder, latency_s=latency) as stub:
        for n in counts:
            results.append(_run(base, n, targets, stub, concurrency, err.print))
    one = next((r for r in results if r.workers == 1), results[0])
    for r in results:
        r.speedup = r.targets_per_s / one.targets_per_s
    table = Table(title=f"sleep-time consolidation (workers = partitions), LLM latency "
                        f"{latency * 1000:.0f} ms, {concurrency} target(s) in flight/worker")
    for col in ("workers", "targets", "s", "targets/s", "vs 1", "LLM calls", "prompt tok",
                "compl tok", "upd", "del"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(str(r.workers), str(r.targets), f"{r.seconds:.2f}",
                      f"{r.targets_per_s:.2f}", f"{r.speedup:.2f}x", str(r.llm_calls),
                      str(r.prompt_tokens), str(r.completion_tokens), str(r.updated),
                      str(r.deleted))
    out.print(table)
    ingest = None
    if ingest_turns:
        from lightmem.ops.bench.sleep_ingest import ingest_comparison, print_ingest

        ingest = ingest_comparison(base, data=ingest_data, turns=ingest_turns, rate=ingest_rate,
                                   compressor=ingest_compressor, latency=latency,
                                   concurrency=ingest_concurrency, targets=ingest_targets)
        print_ingest(ingest)
    if json_out is not None:
        json_out.write_text(json.dumps({
            "latency_s": latency, "concurrency": concurrency, "targets_per_worker": targets,
            "runs": [asdict(r) for r in results], "ingest": ingest}, indent=2))
        err.print(f"wrote {json_out}")
