"""Retention of the raw turns (issue 14, item 4) on the real Kafka broker: ``topics create``
sets ``LIGHTMEM_TURNS_RETENTION`` on the turns, segments and entries topics, also on topics
that exist already, and nothing else of their configuration; an erasure's report says when
the scope's last raw turn ages out."""

from __future__ import annotations

import uuid

import pytest
from typer.testing import CliRunner

pytest.importorskip("confluent_kafka", reason="confluent-kafka (the stream extra) is missing")

from lightmem.ops.cli import app as cli_app  # noqa: E402
from lightmem.settings import Settings  # noqa: E402
from lightmem.streams.kafka.teardown import remove_deployment  # noqa: E402
from lightmem.streams.kafka.topics import Topics, create_topics  # noqa: E402

pytestmark = pytest.mark.integration


def _configs(settings: Settings, names: list[str]) -> dict[str, dict[str, str]]:
    from confluent_kafka.admin import AdminClient, ConfigResource

    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    res = [ConfigResource(ConfigResource.Type.TOPIC, n) for n in names]
    got = admin.describe_configs(res)
    return {r.name: {k: v.value for k, v in got[r].result(30).items()} for r in res}


def test_turns_retention_is_set_and_changed_on_existing_topics(kafka_bootstrap: str) -> None:
    prefix = f"lmret-{uuid.uuid4().hex[:8]}."
    topics = Topics(prefix=prefix)
    hour = Settings(kafka_bootstrap=kafka_bootstrap, turns_retention=3600)
    try:
        create_topics(hour, topics)
        names = [topics.turns, topics.segments, topics.entries, topics.dlq]
        before = _configs(hour, names)
        assert {n: before[n]["retention.ms"] for n in names[:3]} == dict.fromkeys(
            names[:3], "3600000")
        assert before[topics.dlq]["retention.ms"] == "-1"
        # changed on the existing topics by the CLI, nothing else of them
        env = {"LIGHTMEM_KAFKA_BOOTSTRAP": kafka_bootstrap, "LIGHTMEM_TURNS_RETENTION": "7200"}
        result = CliRunner().invoke(cli_app, ["topics", "create", "--topic-prefix", prefix],
                                    env=env)
        assert result.exit_code == 0, result.output
        assert result.output.count("altered") == 3, result.output
        after = _configs(hour, names)
        assert {n: after[n]["retention.ms"] for n in names[:3]} == dict.fromkeys(
            names[:3], "7200000")
        assert after[topics.turns]["max.message.bytes"] == \
            before[topics.turns]["max.message.bytes"]
        assert after[topics.dlq] == before[topics.dlq]
        # again: nothing to change
        again = create_topics(Settings(kafka_bootstrap=kafka_bootstrap, turns_retention=7200),
                              topics)
        assert again.altered == {}
        # the erasure report names the day the last raw turn of the scope ages out
        from lightmem.streams.erasure.forget import _retention, new_request

        when = new_request("acme", "alice").requested_at
        text = _retention(hour, topics.turns, when)
        assert "ages out by" in text and "retention.ms=7200000" in text
    finally:
        remove_deployment(hour, topic_prefixes=[prefix])
