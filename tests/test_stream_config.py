"""Kafka client configuration: security settings pass through, secrets never show."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from lightmem.settings import Settings
from lightmem.streams.kafka.flush_commands import FlushCommand, control_kind, flush_headers
from lightmem.streams.kafka.topics import (
    Topics,
    kafka_config,
    redacted,
    topic_specs,
)

SECRET = "s3cr3t-pa55"


def sasl_settings(protocol: str = "SASL_SSL") -> Settings:
    return Settings(kafka_bootstrap="k1:9093,k2:9093", kafka_security_protocol=protocol,
                    kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username="svc",
                    kafka_sasl_password=SecretStr(SECRET))


def test_sasl_ssl_passes_through_to_confluent_kafka_and_is_redacted() -> None:
    conf = kafka_config(sasl_settings(), group_id="g")
    assert conf["security.protocol"] == "SASL_SSL"
    assert conf["sasl.mechanism"] == "SCRAM-SHA-512" and conf["sasl.username"] == "svc"
    assert conf["sasl.password"] == SECRET and conf["group.id"] == "g"
    assert SECRET not in repr(redacted(conf)) and redacted(conf)["sasl.password"] == "***"


def test_unknown_protocol_is_named_without_secrets() -> None:
    with pytest.raises(ValueError, match="'KERBEROS'") as info:
        kafka_config(sasl_settings("KERBEROS"))
    assert SECRET not in str(info.value)


def test_topic_specs_and_prefixes() -> None:
    topics = Topics(prefix="p.")
    specs = {s.name: s for s in topic_specs(Settings(kafka_partitions=6), topics)}
    assert specs["p.lightmem.turns.v1"].partitions == 6
    assert specs["p.lightmem.sleep-control.v1"].configs["cleanup.policy"] == "compact"
    replay = topics.for_replay("r1")
    assert replay.turns == topics.turns and replay.segments == "p.replay.r1.lightmem.segments.v1"


def test_flush_command_round_trip() -> None:
    command = FlushCommand(tenant="acme", conversation="c1")
    assert command.key == b'["acme","c1"]'  # conversation_key: unambiguous with "/" in names
    back = FlushCommand.from_bytes(command.to_bytes())
    assert back.matches("acme", "c1") and not back.matches("acme", "c2")
    assert FlushCommand.from_bytes(b"garbage").matches("any", "thing")
    assert control_kind(flush_headers()) == "flush" and control_kind(None) is None
    assert control_kind({"lightmem-control": b"flush"}) == "flush"
