"""``lightmem bench stream``: the streaming path on the real servers beside the embedded runtime.

For each mode (extractive; LLM = an OpenAI-protocol endpoint with a fixed per-call latency),
in one run, on the same LoCoMo turns, same settings and same machine:

- **embedded**: ``EmbeddedRuntime.ingest_lines`` + flush (SQLite + sqlite-vec), in process.
- **stream**: a ``lightmem worker`` subprocess on a private set of topics, consumer group and
  index alias; the turns are produced at a steady rate, then one in-band flush. Measured:
  sustained turns/s (first turn produced -> last turn searchable), end-to-end latency per turn
  (produced -> the first memory built from it is returned by an Elasticsearch search, polled
  every ``POLL_S``; it includes the time a turn waits in the sensory and topic buffers, which
  is the design), and consumer lag per stage sampled every ``POLL_S``.

The default rate is 1.5x the embedded throughput just measured: above what the worker can
sustain, so that the stream's turns/s is its capacity, not the offered rate. Model loading
and the consumer-group join are excluded from both sides. The ratio stream / embedded is the
issue's aim (>= 0.8).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lightmem.ops.bench.llm_stub import OpenAIStubServer, fact_extraction_responder
from lightmem.ops.bench.locomo_data import DEFAULT_LOCOMO, load_locomo
from lightmem.schemas import Stage, TurnEvent
from lightmem.settings import Settings, load_settings

# Wide enough for the results table when stderr is not a terminal (CI logs, files).
err = Console(stderr=True, width=max(120, Console(stderr=True).width))
out = Console()

#: Seconds between two polls of Elasticsearch (latency resolution) and of consumer lag.
POLL_S = 0.5
#: Stop waiting for the stream to finish after this long without progress.
STALL_S = 180.0
#: Hits per page when polling the index.
PAGE = 2000
#: The ingest worker's stages (``metrics.STAGES`` less ``sleep``), whose lag is sampled.
INGEST_STAGES = (Stage.SENSORY, Stage.SHORT_TERM, Stage.INDEX)


def interleave(samples: list[Any], limit: int) -> list[TurnEvent]:
    """The first ``limit`` turns taken round-robin over the conversations (each keeps its
    order), so that every partition has work from the start, as on a live platform."""
    iters = [iter(s.turns) for s in samples]
    turns: list[TurnEvent] = []
    while iters and len(turns) < limit:
        alive = []
        for it in iters:
            turn = next(it, None)
            if turn is not None:
                turns.append(turn)
                alive.append(it)
                if len(turns) == limit:
                    break
        iters = alive
    return turns


def _turn_key(t: TurnEvent) -> tuple[str, str]:
    # LoCoMo turn ids (D1:3) repeat across conversations; a conversation is one user here.
    return (t.user, t.turn_id)


def _env(overrides: dict[str, Any]) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    for name, value in overrides.items():
        key = f"LIGHTMEM_{name.upper()}"
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


# -- embedded ------------------------------------------------------------------------------------


def run_embedded(settings: Settings, turns: list[TurnEvent]) -> dict[str, Any]:
    """Ingest ``turns`` (then flush) with the embedded runtime; models loaded beforehand."""
    from lightmem.streams.embedded.runtime import EmbeddedRuntime

    rt = EmbeddedRuntime(settings)
    rt.warm_up()
    _ = rt.embedder, rt.store
    lines = ((i, t.to_bytes()) for i, t in enumerate(turns, start=1))
    t0 = time.perf_counter()
    report = rt.ingest_lines(lines, source="bench")
    seconds = time.perf_counter() - t0
    calls = sum(u.calls for u in rt.usage_this_run().values())
    return {"seconds": round(seconds, 3), "turns_per_s": round(len(turns) / seconds, 2),
            "memories": sum(rt.stats().entries.values()),
            "llm_calls": calls, "processed": report.processed}


# -- stream --------------------------------------------------------------------------------------


@dataclass
class _Watch:
    """Background poller: when each turn first became searchable, and lag per stage."""

    client: Any
    alias: str
    lag_reader: Any
    stage_of: dict[str, str]
    seen: dict[tuple[str, str], float] = field(default_factory=dict)
    entries: int = 0
    lag_samples: dict[str, list[int]] = field(
        default_factory=lambda: {s: [] for s in INGEST_STAGES})
    last_lag: dict[str, int] = field(default_factory=dict)
    #: Lag samples are kept only once the clock runs (not while a caller prepares).
    measuring: bool = False
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def _scan(self) -> Iterator[tuple[str, list[str]]]:
        """(user, source turn ids) of every searchable entry: two small fields per hit, no
        model validation, so that polling steals little CPU from the worker."""
        after: list[Any] | None = None
        while True:
            resp = self.client.search(index=self.alias, size=PAGE, sort=[{"id": "asc"}],
                                      search_after=after, track_total_hits=False,
                                      source_includes=["user", "source_turn_ids"])
            hits = resp["hits"]["hits"]
            for h in hits:
                yield h["_source"]["user"], h["_source"].get("source_turn_ids") or []
            if len(hits) < PAGE:
                return
            after = hits[-1]["sort"]

    def run(self) -> None:
        from lightmem.streams.kafka.lag import by_topic

        while not self.stop.is_set():
            t = time.monotonic()
            try:
                n = 0
                for user, turn_ids in self._scan():
                    n += 1
                    for turn_id in turn_ids:
                        self.seen.setdefault((user, turn_id), t)
                self.entries = n
            except Exception as exc:  # noqa: BLE001 - the index may not exist yet
                self.errors.append(repr(exc))
            try:
                lags = by_topic(self.lag_reader.read(self.stage_of), self.stage_of)
                self.last_lag = lags
                for stage in INGEST_STAGES if self.measuring else ():
                    self.lag_samples[stage].append(lags.get(stage, 0))
            except Exception as exc:  # noqa: BLE001 - a sample lost, not the run
                self.errors.append(repr(exc))
            self.stop.wait(max(0.0, POLL_S - (time.monotonic() - t)))


def _group_ready(admin: Any, group: str, topic: str, partitions: int) -> bool:
    """True once the group's members together own every partition of ``topic``."""
    try:
        desc = admin.describe_consumer_groups([group], request_timeout=10)[group].result(10)
    except Exception:  # noqa: BLE001 - the group does not exist before the worker joins
        return False
    owned = {tp.partition for m in desc.members for tp in m.assignment.topic_partitions
             if tp.topic == topic}
    return len(owned) == partitions


def _start_worker(prefix: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("wb") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "lightmem", "worker", "--topic-prefix", prefix],
            env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _stop_worker(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def _tail(log: Path, n: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return ""


@dataclass(frozen=True)
class StreamDeployment:
    """Names of one throwaway streaming deployment: topics, the workers' consumer group (app
    id) and the index alias."""

    run: str

    @classmethod
    def new(cls) -> StreamDeployment:
        return cls(uuid.uuid4().hex[:8])

    @property
    def prefix(self) -> str:
        return f"lmbench-{self.run}."

    @property
    def ingest_group(self) -> str:
        return f"lmbench-{self.run}"

    @property
    def alias(self) -> str:
        return f"lmbench-{self.run}-mem"


def run_stream(settings: Settings, overrides: dict[str, Any], turns: list[TurnEvent],
               rate: float, *, keep: bool = False, label: str = "",
               on_phase: Callable[[str], None] | None = None,
               deployment: StreamDeployment | None = None) -> dict[str, Any]:
    """Produce ``turns`` at ``rate``/s to a fresh deployment and time them to searchable.

    ``on_phase`` (if given) is called with ``"start"`` once the worker owns its partitions,
    just before the clock starts (it may block: the clock starts after it returns), and with
    ``"end"`` when the last turn is searchable (``lightmem bench sleep`` runs a sleep window
    exactly over the measured interval). ``deployment``: names the caller chose (and may have
    put a sleep worker on); removed at the end unless ``keep``.
    """
    from confluent_kafka.admin import AdminClient

    from lightmem.streams.elastic.store import es_client
    from lightmem.streams.kafka.flush_commands import FlushCommand
    from lightmem.streams.kafka.lag import LagReader
    from lightmem.streams.kafka.producer import RecordProducer
    from lightmem.streams.kafka.teardown import remove_deployment
    from lightmem.streams.kafka.topics import Topics, create_topics, kafka_config

    deployment = deployment or StreamDeployment.new()
    prefix, ingest_group, alias = deployment.prefix, deployment.ingest_group, deployment.alias
    overrides = {**overrides, "ingest_group": ingest_group, "es_alias": alias}
    settings = settings.model_copy(update={"ingest_group": ingest_group, "es_alias": alias})
    topics = Topics(prefix=prefix)
    create_topics(settings, topics)
    log = Path(tempfile.mkdtemp(prefix="lightmem-bench-stream-")) / "worker.log"
    proc = _start_worker(prefix, _env(overrides), log)
    es = es_client(settings)
    stage_of = {topics.turns: "sensory", topics.segments: "short-term",
                topics.entries: "index"}
    lag_reader = LagReader(settings, ingest_group)
    watch = _Watch(es, alias, lag_reader, stage_of)
    poller = threading.Thread(target=watch.run, name="bench-watch", daemon=True)
    produced_at: dict[tuple[str, str], float] = {}
    try:
        err.print(f"{label}: starting a worker (models load before it joins the group) ...")
        deadline = time.monotonic() + 600
        admin = AdminClient(kafka_config(settings))
        while not _group_ready(admin, ingest_group, topics.turns, settings.kafka_partitions):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not join its group:\n{_tail(log)}")
            time.sleep(1.0)
        poller.start()
        expected = {_turn_key(t) for t in turns}
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[lag]}"), TimeElapsedColumn(),
                      console=err) as progress:
            produce = progress.add_task(f"{label}: produce @ {rate:.1f}/s", total=len(turns),
                                        lag="")
            searchable = progress.add_task(f"{label}: searchable", total=len(turns), lag="")
            if on_phase is not None:
                on_phase("start")
            watch.measuring = True
            with RecordProducer(settings, topics) as producer:
                t0 = time.monotonic()
                for i, turn in enumerate(turns):
                    wait = t0 + i / rate - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    producer.add_turns([turn])
                    produced_at[_turn_key(turn)] = time.monotonic()
                    if i % 20 == 0:
                        progress.update(produce, completed=i + 1)
                        progress.update(searchable, completed=len(watch.seen),
                                        lag=f"lag {watch.last_lag}")
                progress.update(produce, completed=len(turns))
                # The tail of every conversation waits in its buffers: flush it, as the
                # idle timer would after idle_timeout_s of silence.
                producer.send_flush(FlushCommand(issued_at=datetime.now(UTC), issued_by="bench"))
            last_progress, last_seen = time.monotonic(), 0
            while True:
                n = len(set(watch.seen) & expected)
                progress.update(searchable, completed=n, lag=f"lag {watch.last_lag}")
                drained = watch.last_lag and not any(watch.last_lag.values())
                if n == len(expected):
                    break
                if n != last_seen:
                    last_progress, last_seen = time.monotonic(), n
                elif drained and time.monotonic() - last_progress > 10 * POLL_S:
                    break  # everything consumed: the rest built no memory
                if proc.poll() is not None:
                    raise RuntimeError(f"the worker exited with {proc.returncode}:\n"
                                       f"{_tail(log)}")
                if time.monotonic() - last_progress > STALL_S:
                    raise RuntimeError(f"no progress for {STALL_S:.0f}s:\n{_tail(log)}")
                time.sleep(POLL_S)
        if on_phase is not None:
            on_phase("end")
        watch.stop.set()
        poller.join(10)
        seen = {k: v for k, v in watch.seen.items() if k in produced_at}
        end = max(seen.values())
        seconds = end - t0
        latencies = sorted(seen[k] - produced_at[k] for k in seen)
        lag_max = {s: max(v, default=0) for s, v in watch.lag_samples.items()}
        lag_mean = {s: round(statistics.fmean(v), 1) if v else 0.0
                    for s, v in watch.lag_samples.items()}
        return {
            "seconds": round(seconds, 3),
            "turns_per_s": round(len(seen) / seconds, 2),
            "offered_rate": round(rate, 2),
            "searchable_turns": len(seen),
            "memories": watch.entries,
            "latency_p50_s": round(_percentile(latencies, 50) or 0.0, 2),
            "latency_p95_s": round(_percentile(latencies, 95) or 0.0, 2),
            "lag_max": lag_max,
            "lag_mean": lag_mean,
            "poll_errors": len(watch.errors),
        }
    finally:
        watch.stop.set()
        _stop_worker(proc)
        lag_reader.close()
        if not keep:
            remove_deployment(settings, topic_prefixes=[prefix, ingest_group],
                              groups=[ingest_group], alias=alias, es=es)
        es.close()


# -- command -------------------------------------------------------------------------------------


def _modes(value: str) -> list[str]:
    modes = [m.strip() for m in value.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("extractive", "llm")]
    if bad or not modes:
        raise typer.BadParameter(f"modes: extractive and/or llm (got {value!r})")
    return modes


@contextmanager
def _llm(mode: str, latency_s: float) -> Iterator[OpenAIStubServer | None]:
    if mode == "llm":
        with OpenAIStubServer(fact_extraction_responder, latency_s=latency_s) as stub:
            yield stub
    else:
        yield None


def stream_command(
    data: Annotated[Path, typer.Option(help="LoCoMo JSON file")] = DEFAULT_LOCOMO,
    limit: Annotated[int, typer.Option(min=10, help="Turns to produce")] = 800,
    rate: Annotated[float | None, typer.Option(
        min=0.1, help="Turns/s offered (default: 1.5x the embedded throughput)")] = None,
    modes: Annotated[str, typer.Option(help="extractive,llm")] = "extractive,llm",
    llm_latency: Annotated[float, typer.Option(
        min=0.0, help="Seconds per LLM call of the stub endpoint (llm mode)")] = 0.2,
    compressor: Annotated[str, typer.Option(
        help="minilm | entropy | llmlingua2 | none")] = "minilm",
    threads: Annotated[int | None, typer.Option(help="torch threads (both sides)")] = None,
    keep: Annotated[bool, typer.Option(help="Keep the bench topics and index")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write JSON here")] = None,
) -> None:
    """Stream path (real Kafka + Elasticsearch) vs the embedded runtime: turns/s, latency to
    searchable (p50/p95), lag per stage; extractive and with a fixed-latency LLM."""

    try:
        samples = load_locomo(data)
    except FileNotFoundError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    chosen = _modes(modes)
    turns = interleave(samples, limit)
    base = load_settings()
    _check_servers(base)
    results: list[dict[str, Any]] = []
    for mode in chosen:
        with _llm(mode, llm_latency) as stub:
            overrides: dict[str, Any] = {
                "compressor": compressor, "torch_threads": threads,
                "llm_base_url": stub.base_url if stub else None,
                "data_dir": tempfile.mkdtemp(prefix="lightmem-bench-embedded-"),
            }
            settings = load_settings(**{k: v for k, v in overrides.items() if v is not None})
            if stub is None:
                settings = settings.model_copy(update={"llm_base_url": None})
            err.print(f"[bold]{mode}[/bold]: embedded runtime, {len(turns)} turns ...")
            embedded = run_embedded(settings, turns)
            offered = rate or 1.5 * embedded["turns_per_s"]
            calls_before = len(stub.chat_requests) if stub else 0
            stream = run_stream(settings, overrides, turns, offered, keep=keep, label=mode)
            stream["llm_calls"] = (len(stub.chat_requests) - calls_before) if stub else 0
            results.append({
                "mode": mode, "turns": len(turns), "compressor": compressor,
                "llm_latency_s": llm_latency if stub else None,
                "embedded": embedded, "stream": stream,
                "ratio_stream_over_embedded": round(
                    stream["turns_per_s"] / embedded["turns_per_s"], 3),
            })
    _print(results)
    out.print_json(data=results)
    if json_out is not None:
        json_out.write_text(json.dumps(results, indent=2) + "\n")


def _check_servers(settings: Settings) -> None:
    from confluent_kafka.admin import AdminClient

    from lightmem.streams.elastic.store import es_client
    from lightmem.streams.kafka.topics import kafka_config

    try:
        AdminClient(kafka_config(settings)).list_topics(timeout=10)
    except Exception as exc:  # noqa: BLE001 - reported, then exit
        err.print(f"[red]error:[/red] no Kafka at {settings.kafka_bootstrap} ({exc}); "
                  "run `lightmem services up`")
        raise typer.Exit(1) from None
    es = es_client(settings)
    try:
        es.cluster.health(timeout="10s")  # the integ-test distribution has no GET /
    except Exception as exc:  # noqa: BLE001
        err.print(f"[red]error:[/red] no Elasticsearch at the configured URL "
                  f"({type(exc).__name__}); run `lightmem services up`")
        raise typer.Exit(1) from None
    finally:
        es.close()


def _print(results: list[dict[str, Any]]) -> None:
    table = Table(title="bench stream: LoCoMo turns, stream (Kafka + Elasticsearch) vs "
                  "embedded; latency = produced -> searchable; lag = max records behind")
    for col in ("mode", "path", "turns/s", "p50 s", "p95 s", "lag sens/short/index",
                "memories", "LLM calls", "vs embedded"):
        table.add_column(col, justify="left" if col in ("mode", "path") else "right")
    for r in results:
        e, s = r["embedded"], r["stream"]
        table.add_row(r["mode"], "embedded", f"{e['turns_per_s']:.1f}", "", "", "",
                      str(e.get("memories") or ""), str(e["llm_calls"]), "")
        lag = "/".join(str(s["lag_max"][k]) for k in INGEST_STAGES)
        table.add_row("", f"stream ({s['offered_rate']:.0f}/s offered)",
                      f"{s['turns_per_s']:.1f}", f"{s['latency_p50_s']:.1f}",
                      f"{s['latency_p95_s']:.1f}", lag, str(s["memories"]),
                      str(s["llm_calls"]), f"{r['ratio_stream_over_embedded']:.2f}")
    err.print(table)
