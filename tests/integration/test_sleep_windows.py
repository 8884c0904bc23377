"""Sleep windows end to end: tenant-limited, automatic and scheduled, on the real Kafka and
Elasticsearch.

Same harness as :mod:`tests.integration.test_sleep`: the sleep worker runs as a
``python -m lightmem sleep-worker`` subprocess, the LLM is the HTTP stub answering with
:func:`~lightmem.ops.bench.sleep.consolidation_responder` ("moved" deletes the target, "also"
updates it, anything else is ignored), and the index and entries topic are seeded with
synthetic pairs whose final index is known exactly. Windows are opened the way an operator
does: the ``lightmem sleep`` CLI, the worker's LIGHTMEM_SLEEP_AUTO settings, a cron schedule.
Positive effects are polled against a deadline; the only fixed wait is the hold that checks
a closed window stays closed while turn traffic goes on.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("confluent_kafka", reason="confluent-kafka (the stream extra) is missing")
pytest.importorskip("elasticsearch", reason="elasticsearch (the stream extra) is missing")

from lightmem.ops.bench.sleep import (  # noqa: E402
    Pair,
    synthetic_pairs,
)
from lightmem.schemas import TurnEvent  # noqa: E402
from lightmem.streams.kafka.producer import RecordProducer  # noqa: E402

from .test_sleep import (  # noqa: E402
    SleepEnv,
    _assert_changes_match,
    _consolidation_calls,
    _free_port,
    _scrape,
    sleep_deployment,
    wait_for,
)

pytestmark = pytest.mark.integration

_TARGET = re.compile(r"TARGET memory:\n\[[^\]]*\] (.*)")


@pytest.fixture
def senv(kafka_bootstrap: str, es_url: str, es_client: Any, tmp_path: Path
         ) -> Iterator[SleepEnv]:
    with sleep_deployment("lmwin", kafka_bootstrap, es_url, es_client, tmp_path) as env:
        yield env


# -- helpers -------------------------------------------------------------------------------


def _tenant_pairs(tenant: str, scopes: int, *, first_scope: int, seed: int,
                  outcomes: tuple[str, ...] = ("update", "delete", "ignore")) -> list[Pair]:
    """``synthetic_pairs`` of ``tenant``, scopes numbered from ``first_scope`` (scope i is
    seeded to partition i % PARTITIONS), every fact starting with the tenant's name so that
    a prompt tells whose memory it is about."""
    def label(e: Any) -> Any:
        fact = f"{tenant} {e.fact}"
        return e.model_copy(update={"fact": fact, "original_text": fact,
                                    "compressed_text": fact})

    return [dataclasses.replace(p, scope_index=p.scope_index + first_scope,
                                target=label(p.target), newer=label(p.newer))
            for p in synthetic_pairs(scopes, 3, tenant=tenant, seed=seed, outcomes=outcomes)]


def _asked(senv: SleepEnv) -> Counter[str]:
    """Target fact -> consolidation calls that asked about it."""
    out: Counter[str] = Counter()
    for r in senv.stub.chat_requests:
        m = _TARGET.search(str(r["messages"][-1]["content"]))
        if m:
            out[m.group(1).strip()] += 1
    return out


def _seeded(pairs: list[Pair]) -> dict[str, tuple[str, int] | None]:
    """``{id: (fact, version)}`` of the pairs as seeded (nothing consolidated)."""
    return {e.id: (e.fact, 1) for p in pairs for e in (p.target, p.newer)}


def _subset(state: dict[str, Any], pairs: list[Pair]) -> dict[str, Any]:
    ids = {e.id for p in pairs for e in (p.target, p.newer)}
    return {i: v for i, v in state.items() if i in ids}


def _status_lines(senv: SleepEnv) -> list[str]:
    """``lightmem sleep status`` as the worker's settings see it: its stdout lines."""
    return [ln.strip() for ln in senv.sleep_cli("status").stdout.splitlines() if ln.strip()]


class _Metrics:
    def __init__(self, port: int) -> None:
        self.port = port

    def value(self, name: str, **labels: str) -> float | None:
        return _scrape(self.port).get((name, frozenset(labels.items())))

    def window(self, tenant: str = "*") -> float | None:
        return self.value("lightmem_sleep_window_open", tenant=tenant)


class _TurnTraffic:
    """A thread producing chat turns to the deployment's turns topic at ~``rate``/s until
    stopped (what an ingest burst looks like to the automatic window)."""

    def __init__(self, senv: SleepEnv, rate: float = 200.0) -> None:
        self.senv = senv
        self.rate = rate
        self.sent = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="turn-traffic")

    def _run(self) -> None:
        step = 0.05
        try:
            with RecordProducer(self.senv.settings, self.senv.topics) as producer:
                while not self._stop.is_set():
                    now = datetime.now(UTC)
                    turns = [TurnEvent(tenant="acme", user=f"u{i % 8}", conversation=f"c{i % 8}",
                                       session="s1", turn_id=f"t{self.sent + i}", role="user",
                                       speaker=f"u{i % 8}", text="hello there", event_time=now)
                             for i in range(max(1, int(self.rate * step)))]
                    self.sent += producer.add_turns(turns)
                    producer.flush()
                    self._stop.wait(step)
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def start(self) -> _TurnTraffic:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
        assert self.error is None, f"turn traffic failed: {self.error!r}"


# -- tests ---------------------------------------------------------------------------------


def test_tenant_limited_window_then_all_tenants(senv: SleepEnv) -> None:
    """``sleep open --tenant acme``: acme's targets are consolidated, globex's memories are
    untouched, never shown to the LLM, and its entries are not committed by the sleep group
    (the commit stops at the first globex entry of a partition, acme's entries before it
    are committed); ``sleep status`` and the per-tenant gauge report the limited window.
    Then ``sleep open`` (all tenants): the held globex entries are read again, every target
    has had exactly one call and the index is the expected one."""
    # Partition layout (scope i -> partition i % 4), 6 records per scope, acme first:
    #   p0: acme scope 0 | p1: acme 1, globex 1 | p2: acme 2, globex 2 | p3: globex 3
    acme = _tenant_pairs("acme", 3, first_scope=0, seed=11)
    globex = _tenant_pairs("globex", 3, first_scope=1, seed=12)
    pairs = acme + globex
    want = senv.expect(pairs)
    senv.seed(acme)
    senv.seed(globex)
    assert senv.ends() == {0: 6, 1: 12, 2: 12, 3: 6}
    port = _free_port()
    m = _Metrics(port)
    w = senv.start_worker("w1", LIGHTMEM_METRICS_PORT=str(port))
    wait_for(lambda: "sleep worker ready" in w.text(), what="the worker", workers=[w])
    assert m.window() == 0

    senv.sleep_cli("open", "--tenant", "acme")
    wait_for(lambda: m.window("acme") == 1, what="acme's window gauge", workers=[w])
    assert m.window() == 0  # every other tenant: closed
    wait_for(lambda: _subset(senv.state(), acme) == _subset(want, acme),
             what="acme's consolidated memories", workers=[w])
    # Every entry has been through a batch: acme's are committed, the commit stops at the
    # first globex entry of each partition (p3 holds only globex: nothing committed past 0).
    wait_for(lambda: senv.committed() == {0: 6, 1: 6, 2: 6, 3: 0},
             what="acme's entries committed, globex's held", workers=[w])
    assert _subset(senv.state(), globex) == _seeded(globex)
    asked = _asked(senv)
    assert asked == Counter({p.target.fact: 1 for p in acme})
    assert not [r for r in senv.stub.chat_requests if "globex" in str(r["messages"])]
    _assert_changes_match(senv, acme)
    assert "window closed -> open for acme" in w.text()
    lines = _status_lines(senv)
    assert lines[0] == "window: open for acme", lines
    assert any(ln.startswith("manual acme: opened ") and ln.endswith(" by ops")
               for ln in lines), lines

    senv.sleep_cli("open")
    wait_for(lambda: senv.state() == want, what="the consolidated index", workers=[w])
    wait_for(lambda: senv.committed() == senv.ends(), what="offsets committed", workers=[w])
    _assert_changes_match(senv, pairs)
    # One call per target over both windows: acme's were not asked again, globex's once.
    assert _asked(senv) == Counter({p.target.fact: 1 for p in pairs})
    assert _consolidation_calls(senv) == len(pairs)
    assert m.window() == 1 and m.window("acme") == 1
    assert "window open for acme -> open" in w.text()
    lines = _status_lines(senv)
    assert lines[0] == "window: open", lines
    # An all-tenant open resets the tenant-limited command.
    assert not any(ln.startswith("manual acme:") for ln in lines), lines
    assert any(ln.startswith("manual all tenants: opened ") for ln in lines), lines


def test_auto_window_opens_when_quiet_and_closes_on_traffic(senv: SleepEnv) -> None:
    """LIGHTMEM_SLEEP_AUTO: the worker starts closed and opens by itself once the turns topic
    has been quiet for LIGHTMEM_SLEEP_AUTO_QUIET_S; a burst of turns above
    LIGHTMEM_SLEEP_AUTO_MAX_RATE closes it mid-work (gauge back to 0, no call after the
    targets in flight, those applied, the rest left uncommitted), and it stays closed while
    the traffic goes on. When the traffic stops the window reopens and the rest of the work
    is done: the expected index, one call per target."""
    # Slow LLM: 12 targets, 2 at a time, take at least 12 s, far longer than the traffic
    # needs to close the window after the first call.
    senv.stub.latency_s = 2.0
    concurrency = 2
    # Only update/delete: each finished target changes the index (so "applied" is visible),
    # and a replayed entry of a finished target asks nothing (reflected, or gone).
    pairs = synthetic_pairs(4, 3, seed=21, outcomes=("update", "delete"))
    want = senv.expect(pairs)
    senv.seed(pairs)
    port = _free_port()
    m = _Metrics(port)
    w = senv.start_worker("w1", LIGHTMEM_METRICS_PORT=str(port),
                          LIGHTMEM_SLEEP_CONCURRENCY=str(concurrency),
                          LIGHTMEM_SLEEP_AUTO="1", LIGHTMEM_SLEEP_AUTO_MAX_RATE="5",
                          LIGHTMEM_SLEEP_AUTO_QUIET_S="4", LIGHTMEM_SLEEP_AUTO_SAMPLE_S="0.5")

    def changed() -> int:
        state = senv.state()
        return sum(1 for p in pairs if state[p.target.id] != (p.target.fact, 1))

    wait_for(lambda: m.window() == 1, what="the automatic window", workers=[w])
    # It started closed (no rate known yet) and opened by itself: no command was sent.
    log = w.text()
    started = re.search(r"sleep: window closed$", log, re.MULTILINE)
    assert started is not None, log
    assert started.start() < log.index("window closed -> open")
    wait_for(lambda: _consolidation_calls(senv) >= 1, what="the first consolidation call",
             workers=[w])

    traffic = _TurnTraffic(senv).start()
    try:
        wait_for(lambda: m.window() == 0, what="the window closed by the traffic",
                 workers=[w])
        close_at = w.text().index("window open -> closed")
        # The batch running at the close finishes its targets in flight, commits what is
        # complete and reports; nothing new starts.
        wait_for(lambda: "batch of" in w.text()[close_at:],
                 what="the batch interrupted by the close wound up", workers=[w])
        calls = _consolidation_calls(senv)
        assert 0 < calls < len(pairs), "the work was over before the traffic closed the window"
        assert changed() == calls  # every target asked was applied
        hold_until = time.monotonic() + 6.0  # ~12 traffic samples, ~20 worker polls
        while time.monotonic() < hold_until:
            assert m.window() == 0
            assert _consolidation_calls(senv) == calls
            time.sleep(0.3)
        assert changed() == calls
        # Exactly the targets asked are consolidated; the others are as seeded.
        asked = _asked(senv)
        state = senv.state()
        for p in pairs:
            expect = want[p.target.id] if asked[p.target.fact] else (p.target.fact, 1)
            assert state[p.target.id] == expect, p
        assert sum(senv.committed().values()) < sum(senv.ends().values())
    finally:
        traffic.stop()
    assert traffic.sent > 0

    wait_for(lambda: m.window() == 1, what="the window reopened after the traffic",
             workers=[w])
    wait_for(lambda: senv.state() == want, what="the consolidated index", workers=[w])
    wait_for(lambda: senv.committed() == senv.ends(), what="offsets committed", workers=[w])
    _assert_changes_match(senv, pairs)
    assert _asked(senv) == Counter({p.target.fact: 1 for p in pairs})
    assert w.text().count("window closed -> open") == 2


def test_schedule_command_opens_and_clears_a_window(senv: SleepEnv) -> None:
    """``sleep schedule CRON --for``: a schedule that does not fire now leaves the window
    closed (nothing consumed); one that fires this minute opens it and the work is done;
    ``--clear`` closes it again. ``sleep status`` shows each schedule."""
    pairs = synthetic_pairs(2, 3, seed=31)
    want = senv.expect(pairs)
    senv.seed(pairs)
    before = senv.state()
    port = _free_port()
    m = _Metrics(port)
    w = senv.start_worker("w1", LIGHTMEM_METRICS_PORT=str(port))
    wait_for(lambda: "sleep worker ready" in w.text(), what="the worker", workers=[w])
    assert m.window() == 0

    # Half an hour away: not firing now (each window lasts a minute).
    far = f"{(datetime.now(UTC).minute + 30) % 60} * * * *"
    senv.sleep_cli("schedule", far, "--for", "1m")
    # A bad record behind it: its dead letter shows the worker has read past the schedule.
    with RecordProducer(senv.settings, senv.topics) as producer:
        producer.produce(senv.topics.sleep_control, b"not json", key=b"window/*")
    wait_for(lambda: m.value("lightmem_dead_letters_total", stage="sleep", reason="control")
             == 1, what="the worker past the schedule", workers=[w])
    assert m.window() == 0
    lines = _status_lines(senv)
    assert lines[0] == "window: closed", lines
    assert f"schedule all tenants: '{far}' for 60s" in lines
    assert _consolidation_calls(senv) == 0
    assert senv.committed() == {}
    assert senv.state() == before

    now = datetime.now(UTC)
    firing = f"{now.minute} {now.hour} * * *"  # fired this minute, for ten minutes
    senv.sleep_cli("schedule", firing, "--for", "10m")
    wait_for(lambda: m.window() == 1, what="the scheduled window", workers=[w])
    wait_for(lambda: senv.state() == want, what="the consolidated index", workers=[w])
    wait_for(lambda: senv.committed() == senv.ends(), what="offsets committed", workers=[w])
    _assert_changes_match(senv, pairs)
    assert _asked(senv) == Counter({p.target.fact: 1 for p in pairs})
    lines = _status_lines(senv)
    assert lines[0] == "window: open", lines
    assert f"schedule all tenants: '{firing}' for 600s" in lines
    assert not any(f"'{far}'" in ln for ln in lines), lines  # replaced: one per key

    senv.sleep_cli("schedule", "--clear")
    wait_for(lambda: m.window() == 0, what="the window closed by the clear", workers=[w])
    lines = _status_lines(senv)
    assert lines[0] == "window: closed", lines
    assert not any(ln.startswith("schedule") for ln in lines), lines


def test_configured_cron_opens_at_start_and_close_ends_it(senv: SleepEnv) -> None:
    """LIGHTMEM_SLEEP_CRON / LIGHTMEM_SLEEP_CRON_DURATION_S: a worker started inside a
    scheduled window consumes without any command; ``sleep close`` ends the scheduled window
    in progress (the next occurrence is a day away), and ``sleep status`` shows the
    configured schedule."""
    pairs = synthetic_pairs(2, 3, seed=41)
    want = senv.expect(pairs)
    senv.seed(pairs)
    now = datetime.now(UTC)
    cron = f"{now.minute} {now.hour} * * *"  # fired this minute, for ten minutes
    senv.env.update(LIGHTMEM_SLEEP_CRON=cron, LIGHTMEM_SLEEP_CRON_DURATION_S="600")
    port = _free_port()
    m = _Metrics(port)
    w = senv.start_worker("w1", LIGHTMEM_METRICS_PORT=str(port))
    wait_for(lambda: senv.state() == want, what="the consolidated index", workers=[w])
    wait_for(lambda: senv.committed() == senv.ends(), what="offsets committed", workers=[w])
    _assert_changes_match(senv, pairs)
    assert _asked(senv) == Counter({p.target.fact: 1 for p in pairs})
    # Open from the start, without any command.
    assert re.search(r"sleep: window open$", w.text(), re.MULTILINE), w.text()
    assert m.window() == 1
    lines = _status_lines(senv)
    assert lines[0] == "window: open", lines
    assert f"schedule (config): '{cron}' for 600s" in lines

    senv.sleep_cli("close")
    wait_for(lambda: m.window() == 0, what="the closed window gauge", workers=[w])
    assert "window open -> closed" in w.text()
    lines = _status_lines(senv)
    assert lines[0] == "window: closed", lines
    assert f"schedule (config): '{cron}' for 600s" in lines
