"""Search throughput and latency of `lightmem serve` (embedded store) beside the bare path.

A first measurement until `lightmem bench serve` exists (issue 13): starts the service on a
free port over DATA_DIR (ingesting USERS x PER_USER turns over HTTP the first time), then
runs the same 200 queries at 1, 8 and 32 concurrent clients over HTTP and in-process (query
embedding + sqlite-vec kNN under one lock, as the service holds them).

    LIGHTMEM_SERVE_BATCH_QUERIES=1 .venv/bin/python scripts/serve_search_latency.py /tmp/serve-bench
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from service_server import start_server, stop_server  # noqa: E402

USERS, PER_USER, QUERIES = 10, 100, 200
WORDS = "dog cat kayak cello Lisbon Porto marathon risotto peanuts maps garden piano".split()


def run(fn: Callable[[tuple[str, str]], None], queries: list[tuple[str, str]],
        clients: int) -> str:
    lat: list[float] = []
    lock = threading.Lock()

    def worker(part: list[tuple[str, str]]) -> None:
        for q in part:
            start = time.perf_counter()
            fn(q)
            with lock:
                lat.append(time.perf_counter() - start)

    threads = [threading.Thread(target=worker, args=(queries[i::clients],))
               for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat.sort()

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000

    return (f"{len(lat) / wall:6.1f} q/s  p50 {pct(.5):6.1f} ms  p95 {pct(.95):6.1f} ms  "
            f"p99 {pct(.99):6.1f} ms")


def main(data: Path) -> None:
    data.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    batch = os.environ.get("LIGHTMEM_SERVE_BATCH_QUERIES", "1")
    srv = start_server(["--data-dir", str(data), "--rate", "0"], log=data / "serve.log",
                       env={"LIGHTMEM_SERVE_BATCH_QUERIES": batch})
    print("batch queries:", batch)
    try:
        c = httpx.Client(base_url=srv.url, timeout=600)
        if c.get("/v1/memories", params={"user": "u0", "limit": 1}).json()["results"] == []:
            started = time.perf_counter()
            for u in range(USERS):
                for b in range(PER_USER // 20):
                    msgs = [{"role": "user", "content": f"I like my {rng.choice(WORDS)} and "
                             f"the {rng.choice(WORDS)} number {b * 20 + i}",
                             "timestamp": f"2024-03-{1 + b:02d}T10:{i:02d}:00Z"}
                            for i in range(20)]
                    r = c.post("/v1/memories", json={"user": f"u{u}", "conversation": f"c{u}",
                                                     "messages": msgs, "flush": True})
                    r.raise_for_status()
            print(f"ingested {USERS * PER_USER} turns over HTTP in "
                  f"{time.perf_counter() - started:.1f}s")
        queries = [(f"u{rng.randrange(USERS)}", f"what about the {rng.choice(WORDS)}?")
                   for _ in range(QUERIES)]
        local = threading.local()

        def http(q: tuple[str, str]) -> None:
            if not hasattr(local, "client"):
                local.client = httpx.Client(base_url=srv.url, timeout=60)
            r = local.client.post("/v1/search", json={"user": q[0], "query": q[1], "k": 10})
            r.raise_for_status()

        from lightmem.streams.embedded.runtime import EmbeddedRuntime

        from lightmem.settings import Settings

        rt = EmbeddedRuntime(Settings(data_dir=data, compressor="none"))
        held = threading.Lock()

        def bare(q: tuple[str, str]) -> None:
            with held:  # one SQLite connection and one model, as in the service
                vector = rt.embedder([q[1]])[0]
                rt.store.search("default", q[0], vector.tolist(), 10)

        bare(queries[0])
        http(queries[0])
        for clients in (1, 8, 32):
            print(f"clients {clients:2d}: bare {run(bare, queries, clients)}")
            print(f"clients {clients:2d}: http {run(http, queries, clients)}")
    finally:
        stop_server(srv)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/serve-bench"))
