"""Erasing a user while the worker ingests that user's turns, with a kill -9 in the middle
(issue 14), on the real Kafka and Elasticsearch.

Turns of alice and bob are produced at a steady rate; ``forget`` runs mid-stream and the
worker is killed (-9) right after the erasure is recorded, then restarted. Afterwards
Elasticsearch holds exactly alice's turns produced after the erasure (by their Kafka
timestamps) and every one of bob's: nothing of alice produced before it survived the
in-flight batches, the aborted transaction or the restart.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

pytest.importorskip("confluent_kafka", reason="confluent-kafka (the stream extra) is missing")

from lightmem.processors.erasure import to_ms  # noqa: E402
from lightmem.schemas import TurnEvent  # noqa: E402
from lightmem.streams.erasure.forget import (  # noqa: E402
    ErasureReport,
    forget_stream,
    new_request,
    read_ledger,
)
from lightmem.streams.kafka.producer import send_flush  # noqa: E402
from lightmem.streams.kafka.topics import kafka_config  # noqa: E402

from . import test_streaming  # noqa: E402
from .test_streaming import (  # noqa: E402
    WAIT_S,
    StreamEnv,
    make_conversation,
    turn_counts,
    wait_for,
)

stream_env = test_streaming.stream_env

pytestmark = pytest.mark.integration

#: Turns per second offered.
RATE = 8.0


class TimedProducer(threading.Thread):
    """Produces turns at ``RATE`` per second and records each one's Kafka timestamp."""

    def __init__(self, senv: StreamEnv, turns: list[TurnEvent]) -> None:
        super().__init__(daemon=True)
        from confluent_kafka import Producer

        self.turns = turns
        self.topic = senv.topics.turns
        self.stamps: dict[str, int] = {}
        self.errors: list[str] = []
        self.producer = Producer(kafka_config(senv.settings, **{
            "enable.idempotence": True, "partitioner": "murmur2_random", "linger.ms": 5}))

    def run(self) -> None:
        for i, turn in enumerate(self.turns):
            def report(err: Any, msg: Any, turn_id: str = turn.turn_id) -> None:
                if err is not None:
                    self.errors.append(str(err))
                else:
                    self.stamps[turn_id] = msg.timestamp()[1]
            self.producer.produce(self.topic, turn.to_bytes(),
                                  key=turn.conversation_key.encode(), on_delivery=report)
            self.producer.poll(0)
            time.sleep(1.0 / RATE)  # the offered rate, not a synchronisation
            if i % 20 == 0:
                self.producer.flush(30)
        self.producer.flush(60)


def interleaved(*convs: list[TurnEvent]) -> list[TurnEvent]:
    out: list[TurnEvent] = []
    for i in range(max(len(c) for c in convs)):
        out.extend(c[i] for c in convs if i < len(c))
    return out


def test_erase_while_ingesting_with_a_kill9(stream_env: StreamEnv) -> None:
    senv = stream_env
    alice = make_conversation("acme", "alice", "c-alice", 80, seed=1)
    bob = make_conversation("acme", "bob", "c-bob", 80, seed=2)
    w1 = senv.start_worker("w1", "--instance", "a")
    wait_for(lambda: "worker ready" in w1.text(), what="the worker", workers=[w1])
    producer = TimedProducer(senv, interleaved(alice, bob))
    producer.start()
    wait_for(lambda: any(e.user == "alice" for e in senv.entries()),
             what="alice's first memories", workers=[w1])

    request = new_request("acme", "alice", reason="test")
    reports: list[ErasureReport] = []
    thread = threading.Thread(target=lambda: reports.append(forget_stream(
        senv.settings, request, topics=senv.topics, wait_s=WAIT_S)))
    thread.start()
    wait_for(lambda: read_ledger(senv.settings, senv.topics), what="the erasure recorded")
    w1.kill9()
    w2 = senv.start_worker("w2", "--instance", "a")
    thread.join(WAIT_S + 120)
    assert reports and reports[0].confirmed, reports and reports[0].as_json()

    producer.join(120)
    assert not producer.errors
    send_flush(senv.settings, topics=senv.topics)
    erased_at = to_ms(request.requested_at)
    after = {t for t, ms in producer.stamps.items() if t.startswith("c-alice") and
             ms > erased_at}
    before = {t.turn_id for t in alice} - after
    assert before and after, "the erasure should fall in the middle of the stream"

    def done() -> bool:
        counts = turn_counts(senv.entries())
        return {t.turn_id for t in bob} | after <= set(counts)
    wait_for(done, what="bob's turns and alice's after the erasure", workers=[w2])
    entries = senv.entries()
    counts = turn_counts(entries)
    assert not before & set(counts), sorted(before & set(counts))
    assert {t for e in entries if e.user == "alice" for t in e.source_turn_ids} == after
    assert all(counts[t.turn_id] == 1 for t in bob)
    w2.stop()
