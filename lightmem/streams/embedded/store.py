"""The embedded store: one SQLite file (apsw + sqlite-vec) under the data directory.

Why SQLite + sqlite-vec: a single file, no server, and ACID transactions that span the
memories, the vector index, the per-conversation buffers and the processed-turn ledger. A
batch of turns is applied in one transaction, so a killed ``lightmem ingest`` never leaves
half a batch behind and a re-run continues exactly where the last commit stopped.
sqlite-vec's ``vec0`` table gives exact (brute-force) cosine kNN with the scope as a
partition key and the event time as a filterable column, which is the update-queue query
(same scope, event time <= the entry's) as well as retrieval. apsw is used because CPython
builds (pyenv's included) often ship ``sqlite3`` without extension loading.

Why one module of ~600 lines: one class over one connection, whose tables (memories,
vectors, FTS, buffers, ledger, usage, dead letters) are written in the same transactions and
migrated together when an older file is opened.

Lexical search (hybrid retrieval) is an FTS5 table ``entry_fts`` over each memory's fact and
the original text of its source turn (a compressed fact is found by the words compression
dropped: measured on the LoCoMo dev file, extractive R@10 0.619 -> 0.645), BM25-ranked,
Porter-stemmed. Its rows are the ``entries`` rows (same rowid) and triggers on
``entries`` write them, so every path that inserts, updates or deletes a memory (this class,
erasure, migrations) keeps the words in step: a deleted or rewritten memory's old words no
longer match. A database from before FTS is indexed when first opened.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import apsw
import numpy as np
import sqlite_vec

from lightmem.processors.llm import UsageMeter, UsageTotals
from lightmem.processors.store import ScoredEntry, VersionConflict
from lightmem.schemas import (
    DeadLetter,
    KeyFormatError,
    MemoryChange,
    MemoryEntry,
    conversation_key,
    decode_conversation_key,
    scope_key,
    stable_id,
)

__all__ = ["EmbeddedStore", "StoreMismatch", "KEY_FORMAT", "dead_letter_id"]

#: How buffer keys, ledger keys and vector partition keys are written (``meta.key_format``):
#: :mod:`lightmem.schemas.keys`. A database without it was written with ``tenant/name``
#: strings, which are ambiguous when a name holds ``/``; it is re-keyed when opened.
KEY_FORMAT = "json-array-v1"
#: Version of the lexical index (``meta.fts``); a database without it is indexed on open.
FTS_VERSION = "fts5-porter-v2"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    user TEXT NOT NULL,
    conversation TEXT NOT NULL,
    event_time_us INTEGER NOT NULL,
    version INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_scope ON entries (tenant, user, event_time_us);
CREATE VIRTUAL TABLE IF NOT EXISTS entry_fts USING fts5(fact, tokenize='porter unicode61');
CREATE TRIGGER IF NOT EXISTS entries_fts2_insert AFTER INSERT ON entries BEGIN
    INSERT INTO entry_fts(rowid, fact) VALUES (new.rowid, json_extract(new.body, '$.fact')
        || ' ' || coalesce(json_extract(new.body, '$.original_text'), ''));
END;
CREATE TRIGGER IF NOT EXISTS entries_fts2_delete AFTER DELETE ON entries BEGIN
    DELETE FROM entry_fts WHERE rowid = old.rowid;
END;
CREATE TRIGGER IF NOT EXISTS entries_fts2_update AFTER UPDATE ON entries BEGIN
    DELETE FROM entry_fts WHERE rowid = old.rowid;
    INSERT INTO entry_fts(rowid, fact) VALUES (new.rowid, json_extract(new.body, '$.fact')
        || ' ' || coalesce(json_extract(new.body, '$.original_text'), ''));
END;
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    change_id TEXT UNIQUE NOT NULL,
    memory_id TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_memory ON changes (memory_id, seq);
CREATE TABLE IF NOT EXISTS buffers (
    kind TEXT NOT NULL, key TEXT NOT NULL, body TEXT NOT NULL, PRIMARY KEY (kind, key)
);
CREATE TABLE IF NOT EXISTS ledger (
    conversation_key TEXT NOT NULL, turn_id TEXT NOT NULL, PRIMARY KEY (conversation_key, turn_id)
);
CREATE TABLE IF NOT EXISTS usage (
    purpose TEXT NOT NULL, tenant TEXT NOT NULL,
    calls INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
    latency_s REAL NOT NULL, errors INTEGER NOT NULL,
    PRIMARY KEY (purpose, tenant)
);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL, letter_id TEXT
);
"""


def dead_letter_id(letter: DeadLetter) -> str:
    """A dead letter's identity: where it came from and its exact bytes, not when it was
    written. A re-run that rejects the same line again makes the same id (not a second
    letter)."""
    return stable_id(letter.step, letter.source, letter.partition, letter.offset,
                     letter.raw_b64)


class StoreMismatch(RuntimeError):
    """The database was created with another embedding dimension than the one in use."""


def _us(t: datetime) -> int:
    return int(t.timestamp() * 1_000_000)


def _vec(v: Sequence[float]) -> bytes:
    return np.asarray(v, dtype=np.float32).tobytes()


class EmbeddedStore:
    """Memories, vectors, buffers, ledger, usage and dead letters in one SQLite file.

    Implements :class:`lightmem.processors.store.MemoryStore`.

    Args:
        path: the database file (created with its parent directory if missing).
        dim: embedding dimension (384 for all-MiniLM-L6-v2); checked against an existing file.
    """

    def __init__(self, path: Path, dim: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.dim = dim
        self._db = apsw.Connection(str(path))
        self._db.enable_load_extension(True)
        self._db.load_extension(sqlite_vec.loadable_path())
        self._db.enable_load_extension(False)
        # WAL lets `lightmem search` read while an ingest is writing.
        self._db.execute("PRAGMA journal_mode=WAL")
        # Erasure: deleted rows are overwritten with zeros, not left in free pages.
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.execute("PRAGMA busy_timeout=10000")
        with self.transaction():
            self._db.execute(_SCHEMA)
            stored = self._meta("embedding_dim")
            if stored is None:
                self._set_meta("embedding_dim", str(dim))
            elif int(stored) != dim:
                raise StoreMismatch(
                    f"{path} holds {stored}-dimensional embeddings, the embedder gives {dim}: "
                    "use another --data-dir or re-ingest"
                )
            self._db.execute(
                "CREATE VIRTUAL TABLE IF NOT EXISTS entry_vectors USING vec0("
                "id TEXT PRIMARY KEY, scope TEXT PARTITION KEY, event_time_us INTEGER, "
                f"embedding FLOAT[{dim}] distance_metric=cosine)"
            )
            self._migrate_dead_letters()
            self._migrate_usage()
            if self._meta("key_format") != KEY_FORMAT:
                self._migrate_keys()
                self._set_meta("key_format", KEY_FORMAT)
            if self._meta("fts") != FTS_VERSION:
                # Entries written before the FTS table existed (or by another version).
                for old in ("insert", "delete", "update"):  # v1 indexed the fact alone
                    self._db.execute(f"DROP TRIGGER IF EXISTS entries_fts_{old}")
                self._db.execute("DELETE FROM entry_fts")
                self._db.execute("INSERT INTO entry_fts(rowid, fact) SELECT rowid, "
                                 "json_extract(body, '$.fact') || ' ' || "
                                 "coalesce(json_extract(body, '$.original_text'), '') "
                                 "FROM entries")
                self._set_meta("fts", FTS_VERSION)

    # -- plumbing

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Everything inside commits together or not at all (nested calls are savepoints)."""
        with self._db:
            yield

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else row[0]

    def _set_meta(self, key: str, value: str) -> None:
        self._db.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (key, value),
        )

    # -- migrations of databases written by earlier versions

    def _migrate_dead_letters(self) -> None:
        """Give every dead letter its id and keep one row per id (earlier versions stored a
        re-run's rejected lines again), then make ids unique."""
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(dead_letters)")}
        if "letter_id" not in columns:
            self._db.execute("ALTER TABLE dead_letters ADD COLUMN letter_id TEXT")
            rows = self._db.execute("SELECT seq, body FROM dead_letters ORDER BY seq").fetchall()
            kept: set[str] = set()
            for seq, body in rows:
                letter_id = dead_letter_id(DeadLetter.model_validate_json(body))
                if letter_id in kept:
                    self._db.execute("DELETE FROM dead_letters WHERE seq=?", (seq,))
                else:
                    kept.add(letter_id)
                    self._db.execute("UPDATE dead_letters SET letter_id=? WHERE seq=?",
                                     (letter_id, seq))
        self._db.execute("CREATE UNIQUE INDEX IF NOT EXISTS dead_letters_id "
                         "ON dead_letters (letter_id)")

    def _migrate_usage(self) -> None:
        """Name the usage table's key column ``purpose`` (earlier versions: ``stage``)."""
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(usage)")}
        if "stage" in columns:
            self._db.execute("ALTER TABLE usage RENAME COLUMN stage TO purpose")

    def _migrate_keys(self) -> None:
        """Re-key a database written with ``tenant/name`` keys (see :data:`KEY_FORMAT`)."""
        # Vector partition keys: exact, from each entry's own tenant and user.
        rows = self._db.execute(
            "SELECT v.id, v.event_time_us, v.embedding, e.tenant, e.user "
            "FROM entry_vectors v JOIN entries e ON e.id = v.id").fetchall()
        for entry_id, event_time_us, embedding, tenant, user in rows:
            self._db.execute("DELETE FROM entry_vectors WHERE id=?", (entry_id,))
            self._db.execute(
                "INSERT INTO entry_vectors(id, scope, event_time_us, embedding) VALUES(?,?,?,?)",
                (entry_id, scope_key(tenant, user), event_time_us, embedding))
        # Buffers: exact, every state names its tenant and conversation.
        known = {(t, c) for t, c in self._db.execute(
            "SELECT DISTINCT tenant, conversation FROM entries")}
        for kind, key, body in self._db.execute("SELECT kind, key, body FROM buffers").fetchall():
            state = json.loads(body)
            pair = (state["tenant"], state["conversation"])
            known.add(pair)
            self._db.execute("DELETE FROM buffers WHERE kind=? AND key=?", (kind, key))
            self._db.execute("INSERT OR REPLACE INTO buffers(kind, key, body) VALUES(?,?,?)",
                             (kind, conversation_key(*pair), body))
        # Turn ledger: an old key with several "/" could be any of its splits. The splits
        # that are known conversations win; otherwise all of them are marked (a turn id of
        # such a key was processed, whichever conversation it belonged to).
        for key, turn_id in self._db.execute("SELECT conversation_key, turn_id FROM ledger"
                                             ).fetchall():
            try:
                decode_conversation_key(key)
                continue  # already in the new format
            except KeyFormatError:
                pass
            splits = [(key[:i], key[i + 1:]) for i, ch in enumerate(key)
                      if ch == "/" and 0 < i < len(key) - 1]
            if not splits:
                continue
            pairs = [p for p in splits if p in known] or splits
            self._db.execute("DELETE FROM ledger WHERE conversation_key=? AND turn_id=?",
                             (key, turn_id))
            for pair in pairs:
                self._db.execute(
                    "INSERT OR IGNORE INTO ledger(conversation_key, turn_id) VALUES(?,?)",
                    (conversation_key(*pair), turn_id))

    # -- MemoryStore

    def upsert(self, entries: Sequence[MemoryEntry]) -> None:
        """Insert or replace entries by id (idempotent). Each must carry its embedding."""
        with self.transaction():
            for e in entries:
                self._write(e)

    def _write(self, e: MemoryEntry) -> None:
        if e.embedding is None:
            raise ValueError(f"entry {e.id} has no embedding: embed before storing")
        body = e.model_copy(update={"embedding": None}).to_json()
        self._db.execute(
            "INSERT INTO entries(id, tenant, user, conversation, event_time_us, version, body) "
            "VALUES(?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET tenant=excluded.tenant, "
            "user=excluded.user, conversation=excluded.conversation, "
            "event_time_us=excluded.event_time_us, version=excluded.version, body=excluded.body",
            (e.id, e.tenant, e.user, e.conversation, _us(e.event_time), e.version, body),
        )
        # vec0 has no upsert: delete then insert, inside the caller's transaction.
        self._db.execute("DELETE FROM entry_vectors WHERE id=?", (e.id,))
        self._db.execute(
            "INSERT INTO entry_vectors(id, scope, event_time_us, embedding) VALUES(?,?,?,?)",
            (e.id, e.scope, _us(e.event_time), _vec(e.embedding)),
        )

    def search(
        self,
        tenant: str,
        user: str,
        vector: Sequence[float],
        k: int,
        *,
        not_after: datetime | None = None,
    ) -> list[ScoredEntry]:
        """Exact cosine kNN within the (tenant, user) scope, best first."""
        sql = (
            "SELECT v.id, v.distance, e.body FROM entry_vectors v JOIN entries e ON e.id = v.id "
            "WHERE v.embedding MATCH ? AND k = ? AND v.scope = ?"
        )
        args: list[Any] = [_vec(vector), k, scope_key(tenant, user)]
        if not_after is not None:
            sql += " AND v.event_time_us <= ?"
            args.append(_us(not_after))
        sql += " ORDER BY v.distance"
        rows = self._db.execute(sql, args).fetchall()
        return [
            ScoredEntry(entry=MemoryEntry.model_validate_json(body), score=1.0 - float(dist))
            for _id, dist, body in rows
        ]

    def lexical_search(
        self,
        tenant: str,
        user: str,
        terms: Sequence[str],
        k: int,
        *,
        not_after: datetime | None = None,
        not_before: datetime | None = None,
    ) -> list[ScoredEntry]:
        """BM25 (FTS5) over the facts within the (tenant, user) scope, best first.

        Args:
            tenant: Scope tenant (exact).
            user: Scope user (exact).
            terms: Words matched with OR (each quoted: no FTS5 syntax gets through).
            k: Number of hits.
            not_after: Only memories with event time <= this (inclusive).
            not_before: Only memories with event time >= this (inclusive).

        Returns:
            Hits with ``score`` = BM25 (higher is better; FTS5's ``bm25()`` negated). The
            statistics (IDF) are the whole file's, as in one Elasticsearch index.
        """
        quoted = [f'"{t.replace(chr(34), "")}"' for t in terms if t.replace('"', "").strip()]
        if k < 1 or not quoted:
            return []
        sql = (
            "SELECT e.body, bm25(entry_fts) AS rank FROM entry_fts "
            "JOIN entries e ON e.rowid = entry_fts.rowid "
            "WHERE entry_fts MATCH ? AND e.tenant = ? AND e.user = ?"
        )
        args: list[Any] = [" OR ".join(quoted), tenant, user]
        if not_after is not None:
            sql += " AND e.event_time_us <= ?"
            args.append(_us(not_after))
        if not_before is not None:
            sql += " AND e.event_time_us >= ?"
            args.append(_us(not_before))
        sql += " ORDER BY rank, e.id LIMIT ?"
        args.append(k)
        return [
            ScoredEntry(entry=MemoryEntry.model_validate_json(body), score=-float(rank))
            for body, rank in self._db.execute(sql, args).fetchall()
        ]

    def rank_ids(
        self,
        tenant: str,
        user: str,
        vector: Sequence[float],
        terms: Sequence[str],
        k: int,
        *,
        not_after: datetime | None = None,
    ) -> tuple[list[str], list[str]]:
        """The ids :meth:`search` and :meth:`lexical_search` would return, best first, in
        one read transaction and without reading the memories (hybrid retrieval fuses the
        ranks, then :meth:`get` reads only the fused top k)."""
        with self.transaction():
            sql = ("SELECT id FROM entry_vectors WHERE embedding MATCH ? AND k = ? "
                   "AND scope = ?")
            args: list[Any] = [_vec(vector), k, scope_key(tenant, user)]
            if not_after is not None:
                sql += " AND event_time_us <= ?"
                args.append(_us(not_after))
            dense = [r[0] for r in self._db.execute(sql + " ORDER BY distance", args)]
            quoted = [f'"{t.replace(chr(34), "")}"' for t in terms if t.replace('"', "").strip()]
            lexical: list[str] = []
            if quoted:
                sql = ("SELECT e.id FROM entry_fts JOIN entries e ON e.rowid = entry_fts.rowid "
                       "WHERE entry_fts MATCH ? AND e.tenant = ? AND e.user = ?")
                args = [" OR ".join(quoted), tenant, user]
                if not_after is not None:
                    sql += " AND e.event_time_us <= ?"
                    args.append(_us(not_after))
                sql += " ORDER BY bm25(entry_fts), e.id LIMIT ?"
                args.append(k)
                lexical = [r[0] for r in self._db.execute(sql, args)]
        return dense, lexical

    def get(self, ids: Sequence[str], *, with_embedding: bool = False) -> list[MemoryEntry]:
        """The stored entries with these ids, in the order asked (missing ids skipped)."""
        out = []
        for entry_id in ids:
            row = self._db.execute("SELECT body FROM entries WHERE id=?", (entry_id,)).fetchone()
            if row is None:
                continue
            entry = MemoryEntry.model_validate_json(row[0])
            if with_embedding:
                vec = self._db.execute(
                    "SELECT embedding FROM entry_vectors WHERE id=?", (entry_id,)
                ).fetchone()
                entry = entry.model_copy(
                    update={"embedding": np.frombuffer(vec[0], dtype=np.float32).tolist()}
                )
            out.append(entry)
        return out

    def _version(self, entry_id: str) -> int | None:
        row = self._db.execute("SELECT version FROM entries WHERE id=?", (entry_id,)).fetchone()
        return None if row is None else int(row[0])

    def replace(self, entry: MemoryEntry, *, expected_version: int) -> None:
        """Write ``entry`` if the stored version is ``expected_version``; else VersionConflict."""
        with self.transaction():
            current = self._version(entry.id)
            if current != expected_version:
                raise VersionConflict(f"{entry.id}: stored {current}, expected {expected_version}")
            self._write(entry)

    def delete(self, entry_id: str, *, expected_version: int) -> None:
        """Delete if the stored version is ``expected_version``; else VersionConflict."""
        with self.transaction():
            current = self._version(entry_id)
            if current != expected_version:
                raise VersionConflict(f"{entry_id}: stored {current}, expected {expected_version}")
            self._db.execute("DELETE FROM entries WHERE id=?", (entry_id,))
            self._db.execute("DELETE FROM entry_vectors WHERE id=?", (entry_id,))

    # -- listing and stats

    def iter_entries(
        self, tenant: str | None = None, user: str | None = None, *, with_embedding: bool = False
    ) -> Iterator[MemoryEntry]:
        """Entries in event-time order, optionally within one tenant / scope."""
        sql, args = "SELECT id FROM entries WHERE 1=1", []
        if tenant is not None:
            sql += " AND tenant=?"
            args.append(tenant)
        if user is not None:
            sql += " AND user=?"
            args.append(user)
        ids = [r[0] for r in self._db.execute(sql + " ORDER BY event_time_us, id", args)]
        for i in range(0, len(ids), 256):
            yield from self.get(ids[i : i + 256], with_embedding=with_embedding)

    def page_entries(
        self, tenant: str, user: str, *, after: tuple[int, str] | None, limit: int
    ) -> list[tuple[MemoryEntry, tuple[int, str]]]:
        """One page of a scope's entries in (event time, id) order, after the key ``after``.

        Keyset pagination: each entry comes with its key ``(event_time_us, id)``; pass the
        last one as ``after`` for the next page. ``id`` is unique, so no entry is skipped or
        repeated between pages, however many there are.
        """
        sql = "SELECT id, event_time_us, body FROM entries WHERE tenant=? AND user=?"
        args: list[Any] = [tenant, user]
        if after is not None:
            sql += " AND (event_time_us > ? OR (event_time_us = ? AND id > ?))"
            args += [after[0], after[0], after[1]]
        sql += " ORDER BY event_time_us, id LIMIT ?"
        args.append(limit)
        return [(MemoryEntry.model_validate_json(body), (int(us), entry_id))
                for entry_id, us, body in self._db.execute(sql, args)]

    def count_entries(self) -> dict[tuple[str, str], int]:
        """Number of memories per (tenant, user)."""
        rows = self._db.execute("SELECT tenant, user, count(*) FROM entries GROUP BY tenant, user")
        return {(t, u): int(n) for t, u, n in rows}

    # -- memory changes (the embedded twin of lightmem.memory-changes.v2)

    def append_changes(self, changes: Sequence[MemoryChange]) -> None:
        """Record changes; a change id already recorded is ignored (idempotent replays)."""
        with self.transaction():
            for c in changes:
                self._db.execute(
                    "INSERT OR IGNORE INTO changes(change_id, memory_id, body) VALUES(?,?,?)",
                    (c.change_id, c.memory_id, c.to_json()),
                )

    def history(self, memory_id: str) -> list[MemoryChange]:
        """Every recorded change of one memory, oldest first."""
        rows = self._db.execute(
            "SELECT body FROM changes WHERE memory_id=? ORDER BY seq", (memory_id,)
        )
        return [MemoryChange.model_validate_json(r[0]) for r in rows]

    def change_counts(self) -> dict[str, int]:
        """Number of recorded changes per op."""
        rows = self._db.execute("SELECT body FROM changes").fetchall()
        out: dict[str, int] = {}
        for (body,) in rows:
            op = json.loads(body)["op"]
            out[op] = out.get(op, 0) + 1
        return out

    # -- buffers and ledger (per-conversation stage state)

    def load_buffer(self, kind: str, key: str) -> str | None:
        """The persisted JSON state of one buffer, or None."""
        row = self._db.execute(
            "SELECT body FROM buffers WHERE kind=? AND key=?", (kind, key)
        ).fetchone()
        return None if row is None else row[0]

    def save_buffer(self, kind: str, key: str, body: str | None) -> None:
        """Persist a buffer's JSON state (None removes it)."""
        if body is None:
            self._db.execute("DELETE FROM buffers WHERE kind=? AND key=?", (kind, key))
        else:
            self._db.execute(
                "INSERT INTO buffers(kind, key, body) VALUES(?,?,?) "
                "ON CONFLICT(kind, key) DO UPDATE SET body=excluded.body",
                (kind, key, body),
            )

    def buffer_keys(self, kind: str) -> list[str]:
        """Keys of every persisted buffer of a kind."""
        return [r[0] for r in self._db.execute("SELECT key FROM buffers WHERE kind=?", (kind,))]

    def seen(self, conversation_key: str, turn_id: str) -> bool:
        """Whether this turn was already processed (re-ingest skips it)."""
        row = self._db.execute(
            "SELECT 1 FROM ledger WHERE conversation_key=? AND turn_id=?",
            (conversation_key, turn_id),
        ).fetchone()
        return row is not None

    def mark_seen(self, conversation_key: str, turn_id: str) -> None:
        """Record a processed turn (in the caller's transaction)."""
        self._db.execute(
            "INSERT OR IGNORE INTO ledger(conversation_key, turn_id) VALUES(?,?)",
            (conversation_key, turn_id),
        )

    def turns_seen(self) -> int:
        """Number of turns processed so far."""
        return int(self._db.execute("SELECT count(*) FROM ledger").fetchone()[0])

    # -- usage and dead letters

    def add_usage(self, meter: UsageMeter) -> None:
        """Add a meter's totals to the persisted usage (in the caller's transaction)."""
        for (purpose, tenant), t in meter.by_key().items():
            self._db.execute(
                "INSERT INTO usage VALUES(?,?,?,?,?,?,?) ON CONFLICT(purpose, tenant) "
                "DO UPDATE SET "
                "calls=calls+excluded.calls, prompt_tokens=prompt_tokens+excluded.prompt_tokens, "
                "completion_tokens=completion_tokens+excluded.completion_tokens, "
                "latency_s=latency_s+excluded.latency_s, errors=errors+excluded.errors",
                (purpose, tenant, t.calls, t.prompt_tokens, t.completion_tokens, t.latency_s,
                 t.errors),
            )

    def usage(self) -> dict[tuple[str, str], UsageTotals]:
        """Persisted LLM usage per (purpose, tenant)."""
        rows = self._db.execute("SELECT * FROM usage ORDER BY purpose, tenant")
        return {
            (s, t): UsageTotals(calls=c, prompt_tokens=p, completion_tokens=ct, latency_s=lat,
                                errors=err)
            for s, t, c, p, ct, lat, err in rows
        }

    def add_dead_letter(self, letter: DeadLetter) -> bool:
        """Keep a dead letter (in the caller's transaction); False when one with the same
        :func:`dead_letter_id` is already kept (a re-run rejecting the same line)."""
        self._db.execute(
            "INSERT OR IGNORE INTO dead_letters(body, letter_id) VALUES(?,?)",
            (letter.to_json(), dead_letter_id(letter)))
        return self._db.changes() > 0

    def dead_letters(self) -> list[DeadLetter]:
        """Every dead letter recorded, oldest first."""
        rows = self._db.execute("SELECT body FROM dead_letters ORDER BY seq")
        return [DeadLetter.model_validate_json(r[0]) for r in rows]
