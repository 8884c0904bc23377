"""Smaller operator-facing fixes of issue 11 (defects 4 and 8), without servers: the topic
prefix setting, the one turn-size limit and what the producer says about it, a byte-order
mark in `lightmem produce`, `search --json` as JSON lines, and the Elasticsearch server's pid
in `services status`. Fakes stand in for the Kafka client and the embedded runtime."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

from lightmem.processors.store import ScoredEntry
from lightmem.schemas import EntryMode, MemoryEntry, TurnEvent
from lightmem.settings import Settings, load_settings
from lightmem.streams.kafka.topics import (
    DLQ_MAX_MESSAGE_BYTES,
    Topics,
    dead_letter_max_bytes,
    topic_specs,
    turns_max_message_bytes,
)

T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)


# -- LIGHTMEM_KAFKA_TOPIC_PREFIX --------------------------------------------------------------


def test_topic_prefix_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTMEM_KAFKA_TOPIC_PREFIX", "dev.")
    settings = load_settings()
    assert settings.kafka_topic_prefix == "dev."
    topics = Topics.from_settings(settings)
    assert topics.turns == "dev.lightmem.turns.v1" and topics.dlq == "dev.lightmem.dlq.v1"
    assert all(name.startswith("dev.") for name in topics.all())
    # --topic-prefix still wins, even an empty one.
    assert Topics.from_settings(settings, "").turns == "lightmem.turns.v1"


# -- one turn-size limit: topics, producer config, checks -------------------------------------


def _configs(settings: Settings) -> dict[str, dict[str, str]]:
    topics = Topics(prefix="x.")
    specs = {s.name: dict(s.configs) for s in topic_specs(settings, topics)}
    return {"turns": specs[topics.turns], "dlq": specs[topics.dlq]}


def test_topic_sizes_follow_max_event_bytes() -> None:
    default = _configs(Settings())
    assert int(default["turns"]["max.message.bytes"]) >= 1_048_588  # never below the broker's
    assert int(default["dlq"]["max.message.bytes"]) == DLQ_MAX_MESSAGE_BYTES
    big = Settings(max_event_bytes=3_000_000)
    configs = _configs(big)
    assert int(configs["turns"]["max.message.bytes"]) == turns_max_message_bytes(big) > 3_000_000
    # The dead letter of the largest turn (base64 + preview + reason) fits the DLQ.
    assert int(configs["dlq"]["max.message.bytes"]) == dead_letter_max_bytes(big)
    assert dead_letter_max_bytes(big) > 4 / 3 * turns_max_message_bytes(big) + 64 * 1024


class FakeKafkaError:
    def __init__(self, code: int, text: str) -> None:
        self._code, self._text = code, text

    def code(self) -> int:
        return self._code

    def str(self) -> str:
        return self._text


class FakeMessage:
    def __init__(self, topic: str, key: bytes | None) -> None:
        self._topic, self._key = topic, key

    def topic(self) -> str:
        return self._topic

    def key(self) -> bytes | None:
        return self._key


class FakeProducer:
    """confluent_kafka.Producer stand-in: records what is produced; a "broker" that refuses
    turns-topic records over ``topic_limit`` bytes, as a topic created smaller would."""

    instances: list[FakeProducer] = []
    topic_limit = 10**9

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.records: list[tuple[str, bytes | None, bytes | None]] = []
        self._pending: list[tuple[Any, Any, Any]] = []
        FakeProducer.instances.append(self)

    def produce(self, topic: str, key: bytes | None = None, value: bytes | None = None,
                on_delivery: Any = None, **_: Any) -> None:
        from confluent_kafka import KafkaError

        self.records.append((topic, key, value))
        err = None
        if value is not None and len(value) > self.topic_limit and ".turns." in topic:
            err = FakeKafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "Broker: Message size too large")
        self._pending.append((on_delivery, err, FakeMessage(topic, key)))

    def poll(self, timeout: float = 0) -> int:
        return self.flush()

    def flush(self, timeout: float = 0) -> int:
        pending, self._pending = self._pending, []
        for callback, err, msg in pending:
            callback(err, msg)
        return 0


@pytest.fixture
def fake_kafka(monkeypatch: pytest.MonkeyPatch) -> type[FakeProducer]:
    confluent_kafka = pytest.importorskip("confluent_kafka")
    FakeProducer.instances = []
    FakeProducer.topic_limit = 10**9
    monkeypatch.setattr(confluent_kafka, "Producer", FakeProducer)
    return FakeProducer


def _turn(turn_id: str = "t1", text: str = "hello there") -> TurnEvent:
    return TurnEvent(tenant="acme", user="u1", conversation="c1", session="s1",
                     turn_id=turn_id, role="user", speaker="Ann", text=text, event_time=T0)


def test_producer_room_is_the_dead_letter_of_the_largest_turn(fake_kafka: Any) -> None:
    from lightmem.streams.kafka.producer import RecordProducer

    settings = Settings(max_event_bytes=3_000_000)
    RecordProducer(settings)
    assert fake_kafka.instances[0].config["message.max.bytes"] == dead_letter_max_bytes(settings)


def test_add_turns_refuses_an_oversized_turn_before_sending_it(fake_kafka: Any) -> None:
    from lightmem.streams.kafka.producer import OversizeError, RecordProducer

    producer = RecordProducer(Settings(max_event_bytes=2048))
    with pytest.raises(OversizeError) as info:
        producer.add_turns([_turn("small"), _turn("huge", "x" * 5000)])
    assert "turn 'huge'" in str(info.value) and "max_event_bytes=2048" in str(info.value)
    assert [json.loads(v)["turn_id"] for _, _, v in fake_kafka.instances[0].records] == ["small"]


def test_produce_file_names_the_line_of_every_size_problem(
        fake_kafka: Any, tmp_path: Path) -> None:
    from lightmem.streams.kafka.producer import DeliveryError, produce_file

    path = tmp_path / "turns.jsonl"
    lines = [_turn("t1").to_json(), _turn("t2", "x" * 3000).to_json(), _turn("t3").to_json()]
    path.write_text("\n".join(lines) + "\n")
    # Over the setting: refused before producing, named by line, dead-lettered.
    report = produce_file(path, Settings(max_event_bytes=2048), topics=Topics(prefix="x."))
    assert report.produced == 2 and [r.line for r in report.rejected] == [2]
    assert "max_event_bytes=2048" in report.rejected[0].reason
    # Under the setting, over what the existing topic takes: the broker's refusal names the
    # line and the setting to look at.
    fake_kafka.topic_limit = 2500
    with pytest.raises(DeliveryError) as info:
        produce_file(path, Settings(max_event_bytes=100_000), topics=Topics(prefix="x."))
    assert f"{path}:2 ->" in str(info.value) and "max.message.bytes" in str(info.value)


def test_produce_file_accepts_a_byte_order_mark(fake_kafka: Any, tmp_path: Path) -> None:
    from lightmem.streams.kafka.producer import produce_file

    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + _turn("t1").to_bytes() + b"\n" + _turn("t2").to_bytes())
    report = produce_file(path, Settings(), topics=Topics(prefix="x."))
    assert report.produced == 2 and not report.rejected
    values = [v for topic, _, v in fake_kafka.instances[0].records if topic.endswith("turns.v1")]
    # The record is plain JSON for every consumer: the mark stays in the file.
    assert values[0] == _turn("t1").to_bytes()


# -- search --json ----------------------------------------------------------------------------


def test_search_json_prints_one_object_per_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightmem.ops import cli
    from lightmem.ops.commands import embedded

    entries = [MemoryEntry(id=f"m{i}", tenant="default", user="u1", conversation="c1",
                           topic_id="s", speaker="Ann", fact=f"fact {i}", event_time=T0,
                           ingest_time=T0, source_turn_ids=[f"t{i}"], original_text="o",
                           compressed_text="c", mode=EntryMode.extractive) for i in range(2)]
    runtime = SimpleNamespace(
        search=lambda tenant, user, query, k=None: [ScoredEntry(e, 0.5) for e in entries],
        answer=lambda tenant, user, query, hits: SimpleNamespace(text="fact 0", mode="extractive"),
    )
    monkeypatch.setattr(embedded, "_runtime", lambda settings: runtime)
    result = CliRunner().invoke(cli.app, ["search", "--user", "u1", "--json", "--answer", "q"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    objects = [json.loads(line) for line in lines]
    assert [o.get("id") for o in objects[:2]] == ["m0", "m1"] and objects[0]["score"] == 0.5
    assert objects[2] == {"answer": "fact 0", "mode": "extractive"}


# -- services status: the Elasticsearch server's pid ------------------------------------------

_LAUNCHER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)",
                          "org.elasticsearch.bootstrap." + "Elasticsearch", sys.argv[1]])
print(child.pid, flush=True)
time.sleep(120)
"""


def test_services_status_reports_the_elasticsearch_server_pid(tmp_path: Path) -> None:
    """A stand-in process group shaped like `bin/elasticsearch`: a launcher (the group leader
    the state file names) that starts the server JVM. The running servers are not touched:
    the stand-in lives under its own root and port."""
    from lightmem.ops.services import launcher as services
    from lightmem.ops.services.process import _started_at

    config = services.ServicesConfig(root=tmp_path, es_port=1)  # nothing answers on port 1
    server = services.ElasticsearchServer(config)
    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(tmp_path)],
                                stdout=subprocess.PIPE, start_new_session=True)
    assert launcher.stdout is not None
    child = int(launcher.stdout.readline())
    try:
        server.run_dir.mkdir(parents=True, exist_ok=True)
        started = None
        for _ in range(50):  # until /proc shows the process
            started = _started_at(launcher.pid)
            if started is not None:
                break
            time.sleep(0.05)
        server.state_file.write_text(json.dumps({
            "pid": launcher.pid, "created_at": started, "version": config.es_version,
            "port": config.es_port}))
        status = server.status()
        assert status.running and status.pid == child and status.group_pid == launcher.pid
        assert status.to_dict()["pid"] == child
    finally:
        for pid in (child, launcher.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        launcher.wait(timeout=10)
        if launcher.stdout is not None:
            launcher.stdout.close()
