"""Erasure and the sleep-time workers on the real Kafka and Elasticsearch (issue 14): a sleep
window opened after an erasure makes no LLM call about the erased scope, and consolidates
the other scopes as usual."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("confluent_kafka", reason="confluent-kafka (the stream extra) is missing")

from lightmem.ops.bench.sleep import synthetic_pairs  # noqa: E402
from lightmem.streams.erasure.forget import forget_stream, new_request  # noqa: E402
from lightmem.streams.kafka.producer import TurnProducer  # noqa: E402

from . import test_sleep  # noqa: E402
from .test_sleep import SleepEnv, wait_for  # noqa: E402

sleep_env = test_sleep.sleep_env

pytestmark = pytest.mark.integration


def _calls_about(senv: SleepEnv, needle: str) -> list[Any]:
    return [r for r in senv.stub.chat_requests if needle in str(r["messages"])]


def test_a_sleep_window_after_an_erasure_never_asks_about_the_scope(sleep_env: SleepEnv
                                                                    ) -> None:
    senv = sleep_env
    pairs = synthetic_pairs(3, 3)  # user000, user001, user002
    want = senv.expect(pairs)
    senv.seed(pairs)
    erased_ids = {e.id for p in pairs if p.target.user == "user000"
                  for e in (p.target, p.newer)}
    before = senv.state()
    # Only the ledger record (the index still holds user000's memories): the sleep worker
    # itself must leave them alone.
    request = new_request("acme", "user000")
    with TurnProducer(senv.settings, senv.topics) as producer:
        producer.produce(senv.topics.erasures, request.to_bytes(), key=request.key.encode())
    want.update({i: before[i] for i in erased_ids})
    w = senv.start_worker("w1")
    senv.sleep_cli("open", "--for", "30m")
    wait_for(lambda: senv.state() == want, what="the other scopes consolidated", workers=[w])
    wait_for(lambda: senv.committed() == senv.ends(), what="offsets committed", workers=[w])
    assert senv.stub.chat_requests and not _calls_about(senv, "user000")
    assert not [c for c in senv.changes() if c.user == "user000"]
    # Then the full erasure removes the memories (no ingest worker here: its buffers are
    # reported pending, Elasticsearch confirms).
    report = forget_stream(senv.settings, new_request("acme", "user000"), topics=senv.topics,
                           store=senv.store, wait_s=2.0)
    assert report.sink("elasticsearch").confirmed and report.sink("elasticsearch").found == 6
    senv.store.refresh()
    assert not list(senv.store.iter_entries("acme", "user000"))
    assert list(senv.store.iter_entries("acme", "user001"))
    w.stop()
