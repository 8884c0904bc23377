"""Erasure (issue 14): the pure ledger, the stage steps and slot sweep (no servers), and the
embedded store end to end through ``lightmem forget``."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lightmem.ops.cli import app
from lightmem.processors.erasure import ErasureLedger, to_ms
from lightmem.schemas import ChangeOp, ErasureRequest, SchemaError, TurnEvent, scope_key
from lightmem.settings import load_settings

T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
ERASED_AT = datetime(2025, 1, 1, tzinfo=UTC)


def _request(tenant: str, user: str | None, at: datetime = ERASED_AT) -> ErasureRequest:
    return ErasureRequest(erasure_id=f"e-{tenant}-{user}", tenant=tenant, user=user,
                          requested_at=at)


# -- the ledger ---------------------------------------------------------------------------------


def test_ledger_drops_only_the_scope_and_only_before_the_erasure() -> None:
    ledger = ErasureLedger([_request("acme", "alice")])
    before, after = to_ms(ERASED_AT) - 1, to_ms(ERASED_AT) + 1
    assert ledger.drops("acme", "alice", before)
    assert ledger.drops("acme", "alice", to_ms(ERASED_AT))  # at the instant: erased
    assert ledger.drops("acme", "alice", None)  # unknown time counts as before
    assert not ledger.drops("acme", "alice", after)  # a new beginning
    assert not ledger.drops("acme", "bob", before)
    assert not ledger.drops("globex", "alice", before)
    assert not ErasureLedger().drops("acme", "alice", before)


def test_tenant_erasure_covers_every_user_and_the_later_time_wins() -> None:
    ledger = ErasureLedger([_request("acme", None)])
    assert ledger.drops("acme", "anyone", to_ms(ERASED_AT))
    assert not ledger.drops("globex", "anyone", to_ms(ERASED_AT))
    later = ERASED_AT + timedelta(days=1)
    assert ledger.apply(_request("acme", "bob", later))
    assert not ledger.apply(_request("acme", "bob", ERASED_AT))  # older: no change
    assert ledger.erased_at("acme", "bob") == to_ms(later)
    assert ledger.erased_at("acme", "carol") == to_ms(ERASED_AT)
    assert len(ledger) == 2


def test_request_keys_and_schema() -> None:
    assert _request("acme", "a/b").key == scope_key("acme", "a/b")
    assert _request("acme", None).key == '["acme"]'
    with pytest.raises(SchemaError):
        ErasureRequest.parse({"erasure_id": "x", "tenant": " ", "requested_at":
                              "2025-01-01T00:00:00Z"})
    assert ChangeOp("erase") is ChangeOp.erase


# -- embedded, end to end -----------------------------------------------------------------------


def _turns(tenant: str, user: str, conversation: str, n: int, *, start: datetime = T0
           ) -> list[TurnEvent]:
    texts = ["My dog Pepper loves the beach near {u}'s house",
             "I baked sourdough bread for {u}'s birthday",
             "Our flight to Lisbon leaves on Friday, says {u}",
             "The quarterly report for {u} is due next week"]
    return [TurnEvent(tenant=tenant, user=user, conversation=conversation, session="s0",
                      turn_id=f"{conversation}-{i}", role="user" if i % 2 == 0 else "assistant",
                      speaker=user if i % 2 == 0 else "assistant",
                      text=texts[i % len(texts)].format(u=user), event_time=start +
                      timedelta(minutes=i)) for i in range(n)]


def _write(path: Path, turns: list[TurnEvent], extra: list[bytes] = ()) -> Path:
    path.write_bytes(b"".join(t.to_bytes() + b"\n" for t in turns) + b"".join(
        line + b"\n" for line in extra))
    return path


def _snapshot(db, tenant: str, user: str) -> dict:  # noqa: ANN001
    rows = db.execute("SELECT id, body FROM entries WHERE tenant=? AND user=? ORDER BY id",
                      (tenant, user)).fetchall()
    changes = db.execute(
        "SELECT change_id, body FROM changes WHERE json_extract(body, '$.tenant')=? AND "
        "json_extract(body, '$.user')=? ORDER BY seq", (tenant, user)).fetchall()
    return {"entries": rows, "changes": changes}


@pytest.mark.models
def test_forget_leaves_no_byte_of_the_text_in_the_database_files(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {"LIGHTMEM_COMPRESSOR": "none", "HF_HUB_OFFLINE": "1"}
    runner = CliRunner()
    alice = [t.model_copy(update={"text": f"{t.text} zanzibarquux{i}"})
             for i, t in enumerate(_turns("acme", "alice", "c-alice", 8))]
    path = _write(tmp_path / "t.jsonl", alice + _turns("acme", "bob", "c-bob", 8))
    result = runner.invoke(app, ["ingest", str(path), "--data-dir", str(data)], env=env)
    assert result.exit_code == 0, result.output

    def files_mention() -> list[str]:
        return [p.name for p in data.rglob("*") if p.is_file()
                and b"zanzibarquux" in p.read_bytes()]

    assert files_mention()  # memories, buffers, history, the FTS index hold it
    result = runner.invoke(app, ["forget", "--tenant", "acme", "--user", "alice",
                                 "--data-dir", str(data)], env=env)
    assert result.exit_code == 0, result.output
    assert files_mention() == []  # not in free pages, FTS segments or the write-ahead log
    result = runner.invoke(app, ["search", "--tenant", "acme", "--user", "bob", "--data-dir",
                                 str(data), "dog"], env=env)
    assert result.exit_code == 0 and "Pepper" in result.output


@pytest.mark.models
def test_forget_one_user_embedded(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {"LIGHTMEM_COMPRESSOR": "none", "HF_HUB_OFFLINE": "1"}
    runner = CliRunner()
    bad_alice = json.dumps({"tenant": "acme", "user": "alice", "conversation": "c-alice",
                            "text": "secret of alice without the other fields"}).encode()
    done = _write(tmp_path / "done.jsonl",
                  _turns("acme", "alice", "c-alice", 12) + _turns("acme", "bob", "c-bob", 12)
                  + _turns("globex", "alice", "g-alice", 12), [bad_alice])
    result = runner.invoke(app, ["ingest", str(done), "--data-dir", str(data)], env=env)
    assert result.exit_code == 1, result.output  # the bad line is rejected
    # Open buffers: turns not flushed yet, one conversation shared by alice and bob.
    shared = [t.model_copy(update={"conversation": "c-shared", "turn_id": f"sh-{i}"})
              for i, t in enumerate(_turns("acme", "alice", "x", 3, start=T0 + timedelta(
                  days=1)) + _turns("acme", "bob", "x", 3, start=T0 + timedelta(days=1)))]
    shared.sort(key=lambda t: t.event_time)
    open_file = _write(tmp_path / "open.jsonl",
                       _turns("acme", "alice", "c-alice-2", 3, start=T0 + timedelta(days=1))
                       + shared + _turns("globex", "alice", "g-alice-2", 3,
                                         start=T0 + timedelta(days=1)))
    result = runner.invoke(app, ["ingest", str(open_file), "--no-flush", "--data-dir",
                                 str(data)], env=env)
    assert result.exit_code == 0, result.output

    from lightmem.streams.embedded.runtime import EmbeddedRuntime

    rt = EmbeddedRuntime(load_settings(data_dir=data, compressor="none"))
    db = rt.store._db
    assert rt.search("acme", "alice", "dog Pepper", k=3)
    before_bob = _snapshot(db, "acme", "bob")
    before_globex = _snapshot(db, "globex", "alice")
    assert before_bob["entries"] and before_globex["entries"]
    alice_ids = [e.id for e in rt.store.iter_entries("acme", "alice")]
    assert alice_ids and rt.store.history(alice_ids[0])
    buffers_before = dict(((k, key), body) for k, key, body in
                          db.execute("SELECT kind, key, body FROM buffers"))
    assert any("alice" in b and "acme" in b for b in buffers_before.values())
    rt.store.close()

    result = runner.invoke(app, ["forget", "--tenant", "acme", "--user", "alice", "--reason",
                                 "ticket 42", "--json", "--data-dir", str(data)], env=env)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["confirmed"] and report["found"]
    sinks = {s["sink"]: s for s in report["sinks"]}
    assert sinks["memories"]["removed"]["memories"] == len(alice_ids)
    assert sinks["dead letters"]["found"] >= 2  # the database row and the file line

    rt = EmbeddedRuntime(load_settings(data_dir=data, compressor="none"))
    db = rt.store._db
    # nothing of acme/alice through any read path
    assert rt.search("acme", "alice", "dog Pepper", k=10) == []
    assert list(rt.store.iter_entries("acme", "alice")) == []
    assert all(rt.store.history(i) == [] for i in alice_ids)
    assert ("acme", "alice") not in rt.stats().entries
    for (kind, key), body in ((k, b) for k, b in (((k, key), body) for k, key, body in
                                                  db.execute("SELECT kind, key, body FROM "
                                                             "buffers"))):
        state = json.loads(body)
        if state["tenant"] == "acme":
            turns = state.get("turns") or [t for s in state.get("segments", [])
                                           for t in s["turns"]]
            assert all(t.get("user") != "alice" for t in turns), (kind, key)
            assert "alice" not in body
    assert not [d for d in rt.store.dead_letters() if "secret of alice" in d.raw]
    assert "secret of alice" not in (data / "dead-letters.jsonl").read_text()
    result = runner.invoke(app, ["history", alice_ids[0], "--data-dir", str(data)], env=env)
    assert result.exit_code == 1
    # the others byte-for-byte untouched; bob keeps his half of the shared conversation
    assert _snapshot(db, "acme", "bob") == before_bob
    assert _snapshot(db, "globex", "alice") == before_globex
    assert rt.search("globex", "alice", "dog Pepper", k=3)
    shared_body = db.execute("SELECT body FROM buffers WHERE kind='sensory' AND key=?",
                             ('["acme","c-shared"]',)).fetchone()[0]
    assert "bob" in shared_body and '"alice"' not in shared_body
    assert db.execute("SELECT body FROM buffers WHERE key=?",
                      ('["acme","c-alice-2"]',)).fetchone() is None
    assert db.execute("SELECT body FROM buffers WHERE key=?",
                      ('["globex","g-alice-2"]',)).fetchone() is not None
    # the content-free audit record
    erase = [json.loads(b) for (b,) in db.execute("SELECT body FROM changes")
             if json.loads(b)["op"] == "erase"]
    assert len(erase) == 1 and erase[0]["tenant"] == "acme" and erase[0]["user"] == "alice"
    assert erase[0]["before"] is None and erase[0]["after"] is None
    assert erase[0]["counts"]["memories"] == len(alice_ids)
    rt.store.close()

    # --status: nothing from before the erasure is left; no erasure of bob is recorded
    result = runner.invoke(app, ["forget", "--status", "--tenant", "acme", "--user", "alice",
                                 "--json", "--data-dir", str(data)], env=env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["confirmed"] is True
    result = runner.invoke(app, ["forget", "--status", "--tenant", "acme", "--user", "bob",
                                 "--data-dir", str(data)], env=env)
    assert result.exit_code == 1 and "no erasure" in result.output

    # unknown scope: nothing to do, exit 0; malformed names: exit 2
    result = runner.invoke(app, ["forget", "--tenant", "acme", "--user", "nobody",
                                 "--data-dir", str(data)], env=env)
    assert result.exit_code == 0 and "nothing" in result.output
    for args in (["--tenant", "  "], ["--tenant", "acme", "--user", ""]):
        result = runner.invoke(app, ["forget", *args, "--data-dir", str(data)], env=env)
        assert result.exit_code == 2, result.output

    # keep them erased: ingesting the same turns again does not bring alice back (their
    # event times are before the erasure); a turn written after it is a new beginning
    fresh = _turns("acme", "alice", "c-alice-3", 2, start=datetime.now(UTC))
    again = _write(tmp_path / "again.jsonl", _turns("acme", "alice", "c-alice", 12) + fresh)
    result = runner.invoke(app, ["ingest", str(again), "--data-dir", str(data)], env=env)
    assert result.exit_code == 0, result.output
    rt = EmbeddedRuntime(load_settings(data_dir=data, compressor="none"))
    assert {t for e in rt.store.iter_entries("acme", "alice") for t in e.source_turn_ids} \
        == {t.turn_id for t in fresh}
    before_bob = _snapshot(rt.store._db, "acme", "bob")  # the flush closed his buffers
    rt.store.close()

    # the whole tenant globex
    result = runner.invoke(app, ["forget", "--tenant", "globex", "--data-dir", str(data)],
                           env=env)
    assert result.exit_code == 0, result.output
    rt = EmbeddedRuntime(load_settings(data_dir=data, compressor="none"))
    assert rt.search("globex", "alice", "dog Pepper", k=3) == []
    assert _snapshot(rt.store._db, "acme", "bob") == before_bob
    rt.store.close()


def test_a_bulk_delete_of_a_document_already_gone_is_not_a_failure() -> None:
    from lightmem.streams.erasure.es_sink import failed_deletes

    gone = {"delete": {"_index": "m", "_id": "event:1", "result": "not_found", "status": 404}}
    refused = {"delete": {"_index": "m", "_id": "event:2", "status": 429,
                          "error": {"type": "es_rejected_execution_exception"}}}
    assert failed_deletes([gone, gone]) == []
    assert failed_deletes([gone, refused]) == [refused]
