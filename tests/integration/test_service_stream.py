"""``lightmem serve --stream`` on the real Kafka broker and Elasticsearch node.

The service process reads the test's private alias and writes the test's private topics: an
added turn is produced to the turns topic (202 with its ids, read back from the topic), the
read side is seeded directly with :class:`ElasticsearchStore` (no worker), and a delete is
recorded on the memory-changes topic. A missing alias or topic refuses the start in one line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from service_server import Server, start_server, stop_server

from lightmem.schemas import EntryMode, MemoryEntry, TurnEvent, conversation_key
from lightmem.service.auth import create_key
from lightmem.settings import Settings

pytest.importorskip("confluent_kafka")
pytest.importorskip("elasticsearch")

from lightmem.streams.elastic.store import ElasticsearchStore  # noqa: E402
from lightmem.streams.kafka.topic_reader import read_to_end  # noqa: E402
from lightmem.streams.kafka.topics import Topics, create_topics, delete_topics  # noqa: E402

from .test_streaming import StreamEnv, stream_env  # noqa: E402, F401 - the worker fixture

pytestmark = [pytest.mark.integration, pytest.mark.models]


def _entry(i: int, tenant: str, user: str, fact: str) -> MemoryEntry:
    when = datetime(2024, 3, 4 + i, 18, 0, tzinfo=UTC)
    return MemoryEntry(id=f"{tenant}-{user}-{i}", tenant=tenant, user=user, conversation="c1",
                       topic_id="t1", speaker=user, fact=fact, event_time=when,
                       ingest_time=when, source_turn_ids=[f"turn-{i}"],
                       # As said, without the "speaker: " the fact starts with (what an
                       # extractive memory keeps beside its compressed line).
                       original_text=fact.split(": ", 1)[-1],
                       compressed_text=fact.split(": ", 1)[-1], mode=EntryMode.extractive)


@pytest.fixture
def deployment(kafka_bootstrap: str, es_url: str, es_client, unique_id: Callable[[str], str],  # noqa: ANN001
               tmp_path: Path) -> Iterator[tuple[Settings, Topics, ElasticsearchStore]]:
    """Private topics and alias, seeded with two tenants' memories; removed after."""
    from lightmem.processors.embed import Embedder
    from lightmem.streams.models.encoder import load_encoder

    prefix = unique_id("lmtest-serve") + "."
    alias = unique_id("lightmem-test-serve")
    settings = Settings(kafka_bootstrap=kafka_bootstrap, es_url=es_url, kafka_partitions=2,
                        kafka_topic_prefix=prefix, es_alias=alias, data_dir=tmp_path)
    topics = Topics.from_settings(settings)
    created = create_topics(settings, topics).created
    store = ElasticsearchStore(es_client, alias=alias, refresh=True)
    store.ensure_index()
    try:
        embedder = Embedder(load_encoder().sentence_model, batch_size=8)
        store.bulk_upsert(embedder.embed_entries([
            _entry(0, "tenant-a", "alice", "alice: I adopted a dog named Pepper."),
            _entry(1, "tenant-a", "alice", "alice: My sister lives in Lisbon."),
            _entry(2, "tenant-a", "alice", "alice: I play the cello on Sundays."),
            _entry(0, "tenant-b", "alice", "alice: My dog is called Rex."),
        ]))
        yield settings, topics, store
    finally:
        delete_topics(settings, created)
        for name in es_client.indices.get(index=f"{alias}-*", expand_wildcards="all"):
            es_client.indices.delete(index=name, ignore_unavailable=True)
        es_client.options(ignore_status=404).indices.delete_index_template(
            name=f"{alias}-template")


def _env(settings: Settings) -> dict[str, str]:
    return {"LIGHTMEM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "LIGHTMEM_ES_URL": settings.es_url,
            "LIGHTMEM_KAFKA_TOPIC_PREFIX": settings.kafka_topic_prefix}


@pytest.fixture
def served(deployment: tuple[Settings, Topics, ElasticsearchStore], tmp_path: Path
           ) -> Iterator[tuple[Server, dict[str, str]]]:
    settings, _, _ = deployment
    keys_file = tmp_path / "keys.json"
    keys = {"a": create_key(keys_file, "tenant-a")[0], "b": create_key(keys_file, "tenant-b")[0]}
    server = start_server(["--stream", "--alias", settings.es_alias, "--keys-file",
                           str(keys_file), "--data-dir", str(tmp_path)],
                          env=_env(settings), log=tmp_path / "serve.log")
    try:
        yield server, keys
    finally:
        stop_server(server)


def test_stream_service_produces_turns_and_reads_the_alias(
    deployment: tuple[Settings, Topics, ElasticsearchStore],
    served: tuple[Server, dict[str, str]],
) -> None:
    settings, topics, store = deployment
    server, keys = served
    a = httpx.Client(base_url=server.url, timeout=60.0,
                     headers={"Authorization": f"Bearer {keys['a']}"})
    b = httpx.Client(base_url=server.url, timeout=60.0, headers={"X-API-Key": keys["b"]})

    ready = a.get("/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"elasticsearch": "ok", "kafka": "ok"}

    # Write side: 202 with the turn ids; the turns are on the turns topic, keyed by
    # conversation, with the key's tenant (never the body's).
    r = a.post("/v1/memories", json={"user": "alice", "conversation": "c9", "messages": [
        {"role": "user", "content": "I moved to Porto.", "timestamp": "2024-05-01T09:00:00Z"},
        {"role": "assistant", "content": "Porto is lovely!"}]})
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "queued" and r.json()["searchable"] is False
    turn_ids = r.json()["turn_ids"]
    produced = [(m.key(), TurnEvent.parse(m.value()))
                for m in read_to_end(settings, topics.turns, timeout_s=30)]
    assert [t.turn_id for _, t in produced] == turn_ids
    assert all(k == conversation_key("tenant-a", "c9").encode() for k, _ in produced)
    assert {(t.tenant, t.user, t.text) for _, t in produced} == {
        ("tenant-a", "alice", "I moved to Porto."), ("tenant-a", "alice", "Porto is lovely!")}

    # Read side: the alias, within the key's tenant only.
    r = a.post("/v1/search", json={"user": "alice", "query": "what is my dog called", "k": 2})
    assert r.status_code == 200, r.text
    hits = r.json()["results"]
    assert "Pepper" in hits[0]["text"] and all(h["id"].startswith("tenant-a-") for h in hits)
    assert hits[0]["rendered"] == "[2024-03-04, Monday] alice: I adopted a dog named Pepper."
    r = b.post("/v1/search", json={"user": "alice", "query": "what is my dog called"})
    assert [h["id"] for h in r.json()["results"]] == ["tenant-b-alice-0"]
    r = a.post("/v1/search", json={"user": "alice", "query": "dog",
                                   "after": "2024-03-05T00:00:00Z"})
    assert "tenant-a-alice-0" not in [h["id"] for h in r.json()["results"]]
    # Lexical + vector: an exact word of a memory ranks it first.
    r = a.post("/v1/search", json={"user": "alice", "query": "cello", "k": 3, "hybrid": True})
    assert r.status_code == 200, r.text
    hybrid = r.json()["results"]
    # (Scores are the Retriever's reciprocal-rank fusion: comparable within one search.)
    assert hybrid[0]["id"] == "tenant-a-alice-2"
    assert [h["score"] for h in hybrid] == sorted((h["score"] for h in hybrid), reverse=True)
    assert all(h["id"].startswith("tenant-a-") for h in hybrid)
    r = a.post("/search", json={"user_id": "alice", "query": "sister", "top_k": 1})
    assert r.json()["data"][0]["id"] == "tenant-a-alice-1"

    pages, cursor, ids = 0, None, []
    while True:
        params = {"user": "alice", "limit": 2, **({"cursor": cursor} if cursor else {})}
        page = a.get("/v1/memories", params=params).json()
        ids += [m["id"] for m in page["results"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert ids == ["tenant-a-alice-0", "tenant-a-alice-1", "tenant-a-alice-2"] and pages == 2

    assert b.get("/v1/memories/tenant-a-alice-0").status_code == 404
    assert b.delete("/v1/memories/tenant-a-alice-0").status_code == 404
    assert a.get("/v1/memories/tenant-a-alice-0").status_code == 200

    # Delete one: gone from the alias, a delete change on the memory-changes topic.
    r = a.delete("/v1/memories/tenant-a-alice-2")
    assert r.status_code == 200, r.text
    assert a.get("/v1/memories/tenant-a-alice-2").status_code == 404
    assert store.get(["tenant-a-alice-2"]) == []
    history = a.get("/v1/memories/tenant-a-alice-2/history")
    assert history.status_code == 200, history.text
    assert [c["op"] for c in history.json()["results"]] == ["delete"]
    assert b.get("/v1/memories/tenant-a-alice-2/history").status_code == 404

    # Delete all = the stream erasure: the alias is cleared now; with no ingest worker
    # running, the buffers part is not confirmed, and the answer says so.
    r = a.request("DELETE", "/v1/memories", params={"user": "alice"})
    assert r.status_code == 200, r.text
    wiped = r.json()
    assert wiped["deleted"] == 2 and wiped["confirmed"] is False
    sinks = {s["sink"]: s for s in wiped["sinks"]}
    assert sinks["elasticsearch"]["confirmed"] is True
    assert any(item.startswith("turns: raw turns in") for item in wiped["not_erased"])
    assert a.get("/v1/memories", params={"user": "alice"}).json()["results"] == []
    r = b.post("/v1/search", json={"user": "alice", "query": "dog"})
    assert [h["id"] for h in r.json()["results"]] == ["tenant-b-alice-0"]


def test_stream_service_refuses_to_start_without_its_alias_or_topics(
    deployment: tuple[Settings, Topics, ElasticsearchStore], tmp_path: Path,
) -> None:
    settings, _, _ = deployment
    for args, env, says in (
        (["--alias", settings.es_alias + "-missing"], _env(settings), "index alias"),
        (["--alias", settings.es_alias, "--topic-prefix", "no-such-prefix."], _env(settings),
         "missing topics"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "lightmem", "serve", "--stream", "--data-dir", str(tmp_path),
             *args], env={**os.environ, **env}, capture_output=True, text=True,
            timeout=120)
        assert proc.returncode == 1, proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        error = [ln for ln in lines if ln.startswith("error:")]
        assert len(error) == 1 and says in error[0], proc.stderr
        assert "Traceback" not in proc.stderr


def test_wait_searchable_and_aml_add_with_a_worker(stream_env: StreamEnv) -> None:  # noqa: F811
    """With an ingest worker running: ``?wait=searchable`` flushes the conversation and
    answers 200 once the turns' memories are in the alias; ``POST /add`` is searchable when
    it returns, on the stream backend too."""
    senv = stream_env
    worker = senv.start_worker("w1")
    # The worker creates the alias once its models are loaded; the service needs it.
    deadline = time.monotonic() + 240
    while not senv.es.indices.exists_alias(name=senv.alias):
        assert worker.proc.poll() is None and time.monotonic() < deadline, worker.tail()
        time.sleep(0.5)  # polling interval of a deadline wait
    server = start_server(["--stream", "--data-dir", str(senv.tmp), "--topic-prefix",
                           senv.topics.prefix], env=senv.env, log=senv.tmp / "serve.log")
    try:
        with httpx.Client(base_url=server.url, timeout=120.0) as c:  # dev mode: 127.0.0.1
            r = c.post("/v1/memories", params={"wait": "searchable", "timeout_s": 90},
                       json={"user": "zoe", "conversation": "c1", "messages": [
                           {"role": "user", "content": "My kayak is bright red."},
                           {"role": "user", "content": "I keep it in a shed in Bergen."}]})
            assert r.status_code == 200, (r.text, worker.tail())
            added = r.json()
            assert added["searchable"] is True and added["not_searchable"] == []
            hits = c.post("/v1/search", json={"user": "zoe", "query": "what colour is the "
                                              "kayak"}).json()["results"]
            assert hits and "red" in hits[0]["text"]
            assert hits[0]["source_turn_ids"] == [added["turn_ids"][0]]

            body = {"request_id": "r1", "user_id": "zoe", "session_id": "s2",
                    "messages": [{"role": "user", "content": "I moved to Tromso in May."}]}
            first = c.post("/add", json=body)
            assert first.status_code == 200 and first.json()["searchable"] is True
            data = c.post("/search", json={"query": "where did I move", "user_id": "zoe",
                                           "top_k": 1}).json()["data"]
            assert "Tromso" in data[0]["content"]
            assert c.post("/add", json=body).json() == first.json()
    finally:
        stop_server(server)


def _search(c: httpx.Client, user: str, query: str) -> list[dict]:
    r = c.post("/v1/search", json={"user": user, "query": query, "k": 10})
    assert r.status_code == 200, r.text
    return r.json()["results"]


def test_stream_turns_are_searchable_as_events_before_their_memories(
    stream_env: StreamEnv,  # noqa: F811
) -> None:
    """Freshness on ``--stream``: the worker's sensory stage writes every buffered turn to the
    events index, so a produced turn is found at once as a provisional event; once its
    conversation is summarized the memory replaces it (same turn id, no duplicate) and the
    event is retired; erasing the user removes events too."""
    from lightmem.streams.elastic.events import events_index

    senv = stream_env
    worker = senv.start_worker("w1")
    deadline = time.monotonic() + 240
    while not senv.es.indices.exists(index=events_index(senv.alias)):
        assert worker.proc.poll() is None and time.monotonic() < deadline, worker.tail()
        time.sleep(0.5)  # polling interval of a deadline wait
    server = start_server(["--stream", "--data-dir", str(senv.tmp), "--topic-prefix",
                           senv.topics.prefix], env=senv.env, log=senv.tmp / "serve.log")
    try:
        with httpx.Client(base_url=server.url, timeout=120.0) as c:  # dev mode: 127.0.0.1
            r = c.post("/v1/memories", json={"user": "yan", "conversation": "c1", "messages": [
                {"role": "user", "content": "My violin teacher is called Ines."}]})
            assert r.status_code == 202, r.text
            [turn_id] = r.json()["turn_ids"]

            # 1. An event, within seconds, while the turn waits in its sensory buffer.
            deadline = time.monotonic() + 60
            while True:
                hits = [h for h in _search(c, "yan", "who teaches me the violin")
                        if turn_id in h["source_turn_ids"]]
                if hits:
                    break
                assert time.monotonic() < deadline, worker.tail()
                time.sleep(0.2)  # polling interval of a deadline wait
            [event] = hits
            assert event["kind"] == "event" and event["id"].startswith("event:")
            assert "Ines" in event["text"] and event["source_turn_ids"] == [turn_id]
            assert _search(c, "someone-else", "who teaches me the violin") == []
            listed = c.get("/v1/memories", params={"user": "yan"}).json()["results"]
            assert [(m["kind"], m["source_turn_ids"]) for m in listed] == [("event", [turn_id])]
            r = c.post("/v1/search", json={"user": "yan", "query": "violin teacher",
                                           "include_events": False})
            assert r.json()["results"] == []

            # 2. Summarized (flushed): the memory, never the event beside it.
            r = c.post("/v1/memories", params={"wait": "searchable", "timeout_s": 90},
                       json={"user": "yan", "conversation": "c1", "messages": [
                           {"role": "user", "content": "She comes on Tuesdays."}]})
            assert r.status_code == 200 and r.json()["searchable"] is True, r.text
            hits = [h for h in _search(c, "yan", "who teaches me the violin")
                    if turn_id in h["source_turn_ids"]]
            assert [h["kind"] for h in hits] == ["memory"], hits
            listed = c.get("/v1/memories", params={"user": "yan", "limit": 1}).json()
            assert listed["results"][0]["kind"] == "memory"
            assert turn_id in listed["results"][0]["source_turn_ids"]
            # ... and the event is gone from the events index (retired by the index sink).
            deadline = time.monotonic() + 30
            while senv.es.count(index=events_index(senv.alias), query={
                    "term": {"source_turn_ids": turn_id}})["count"]:
                assert time.monotonic() < deadline
                time.sleep(0.2)  # polling interval (the events index refreshes every 1 s)
                senv.es.indices.refresh(index=events_index(senv.alias))

            # 3. Erasing the user removes her events as well as her memories.
            r = c.post("/v1/memories", json={"user": "erin", "conversation": "c2", "messages": [
                {"role": "user", "content": "My locker code is 4711."}]})
            assert r.status_code == 202, r.text
            deadline = time.monotonic() + 60
            while not _search(c, "erin", "locker code"):
                assert time.monotonic() < deadline, worker.tail()
                time.sleep(0.2)  # polling interval of a deadline wait
            r = c.request("DELETE", "/v1/memories", params={"user": "erin"})
            assert r.status_code == 200, r.text
            assert _search(c, "erin", "locker code") == []
    finally:
        stop_server(server)


def test_event_index_erases_only_turns_produced_before_the_erasure(
    es_client, unique_id: Callable[[str], str],  # noqa: ANN001
) -> None:
    """What a worker does when an erasure reaches it after it wrote events of the scope:
    the events of turns produced up to the erasure go, later ones and other scopes stay."""
    from lightmem.processors.events import event_entry
    from lightmem.streams.elastic.events import EventIndex

    alias = unique_id("lightmem-test-events")
    events = EventIndex(es_client, alias, dim=4)
    events.ensure()
    try:
        at = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
        made = []
        for i, (user, minutes) in enumerate([("ann", -5), ("ann", 0), ("ann", 5), ("bob", -5)]):
            when = at + timedelta(minutes=minutes)
            turn = TurnEvent(tenant="t", user=user, conversation=f"c-{user}", session="s",
                             turn_id=f"t{i}", role="user", speaker=user, text=f"turn {i}",
                             event_time=when)
            made.append(event_entry(turn, turn.text, seq=i, written_at=when)
                        .model_copy(update={"embedding": [1.0, 0.0, 0.0, 0.0]}))
        events.write(made)
        gone = events.erase([("t", "ann", int(at.timestamp() * 1000))])
        assert gone == 2
        es_client.indices.refresh(index=events.name)
        left = {h["_source"]["source_turn_ids"][0] for h in es_client.search(
            index=events.name, size=10)["hits"]["hits"]}
        assert left == {"t2", "t3"}
        assert events.erase([("t", None, int(at.timestamp() * 1000) + 10 * 60_000)]) == 2
    finally:
        es_client.indices.delete(index=events.name, ignore_unavailable=True)
