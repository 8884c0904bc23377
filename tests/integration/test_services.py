"""The local Kafka and Elasticsearch work for the Kafka client (confluent-kafka: plain and
transactional produce, group consume and commit) and for kNN search."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator

import pytest
from typer.testing import CliRunner

from lightmem.ops.commands import services as services_cli
from lightmem.ops.services import launcher as services

N_MESSAGES = 40
PARTITIONS = 4


def _expected() -> dict[str, int]:
    # Message i goes to partition i % 4, so every partition gets an ordered share.
    return {f"m{i:03d}": i % PARTITIONS for i in range(N_MESSAGES)}


def _assert_round_trip(received: list[tuple[int, str]]) -> None:
    expected = _expected()
    assert sorted(v for _, v in received) == sorted(expected)
    assert {p for p, _ in received} == set(range(PARTITIONS))
    for partition, value in received:
        assert expected[value] == partition
    for partition in range(PARTITIONS):
        in_partition = [v for p, v in received if p == partition]
        assert in_partition == sorted(in_partition), "order within a partition"


@pytest.mark.integration
def test_confluent_kafka_round_trip(
    kafka_bootstrap: str,
    kafka_admin,  # noqa: ANN001
    new_topic: Callable[..., str],
    new_group: Callable[[], str],
) -> None:
    from confluent_kafka import Consumer, Producer

    topic = new_topic(PARTITIONS)
    metadata = kafka_admin.list_topics(topic=topic, timeout=10)
    assert len(metadata.topics[topic].partitions) == PARTITIONS

    failures: list[str] = []

    def on_delivery(err, msg) -> None:  # noqa: ANN001
        if err is not None:
            failures.append(f"{msg.key()!r}: {err}")

    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    for value, partition in _expected().items():
        producer.produce(
            topic,
            value=value.encode(),
            key=value.encode(),
            partition=partition,
            on_delivery=on_delivery,
        )
        producer.poll(0)
    assert producer.flush(30) == 0, "messages still queued after flush"
    assert failures == []

    consumer = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": new_group(),
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    received: list[tuple[int, str]] = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 60
        while len(received) < N_MESSAGES and time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            received.append((msg.partition(), msg.value().decode()))
        consumer.commit(asynchronous=False)
    finally:
        consumer.close()
    _assert_round_trip(received)


@pytest.mark.integration
def test_elasticsearch_knn_with_keyword_filter(es_client, new_index: Callable[[], str]) -> None:
    index = new_index()
    es_client.indices.create(
        index=index,
        mappings={
            "properties": {
                "tag": {"type": "keyword"},
                "vec": {
                    "type": "dense_vector",
                    "dims": 4,
                    "index": True,
                    "similarity": "cosine",
                    "index_options": {"type": "hnsw", "m": 16, "ef_construction": 100},
                },
            }
        },
    )
    docs = {
        "a": ([1.0, 0.0, 0.0, 0.0], "keep"),
        "b": ([0.9, 0.1, 0.0, 0.0], "drop"),  # second nearest, but filtered out
        "c": ([0.5, 0.5, 0.0, 0.0], "keep"),
        "d": ([0.0, 0.0, 1.0, 0.0], "keep"),
    }
    for doc_id, (vec, tag) in docs.items():
        es_client.index(index=index, id=doc_id, document={"vec": vec, "tag": tag})
    es_client.indices.refresh(index=index)

    mapping = es_client.indices.get_mapping(index=index)[index]["mappings"]
    assert mapping["properties"]["vec"]["index_options"]["type"] == "hnsw"

    result = es_client.search(
        index=index,
        knn={
            "field": "vec",
            "query_vector": [1.0, 0.0, 0.0, 0.0],
            "k": 2,
            "num_candidates": 10,
            "filter": {"term": {"tag": "keep"}},
        },
        source=False,
    )
    hits = result["hits"]["hits"]
    assert [h["_id"] for h in hits] == ["a", "c"]
    # Cosine scores are (1 + cos) / 2.
    assert hits[0]["_score"] == pytest.approx(1.0, abs=1e-4)
    assert hits[1]["_score"] == pytest.approx((1 + 0.5**0.5) / 2, abs=1e-3)


# --------------------------------------------------------------------------- CLI

runner = CliRunner()


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A local port that refuses connections (bound, never listening) for the test's length."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.mark.integration
def test_cli_status_exit_0_when_healthy(
    kafka_bootstrap: str, es_url: str, services_config: services.ServicesConfig
) -> None:
    result = runner.invoke(services_cli.app, ["status", "--json"])
    assert result.exit_code == 0, result.output
    by_name = {st["name"]: st for st in json.loads(result.stdout)}
    assert by_name["kafka"]["healthy"] and by_name["elasticsearch"]["healthy"]
    assert by_name["kafka"]["address"] == kafka_bootstrap
    assert by_name["elasticsearch"]["address"] == es_url.rstrip("/")
    if not services_config.external_es_url:
        assert by_name["elasticsearch"]["version"] == services_config.es_version
    if not services_config.external_kafka_bootstrap:
        kafka = by_name["kafka"]
        if kafka["detail"] == "not started by lightmem":
            # Healthy, but launched from another checkout's cache: no pid file here.
            assert kafka["pid"] is None and not kafka["running"]
        else:
            # Started by this launcher (this session or an earlier `services up`): a pid.
            assert kafka["pid"] and kafka["version"]


def test_cli_status_exit_1_when_unreachable(dead_port: int) -> None:
    env = {
        "LIGHTMEM_KAFKA_BOOTSTRAP": f"127.0.0.1:{dead_port}",
        "LIGHTMEM_ES_URL": f"http://127.0.0.1:{dead_port}",
    }
    result = runner.invoke(services_cli.app, ["status"], env=env)
    assert result.exit_code == 1, result.output
    result = runner.invoke(services_cli.app, ["status", "--no-kafka"], env=env)
    assert result.exit_code == 1, result.output


def test_cli_up_exit_1_for_unreachable_external_server(dead_port: int) -> None:
    env = {"LIGHTMEM_ES_URL": f"http://127.0.0.1:{dead_port}"}
    result = runner.invoke(services_cli.app, ["up", "--no-kafka"], env=env)
    assert result.exit_code == 1, result.output
    assert "not healthy" in result.stderr


def test_cli_down_and_status_with_nothing_selected() -> None:
    assert runner.invoke(services_cli.app, ["down", "--no-kafka", "--no-es"]).exit_code == 0
    assert runner.invoke(services_cli.app, ["status", "--no-kafka", "--no-es"]).exit_code == 0


def test_cli_exit_2_on_bad_setting() -> None:
    result = runner.invoke(services_cli.app, ["status"], env={"LIGHTMEM_KAFKA_PORT": "http"})
    assert result.exit_code == 2
    assert "LIGHTMEM_KAFKA_PORT" in result.stderr


def test_down_is_safe_when_nothing_runs(tmp_path) -> None:  # noqa: ANN001
    config = services.ServicesConfig(root=tmp_path)
    assert services.down(config) == []
    assert [st.running for st in services.status(config, es=False)] == [False]
