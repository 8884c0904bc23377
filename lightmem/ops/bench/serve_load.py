"""``lightmem bench serve``'s load: a real ``lightmem serve`` process (:class:`Service`, also the
tests' way to start one), closed-loop clients over HTTP beside the bare in-process path, and
produce -> searchable freshness.
"""

from __future__ import annotations

import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from lightmem.ops.bench.serve_corpus import TENANT, WORDS
from lightmem.ops.bench.stream import (
    _percentile,
    _tail,
)
from lightmem.settings import Settings

__all__ = [
    "Service",
    "measure",
    "search_rounds",
    "freshness",
    "bench_queries",
    "BENCH_SERVE_ARGS",
]

err = Console(stderr=True, width=max(120, Console(stderr=True).width))


# -- the service as a process ------------------------------------------------------------------

#: The bench's own service options: loopback only, no per-key rate limit (it measures capacity).
BENCH_SERVE_ARGS = ("--host", "127.0.0.1", "--rate", "0")


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


def bench_queries(n: int, users: int, seed: int) -> list[tuple[str, str]]:
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
