"""``lightmem memories list | get | delete --stream`` on the real Kafka broker and
Elasticsearch node (issue 14, item 6).

The alias is seeded directly with :class:`ElasticsearchStore` (no worker needed: the commands
read and delete memories); a delete is recorded on the memory-changes topic, so ``history
--stream`` shows it. Reads are tenant-scoped; an erased user lists nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lightmem.ops.cli import app
from lightmem.settings import Settings

pytest.importorskip("confluent_kafka")
pytest.importorskip("elasticsearch")

from test_memories_cli import SEED, json_lines  # noqa: E402

from lightmem.streams.elastic.store import ElasticsearchStore  # noqa: E402
from lightmem.streams.kafka.topics import Topics, create_topics, delete_topics  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.models]


@pytest.fixture
def deployment(kafka_bootstrap: str, es_url: str, es_client, unique_id: Callable[[str], str],  # noqa: ANN001
               tmp_path: Path) -> Iterator[tuple[Settings, ElasticsearchStore]]:
    """Private topics and alias, seeded with two tenants' memories; removed after."""
    from lightmem.processors.embed import Embedder
    from lightmem.streams.models.encoder import load_encoder

    prefix = unique_id("lmtest-memories") + "."
    alias = unique_id("lightmem-test-memories")
    settings = Settings(kafka_bootstrap=kafka_bootstrap, es_url=es_url, kafka_partitions=2,
                        kafka_topic_prefix=prefix, es_alias=alias, data_dir=tmp_path)
    created = create_topics(settings, Topics.from_settings(settings)).created
    store = ElasticsearchStore(es_client, alias=alias, refresh=True)
    store.ensure_index()
    try:
        store.bulk_upsert(Embedder(load_encoder().sentence_model, batch_size=8)
                          .embed_entries(SEED))
        yield settings, store
    finally:
        delete_topics(settings, created)
        for name in es_client.indices.get(index=f"{alias}-*", expand_wildcards="all"):
            es_client.indices.delete(index=name, ignore_unavailable=True)
        es_client.options(ignore_status=404).indices.delete_index_template(
            name=f"{alias}-template")


def test_memories_list_get_delete_stream(deployment: tuple[Settings, ElasticsearchStore]
                                         ) -> None:
    settings, store = deployment
    env = {"LIGHTMEM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
           "LIGHTMEM_ES_URL": settings.es_url, "LIGHTMEM_ES_ALIAS": settings.es_alias,
           "HF_HUB_OFFLINE": "1"}
    where = ["--stream", "--alias", settings.es_alias, "--topic-prefix",
             settings.kafka_topic_prefix]

    def run(*args: str, code: int | None = 0):  # noqa: ANN202 - None: any exit code
        result = CliRunner().invoke(app, list(args), env=env)
        assert code is None or result.exit_code == code, (args, result.output)
        return result

    def listed(tenant: str, user: str) -> list[str]:
        return [m["id"] for m in json_lines(run("memories", "list", "--tenant", tenant,
                                                "--user", user, "--json", *where).stdout)]

    def searched(query: str) -> list[str]:
        from lightmem.service.backends import StreamBackend
        from lightmem.service.core import MemoryService
        from lightmem.service.models import SearchRequest

        service = MemoryService(StreamBackend(settings), settings)
        try:
            return [h.id for h in service.search("acme", SearchRequest(
                user="alice", query=query, k=5)).results]
        finally:
            service.close()

    assert listed("acme", "alice") == ["acme-alice-0", "acme-alice-1", "acme-alice-2"]
    got = json.loads(run("memories", "get", "acme-alice-0", "--tenant", "acme", *where).stdout)
    assert got["text"] == "alice: I adopted a dog named Pepper."
    other = run("memories", "get", "acme-alice-0", "--tenant", "globex", *where, code=1)
    assert "no memory" in other.output and "Pepper" not in other.output
    run("memories", "delete", "acme-alice-0", "--tenant", "globex", *where, code=1)
    assert searched("dog Pepper")[0] == "acme-alice-0"

    run("memories", "delete", "acme-alice-0", "--tenant", "acme", "--reason", "ticket 7",
        *where)
    run("memories", "get", "acme-alice-0", "--tenant", "acme", *where, code=1)
    assert "acme-alice-0" not in searched("dog Pepper")
    assert listed("acme", "alice") == ["acme-alice-1", "acme-alice-2"]
    history = json_lines(run("history", "acme-alice-0", "--stream", "--topic-prefix",
                             settings.kafka_topic_prefix).stdout)
    assert [(c["op"], c["reason"]) for c in history] == [("delete", "ticket 7")]
    assert listed("globex", "alice") == ["globex-alice-0"]

    # an erased user lists nothing; the others are still listed
    forgot = run("forget", "--tenant", "acme", "--user", "alice", "--json", "--wait", "10",
                 "--topic-prefix", settings.kafka_topic_prefix, "--stream",
                 code=None)  # no ingest worker runs here: its part may be pending
    report = json.loads(forgot.stdout.strip().splitlines()[-1])
    sinks = {s["sink"]: s for s in report["sinks"]}
    assert sinks["elasticsearch"]["confirmed"]
    # the delete change is tombstoned; the report says when the log cleaner removes it
    assert sinks["memory-changes"]["found"] == 1
    assert sinks["memory-changes"]["removed"] == {"change records tombstoned": 1}
    assert "log cleaner" in " ".join(sinks["memory-changes"]["pending"])
    assert listed("acme", "alice") == []
    run("memories", "get", "acme-alice-1", "--tenant", "acme", *where, code=1)
    assert listed("acme", "bob") == ["acme-bob-0"]
    assert listed("globex", "alice") == ["globex-alice-0"]
