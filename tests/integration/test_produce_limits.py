"""Turn size and file quirks against the real broker (issue 11, defects 4 and 8):
``max_event_bytes`` is the one limit: topics created from it take a 2 MB turn, a file line
over it is refused before producing (named by line, dead-lettered), a topic created smaller
refuses it with an error naming the line; a byte-order mark does not cost the first line.
Also: `services status` names the Elasticsearch server's pid (read-only, the node keeps
running)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

pytest.importorskip("confluent_kafka", reason="confluent-kafka (the stream extra) is missing")

from lightmem.ops.services import launcher as services  # noqa: E402
from lightmem.schemas import DeadLetter, TurnEvent  # noqa: E402
from lightmem.settings import Settings  # noqa: E402
from lightmem.streams.kafka.producer import DeliveryError, produce_file  # noqa: E402
from lightmem.streams.kafka.topics import (  # noqa: E402
    Topics,
    create_topics,
    delete_topics,
    turns_max_message_bytes,
)

pytestmark = pytest.mark.integration

T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
TWO_MB = 2_000_000


@pytest.fixture
def deployment(kafka_bootstrap: str, unique_id: Callable[[str], str]
               ) -> Iterator[Callable[[Settings], tuple[Settings, Topics]]]:
    """``deployment(settings)``: the pipeline topics under a fresh prefix, created from
    ``settings`` as `lightmem topics create` would; deleted afterwards."""
    made: list[tuple[Settings, Topics]] = []

    def make(settings: Settings) -> tuple[Settings, Topics]:
        settings = settings.model_copy(update={"kafka_bootstrap": kafka_bootstrap})
        topics = Topics(prefix=unique_id("lmsize") + ".")
        create_topics(settings, topics)
        made.append((settings, topics))
        return settings, topics

    yield make
    for settings, topics in made:
        delete_topics(settings, topics.all())


def _line(turn_id: str, text: str = "hello there") -> str:
    return TurnEvent(tenant="acme", user="u1", conversation="c1", session="s1", turn_id=turn_id,
                     role="user", speaker="Ann", text=text, event_time=T0).to_json()


def _big_line(turn_id: str) -> str:
    # 2 MB of platform metadata on a short message: valid under the schema, only too large.
    turn = json.loads(_line(turn_id))
    turn["metadata"] = {"blob": "x" * TWO_MB}
    return json.dumps(turn)


def _read_all(settings: Settings, topic: str) -> list[bytes]:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "unused",
                         "enable.auto.commit": False, "fetch.max.bytes": 64 * 1024 * 1024})
    try:
        meta = consumer.list_topics(topic, timeout=30).topics[topic]
        values: list[bytes] = []
        for p in meta.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)
            if high <= low:
                continue
            consumer.assign([TopicPartition(topic, p, low)])
            while True:
                msg = consumer.poll(10)
                assert msg is not None, f"{topic}[{p}]: nothing read before offset {high}"
                assert msg.error() is None, msg.error()
                values.append(msg.value())
                if msg.offset() >= high - 1:
                    break
        return values
    finally:
        consumer.close()


def test_a_2mb_turn_is_produced_when_the_limit_allows_it(
        deployment: Callable[..., tuple[Settings, Topics]], tmp_path: Path) -> None:
    settings, topics = deployment(Settings(max_event_bytes=3_000_000))
    assert turns_max_message_bytes(settings) > 3_000_000
    path = tmp_path / "turns.jsonl"
    path.write_text(_line("t1") + "\n" + _big_line("t2") + "\n")
    report = produce_file(path, settings, topics=topics)
    assert report.produced == 2 and not report.rejected
    turns = [json.loads(v)["turn_id"] for v in _read_all(settings, topics.turns)]
    assert sorted(turns) == ["t1", "t2"]


def test_a_2mb_turn_over_the_limit_is_refused_by_line_and_dead_lettered(
        deployment: Callable[..., tuple[Settings, Topics]], tmp_path: Path) -> None:
    settings, topics = deployment(Settings())
    path = tmp_path / "turns.jsonl"
    # A byte-order mark before the first line, as some editors write it.
    path.write_bytes(b"\xef\xbb\xbf" + (_line("t1") + "\n" + _big_line("t2") + "\n"
                                        + _line("t3") + "\n").encode())
    report = produce_file(path, settings, topics=topics)
    assert report.produced == 2
    assert [r.line for r in report.rejected] == [2]
    assert "max_event_bytes=256000" in report.rejected[0].reason
    values = _read_all(settings, topics.turns)
    assert sorted(json.loads(v)["turn_id"] for v in values) == ["t1", "t3"]
    assert not any(v.startswith(b"\xef\xbb\xbf") for v in values)
    [letter] = [DeadLetter.parse(v) for v in _read_all(settings, topics.dlq)]
    assert (letter.source, letter.offset, letter.step) == (str(path), 2, "parse")


def test_a_topic_created_smaller_than_the_limit_names_the_line(
        deployment: Callable[..., tuple[Settings, Topics]], tmp_path: Path) -> None:
    settings, topics = deployment(Settings())  # the turns topic takes about 1 MiB
    raised = settings.model_copy(update={"max_event_bytes": 3_000_000})
    path = tmp_path / "turns.jsonl"
    path.write_text(_line("t1") + "\n" + _big_line("t2") + "\n")
    with pytest.raises(DeliveryError) as info:
        produce_file(path, raised, topics=topics)
    message = str(info.value)
    assert f"{path}:2 -> {topics.turns}" in message
    assert "Message size too large" in message and "max.message.bytes" in message


def test_services_status_names_the_elasticsearch_server_pid(es_client) -> None:  # noqa: ANN001
    server = services.ElasticsearchServer(services.ServicesConfig.from_env())
    if server.external or server.running_pid() is None:
        pytest.skip("the Elasticsearch node was not started by this launcher")
    nodes = es_client.nodes.info(node_id="_local", metric="process")["nodes"]
    [node] = nodes.values()
    status = server.status()
    assert status.pid == node["process"]["id"]
    assert status.group_pid is not None and status.group_pid != status.pid
