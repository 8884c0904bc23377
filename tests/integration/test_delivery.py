"""Delivery guarantees of the ingest worker on the real Kafka and Elasticsearch.

A rolling deploy must never lose or duplicate a turn: turns are produced at a steady rate
over 4 partitions while the worker is stopped three times (by ``kill -9`` or by SIGTERM, one
stop within seconds of the worker being ready again) and restarted; a second worker joins
and leaves a group mid-stream. Every produced turn must end up in exactly one memory, in
order. Also: every producer codec, and two deployments that try to share one ingest group.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

import pytest

pytest.importorskip("confluent_kafka", reason="confluent-kafka (the stream extra) is missing")

from lightmem.schemas import TurnEvent  # noqa: E402
from lightmem.streams.kafka.producer import send_flush  # noqa: E402
from lightmem.streams.kafka.topics import Topics, create_topics, kafka_config  # noqa: E402

from . import test_streaming  # noqa: E402
from .procs import Worker  # noqa: E402
from .test_streaming import (  # noqa: E402
    StreamEnv,
    assert_order,
    bad_event,
    make_conversation,
    turn_counts,
    wait_count,
    wait_for,
)

#: One isolated deployment per test (the fixture of the streaming tests).
stream_env = test_streaming.stream_env

pytestmark = pytest.mark.integration

#: Turns per second offered while workers stop and start.
RATE = 6.0


def interleaved(convs: list[list[TurnEvent]]) -> list[TurnEvent]:
    """Round-robin over the conversations: every partition gets traffic all the time."""
    out: list[TurnEvent] = []
    for i in range(max(len(c) for c in convs)):
        out.extend(c[i] for c in convs if i < len(c))
    return out


class SteadyProducer(threading.Thread):
    """Produces turns at ``rate`` per second (idempotent producer, delivery awaited)."""

    def __init__(self, senv: StreamEnv, turns: list[TurnEvent], rate: float,
                 codec: str = "none") -> None:
        super().__init__(daemon=True, name="steady-producer")
        self.senv, self.turns, self.rate, self.codec = senv, turns, rate, codec
        self.sent = 0
        self.errors: list[str] = []

    def run(self) -> None:
        from confluent_kafka import Producer

        producer = Producer(kafka_config(self.senv.settings, **{
            "enable.idempotence": True, "acks": "all", "compression.type": self.codec,
            "linger.ms": 5, "partitioner": "murmur2_random"}))

        def done(err: Any, msg: Any) -> None:
            if err is not None:
                self.errors.append(str(err))

        start = time.monotonic()
        for i, turn in enumerate(self.turns):
            delay = start + i / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing the offered load, not synchronisation
            producer.produce(self.senv.topics.turns, turn.to_bytes(),
                             key=turn.conversation_key.encode(), on_delivery=done)
            producer.poll(0)
            self.sent += 1
        assert producer.flush(60) == 0


def ready_count(w: Worker) -> int:
    return w.text().count("worker ready")


def wait_ready(w: Worker) -> None:
    wait_for(lambda: ready_count(w) >= 1, what=f"{w.name} ready", workers=[w], interval=0.2)


def check_every_turn_once(senv: StreamEnv, turns: Iterable[TurnEvent],
                          convs: list[list[TurnEvent]], workers: list[Worker]) -> None:
    turns = list(turns)
    assert send_flush(senv.settings, topics=senv.topics) == 4
    wait_count(senv, len(turns), workers, "every turn indexed")
    counts = turn_counts(senv.entries())
    missing = sorted({t.turn_id for t in turns} - set(counts))
    dupes = {t: n for t, n in counts.items() if n != 1}
    assert not missing, f"{len(missing)} turns lost: {missing[:20]}"
    assert not dupes, f"turns in more than one memory: {dupes}"
    assert_order(senv, {c[0].conversation_key: [t.turn_id for t in c] for c in convs})
    assert senv.dead_letters() == []


@pytest.mark.parametrize("how", ["kill9", "sigterm"])
def test_three_restarts_mid_stream_lose_and_duplicate_nothing(stream_env: StreamEnv,
                                                              how: str) -> None:
    """Stopped 3 times while turns arrive (once within seconds of being ready again), then
    restarted: every turn in exactly one memory, per-conversation order kept."""
    senv = stream_env
    convs = [make_conversation("acme" if i % 2 else "globex", f"u{i}", f"rs-{how}-c{i}", 36,
                               seed=i, session_every=18) for i in range(16)]
    turns = interleaved(convs)
    w = senv.start_worker("w0")
    wait_ready(w)
    producer = SteadyProducer(senv, turns, RATE)
    producer.start()
    # (seconds after the worker was ready, then stop it)
    schedule = [6.0, 2.0, 6.0]
    for n, after in enumerate(schedule, start=1):
        time.sleep(after)  # the point in the stream where the worker is stopped
        if how == "kill9":
            w.kill9()
        else:
            assert w.stop() == 0, w.tail()
        assert producer.is_alive() or n == len(schedule), "the stream ended too early"
        w = senv.start_worker(f"w{n}")
        wait_ready(w)
    producer.join(120)
    assert not producer.errors and producer.sent == len(turns)
    check_every_turn_once(senv, turns, convs, [w])


def test_a_second_worker_joining_and_leaving_mid_stream_loses_nothing(stream_env: StreamEnv
                                                                      ) -> None:
    """Two workers in one group; one stopped and restarted mid-stream (two rebalances)."""
    senv = stream_env
    convs = [make_conversation("acme", f"u{i}", f"rb-c{i}", 36, seed=i, session_every=18)
             for i in range(10)]
    turns = interleaved(convs)
    w1 = senv.start_worker("w1")
    w2 = senv.start_worker("w2")
    wait_ready(w1)
    wait_ready(w2)
    producer = SteadyProducer(senv, turns, RATE)
    producer.start()
    time.sleep(6.0)  # mid-stream
    assert w2.stop() == 0, w2.tail()
    time.sleep(6.0)  # w1 alone
    w3 = senv.start_worker("w3")
    wait_ready(w3)
    producer.join(120)
    assert not producer.errors and producer.sent == len(turns)
    check_every_turn_once(senv, turns, convs, [w1, w3])
    # Both rebalances happened: w1 was assigned three times (start, w2 gone, w3 came).
    assert w1.text().count("assigned ") >= 3, w1.tail()


def test_every_producer_codec_is_read(stream_env: StreamEnv) -> None:
    """Turns produced with gzip, snappy, lz4 and zstd, malformed ones among them: every valid
    turn in exactly one memory, every malformed one in the DLQ with its reason (before, one
    lz4 record crash-looped the whole worker)."""
    from confluent_kafka import Producer

    senv = stream_env
    convs = []
    w = senv.start_worker("w1")
    bad_markers = []
    for i, codec in enumerate(("gzip", "snappy", "lz4", "zstd")):
        conv = make_conversation("acme", f"u{i}", f"codec-{codec}", 10, seed=i)
        convs.append(conv)
        producer = Producer(kafka_config(senv.settings, **{"compression.type": codec,
                                                            "linger.ms": 50,
                                                            "partitioner": "murmur2_random"}))
        for n, turn in enumerate(conv):
            producer.produce(senv.topics.turns, turn.to_bytes(),
                             key=turn.conversation_key.encode())
            if n in (3, 7):  # malformed records inside the same compressed batches
                key, value, kind = bad_event(len(bad_markers) * 3 + (n == 7), turn)
                bad_markers.append((f"BAD-{len(bad_markers) * 3 + (n == 7):04d}", kind))
                producer.produce(senv.topics.turns, value, key=key)
        assert producer.flush(30) == 0
    turns = [t for c in convs for t in c]
    assert send_flush(senv.settings, topics=senv.topics) == 4
    wait_count(senv, len(turns), [w], "every valid turn indexed")
    counts = turn_counts(senv.entries())
    assert set(counts) == {t.turn_id for t in turns} and set(counts.values()) == {1}
    letters = wait_for(lambda: (lambda ls: ls if len(ls) >= len(bad_markers) else None)(
        senv.dead_letters()), what="the dead letters", workers=[w])
    assert len(letters) == len(bad_markers)
    assert all(r.letter is not None and r.letter.reason for r in letters)


def test_a_second_deployment_cannot_share_the_ingest_group(stream_env: StreamEnv) -> None:
    """Same ingest group, another topic prefix: the second worker refuses to start, naming the
    conflict (before, it shared the first one's group and buffers and indexed nothing)."""
    senv = stream_env
    conv = make_conversation("acme", "u1", "share-c1", 6)
    w = senv.start_worker("w1")
    producer = SteadyProducer(senv, conv, 100.0)
    producer.run()
    check_every_turn_once(senv, conv, [conv], [w])
    assert w.stop() == 0
    other = Topics(prefix=f"{senv.topics.prefix}other.")
    create_topics(senv.settings, other)
    # The same ingest group (LIGHTMEM_INGEST_GROUP of the env), another prefix.
    result = subprocess.run(
        [sys.executable, "-m", "lightmem", "worker", "--topic-prefix", other.prefix],
        env=senv.env, cwd=senv.tmp, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "already consumes" in result.stderr and senv.topics.turns in result.stderr


def test_a_quiet_stream_is_flushed_by_the_wall_clock(stream_env: StreamEnv) -> None:
    """The last turns of a stream that goes quiet become memories without `lightmem flush`
    and without newer traffic: idle by wall clock since their last turn arrived."""
    from datetime import UTC, datetime, timedelta

    senv = stream_env
    senv.env["LIGHTMEM_IDLE_TIMEOUT_S"] = "4"
    now = datetime.now(UTC).replace(microsecond=0)
    conv = make_conversation("acme", "u1", "quiet-c1", 6, start=now - timedelta(minutes=6))
    w = senv.start_worker("w1")
    wait_ready(w)
    SteadyProducer(senv, conv, 100.0).run()
    # No flush command, no later turn: only the timer can close the buffers.
    wait_count(senv, len(conv), [w], "the quiet conversation's memories")
    assert "idle flush requested" in w.text()
