"""A worker's /metrics after a small run on the real Kafka and Elasticsearch: the counters
equal what happened (records on each topic, dead letters, memories in the index, LLM calls
and tokens the OpenAI stub served), the lag gauges reach zero, the JSON logs parse and
carry no secret, and ``lightmem stats --stream`` reports the same per tenant.

The deployment (topic prefix, ingest group, alias, worker subprocess) is the one of
``test_streaming.py``; the LLM is :class:`~lightmem.ops.bench.llm_stub.OpenAIStubServer` with the
rule-based fact extractor, so the short-term stage makes real HTTP calls.
"""

from __future__ import annotations

import json
import socket
from collections import defaultdict
from typing import Any

import pytest
from typer.testing import CliRunner

pytest.importorskip("confluent_kafka", reason="confluent-kafka (the stream extra) is missing")

import httpx  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from lightmem.ops.bench.llm_stub import (  # noqa: E402
    OpenAIStubServer,
    count_words,
    fact_extraction_responder,
)
from lightmem.ops.cli import app as cli_app  # noqa: E402
from lightmem.streams.kafka.flush_commands import FlushCommand  # noqa: E402
from lightmem.streams.kafka.producer import RecordProducer  # noqa: E402

from . import test_streaming  # noqa: E402
from .test_streaming import StreamEnv, bad_event, make_conversation, wait_for  # noqa: E402

#: One isolated deployment per test (topic prefix, ingest group, alias), as test_streaming's.
stream_env = test_streaming.stream_env

pytestmark = pytest.mark.integration

#: Must never show up in a log line (the stub ignores keys).
SECRET_KEY = "sk-metrics-test-5f1c0ffee0ddba11"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(url: str) -> Samples:
    """Every sample of the endpoint: name -> [(labels, value)]."""
    out: Samples = defaultdict(list)
    body = httpx.get(url, timeout=10).text
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[s.name].append((s.labels, s.value))
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == x
                                                            for k, x in labels.items()))


def topic_ends(senv: StreamEnv, topic: str) -> int:
    """Committed records ever written to ``topic`` (a fresh topic). Not the high watermarks:
    the workers write in transactions, whose commit markers take offsets too."""
    from lightmem.streams.kafka.topic_reader import read_to_end

    return sum(1 for _ in read_to_end(senv.settings, topic, purpose="test-ends"))


def test_metrics_match_what_the_worker_did(stream_env: StreamEnv) -> None:
    senv = stream_env
    convs = [make_conversation("acme", "u1", "met-c1", 20, seed=1),
             make_conversation("globex", "u2", "met-c2", 20, seed=2)]
    good = [t for c in convs for t in c]
    with RecordProducer(senv.settings, senv.topics) as producer:
        for i, turn in enumerate(good):
            if i in (8, 19, 30):  # 3 malformed events (not JSON, oversized, naive time)
                key, raw, _ = bad_event(i, turn)
                producer.produce(senv.topics.turns, raw, key=key)
            producer.produce(senv.topics.turns, turn.to_bytes(),
                             key=turn.conversation_key.encode())
        flushes = producer.send_flush(FlushCommand())
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    with OpenAIStubServer(fact_extraction_responder) as llm:
        senv.env.update({"LIGHTMEM_LLM_BASE_URL": llm.base_url,
                         "LIGHTMEM_LLM_API_KEY": SECRET_KEY})
        w = senv.start_worker("w1", "--metrics-port", str(port), "--log-format", "json")
        topics = senv.topics
        stage_topics = [topics.turns, topics.segments, topics.entries]
        n_turns = len(good) + 3 + flushes

        def settled() -> Samples | None:
            """Every turn consumed, everything downstream indexed and committed (the lag
            gauges of all 12 partitions at 0), on two consecutive scrapes."""
            try:
                m = scrape(url)
            except httpx.HTTPError:
                return None  # not serving yet (models loading)
            lags = [(lab["topic"], v) for lab, v in m.get("lightmem_consumer_lag", [])]
            done = (total(m, "lightmem_events_in_total", stage="sensory") == n_turns
                    and len(lags) == 12 and {t for t, _ in lags} == set(stage_topics)
                    and all(v == 0 for _, v in lags)
                    and total(m, "lightmem_events_in_total", stage="index")
                    == topic_ends(senv, topics.entries) > 0)
            if not done:
                return None
            again = scrape(url)
            keys = ("lightmem_events_in_total", "lightmem_events_out_total")
            return again if all(again[k] == m[k] for k in keys) else None

        m = wait_for(settled, what="the run to settle in /metrics", workers=[w], interval=1.0)
        requests = llm.chat_requests

    entries = senv.entries()
    segments_end = topic_ends(senv, topics.segments)
    entries_end = topic_ends(senv, topics.entries)
    dlq_end = topic_ends(senv, topics.dlq)

    # events in = records on each stage's input topic
    assert total(m, "lightmem_events_in_total", stage="sensory", topic=topics.turns) == n_turns
    assert total(m, "lightmem_events_in_total", stage="short-term",
                 topic=topics.segments) == segments_end > 0
    assert total(m, "lightmem_events_in_total", stage="index",
                 topic=topics.entries) == entries_end
    # events out = records each stage produced
    assert total(m, "lightmem_events_out_total", stage="sensory",
                 topic=topics.segments) == segments_end
    assert total(m, "lightmem_events_out_total", stage="short-term",
                 topic=topics.entries) == entries_end
    assert total(m, "lightmem_events_out_total", stage="index",
                 topic=topics.memory_changes) == len(entries)
    assert total(m, "lightmem_events_out_total", topic=topics.dlq) == dlq_end == 3
    # the 3 malformed events, and nothing else, were dead-lettered
    assert total(m, "lightmem_dead_letters_total") == 3
    assert total(m, "lightmem_dead_letters_total", stage="sensory", reason="parse") == 3
    assert total(m, "lightmem_events_applied_total", stage="sensory") == len(good)
    assert total(m, "lightmem_events_applied_total", stage="index") == len(entries)
    assert total(m, "lightmem_events_skipped_total") == 0  # nothing redelivered
    assert total(m, "lightmem_stage_errors_total") == 0
    # Elasticsearch: every memory in the index went through a timed bulk call
    written = total(m, "lightmem_es_docs_total", outcome="written", kind="memories")
    assert written == len(entries) > 0
    assert total(m, "lightmem_es_docs_total", outcome="failed") == 0
    assert total(m, "lightmem_es_bulk_seconds_count") >= 1
    assert total(m, "lightmem_batch_seconds_count", stage="index") >= 1
    # LLM: the calls and tokens the stub served, per tenant
    assert requests
    prompt = sum(count_words(msg["content"]) for r in requests for msg in r["messages"])
    completion = sum(count_words(fact_extraction_responder(r)) for r in requests)
    assert total(m, "lightmem_llm_calls_total") == len(requests)
    assert {lab["tenant"] for lab, v in m["lightmem_llm_calls_total"] if v} == {"acme", "globex"}
    assert total(m, "lightmem_llm_tokens_total", kind="prompt") == prompt
    assert total(m, "lightmem_llm_tokens_total", kind="completion") == completion
    assert total(m, "lightmem_llm_latency_seconds_count") == len(requests)
    assert total(m, "lightmem_llm_errors_total") == 0
    print("\n[scrape] " + "\n[scrape] ".join(
        f"{name}{lab} {v:g}" for name in ("lightmem_events_in_total",
                                          "lightmem_events_out_total",
                                          "lightmem_dead_letters_total",
                                          "lightmem_llm_calls_total", "lightmem_es_docs_total")
        for lab, v in m[name]))

    # `lightmem stats --stream`: the same numbers, per tenant
    per_tenant: dict[str, int] = defaultdict(int)
    for e in entries:
        per_tenant[e.tenant] += 1
    env = {k: senv.env[k] for k in ("LIGHTMEM_KAFKA_BOOTSTRAP", "LIGHTMEM_ES_URL",
                                    "LIGHTMEM_ES_ALIAS", "LIGHTMEM_INGEST_GROUP")}
    result = CliRunner().invoke(cli_app, ["stats", "--stream", "--topic-prefix", topics.prefix,
                                          "--metrics-url", url], env=env)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    tenants = {t["tenant"]: t for t in report["tenants"]}
    assert {t: tenants[t]["memories"] for t in tenants} == dict(per_tenant)
    assert sum(t["llm_calls"] for t in tenants.values()) == len(requests)
    assert sum(t["prompt_tokens"] for t in tenants.values()) == prompt
    assert report["lag_by_stage"] == {"sensory": 0, "short-term": 0, "index": 0}
    assert len(report["lag"]) == 12 and all(t["lag_total"] == 0 for t in tenants.values())

    # JSON logs: every line of the worker's log is one object; the key is never in them
    w.stop()
    text = w.log.read_text(errors="replace")
    assert SECRET_KEY not in text
    records = _json_lines(text)
    assert any("metrics at" in r["message"] for r in records)
    assert {"ts", "level", "logger", "message"} <= set(records[0])


def _json_lines(text: str) -> list[dict[str, Any]]:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    bad = [ln for ln in lines if not ln.startswith("{")]
    assert not bad, f"{len(bad)} non-JSON log lines, e.g. {bad[:5]}"
    return [json.loads(ln) for ln in lines]
