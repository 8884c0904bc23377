"""Issue 11, defect 2 (scope keys) and the `lightmem ingest` dead letters of defect 8.

- The key encoding (lightmem.schemas.keys): tuples that "/"-joining merged stay apart, keys
  decode back to their names, non-canonical spellings are refused.
- The embedded runtime (`lightmem ingest`, real MiniLM): "/" in tenant, user and
  conversation names merges neither buffers nor search scopes; two users of one
  conversation each find only their own turns.
- `lightmem ingest` reports its dead letters, and a re-run does not append them again.
- A database written with "tenant/name" keys is re-keyed when opened.
"""

from __future__ import annotations

import json
import struct
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from lightmem.ops.cli import app
from lightmem.schemas import (
    DeadLetter,
    EntryMode,
    KeyFormatError,
    MemoryEntry,
    conversation_key,
    decode_conversation_key,
    decode_key,
    decode_scope_key,
    encode_key,
    scope_key,
)
from lightmem.settings import load_settings
from lightmem.streams.embedded.runtime import EmbeddedRuntime
from lightmem.streams.embedded.store import EmbeddedStore

T0 = datetime(2024, 3, 1, 10, 0, tzinfo=UTC)

# -- the encoding -----------------------------------------------------------------------------


@pytest.mark.parametrize("left, right", [
    (("a", "b/c"), ("a/b", "c")),
    (("a", 'b","c'), ("a\",\"b", "c")),
    (("a\\", "b"), ("a", "\\b")),
    (("a", ""), ("", "a")),
])
def test_tuples_that_slash_joining_merged_get_different_keys(
    left: tuple[str, str], right: tuple[str, str]
) -> None:
    assert encode_key(*left) != encode_key(*right)
    assert decode_key(encode_key(*left), 2) == left
    assert decode_key(encode_key(*right).encode(), 2) == right


def test_keys_are_compact_json_arrays_in_utf8() -> None:
    assert conversation_key("acme", "c/1") == '["acme","c/1"]'
    assert scope_key("zoë", "u1").encode() == '["zoë","u1"]'.encode()
    assert decode_conversation_key(b'["a/b","c"]') == ("a/b", "c")
    assert decode_scope_key('["t","u"]') == ("t", "u")


@pytest.mark.parametrize("key", [
    b"acme/c1",                 # the old spelling
    b'["acme", "c1"]',          # not compact: another key, another partition
    b'["zo\\u00eb","c1"]',      # ASCII-escaped
    b'["acme"]',                # wrong arity
    b'["acme",1]',
    b"\xff",
])
def test_non_canonical_keys_are_refused(key: bytes) -> None:
    with pytest.raises(KeyFormatError):
        decode_conversation_key(key)


# -- the embedded runtime: `lightmem ingest` then search -----------------------------------------


def _turn(i: int, *, tenant: str, user: str, conversation: str, text: str,
          role: str = "user") -> dict[str, Any]:
    return {"tenant": tenant, "user": user, "conversation": conversation, "session": "s1",
            "turn_id": f"t{i:02d}", "role": role, "speaker": user if role == "user" else role,
            "text": text, "event_time": (T0 + timedelta(minutes=i)).isoformat()}


def _write(path: Path, rows: list[dict[str, Any] | str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _ingest(path: Path, data: Path, *extra: str) -> tuple[int, str]:
    """Exit code and output (whitespace normalised: the console wraps long lines)."""
    result = CliRunner().invoke(app, ["ingest", str(path), "--data-dir", str(data), *extra],
                                env={"LIGHTMEM_COMPRESSOR": "none"})
    return result.exit_code, " ".join(result.output.split())


def _texts(rt: EmbeddedRuntime, tenant: str, user: str, query: str) -> list[str]:
    return [h.entry.original_text for h in rt.search(tenant, user, query, k=10)]


@pytest.mark.models
def test_slash_in_names_merges_neither_buffers_nor_scopes(tmp_path: Path) -> None:
    # Joined with "/", tenant a + conversation b/c and tenant a/b + conversation c shared one
    # buffer, and scope (a, b/u) and (a/b, u) one vector partition "a/b/u".
    a = dict(tenant="a", user="b/u", conversation="b/c")
    ab = dict(tenant="a/b", user="u", conversation="c")
    rows = [
        _turn(0, **a, text="The launch code of the rocket project is 4711."),
        _turn(1, **ab, text="I planted red tulips along the garden fence yesterday."),
        _turn(2, **a, text="Our rocket launches from the northern pad in May."),
        _turn(3, **ab, text="The tulips need watering every second morning."),
    ]
    path = _write(tmp_path / "turns.jsonl", rows)
    code, output = _ingest(path, tmp_path / "d")
    assert code == 0, output
    rt = EmbeddedRuntime(load_settings(data_dir=tmp_path / "d", compressor="none"))
    entries = list(rt.store.iter_entries())
    assert sorted((e.tenant, e.user, e.conversation, e.source_turn_ids[0]) for e in entries) == [
        ("a", "b/u", "b/c", "t00"), ("a", "b/u", "b/c", "t02"),
        ("a/b", "u", "c", "t01"), ("a/b", "u", "c", "t03")]
    assert all("tulips" not in t for t in _texts(rt, "a", "b/u", "tulips garden"))
    assert all("rocket" not in t for t in _texts(rt, "a/b", "u", "rocket launch code"))
    assert any("4711" in t for t in _texts(rt, "a", "b/u", "rocket launch code"))
    assert any("tulips" in t for t in _texts(rt, "a/b", "u", "tulips garden"))


@pytest.mark.models
def test_two_users_of_one_conversation_each_find_only_their_own_turns(tmp_path: Path) -> None:
    both = dict(tenant="acme", conversation="family-chat")
    rows = [
        _turn(0, **both, user="u1", text="My cat is called Biscuit and she is nine."),
        _turn(1, **both, user="u1", role="assistant", text="Biscuit is a lovely name."),
        _turn(2, **both, user="u2", text="I am training for the Berlin marathon in autumn."),
        _turn(3, **both, user="u2", role="assistant", text="Good luck with the marathon."),
        _turn(4, **both, user="u1", text="Biscuit sleeps on the radiator all day."),
    ]
    path = _write(tmp_path / "turns.jsonl", rows)
    code, output = _ingest(path, tmp_path / "d")
    assert code == 0, output
    rt = EmbeddedRuntime(load_settings(data_dir=tmp_path / "d", compressor="none"))
    users = {r["turn_id"]: r["user"] for r in rows}
    entries = list(rt.store.iter_entries())
    assert len(entries) == len(rows) and all(e.mode is EntryMode.extractive for e in entries)
    assert all(e.user == users[e.source_turn_ids[0]] for e in entries)
    assert all("marathon" not in t for t in _texts(rt, "acme", "u1", "marathon training"))
    assert all("Biscuit" not in t for t in _texts(rt, "acme", "u2", "cat name"))
    assert any("marathon" in t for t in _texts(rt, "acme", "u2", "marathon training"))


# -- `lightmem ingest` dead letters (defect 8) ---------------------------------------------------


@pytest.mark.models
def test_ingest_reports_its_dead_letters_and_a_rerun_does_not_append_them_again(
    tmp_path: Path
) -> None:
    good = dict(tenant="acme", user="u1", conversation="c1")
    rows: list[dict[str, Any] | str] = [
        _turn(0, **good, text="I bought a green bicycle last weekend."),
        "{not json",
        {**_turn(1, **good, text="x"), "role": "robot"},
        _turn(2, **good, text="The bicycle has a basket for groceries."),
        '{"tenant": "acme"}',
    ]
    path = _write(tmp_path / "turns.jsonl", rows)
    data, dlq = tmp_path / "d", tmp_path / "dlq.jsonl"
    code, first = _ingest(path, data, "--dead-letters", str(dlq))
    assert code == 1
    assert "rejected 3" in first and "dead letters 3" in first, first
    code, again = _ingest(path, data, "--dead-letters", str(dlq))
    assert code == 1 and "dead letters 3" in again and "3 already there" in again, again
    letters = [DeadLetter.parse(line) for line in dlq.read_text().splitlines()]
    assert sorted(d.offset for d in letters) == [2, 3, 5]  # once each, after two runs
    stats = CliRunner().invoke(app, ["stats", "--data-dir", str(data)])
    assert "dead letters 3" in " ".join(stats.output.split()), stats.output
    # The same bad line at another position is another dead letter.
    moved = _write(tmp_path / "turns.jsonl", ["", *rows])
    _ingest(moved, data, "--dead-letters", str(dlq))
    assert len(dlq.read_text().splitlines()) == 6


# -- databases written with "tenant/name" keys --------------------------------------------------


def test_a_database_with_slash_joined_keys_is_rekeyed_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "lightmem.db"
    store = EmbeddedStore(path, dim=4)
    entry = MemoryEntry(
        id="e1", tenant="a", user="b/u", conversation="b/c", topic_id="s", speaker="x",
        fact="fact", event_time=T0, ingest_time=T0, source_turn_ids=["t1"],
        original_text="fact", compressed_text="fact", mode=EntryMode.extractive,
        embedding=[1.0, 0.0, 0.0, 0.0])
    letter = DeadLetter.from_raw(b"{bad", step="parse", error=ValueError("bad"),
                                 source="f.jsonl", offset=3, at=T0)
    buffer = json.dumps({"tenant": "x/y", "user": "u", "conversation": "z", "session": "s"})
    with store.transaction():
        store.upsert([entry])
        db = store._db
        # What an earlier version wrote: "/"-joined keys, no key format, no letter ids, and
        # the same dead letter stored once per run.
        db.execute("UPDATE meta SET value='x' WHERE key='key_format'")
        db.execute("DELETE FROM entry_vectors")
        db.execute("INSERT INTO entry_vectors(id, scope, event_time_us, embedding) "
                   "VALUES('e1', 'a/b/u', 0, ?)", (struct.pack("4f", 1, 0, 0, 0),))
        db.execute("INSERT INTO buffers VALUES('sensory', 'x/y/z', ?)", (buffer,))
        db.execute("INSERT INTO ledger VALUES('a/b/c', 't1')")  # known: entry a + b/c
        db.execute("INSERT INTO ledger VALUES('p/q/r', 't9')")  # unknown: either split
        db.execute("DROP INDEX dead_letters_id")
        db.execute("ALTER TABLE dead_letters DROP COLUMN letter_id")
        for _ in range(2):
            db.execute("INSERT INTO dead_letters(body) VALUES(?)", (letter.to_json(),))
    store.close()

    store = EmbeddedStore(path, dim=4)
    assert [h.entry.id for h in store.search("a", "b/u", [1.0, 0, 0, 0], 5)] == ["e1"]
    assert store.search("a/b", "u", [1.0, 0, 0, 0], 5) == []
    assert store.buffer_keys("sensory") == [conversation_key("x/y", "z")]
    assert store.seen(conversation_key("a", "b/c"), "t1")
    assert not store.seen(conversation_key("a/b", "c"), "t1")
    assert store.seen(conversation_key("p", "q/r"), "t9")
    assert store.seen(conversation_key("p/q", "r"), "t9")
    assert len(store.dead_letters()) == 1
    assert not store.add_dead_letter(letter)  # the same letter again: kept once
