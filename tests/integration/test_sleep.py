"""The sleep-time consumer group on the real Kafka and Elasticsearch.

Workers run as subprocesses (``python -m lightmem sleep-worker``), exactly as deployed, so a
test can ``kill -9`` one. The LLM is the HTTP stub (:mod:`lightmem.ops.bench.llm_stub`) with the
deterministic rule of :func:`lightmem.ops.bench.sleep.consolidation_responder`: "moved"
deletes the target, "also" updates it, anything else is ignored. The index is seeded with
synthetic vectors (pairs at cosine ~0.95, unrelated memories at ~0) and the entries topic
with the same entries, so the expected final index is known exactly
(:func:`~lightmem.ops.bench.sleep.expected_facts`). Nothing sleeps to synchronise: every wait
polls a condition against a deadline.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

pytest.importorskip("confluent_kafka", reason="confluent-kafka (the stream extra) is missing")
pytest.importorskip("elasticsearch", reason="elasticsearch (the stream extra) is missing")

from lightmem.ops.bench.llm_stub import OpenAIStubServer  # noqa: E402
from lightmem.ops.bench.sleep import (  # noqa: E402
    Pair,
    consolidation_responder,
    expected_facts,
    synthetic_pairs,
)
from lightmem.ops.cli import app as cli_app  # noqa: E402
from lightmem.schemas import ChangeOp, MemoryChange  # noqa: E402
from lightmem.settings import Settings  # noqa: E402
from lightmem.streams.elastic.store import ElasticsearchStore  # noqa: E402
from lightmem.streams.kafka.changes import read_changes  # noqa: E402
from lightmem.streams.kafka.dlq import read_dead_letters  # noqa: E402
from lightmem.streams.kafka.producer import RecordProducer  # noqa: E402
from lightmem.streams.kafka.teardown import remove_deployment  # noqa: E402
from lightmem.streams.kafka.topics import Topics, create_topics  # noqa: E402

from .procs import Worker  # noqa: E402

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
#: Deadline of one wait: worker start (imports, group join, encoder load on the first
#: update) plus the work, on a loaded 2-core machine.
WAIT_S = 180.0
PARTITIONS = 4


def wait_for(predicate: Callable[[], Any], *, what: str, workers: list[Worker] | None = None,
             timeout: float = WAIT_S) -> Any:
    """Poll ``predicate`` until truthy; fail at the deadline or when a worker died."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        for w in workers or []:
            if w.proc.poll() is not None:
                pytest.fail(f"worker {w.name} exited with {w.proc.returncode} while waiting "
                            f"for {what}:\n{w.tail()}")
        time.sleep(0.3)  # polling interval, not a synchronisation
    logs = "\n".join(w.tail() for w in workers or [])
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})\n{logs}")


@dataclass
class SleepEnv:
    settings: Settings
    topics: Topics
    env: dict[str, str]
    tmp: Path
    es: Any
    stub: OpenAIStubServer
    workers: list[Worker] = field(default_factory=list)

    @property
    def store(self) -> ElasticsearchStore:
        return ElasticsearchStore(self.es, alias=self.settings.es_alias)

    def start_worker(self, name: str, *args: str, **env: str) -> Worker:
        log = self.tmp / f"sleep-{name}-{len(self.workers)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "lightmem", "sleep-worker", "--topic-prefix",
                 self.topics.prefix, *args],
                env={**self.env, **env}, stdout=out, stderr=subprocess.STDOUT, cwd=self.tmp,
                start_new_session=True)
        worker = Worker(name, proc, log)
        self.workers.append(worker)
        return worker

    def seed(self, pairs: list[Pair], *, newer_first: bool = False) -> None:
        """Index the pairs (with vectors) and produce them (without) to the entries topic."""
        self.store.bulk_upsert([e for p in pairs for e in (p.target, p.newer)], refresh=True)
        with RecordProducer(self.settings, self.topics) as producer:
            for p in pairs:
                both = (p.newer, p.target) if newer_first else (p.target, p.newer)
                for e in both:
                    producer.produce(self.topics.entries,
                                     e.model_copy(update={"embedding": None}).to_bytes(),
                                     key=e.scope.encode(), partition=p.scope_index % PARTITIONS)

    def cli(self, *args: str) -> Any:
        env = {k: v for k, v in self.env.items() if k.startswith("LIGHTMEM_")}
        return CliRunner().invoke(cli_app, [*args], env=env)

    def sleep_cli(self, *args: str) -> Any:
        result = self.cli("sleep", *args, "--topic-prefix", self.topics.prefix)
        assert result.exit_code == 0, result.output
        return result

    def state(self) -> dict[str, tuple[str, int] | None]:
        ids = [i for i in self._ids]
        found = {e.id: (e.fact, e.version) for e in self.store.get(ids)}
        return {i: found.get(i) for i in ids}

    _ids: list[str] = field(default_factory=list)

    def expect(self, pairs: list[Pair]) -> dict[str, tuple[str, int] | None]:
        want = expected_facts(pairs)
        self._ids = sorted(want)
        return want

    def changes(self) -> list[MemoryChange]:
        return [r.change for r in read_changes(self.settings, self.topics)]

    def committed(self) -> dict[int, int]:
        from confluent_kafka import Consumer, TopicPartition

        from lightmem.streams.kafka.topics import kafka_config

        c = Consumer(kafka_config(self.settings, **{"group.id": self.settings.sleep_group,
                                                    "enable.auto.commit": False}))
        try:
            tps = c.committed([TopicPartition(self.topics.entries, p)
                               for p in range(PARTITIONS)], timeout=30)
            return {tp.partition: tp.offset for tp in tps if tp.offset >= 0}
        finally:
            c.close()

    def ends(self, topic: str | None = None) -> dict[int, int]:
        """Non-empty partitions of ``topic`` (default: the entries topic) -> end offset."""
        from confluent_kafka import Consumer, TopicPartition

        from lightmem.streams.kafka.topics import kafka_config

        c = Consumer(kafka_config(self.settings, **{"group.id": "ends",
                                                    "enable.auto.commit": False}))
        try:
            out = {}
            for p in range(PARTITIONS):
                _, high = c.get_watermark_offsets(
                    TopicPartition(topic or self.topics.entries, p), timeout=30)
                if high:
                    out[p] = high
            return out
        finally:
            c.close()


@contextmanager
def sleep_deployment(kind: str, kafka_bootstrap: str, es_url: str, es_client: Any,
                     tmp_path: Path) -> Iterator[SleepEnv]:
    """A private deployment (topic prefix ``<kind>-<run>.``, index alias, sleep group) and an
    LLM stub; removed afterwards. The environment's sleep-window and metrics settings are
    dropped, so that each test sets what it uses."""
    run = uuid.uuid4().hex[:10]
    prefix = f"{kind}-{run}."
    alias = f"{kind}-{run}-mem"
    group = f"{kind}-{run}-sleep"
    stub = OpenAIStubServer(consolidation_responder, latency_s=0.05).start()
    env = {
        **os.environ,
        "LIGHTMEM_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "LIGHTMEM_ES_URL": es_url,
        "LIGHTMEM_ES_ALIAS": alias,
        "LIGHTMEM_SLEEP_GROUP": group,
        "LIGHTMEM_SLEEP_POLL_S": "0.3",
        "LIGHTMEM_SLEEP_CONCURRENCY": "4",
        "LIGHTMEM_KAFKA_PARTITIONS": str(PARTITIONS),
        "LIGHTMEM_LLM_BASE_URL": stub.base_url,
        "LIGHTMEM_LLM_MAX_RETRIES": "0",
        "LIGHTMEM_TORCH_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    for name in ("LIGHTMEM_SLEEP_CRON", "LIGHTMEM_SLEEP_CRON_DURATION_S", "LIGHTMEM_SLEEP_AUTO",
                 "LIGHTMEM_SLEEP_AUTO_MAX_RATE", "LIGHTMEM_SLEEP_AUTO_QUIET_S",
                 "LIGHTMEM_SLEEP_AUTO_SAMPLE_S", "LIGHTMEM_SLEEP_YIELD_LAG",
                 "LIGHTMEM_METRICS_PORT"):
        env.pop(name, None)
    settings = Settings(kafka_bootstrap=kafka_bootstrap, es_url=es_url, es_alias=alias,
                        sleep_group=group, kafka_partitions=PARTITIONS,
                        llm_base_url=stub.base_url)
    topics = Topics(prefix=prefix)
    create_topics(settings, topics)
    senv = SleepEnv(settings, topics, env, tmp_path, es_client, stub)
    senv.store.ensure_index()
    try:
        yield senv
    finally:
        for w in senv.workers:
            w.stop()
        stub.stop()
        remove_deployment(settings, topic_prefixes=[prefix], groups=[group, f"{group}.control"],
                          alias=alias, es=es_client)


@pytest.fixture
def sleep_env(kafka_bootstrap: str, es_url: str, es_client: Any, tmp_path: Path
              ) -> Iterator[SleepEnv]:
    with sleep_deployment("lmsleep", kafka_bootstrap, es_url, es_client, tmp_path) as senv:
        yield senv


def _consolidation_calls(senv: SleepEnv) -> int:
    return sum(1 for r in senv.stub.chat_requests
               if "TARGET memory:" in str(r["messages"][-1]["content"]))


def _assert_changes_match(senv: SleepEnv, pairs: list[Pair]) -> list[MemoryChange]:
    """One change per updated/deleted target, each change id once (a duplicate record of a
    change id must be the same change), nothing else."""
    records = senv.changes()
    by_id: dict[str, MemoryChange] = {}
    for c in records:
        if c.change_id in by_id:
            before = by_id[c.change_id]
            assert (before.op, before.memory_id, before.after and before.after.fact) == \
                (c.op, c.memory_id, c.after and c.after.fact), f"two versions of {c.change_id}"
        by_id.setdefault(c.change_id, c)
    want = Counter((p.target.id, p.outcome) for p in pairs if p.outcome != "ignore")
    got = Counter((c.memory_id, "update" if c.op is ChangeOp.update else "delete")
                  for c in by_id.values())
    assert got == want
    return records


# -- tests ---------------------------------------------------------------------------------


def test_closed_window_consumes_nothing_then_open_consolidates(sleep_env: SleepEnv) -> None:
    """Closed: nothing consumed (no LLM call, no commit) while a bad control command proves
    the worker was running; open: queues built, changes applied and published, an older
    entry never changes a newer one (even when the newer one comes first in the topic)."""
    senv = sleep_env
    pairs = synthetic_pairs(4, 3)  # 4 scopes x (update, delete, ignore)
    want = senv.expect(pairs)
    senv.seed(pairs, newer_first=True)
    before = senv.state()
    w = senv.start_worker("w1")
    wait_for(lambda: "assigned [0, 1, 2, 3]" in w.text(), what="partition assignment",
             workers=[w])
    # A malformed command (a close with a cron) straight onto the control topic: the worker
    # rejects it with the reasons and dead-letters it. Its dead letter is the barrier: the
    # worker has polled with its partitions assigned and entries waiting.
    with RecordProducer(senv.settings, senv.topics) as producer:
        producer.produce(senv.topics.sleep_control, b'{"command_id": "x", "action": "close", '
                         b'"cron": "* * * * *", "issued_at": "2024-05-01T00:00:00Z"}',
                         key=b"window/*")
        producer.produce(senv.topics.sleep_control, b"not json", key=b"window/*")

    def sleep_dead_letters() -> list[Any]:
        return [r for r in read_dead_letters(senv.settings, senv.topics)
                if r.letter is not None and r.letter.step == "sleep-control"]

    letters = wait_for(lambda: len(sleep_dead_letters()) == 2 and sleep_dead_letters(),
                       what="dead letters of the bad commands", workers=[w])
    assert "cron: a close takes no cron" in letters[0].letter.reason
    assert "invalid SleepWindowCommand" in letters[1].letter.reason
    assert _consolidation_calls(senv) == 0
    assert senv.committed() == {}
    assert senv.state() == before
    status = senv.sleep_cli("status", "--log")
    assert "window: closed" in status.stdout
    assert "REJECTED" in status.stdout

    senv.sleep_cli("open", "--for", "30m")
    wait_for(lambda: senv.state() == want, what="the consolidated index", workers=[w])
    wait_for(lambda: senv.committed() == senv.ends(), what="offsets committed", workers=[w])
    records = _assert_changes_match(senv, pairs)
    assert all(not c.caused_by or set(c.caused_by) <= {p.newer.id for p in pairs}
               for c in records)
    # Newer entries are untouched (version 1) whatever their order in the topic.
    assert all(senv.state()[p.newer.id] == (p.newer.fact, 1) for p in pairs)
    assert _consolidation_calls(senv) == len(pairs)  # one call per target, none twice
    # The audit trail of one updated memory, from the topic.
    updated = next(p for p in pairs if p.outcome == "update")
    result = senv.cli("history", updated.target.id, "--stream", "--topic-prefix",
                      senv.topics.prefix)
    assert result.exit_code == 0, result.output
    [line] = [ln for ln in result.stdout.splitlines() if ln.strip()]
    change = MemoryChange.parse(line)
    assert change.op is ChangeOp.update and change.caused_by == [updated.newer.id]
    assert change.after is not None and change.after.version == 2
    # Each bad command was dead-lettered once, not once per poll.
    assert len(sleep_dead_letters()) == 2

    senv.sleep_cli("close")
    wait_for(lambda: "window open -> closed" in w.text(), what="the close", workers=[w])


def test_two_workers_split_partitions_and_match_one(sleep_env: SleepEnv) -> None:
    """Two workers share the four partitions and end with exactly the index one worker
    produces (the expected index of the first test)."""
    senv = sleep_env
    pairs = synthetic_pairs(8, 3, seed=1)
    want = senv.expect(pairs)
    senv.seed(pairs)
    w1 = senv.start_worker("w1")
    w2 = senv.start_worker("w2")
    workers = [w1, w2]

    def last_assignment(w: Worker) -> str:
        lines = [ln for ln in w.text().splitlines() if ": assigned [" in ln]
        return lines[-1].split(": assigned ")[1].split(" (")[0] if lines else ""

    def split() -> bool:
        # The group settled with two partitions each (a lone first member had all four).
        return all(last_assignment(w).count(",") == 1 for w in workers)

    wait_for(split, what="two partitions per worker", workers=workers)
    senv.sleep_cli("open")
    wait_for(lambda: senv.state() == want, what="the consolidated index", workers=workers)
    wait_for(lambda: senv.committed() == senv.ends(), what="offsets committed",
             workers=workers)
    _assert_changes_match(senv, pairs)
    # Both did consolidation work: the partitions were split, not idled.
    busy = [w for w in workers if any(
        "batch of" in ln and " 0 targets" not in ln for ln in w.text().splitlines())]
    assert len(busy) == 2, "\n".join(w.tail() for w in workers)


def test_killed_worker_restarts_to_the_same_index(sleep_env: SleepEnv) -> None:
    """kill -9 mid-window, restart: the same final index as an uninterrupted run, every
    change applied and published once (duplicates only as identical records)."""
    senv = sleep_env
    senv.stub.latency_s = 0.4  # slow LLM: the kill lands mid-batch
    pairs = synthetic_pairs(8, 3, seed=2)
    want = senv.expect(pairs)
    senv.seed(pairs)
    senv.sleep_cli("open")
    w1 = senv.start_worker("w1", LIGHTMEM_SLEEP_CONCURRENCY="2")

    def changed() -> int:
        return sum(1 for v in senv.state().values() if v is None or v[1] > 1)

    wait_for(lambda: changed() >= 2, what="the first changes", workers=[w1])
    w1.kill9()
    assert senv.state() != want, "the worker finished before it was killed"
    w2 = senv.start_worker("w2")
    wait_for(lambda: senv.state() == want, what="the consolidated index", workers=[w2])
    wait_for(lambda: senv.committed() == senv.ends(), what="offsets committed", workers=[w2])
    _assert_changes_match(senv, pairs)
    assert all(v is None or v[1] <= 2 for v in senv.state().values())


def test_change_in_index_but_not_on_topic_is_recovered(sleep_env: SleepEnv) -> None:
    """A worker that died between its index write and its change record: the next owner of
    the partition settles the outbox and publishes the change, without applying it again."""
    from lightmem.processors.consolidate import consolidate_pending
    from lightmem.processors.update import Consolidator
    from lightmem.streams.models.openai_chat import OpenAIChatModel
    from lightmem.streams.sleep.outbox import Outbox, OutboxStore

    senv = sleep_env
    pairs = synthetic_pairs(1, 1, outcomes=("delete",))
    want = senv.expect(pairs)
    senv.seed(pairs)
    [pair] = pairs
    outbox = Outbox(senv.es, f"{senv.settings.es_alias}.sleep-outbox")
    outbox.ensure()
    store = OutboxStore(senv.store, outbox, topic=senv.topics.entries, partition=0,
                        caused_by=[pair.newer.id], now=pair.newer.ingest_time)
    chat = OpenAIChatModel(senv.stub.base_url, "stub", "k", timeout=10, max_retries=0)
    outcome = consolidate_pending(store, Consolidator(chat), lambda t: None, pair.target.id,
                                  [pair.newer.id], pair.newer.ingest_time)
    assert outcome.change is not None  # deleted in the index; "crash" before producing it
    assert senv.state() == want and senv.changes() == []
    senv.sleep_cli("open")
    w = senv.start_worker("w1")
    wait_for(lambda: senv.committed() == senv.ends(), what="offsets committed", workers=[w])
    wait_for(lambda: senv.changes(), what="the recovered change", workers=[w])
    [change] = senv.changes()
    assert change.op is ChangeOp.delete and change.memory_id == pair.target.id
    assert change.change_id == outcome.change.change_id
    assert senv.state() == want
    assert "settled 1 pending change" in w.text()
    assert _consolidation_calls(senv) == 1  # the replayed entry did not ask again



def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``/metrics`` of a worker: (sample name, labels) -> value; {} while it is not up."""
    import urllib.error
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return {}
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_follow_the_window_and_the_work(sleep_env: SleepEnv) -> None:
    """``--metrics-port``: the window gauge follows close/open/close, and the counters equal
    what happened: records consumed from the entries topic, change records on the
    memory-changes topic, targets, LLM calls, the dead-lettered control command, and the
    lag of every partition back to 0. Logs are JSON lines (``--log-format json``)."""
    import json

    senv = sleep_env
    pairs = synthetic_pairs(4, 2, seed=3)
    want = senv.expect(pairs)
    senv.seed(pairs)
    port = _free_port()
    w = senv.start_worker("w1", LIGHTMEM_METRICS_PORT=str(port), LIGHTMEM_LOG_FORMAT="json")
    entries, changes_topic = senv.topics.entries, senv.topics.memory_changes

    def value(name: str, **labels: str) -> float | None:
        return _scrape(port).get((name, frozenset(labels.items())))

    def window() -> float | None:
        return value("lightmem_sleep_window_open", tenant="*")

    wait_for(lambda: "sleep worker ready" in w.text(), what="the worker", workers=[w])
    assert window() == 0
    with RecordProducer(senv.settings, senv.topics) as producer:
        producer.produce(senv.topics.sleep_control, b"not json", key=b"window/*")
    wait_for(lambda: value("lightmem_dead_letters_total", stage="sleep", reason="control")
             == 1, what="the control dead letter counted", workers=[w])
    assert value("lightmem_events_in_total", stage="sleep", topic=entries) is None

    senv.sleep_cli("open")
    wait_for(lambda: window() == 1, what="the open window gauge", workers=[w])
    wait_for(lambda: senv.state() == want, what="the consolidated index", workers=[w])
    wait_for(lambda: senv.committed() == senv.ends(), what="offsets committed", workers=[w])
    consumed = sum(senv.ends().values())  # every record of the entries topic, once
    records = _assert_changes_match(senv, pairs)
    wait_for(lambda: value("lightmem_events_in_total", stage="sleep", topic=entries)
             == consumed, what="entries consumed counted", workers=[w])
    assert value("lightmem_events_out_total", stage="sleep", topic=changes_topic) \
        == len(records)
    assert value("lightmem_events_applied_total", stage="sleep") == len(pairs)
    assert value("lightmem_stage_errors_total", stage="sleep", kind="transient") is None
    assert value("lightmem_llm_calls_total", purpose="consolidate", tenant="acme") \
        == _consolidation_calls(senv) == len(pairs)
    assert window() == 1

    def lags() -> dict[str, float]:
        return {dict(labels)["partition"]: v for (name, labels), v in _scrape(port).items()
                if name == "lightmem_consumer_lag" and dict(labels)["topic"] == entries}

    wait_for(lambda: lags() == {str(p): 0 for p in range(PARTITIONS)},
             what="lag 0 on every partition", workers=[w])

    senv.sleep_cli("close")
    wait_for(lambda: window() == 0, what="the closed window gauge", workers=[w])
    assert value("lightmem_events_in_total", stage="sleep", topic=entries) == consumed
    # JSON logs: every line the worker's logging wrote is one object.
    logged = [json.loads(ln) for ln in w.text().splitlines() if ln.startswith("{")]
    assert any(r["message"] == "sleep worker ready" for r in logged)
    assert any("window closed -> open" in r["message"] for r in logged)


def _commit_group(settings: Settings, group: str, topic: str, offsets: dict[int, int]) -> None:
    """Commit ``offsets`` for ``group`` on ``topic`` (a stand-in for the ingest workers'
    commits: a real group on the real broker, without a member)."""
    from confluent_kafka import Consumer, TopicPartition

    from lightmem.streams.kafka.topics import kafka_config

    c = Consumer(kafka_config(settings, **{"group.id": group, "enable.auto.commit": False}))
    try:
        c.commit(offsets=[TopicPartition(topic, p, o) for p, o in offsets.items()],
                 asynchronous=False)
    finally:
        c.close()


def test_open_window_yields_to_an_ingest_backlog(sleep_env: SleepEnv) -> None:
    """Ingest first (``LIGHTMEM_SLEEP_YIELD_LAG``): while the ingest group has more records
    waiting than the threshold, an open window starts no target (no LLM call, no commit, index
    unchanged, ``lightmem_sleep_yielding`` 1); once ingest has caught up, the same window
    does all the work."""
    senv = sleep_env
    ingest_group = f"{senv.settings.sleep_group}-ingest"
    pairs = synthetic_pairs(4, 2, seed=5)
    want = senv.expect(pairs)
    senv.seed(pairs)
    before = senv.state()
    turns = senv.topics.turns
    _commit_group(senv.settings, ingest_group, turns, {p: 0 for p in range(PARTITIONS)})
    with RecordProducer(senv.settings, senv.topics) as producer:
        for i in range(40):  # what the ingest workers have not read yet
            producer.produce(turns, b"{}", key=f"acme/c{i % 8}".encode())
    try:
        port = _free_port()
        w = senv.start_worker("w1", "--ingest-group", ingest_group, "--yield-lag", "20",
                              LIGHTMEM_METRICS_PORT=str(port))

        def value(name: str, **labels: str) -> float | None:
            return _scrape(port).get((name, frozenset(labels.items())))

        wait_for(lambda: "ingest backlog 40 records: yielding to ingest" in w.text(),
                 what="the backlog seen", workers=[w])
        assert f"no new target while group {ingest_group!r} has more than 20 records" \
            in w.text()
        wait_for(lambda: "sleep worker ready" in w.text(), what="the worker", workers=[w])
        senv.sleep_cli("open")
        # Both gauges come from the same pass of the worker's loop over the open window.
        wait_for(lambda: value("lightmem_sleep_window_open", tenant="*") == 1
                 and value("lightmem_sleep_yielding") == 1, what="yielding with the window open",
                 workers=[w])
        assert _consolidation_calls(senv) == 0
        assert senv.committed() == {}
        assert senv.state() == before

        # Ingest catches up (36 of 40 read: 4 <= half the threshold): the window works.
        _commit_group(senv.settings, ingest_group, turns,
                      {p: h - 1 for p, h in senv.ends(turns).items()})
        wait_for(lambda: senv.state() == want, what="the consolidated index", workers=[w])
        wait_for(lambda: senv.committed() == senv.ends(), what="offsets committed", workers=[w])
        assert value("lightmem_sleep_yielding") == 0
        assert "resuming sleep-time work" in w.text()
        _assert_changes_match(senv, pairs)
        assert _consolidation_calls(senv) == len(pairs)
    finally:
        # The stand-in group has no member (the worker only reads its offsets).
        remove_deployment(senv.settings, groups=[ingest_group])


def test_entries_the_index_sink_has_not_read_are_not_committed_past(sleep_env: SleepEnv
                                                                    ) -> None:
    """An entry at or after the ingest group's committed offset on the entries topic may not
    be in Elasticsearch yet: the open window neither takes it for deleted nor commits past it;
    once the index sink has read it, it is consolidated."""
    senv = sleep_env
    ingest_group = f"{senv.settings.sleep_group}-ingest"
    pairs = synthetic_pairs(4, 2, seed=9)
    want = senv.expect(pairs)
    senv.seed(pairs)
    before = senv.state()
    entries = senv.topics.entries
    # The index sink has read nothing yet (a real group committed at 0 everywhere).
    _commit_group(senv.settings, ingest_group, entries, {p: 0 for p in range(PARTITIONS)})
    try:
        w = senv.start_worker("w1", "--ingest-group", ingest_group, "--yield-lag", "0")
        wait_for(lambda: "sleep worker ready" in w.text(), what="the worker", workers=[w])
        senv.sleep_cli("open")
        wait_for(lambda: re.search(r"batch of \d+ entries: .* [1-9]\d* not indexed yet",
                                   w.text()), what="a batch of unindexed entries", workers=[w])
        assert _consolidation_calls(senv) == 0
        assert set(senv.committed().values()) <= {0}
        assert senv.state() == before

        _commit_group(senv.settings, ingest_group, entries, senv.ends())  # indexed now
        wait_for(lambda: senv.state() == want, what="the consolidated index", workers=[w])
        wait_for(lambda: senv.committed() == senv.ends(), what="offsets committed", workers=[w])
        _assert_changes_match(senv, pairs)
        assert _consolidation_calls(senv) == len(pairs)
    finally:
        remove_deployment(senv.settings, groups=[ingest_group])
