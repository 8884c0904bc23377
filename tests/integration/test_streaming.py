"""The streaming pipeline end to end on the real Kafka and Elasticsearch.

Workers run as subprocesses (``python -m lightmem worker``), exactly as deployed, so that a
test can ``kill -9`` one. Each test gets its own topic prefix, ingest group (consumer group) and
index alias, and deletes them afterwards. Nothing sleeps to synchronise: every wait is a
condition polled against a deadline (:func:`wait_for`).

Settings of the test workers: no pre-compression (``compressor=none``: the entropy model is
slow on this machine and changes nothing in the wiring), a small sensory budget (64 tokens)
and topic buffer (64 tokens) so that conversations of a few dozen turns are cut into several
segments and summarized several times, extractive mode (no LLM endpoint).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

pytest.importorskip("confluent_kafka", reason="confluent-kafka (the stream extra) is missing")

from lightmem.ops.cli import app as cli_app  # noqa: E402
from lightmem.schemas import Segment, TurnEvent, conversation_key  # noqa: E402
from lightmem.settings import Settings  # noqa: E402
from lightmem.streams.ingest import changelog_topic  # noqa: E402
from lightmem.streams.kafka.dlq import read_dead_letters  # noqa: E402
from lightmem.streams.kafka.flush_commands import FlushCommand, control_kind  # noqa: E402
from lightmem.streams.kafka.producer import RecordProducer, add_turns, send_flush  # noqa: E402
from lightmem.streams.kafka.teardown import remove_deployment  # noqa: E402
from lightmem.streams.kafka.topics import Topics, create_topics  # noqa: E402

from .procs import Worker  # noqa: E402

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
#: Deadline of a pipeline wait: worker start (model load, group join) plus processing, on a
#: loaded 2-core machine.
WAIT_S = 240.0


def wait_for(predicate: Callable[[], Any], *, timeout: float = WAIT_S, what: str = "",
             interval: float = 0.5, workers: list[Worker] | None = None) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail at the deadline (or when a
    worker died, showing its log)."""
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
        time.sleep(interval)  # polling interval, not a synchronisation
    for w in workers or []:
        w.dump_stacks()
    logs = "\n".join(w.tail(200) for w in workers or [])
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})\n{logs}")


def wait_count(senv: StreamEnv, n: int, workers: list[Worker], what: str,
               index: str | None = None) -> None:
    """Wait until the index holds exactly ``n`` memories (the failure names the last count)."""
    seen: list[int] = []

    def reached() -> bool:
        seen.append(senv.count(index))
        return seen[-1] == n

    try:
        wait_for(reached, what=what, workers=workers)
    except pytest.fail.Exception as exc:
        raise AssertionError(f"{exc}\nlast counts: {seen[-5:]} of {n}") from None


# -- test data ---------------------------------------------------------------------------------

TOPICS_POOL = {
    "dog": ["I walked my dog {n} times around the park this week",
            "The puppy chewed my shoes again, that is number {n}",
            "We signed the dog up for obedience class level {n}"],
    "cooking": ["I baked {n} loaves of sourdough bread on Sunday",
                "The lasagna recipe needs {n} layers of pasta",
                "I bought {n} kilos of tomatoes for the sauce"],
    "travel": ["Our flight to Lisbon leaves at gate {n}",
               "The hotel in Porto has {n} floors and a rooftop bar",
               "We rented bikes for {n} days along the coast"],
    "work": ["The quarterly report is due in {n} days",
             "My manager scheduled {n} meetings for tomorrow",
             "We hired {n} new engineers for the platform team"],
}


def make_conversation(tenant: str, user: str, conversation: str, n_turns: int, *,
                      start: datetime = T0, session_every: int = 0, seed: int = 0
                      ) -> list[TurnEvent]:
    """``n_turns`` alternating user/assistant turns drifting between topics."""
    rng = random.Random(f"{tenant}/{conversation}/{seed}")
    names = list(TOPICS_POOL)
    topic = rng.choice(names)
    turns = []
    for i in range(n_turns):
        if i % 6 == 0:
            topic = rng.choice(names)
        user_turn = i % 2 == 0
        text = (rng.choice(TOPICS_POOL[topic]).format(n=i) if user_turn
                else f"That sounds great, tell me more about the {topic} ({i}).")
        session = f"s{i // session_every}" if session_every else "s0"
        turns.append(TurnEvent(
            tenant=tenant, user=user, conversation=conversation, session=session,
            turn_id=f"{conversation}-t{i:04d}", role="user" if user_turn else "assistant",
            speaker=user if user_turn else "assistant", text=text,
            event_time=start + timedelta(minutes=i),
        ))
    return turns


# -- one isolated pipeline deployment per test ---------------------------------------------------


@dataclass
class StreamEnv:
    """One deployment: unique topic prefix, ingest group, ES alias."""

    settings: Settings
    topics: Topics
    env: dict[str, str]
    tmp: Path
    es: Any
    workers: list[Worker] = field(default_factory=list)

    @property
    def alias(self) -> str:
        return self.settings.es_alias

    def start_worker(self, name: str = "w1", *args: str) -> Worker:
        log = self.tmp / f"worker-{name}-{len(self.workers)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "lightmem", "worker", "--topic-prefix",
                 self.topics.prefix, "--loglevel",
                 os.environ.get("LMTEST_WORKER_LOGLEVEL", "info"), *args],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=self.tmp,
                start_new_session=True,
            )
        worker = Worker(name, proc, log)
        self.workers.append(worker)
        return worker

    def store(self, index: str | None = None) -> Any:
        from lightmem.streams.elastic.store import ElasticsearchStore

        return ElasticsearchStore(self.es, alias=self.alias, index=index)

    def entries(self, index: str | None = None) -> list[Any]:
        store = self.store(index)
        target = index or self.alias
        if not self.es.indices.exists(index=target):
            return []
        store.refresh()
        return list(store.iter_entries())

    def count(self, index: str | None = None) -> int:
        target = index or self.alias
        if not self.es.indices.exists(index=target):
            return 0
        self.es.indices.refresh(index=target)
        return int(self.es.count(index=target)["count"])

    def dead_letters(self) -> list[Any]:
        return read_dead_letters(self.settings, self.topics)

    def segments(self) -> list[tuple[int, int, Segment | None, bytes | None]]:
        """Every record of the segments topic: (partition, offset, segment or None for a
        control record, key)."""
        return [(p, o, None if control else Segment.parse(v), k)
                for p, o, k, v, control in consume_all(self.settings, self.topics.segments)]


def consume_all(settings: Settings, topic: str, timeout_s: float = 60.0
                ) -> list[tuple[int, int, bytes | None, bytes | None, bool]]:
    """Every committed record of ``topic`` up to its current end: (partition, offset, key,
    value, is a control record)."""
    from lightmem.streams.kafka.topic_reader import read_to_end

    return sorted((m.partition(), m.offset(), m.key(), m.value(),
                   control_kind(m.headers()) is not None)
                  for m in read_to_end(settings, topic, timeout_s=timeout_s, purpose="test"))


@pytest.fixture
def stream_env(kafka_bootstrap: str, es_url: str, es_client: Any, tmp_path: Path
               ) -> Iterator[StreamEnv]:
    run = uuid.uuid4().hex[:10]
    prefix = f"lmtest-{run}."
    ingest_group = f"lmtest-{run}"
    alias = f"lmtest-{run}-mem"
    env = {
        **os.environ,
        "LIGHTMEM_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "LIGHTMEM_ES_URL": es_url,
        "LIGHTMEM_ES_ALIAS": alias,
        "LIGHTMEM_INGEST_GROUP": ingest_group,
        "LIGHTMEM_COMPRESSOR": "none",
        "LIGHTMEM_SENSORY_BUDGET_TOKENS": "64",
        "LIGHTMEM_TOPIC_BUFFER_TOKENS": "64",
        "LIGHTMEM_KAFKA_PARTITIONS": "4",
        "LIGHTMEM_MAX_EVENT_BYTES": "2048",
        "LIGHTMEM_TORCH_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("LIGHTMEM_LLM_BASE_URL", None)
    settings = Settings(kafka_bootstrap=kafka_bootstrap, es_url=es_url, es_alias=alias,
                        ingest_group=ingest_group, kafka_partitions=4, max_event_bytes=2048,
                        compressor="none", sensory_budget_tokens=64, topic_buffer_tokens=64)
    topics = Topics(prefix=prefix)
    create_topics(settings, topics)
    senv = StreamEnv(settings, topics, env, tmp_path, es_client)
    try:
        yield senv
    finally:
        for w in senv.workers:
            w.stop()
        remove_deployment(settings, topic_prefixes=[prefix, ingest_group], groups=[ingest_group],
                          alias=alias, es=es_client)


# -- helpers -----------------------------------------------------------------------------------


def turn_counts(entries: list[Any]) -> Counter:
    return Counter(t for e in entries for t in e.source_turn_ids)


def assert_order(senv: StreamEnv, produced: dict[str, list[str]]) -> None:
    """Per conversation, the distinct segments' turns are exactly the produced turns, in the
    order they were produced (segments cut twice after a crash carry the same id)."""
    seen: dict[str, list[str]] = defaultdict(list)
    ids: set[str] = set()
    for _, _, segment, _ in senv.segments():
        if segment is None or segment.segment_id in ids:
            continue
        ids.add(segment.segment_id)
        seen[segment.conversation_key].extend(t.turn_id for t in segment.turns)
    assert set(seen) == set(produced)
    for key, turn_ids in produced.items():
        assert seen[key] == turn_ids, f"{key}: turns out of order or missing/duplicated"


def turns_assignment(senv: StreamEnv) -> list[list[int]] | None:
    """Turns partitions per member of the worker group, once there are two members that
    each own some (None before)."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": senv.settings.kafka_bootstrap})
    group = senv.settings.ingest_group
    desc = admin.describe_consumer_groups([group], request_timeout=10)[group].result(10)
    owned = [sorted(tp.partition for tp in m.assignment.topic_partitions
                    if tp.topic == senv.topics.turns) for m in desc.members]
    return owned if len(owned) == 2 and all(owned) else None


def search(senv: StreamEnv, tenant: str, user: str, query: str, k: int = 5) -> list[Any]:
    from lightmem.streams.models.encoder import load_encoder

    vector = load_encoder().sentence_model.encode([query], normalize_embeddings=True)[0]
    return senv.store().search(tenant, user, vector.tolist(), k)


# -- tests -------------------------------------------------------------------------------------


def test_turns_become_searchable_memories_in_order(stream_env: StreamEnv) -> None:
    """Produced turns -> segments (in order, 4 partitions) -> entries -> ES kNN; tenant
    isolation; the idle timer flushes a silent conversation; `lightmem flush` the rest;
    a replay into a new index yields the same entry ids."""
    senv = stream_env
    convs = [make_conversation("acme", f"u{i}", f"acme-c{i}", 30, seed=i) for i in range(4)]
    # Same user name in another tenant, with the same texts: must never leak across tenants.
    convs.append(make_conversation("globex", "u0", "globex-c0", 30, seed=0))
    # One conversation that goes silent long before the others (idle timer flushes it).
    idle = make_conversation("acme", "u9", "acme-idle", 8, start=T0 - timedelta(days=2))
    special = TurnEvent(
        tenant="acme", user="u1", conversation="acme-c1", session="s0", turn_id="acme-c1-kayak",
        role="user", speaker="u1", text="My sister Zelda bought a bright red kayak in Lisbon",
        event_time=T0 + timedelta(minutes=31),
    )
    convs[1].append(special)
    all_turns = [t for c in [idle, *convs] for t in c]
    produced = {c[0].conversation_key: [t.turn_id for t in c] for c in [idle, *convs]}

    assert add_turns(all_turns, senv.settings, topics=senv.topics) == len(all_turns)
    started = time.monotonic()
    w = senv.start_worker("w1")

    # The idle conversation is flushed by the timer, without any explicit flush.
    def idle_indexed() -> bool:
        return senv.count() > 0 and {f"acme-idle-t{i:04d}" for i in range(8)} <= set(
            turn_counts(senv.entries()))
    wait_for(idle_indexed, what="the idle conversation's memories", workers=[w])

    assert send_flush(senv.settings, topics=senv.topics) == 4
    wait_count(senv, len(all_turns), [w], "every turn indexed")
    elapsed = time.monotonic() - started

    entries = senv.entries()
    counts = turn_counts(entries)
    assert set(counts) == {t.turn_id for t in all_turns}
    assert all(n == 1 for n in counts.values())
    assert_order(senv, produced)

    hits = search(senv, "acme", "u1", "kayak in Lisbon")
    assert hits and hits[0].entry.source_turn_ids == ["acme-c1-kayak"]
    assert "Zelda" in hits[0].entry.fact
    # Tenant isolation: globex/u0 and acme/u0 have identical texts; each search stays home.
    for tenant in ("acme", "globex"):
        hits = search(senv, tenant, "u0", "walked my dog in the park", k=50)
        assert hits and {(h.entry.tenant, h.entry.user) for h in hits} == {(tenant, "u0")}

    # Memory changes: one `add` per entry.
    changes = consume_all(senv.settings, senv.topics.memory_changes)
    assert {json.loads(v)["memory_id"] for *_, v, _ in changes} == {e.id for e in entries}

    # Replay the turns topic into a new index under a new group: same entry ids.
    new_index = f"{senv.alias}-v2"
    result = subprocess.run(
        [sys.executable, "-m", "lightmem", "replay", "--from", "earliest", "--index",
         new_index, "--topic-prefix", senv.topics.prefix, "--run", "r1", "--timeout", "300"],
        env=senv.env, cwd=senv.tmp, capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    replayed = senv.entries(new_index)

    def content(es: list[Any]) -> set[tuple[str, str, str, tuple[str, ...]]]:
        return {(e.id, e.scope, e.fact, tuple(e.source_turn_ids)) for e in es}

    assert content(replayed) == content(entries)
    # Promote: the alias now resolves to the replayed index only.
    promoted = CliRunner().invoke(cli_app, ["index", "promote", new_index], env=senv.env)
    assert promoted.exit_code == 0, promoted.output
    assert list(senv.es.indices.get_alias(name=senv.alias)) == [new_index]
    assert content(senv.entries()) == content(entries)
    print(f"\n[timing] {len(all_turns)} turns indexed in {elapsed:.1f}s (worker start "
          f"included); replay {len(replayed)} entries")


BAD_KINDS = ("not-json", "missing-field", "bad-role", "oversized", "wrong-key", "tombstone",
             "naive-time", "not-utf8")


def bad_event(i: int, good: TurnEvent) -> tuple[bytes | None, bytes | None, str]:
    """(key, value, kind) of the i-th malformed event; each carries a unique marker."""
    kind = BAD_KINDS[i % len(BAD_KINDS)]
    marker = f"BAD-{i:04d}"
    body = json.loads(good.to_json())
    body["turn_id"] = marker
    key = good.conversation_key.encode()
    if kind == "not-json":
        return key, f"{{{marker} this is not json".encode(), kind
    if kind == "missing-field":
        del body["text"]
    elif kind == "bad-role":
        body["role"] = "narrator"
    elif kind == "oversized":
        body["text"] = marker + " " + "x" * 3000
    elif kind == "wrong-key":
        key = b"acme/someone-else"
    elif kind == "tombstone":
        return key, None, kind
    elif kind == "naive-time":
        body["event_time"] = "2024-05-01T09:00:00"
    elif kind == "not-utf8":
        return key, marker.encode() + b"\xff\xfe{", kind
    return key, json.dumps(body).encode(), kind


def test_malformed_events_go_to_the_dlq_and_good_ones_are_indexed(stream_env: StreamEnv
                                                                  ) -> None:
    """100 malformed events among 1,000 good ones: exactly those 100 in the DLQ, with
    reasons and source coordinates; every good turn indexed; `dlq list` and `dlq replay`."""
    senv = stream_env
    convs = [make_conversation("acme", f"u{i}", f"dlq-c{i}", 100, seed=i) for i in range(10)]
    good = [t for c in convs for t in c]
    assert len(good) == 1000
    rng = random.Random(7)
    bad_at = set(rng.sample(range(1, len(good)), 100))
    bad: dict[int, str] = {}  # index in the bad list -> kind
    with RecordProducer(senv.settings, senv.topics) as producer:
        n_bad = 0
        for i, turn in enumerate(good):
            if i in bad_at:
                key, value, kind = bad_event(n_bad, turn)
                producer.produce(senv.topics.turns, value, key=key)
                bad[n_bad] = kind
                n_bad += 1
            producer.produce(senv.topics.turns, turn.to_bytes(),
                             key=turn.conversation_key.encode())
        producer.send_flush(FlushCommand())
    started = time.monotonic()
    w = senv.start_worker("w1")
    wait_count(senv, len(good), [w], "1000 good turns indexed")
    elapsed = time.monotonic() - started

    counts = turn_counts(senv.entries())
    assert set(counts) == {t.turn_id for t in good} and set(counts.values()) == {1}

    letters = wait_for(lambda: (dl := senv.dead_letters()) and len(dl) >= 100 and dl,
                       what="100 dead letters", workers=[w])
    assert len(letters) == 100
    by_marker = {}
    for rec in letters:
        x = rec.letter
        assert x is not None and x.step == "parse" and x.source == senv.topics.turns
        assert x.partition is not None and x.offset is not None and x.reason
        raw = rec.original
        marker = next((f"BAD-{i:04d}" for i in bad if f"BAD-{i:04d}".encode() in raw), None)
        if raw == b"":  # the tombstone carries no bytes: identify it by its reason
            assert "tombstone" in x.reason
            marker = f"tombstone@{x.partition}:{x.offset}"
        assert marker is not None, raw[:200]
        by_marker[marker] = x
    assert len(by_marker) == 100
    reasons = {kind: [] for kind in BAD_KINDS}
    for i, kind in bad.items():
        x = by_marker.get(f"BAD-{i:04d}")
        if kind == "tombstone":
            continue
        assert x is not None, f"bad event {i} ({kind}) not dead-lettered"
        reasons[kind].append(x.reason)
    assert "max_event_bytes" in reasons["oversized"][0]
    assert "key: must be" in reasons["wrong-key"][0]
    assert "text" in reasons["missing-field"][0] and "role" in reasons["bad-role"][0]
    assert "event_time" in reasons["naive-time"][0]

    runner = CliRunner()
    listed = runner.invoke(cli_app, ["dlq", "list", "--json", "--topic-prefix",
                                     senv.topics.prefix], env={
        "LIGHTMEM_KAFKA_BOOTSTRAP": senv.settings.kafka_bootstrap})
    assert listed.exit_code == 0, listed.output
    rows = [json.loads(line) for line in listed.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 100 and all(r["step"] == "parse" and r["reason"] for r in rows)

    # Replay re-produces the original bytes; still bad, so each comes back: nothing lost.
    replayed = runner.invoke(cli_app, ["dlq", "replay", "--stage", "parse", "--topic-prefix",
                                       senv.topics.prefix], env={
        "LIGHTMEM_KAFKA_BOOTSTRAP": senv.settings.kafka_bootstrap})
    assert replayed.exit_code == 0, replayed.output
    again = wait_for(lambda: (dl := senv.dead_letters()) and len(dl) >= 200 and dl,
                     what="replayed dead letters", workers=[w])
    assert len(again) == 200
    assert Counter(r.original for r in again[100:]) == Counter(r.original for r in letters)
    print(f"\n[timing] 1000 good + 100 bad turns indexed in {elapsed:.1f}s")


def test_kill9_worker_mid_stream_loses_nothing_and_duplicates_nothing(stream_env: StreamEnv
                                                                      ) -> None:
    """kill -9 a worker while it works through a backlog, restart it: every turn ends up in
    exactly one memory (by source turn id), buffered turns survive in the changelog."""
    senv = stream_env
    convs = [make_conversation("acme", f"u{i}", f"k9-c{i}", 80, seed=i, session_every=40)
             for i in range(6)]
    turns = [t for c in convs for t in c]
    produced = {c[0].conversation_key: [t.turn_id for t in c] for c in convs}
    add_turns(turns, senv.settings, topics=senv.topics)
    w1 = senv.start_worker("w1")
    # Mid-stream: some memories written, far from all.
    wait_for(lambda: senv.count() >= 20, what="first memories", workers=[w1], interval=0.2)
    w1.kill9()
    before = senv.count()
    assert before < len(turns), "the worker finished before it was killed: test too small"
    # What the changelog holds at the kill: buffered turns that only it remembers.
    latest = {k: v for _, _, k, v, _ in consume_all(
        senv.settings, changelog_topic(senv.topics, senv.settings.ingest_group, "sensory"))}
    buffered = sum(len((json.loads(v).get("buffer") or {}).get("turns", []))
                   for v in latest.values() if v)
    assert buffered > 0, "no buffered turns at the kill: the test would prove nothing"
    w2 = senv.start_worker("w2")
    assert send_flush(senv.settings, topics=senv.topics) == 4
    wait_count(senv, len(turns), [w2], "every turn indexed after restart")
    counts = turn_counts(senv.entries())
    assert set(counts) == {t.turn_id for t in turns}
    dupes = {t: n for t, n in counts.items() if n != 1}
    assert not dupes, f"turns in more than one memory: {dupes}"
    assert_order(senv, produced)
    print(f"\n[kill -9] {before} of {len(turns)} memories written and {buffered} turns "
          f"buffered (changelog) at the kill")


def test_two_workers_keep_per_conversation_order(stream_env: StreamEnv) -> None:
    """Two workers in one group share the 4 partitions; order and exactly-once-by-id hold."""
    senv = stream_env
    convs = [make_conversation("acme", f"u{i}", f"two-c{i}", 40, seed=i) for i in range(8)]
    # Interleaved, so that both halves below carry part of every conversation.
    turns = [t for group in zip(*convs, strict=True) for t in group]
    produced = {c[0].conversation_key: [t.turn_id for t in c] for c in convs}
    w1 = senv.start_worker("w1")
    w2 = senv.start_worker("w2")
    half = len(turns) // 2
    add_turns(turns[:half], senv.settings, topics=senv.topics)
    wait_for(lambda: senv.count() > 0, what="first memories", workers=[w1, w2])
    # Both workers own some of the turns partitions before the second half arrives.
    owners = wait_for(lambda: turns_assignment(senv), what="two members sharing the turns "
                      "partitions", workers=[w1, w2])
    assert sorted(p for ps in owners for p in ps) == [0, 1, 2, 3]
    add_turns(turns[half:], senv.settings, topics=senv.topics)
    send_flush(senv.settings, topics=senv.topics)
    wait_count(senv, len(turns), [w1, w2], "every turn indexed")
    counts = turn_counts(senv.entries())
    assert set(counts) == {t.turn_id for t in turns} and set(counts.values()) == {1}
    assert_order(senv, produced)


def test_produce_file_reports_bad_lines_dead_letters_them_and_produces_the_rest(
    stream_env: StreamEnv, tmp_path: Path
) -> None:
    """`lightmem produce FILE.jsonl`: exit 1, every bad line named with its reason, bad lines
    on the DLQ (source = the file, offset = the line), good lines keyed on the turns topic;
    `lightmem topics create` is idempotent."""
    senv = stream_env
    good = make_conversation("acme", "u1", "file-c1", 4)
    lines = [good[0].to_json(), "{broken", good[1].to_json(), "",
             json.dumps({**json.loads(good[2].to_json()), "role": "robot"}),
             good[2].to_json(), good[3].to_json()]
    path = tmp_path / "turns.jsonl"
    path.write_text("\n".join(lines) + "\n")
    env = {"LIGHTMEM_KAFKA_BOOTSTRAP": senv.settings.kafka_bootstrap}
    runner = CliRunner()
    for _ in range(2):
        created = runner.invoke(cli_app, ["topics", "create", "--topic-prefix",
                                          senv.topics.prefix], env=env)
        assert created.exit_code == 0, created.output
    result = runner.invoke(cli_app, ["produce", str(path), "--topic-prefix",
                                     senv.topics.prefix], env=env)
    assert result.exit_code == 1
    assert f"{path}:2" in result.stderr and f"{path}:5" in result.stderr
    assert "role" in result.stderr
    produced = consume_all(senv.settings, senv.topics.turns)
    assert sorted(json.loads(v)["turn_id"] for *_, v, _ in produced) == sorted(
        t.turn_id for t in good)
    assert {k for _, _, k, _, _ in produced} == {conversation_key("acme", "file-c1").encode()}
    assert len({p for p, *_ in produced}) == 1  # one conversation, one partition
    letters = senv.dead_letters()
    assert [(r.letter.source, r.letter.offset, r.letter.step) for r in letters] == [
        (str(path), 2, "parse"), (str(path), 5, "parse")]
