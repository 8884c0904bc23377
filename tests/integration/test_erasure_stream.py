"""Erasure on the real Kafka and Elasticsearch (issue 14).

Two users in one tenant and the same user name in another tenant; acme/alice also has an
open sensory buffer, a dead letter and turns produced while the worker was down. ``forget``
runs while the worker is stopped; the restarted worker drops alice's pending turns, deletes
her buffer slots, and ``forget`` confirms every sink. Nothing of her from before comes back:
not in Elasticsearch, not in history, not in the DLQ listing, not after a replay of the
turns topic from the beginning into a new index. Turns produced after the erasure are a new
beginning and appear. The other scopes are untouched.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import timedelta
from typing import Any

import pytest
from typer.testing import CliRunner

pytest.importorskip("confluent_kafka", reason="confluent-kafka (the stream extra) is missing")

from lightmem.ops.cli import app as cli_app  # noqa: E402
from lightmem.schemas import ChangeOp, conversation_key  # noqa: E402
from lightmem.streams.erasure.forget import (  # noqa: E402
    ErasureReport,
    forget_stream,
    new_request,
    read_ledger,
)
from lightmem.streams.erasure.sweeps import changelog_slots  # noqa: E402
from lightmem.streams.ingest import changelog_topic  # noqa: E402
from lightmem.streams.kafka.changes import read_changes  # noqa: E402
from lightmem.streams.kafka.dlq import read_dead_letters  # noqa: E402
from lightmem.streams.kafka.producer import RecordProducer, add_turns, send_flush  # noqa: E402

from . import test_streaming  # noqa: E402
from .test_streaming import (  # noqa: E402
    T0,
    WAIT_S,
    StreamEnv,
    make_conversation,
    turn_counts,
    wait_for,
)

stream_env = test_streaming.stream_env

pytestmark = pytest.mark.integration


def ids(turns: list[Any]) -> set[str]:
    return {t.turn_id for t in turns}


def indexed(senv: StreamEnv, index: str | None = None) -> set[str]:
    return set(turn_counts(senv.entries(index)))


def scope_turns(senv: StreamEnv, tenant: str, user: str, index: str | None = None
                ) -> set[str]:
    return {t for e in senv.entries(index) if (e.tenant, e.user) == (tenant, user)
            for t in e.source_turn_ids}


def test_forget_a_user_on_the_stream(stream_env: StreamEnv) -> None:
    senv = stream_env
    alice = make_conversation("acme", "alice", "c-alice", 18, seed=1)
    bob = make_conversation("acme", "bob", "c-bob", 18, seed=2)
    galice = make_conversation("globex", "alice", "g-alice", 18, seed=1)
    assert add_turns(alice + bob + galice, senv.settings, topics=senv.topics) == 54
    # a bad turn of alice: dead-lettered by the sensory stage, with her text in it
    bad = alice[0].model_dump(mode="json", exclude={"text"})
    bad["turn_id"] = "c-alice-bad"
    import json

    with RecordProducer(senv.settings, senv.topics) as producer:
        producer.produce(senv.topics.turns, json.dumps(bad).encode(),
                         key=alice[0].conversation_key.encode())
    w1 = senv.start_worker("w1")
    send_flush(senv.settings, topics=senv.topics)
    wait_for(lambda: indexed(senv) >= ids(alice + bob + galice), what="every turn indexed",
             workers=[w1])
    wait_for(lambda: any(r.letter and "c-alice-bad" in r.letter.raw
                         for r in read_dead_letters(senv.settings, senv.topics)),
             what="alice's dead letter", workers=[w1])
    # an open buffer of alice (no flush)
    day = T0 + timedelta(days=1)
    open_turns = make_conversation("acme", "alice", "c-alice-open", 3, start=day, seed=3)
    add_turns(open_turns, senv.settings, topics=senv.topics)
    sensory_log = changelog_topic(senv.topics, senv.settings.ingest_group, "sensory")
    open_key = conversation_key("acme", "c-alice-open").encode()
    wait_for(lambda: open_key in changelog_slots(senv.settings, sensory_log),
             what="alice's open buffer slot", workers=[w1])
    before = {e.id: e for e in senv.entries() if e.user != "alice" or e.tenant != "acme"}
    assert w1.stop() == 0

    # produced BEFORE the erasure, still unprocessed in the topic
    late = make_conversation("acme", "alice", "c-alice-late", 4, start=day + timedelta(
        minutes=5), seed=4)
    bob_late = make_conversation("acme", "bob", "c-bob-late", 4, start=day + timedelta(
        minutes=5), seed=5)
    add_turns(late + bob_late, senv.settings, topics=senv.topics)

    # forget while the worker is down; it confirms once the restarted worker passed it
    reports: list[ErasureReport] = []
    thread = threading.Thread(target=lambda: reports.append(forget_stream(
        senv.settings, new_request("acme", "alice", reason="test"), topics=senv.topics,
        wait_s=WAIT_S)))
    thread.start()
    wait_for(lambda: read_ledger(senv.settings, senv.topics), what="the erasure recorded")
    w2 = senv.start_worker("w2")
    thread.join(WAIT_S + 120)
    assert reports, "forget did not return"
    [report] = reports
    assert report.confirmed, report.as_json()
    assert report.sink("elasticsearch").found >= 1
    assert report.sink("buffers").found >= 1
    assert report.sink("dlq").found >= 1
    assert report.sink("memory-changes").found >= 1
    assert open_key not in changelog_slots(senv.settings, sensory_log)

    send_flush(senv.settings, topics=senv.topics)
    wait_for(lambda: indexed(senv) >= ids(bob_late), what="bob's late turns", workers=[w2])
    # nothing of acme/alice from before the erasure; the others untouched
    assert scope_turns(senv, "acme", "alice") == set()
    kept = {e.id: e for e in senv.entries() if e.user != "alice" or e.tenant != "acme"}
    assert {i: e for i, e in kept.items() if i in before} == before
    assert scope_turns(senv, "globex", "alice") == ids(galice)
    # after the erasure: a new beginning
    after = make_conversation("acme", "alice", "c-alice-new", 6, start=T0 + timedelta(days=2),
                              seed=6)
    add_turns(after, senv.settings, topics=senv.topics)
    send_flush(senv.settings, topics=senv.topics)
    wait_for(lambda: scope_turns(senv, "acme", "alice") == ids(after),
             what="alice's turns after the erasure", workers=[w2])

    # --status: nothing of her from before the erasure is left anywhere
    status = CliRunner().invoke(cli_app, ["forget", "--status", "--stream", "--tenant", "acme",
                                          "--user", "alice", "--topic-prefix",
                                          senv.topics.prefix], env=senv.env)
    assert status.exit_code == 0, status.output

    # history and the DLQ show nothing of her from before
    erased_ids = ids(alice + open_turns + late) | {"c-alice-bad"}
    for rec in read_changes(senv.settings, senv.topics):
        c = rec.change
        if (c.tenant, c.user) == ("acme", "alice"):
            assert c.op is ChangeOp.erase or set(c.after.source_turn_ids) <= ids(after)
    erase = [r.change for r in read_changes(senv.settings, senv.topics)
             if r.change.op is ChangeOp.erase]
    assert [(c.tenant, c.user) for c in erase] == [("acme", "alice")]
    assert erase[0].before is None and erase[0].after is None and erase[0].counts
    listed = read_dead_letters(senv.settings, senv.topics)
    assert not [r for r in listed if r.letter and "c-alice-bad" in r.letter.raw]
    assert [r for r in read_dead_letters(senv.settings, senv.topics, skip_erased=False)
            if r.letter and "c-alice-bad" in r.letter.raw]
    result = CliRunner().invoke(cli_app, ["dlq", "list", "--json", "--topic-prefix",
                                          senv.topics.prefix], env=senv.env)
    assert result.exit_code == 0 and "c-alice-bad" not in result.stdout

    # a replay of the turns topic from the beginning does not bring her back
    new_index = f"{senv.alias}-v2"
    replay = subprocess.run(
        [sys.executable, "-m", "lightmem", "replay", "--from", "earliest", "--index",
         new_index, "--topic-prefix", senv.topics.prefix, "--run", "r1", "--timeout", "400"],
        env=senv.env, cwd=senv.tmp, capture_output=True, text=True, timeout=500)
    assert replay.returncode == 0, replay.stderr[-4000:]
    assert scope_turns(senv, "acme", "alice", new_index) == ids(after)
    assert not erased_ids & indexed(senv, new_index)
    assert scope_turns(senv, "acme", "bob", new_index) == ids(bob + bob_late)
    assert scope_turns(senv, "globex", "alice", new_index) == ids(galice)
    # the replay dropped her bad turn instead of dead-lettering its text again
    assert not [r for r in read_dead_letters(senv.settings, senv.topics.for_replay("r1"),
                                             skip_erased=False)
                if r.letter and "c-alice-bad" in r.letter.raw]
    # promoted: every read through the alias sees the replayed index, still without her
    promoted = CliRunner().invoke(cli_app, ["index", "promote", new_index], env=senv.env)
    assert promoted.exit_code == 0, promoted.output
    assert list(senv.es.indices.get_alias(name=senv.alias)) == [new_index]
    assert scope_turns(senv, "acme", "alice") == ids(after)
    listed = CliRunner().invoke(cli_app, ["memories", "list", "--stream", "--tenant", "acme",
                                          "--user", "alice", "--json", "--topic-prefix",
                                          senv.topics.prefix], env=senv.env)
    assert listed.exit_code == 0, listed.output
    assert {t for line in listed.stdout.splitlines() if line.strip()
            for t in json.loads(line)["source_turn_ids"]} == ids(after)

    # the CLI: an unknown scope has nothing to do; malformed names are refused
    runner = CliRunner()
    unknown = runner.invoke(cli_app, ["forget", "--stream", "--tenant", "acme", "--user",
                                      "nobody", "--topic-prefix", senv.topics.prefix],
                            env=senv.env)
    assert unknown.exit_code == 0, unknown.output
    assert "nothing" in unknown.output
    bad_name = runner.invoke(cli_app, ["forget", "--stream", "--tenant", " ", "--topic-prefix",
                                       senv.topics.prefix], env=senv.env)
    assert bad_name.exit_code == 2, bad_name.output
    # once everything is erased, a second request for her confirms at once
    again = runner.invoke(cli_app, ["forget", "--stream", "--tenant", "acme", "--user",
                                    "alice", "--topic-prefix", senv.topics.prefix, "--json"],
                          env=senv.env)
    assert again.exit_code == 0, again.output
    w2.stop()
