"""``lightmem bench sleep``, second half: ingest throughput beside the sleep workers.

The issue's other aim, "ingest throughput unchanged while a window is open"
(``--ingest-turns``, 0 = skip): the streaming ingest path (a ``lightmem worker`` subprocess on
private topics and index, :func:`~lightmem.ops.bench.stream.run_stream`) over the same LoCoMo
turns three times, each beside a ``lightmem sleep-worker`` subprocess on the same deployment
(its entries topic and index, seeded with consolidation work; the ingest group is the one it
yields to):
with the window closed (the sleep worker idle); with the window open over exactly the
measured interval (opened when the turns start, once the first consolidation call arrived)
and the default ingest-first rule (``LIGHTMEM_SLEEP_YIELD_LAG``: no new target while ingest
has a backlog); and open with that rule off (0). The workers share the machine, Kafka and
Elasticsearch. Printed: turns/s of each run and the ratio to the closed one, and what the
sleep worker did meanwhile (LLM calls from the stub, targets from its ``/metrics``).
"""

from __future__ import annotations

import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lightmem.ops.bench.llm_stub import OpenAIStubServer
from lightmem.ops.bench.locomo_data import load_locomo
from lightmem.ops.bench.sleep import consolidation_responder, seed_pairs, synthetic_pairs
from lightmem.ops.bench.stream import (
    StreamDeployment,
    _env,
    _stop_worker,
    _tail,
    interleave,
    run_stream,
)
from lightmem.settings import Settings

__all__ = ["ingest_comparison", "print_ingest"]

err = Console(stderr=True)
out = Console(width=max(120, Console().width))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _targets_done(port: int) -> int:
    """Targets the sleep worker has finished (applied + already reflected), from its
    ``/metrics`` (counted per batch)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return int(sum(s.value for fam in text_string_to_metric_families(text)
                   for s in fam.samples
                   if s.name in ("lightmem_events_applied_total",
                                 "lightmem_events_skipped_total")
                   and s.labels.get("stage") == "sleep"))


@dataclass
class _SleepSide:
    """A ``lightmem sleep-worker`` subprocess on a deployment of its own."""

    settings: Settings
    topics: Any
    store: Any
    stub: OpenAIStubServer
    port: int
    proc: subprocess.Popen
    log: Path
    seeded: int = 0

    def consolidation_calls(self) -> int:
        return sum(1 for r in self.stub.chat_requests
                   if "TARGET memory:" in str(r["messages"][-1]["content"]))

    def seed(self, targets: int, partitions: int) -> None:
        scopes = 4 * partitions
        pairs = synthetic_pairs(scopes, max(1, math.ceil(targets / scopes)), seed=7)
        seed_pairs(self.settings, self.topics, self.store, pairs, partitions)
        self.seeded += len(pairs)

    def entries_left(self) -> int:
        """Entries the sleep group has not consumed yet (the work still ahead of it)."""
        from lightmem.streams.kafka.lag import LagReader

        with LagReader(self.settings, self.settings.sleep_group) as reader:
            return sum(p.lag for p in reader.read([self.topics.entries]))

    def window(self, action: str) -> None:
        from lightmem.streams.sleep.windows import new_command, send_command

        send_command(self.settings, new_command(action, issued_by="bench"), self.topics)

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the sleep worker exited with {self.proc.returncode}:\n"
                                   f"{_tail(self.log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"sleep worker: no {what} after {timeout:.0f}s:\n"
                                   f"{_tail(self.log)}")
            time.sleep(0.05)  # polling interval of the bench, not of the measured work


def _start_sleep_side(base: Settings, stub: OpenAIStubServer, concurrency: int,
                      deployment: StreamDeployment, *, yield_lag: int, targets: int
                      ) -> _SleepSide:
    """A sleep worker (window closed) on the ingest run's deployment: same entries topic and
    index, its ingest group (``ingest_group``) to yield to; seeded with ``targets``."""
    from lightmem.streams.elastic.store import ElasticsearchStore, es_client
    from lightmem.streams.kafka.topics import Topics, create_topics

    port = _free_port()
    overrides: dict[str, Any] = {
        "es_alias": deployment.alias, "ingest_group": deployment.ingest_group,
        "sleep_group": f"{deployment.ingest_group}-sleep", "sleep_yield_lag": yield_lag,
        "sleep_concurrency": concurrency, "sleep_poll_s": 0.2,
        # Small batches: the targets counter (per batch) follows the work closely.
        "sleep_batch_entries": 4 * concurrency,
        "llm_base_url": stub.base_url, "llm_max_retries": 0, "metrics_port": port,
        "sleep_cron": None, "sleep_auto": None}
    settings = base.model_copy(update={k: v for k, v in overrides.items()
                                       if k not in ("sleep_cron", "sleep_auto")})
    topics = Topics(prefix=deployment.prefix)
    create_topics(settings, topics)
    store = ElasticsearchStore(es_client(settings), alias=settings.es_alias)
    store.ensure_index()
    log = Path(tempfile.mkdtemp(prefix="lightmem-bench-sleep-")) / "sleep-worker.log"
    with log.open("wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lightmem", "sleep-worker", "--topic-prefix", topics.prefix],
            env=_env(overrides), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    side = _SleepSide(settings, topics, store, stub, port, proc, log)
    side.seed(targets, settings.kafka_partitions)
    side.wait(lambda: "sleep worker ready" in log.read_text(errors="replace"),
              "group assignment")
    return side


def _stop_sleep_side(side: _SleepSide) -> None:
    """Stop the worker and remove its groups (the ingest run removes the deployment)."""
    from lightmem.streams.kafka.teardown import remove_deployment

    _stop_worker(side.proc)
    group = side.settings.sleep_group
    remove_deployment(side.settings, groups=[group, f"{group}.control"])
    side.store.client.close()


def _ingest_lag(settings: Settings, deployment: StreamDeployment) -> int:
    """Records the ingest group has not consumed on its topics (all of a partition it never
    committed on)."""
    from lightmem.streams.kafka.lag import LagReader
    from lightmem.streams.kafka.topics import Topics

    topics = Topics(prefix=deployment.prefix)
    with LagReader(settings, deployment.ingest_group) as reader:
        return sum(p.lag for p in reader.read([topics.turns, topics.segments, topics.entries]))


#: The ingest comparison's runs: (name, window opened, LIGHTMEM_SLEEP_YIELD_LAG or None for
#: the default).
INGEST_RUNS = (("closed", False, None), ("open", True, None), ("open, no yield", True, 0))


@dataclass
class _SleepBeside:
    """The ``on_phase`` of one ingest run: at the start, a seeded sleep worker on the run's
    deployment (and its window opened); at both ends, what it had done."""

    base: Settings
    ingest: Settings
    stub: OpenAIStubServer
    deployment: StreamDeployment
    label: str
    concurrency: int
    yield_lag: int
    targets: int
    opened: bool
    side: _SleepSide | None = None
    marks: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: Entries the sleep worker had not consumed when the last turn was searchable.
    left: int = 0

    def __call__(self, phase: str) -> None:
        if phase == "start":
            err.print(f"{self.label}: a sleep worker ({self.concurrency} target(s) in flight, "
                      f"yield above {self.yield_lag or 'off'}) seeded with {self.targets} "
                      "targets ...")
            self.side = _start_sleep_side(self.base, self.stub, self.concurrency,
                                          self.deployment, yield_lag=self.yield_lag,
                                          targets=self.targets)
            # The ingest worker's index sink reads the seeded entries too (first write wins:
            # nothing changes): let it finish before the clock starts.
            deadline = time.monotonic() + 600
            while _ingest_lag(self.ingest, self.deployment):
                if time.monotonic() > deadline:
                    raise RuntimeError("the ingest worker did not read the seeded entries")
                time.sleep(0.5)  # polling interval of the bench, not of the measured work
            # Every run starts from a merged index: the segment merges the seeding causes
            # would otherwise run inside the measured interval.
            self.side.store.client.indices.forcemerge(index=self.deployment.alias,
                                                      max_num_segments=1)
        side = self.side
        assert side is not None
        if phase == "start" and self.opened:
            before = side.consolidation_calls()
            side.window("open")
            # The clock starts once the sleep worker is consolidating.
            side.wait(lambda: side.consolidation_calls() > before,
                      "consolidation call after the open")
        self.marks[phase] = (side.consolidation_calls(), _targets_done(side.port))
        if phase == "end":
            self.left = side.entries_left()

    def report(self) -> dict[str, Any]:
        assert self.side is not None
        start, end = self.marks["start"], self.marks["end"]
        return {
            "sleep_llm_calls": end[0] - start[0], "sleep_targets_done": end[1] - start[1],
            "sleep_entries_left": self.left,
            "seeded_targets": self.side.seeded, "sleep_yield_lag": self.yield_lag,
            "sleep_yield_log": [ln for ln in self.side.log.read_text(
                errors="replace").splitlines() if "ingest backlog" in ln],
        }


def ingest_comparison(base: Settings, *, data: Path, turns: int, rate: float,
                      compressor: str, latency: float, concurrency: int,
                      targets: int) -> dict[str, Any]:
    """Stream ingest turns/s with the sleep window closed, open (ingest first, the default)
    and open with yielding off; what the sleep worker did during each measured interval."""
    samples = load_locomo(data)
    chosen = interleave(samples, turns)
    overrides: dict[str, Any] = {
        "compressor": compressor, "llm_base_url": None,  # extractive ingest
        "metrics_port": None,  # the sleep worker's port is taken
    }
    settings = base.model_copy(update={"compressor": compressor, "llm_base_url": None})
    runs: dict[str, dict[str, Any]] = {}
    with OpenAIStubServer(consolidation_responder, latency_s=latency) as stub:
        for state, opened, yield_lag in INGEST_RUNS:
            # The same seeded work in every run, closed included (a larger index costs the
            # ingest too); enough to outlast an open run (checked below: busy_throughout).
            deployment = StreamDeployment.new()
            beside = _SleepBeside(
                base, settings, stub, deployment, f"ingest, window {state}", concurrency,
                base.sleep_yield_lag if yield_lag is None else yield_lag, targets, opened)
            try:
                result = run_stream(settings, overrides, chosen, rate, label=beside.label,
                                    on_phase=beside, deployment=deployment)
            finally:
                if beside.side is not None:
                    _stop_sleep_side(beside.side)
            runs[state] = {**result, **beside.report()}
    closed = runs["closed"]
    return {
        "turns": len(chosen), "mode": "extractive", "compressor": compressor,
        "offered_rate": rate, "llm_latency_s": latency, "sleep_concurrency": concurrency,
        "runs": runs,
        "busy_throughout": all(r["sleep_entries_left"] > 0 for r in runs.values()),
        "ratio_over_closed": {state: round(r["turns_per_s"] / closed["turns_per_s"], 3)
                              for state, r in runs.items() if state != "closed"},
    }


def print_ingest(r: dict[str, Any]) -> None:
    table = Table(title=f"stream ingest while a sleep window is open: {r['turns']} LoCoMo "
                        f"turns, {r['mode']}, compressor {r['compressor']}, offered "
                        f"{r['offered_rate']:.0f}/s")
    for col in ("window", "yield above", "turns/s", "p50 s", "p95 s", "sleep LLM calls",
                "sleep targets", "entries left", "vs closed"):
        table.add_column(col, justify="left" if col == "window" else "right")
    for state, s in r["runs"].items():
        ratio = r["ratio_over_closed"].get(state)
        table.add_row(state, str(s["sleep_yield_lag"] or "off"), f"{s['turns_per_s']:.1f}",
                      f"{s['latency_p50_s']:.1f}", f"{s['latency_p95_s']:.1f}",
                      str(s["sleep_llm_calls"]), str(s["sleep_targets_done"]),
                      str(s["sleep_entries_left"]), "" if ratio is None else f"{ratio:.2f}")
    out.print(table)
    out.print("yield above: the sleep worker starts no new target while the ingest group has "
              "more records waiting (LIGHTMEM_SLEEP_YIELD_LAG; off = 0)")
    if r["compressor"] == "none":
        out.print("compressor none: the entropy compressor makes this comparison too slow "
                  "on a small machine (--ingest-compressor entropy to use it)")
    if not r["busy_throughout"]:
        out.print("[yellow]warning:[/yellow] a sleep worker ran out of work before the "
                  "ingest ended: that run was not fully under load")
