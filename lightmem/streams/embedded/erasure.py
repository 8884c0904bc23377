"""Erasure on the embedded store: one scope out of every table, in one SQLite transaction.

The companion of :class:`~lightmem.streams.embedded.store.EmbeddedStore` for erasure (it
works on the store's connection). :func:`forget_embedded` removes, for a user (tenant, user)
or a whole tenant:

- memories and their vectors (``entries``, ``entry_vectors``);
- their recorded changes (``changes``: every change of an erased memory, and every other
  change filed under the scope), then records one content-free ``erase`` change per erased
  user (scope, counts, time) for audit;
- the scope's turns in the open sensory and topic buffers (a buffer with nothing else left
  is deleted; one shared with another user keeps that user's turns);
- the turn ledger rows of conversations nobody else took part in (a conversation shared
  with another user keeps its rows: they hold turn ids, no text, and tell which turns were
  processed);
- dead letters of the scope (database rows and lines of the dead-letter file);
- LLM usage rows are per (purpose, tenant) and hold counts only: kept.

The request itself is kept in the ``erasures`` table (the embedded ledger).
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from lightmem.processors.erasure import ErasureLedger
from lightmem.processors.segment import SensoryBufferState
from lightmem.processors.summarize import TopicBufferState
from lightmem.schemas import DeadLetter, ErasureRequest, SchemaError
from lightmem.streams.embedded.store import EmbeddedStore
from lightmem.streams.erasure.forget import (
    ErasureReport,
    SinkReport,
    dead_letter_erased,
    erase_change,
)

__all__ = ["forget_embedded", "erasures_of", "embedded_status"]

_TABLE = ("CREATE TABLE IF NOT EXISTS erasures (key TEXT PRIMARY KEY, requested_at TEXT NOT "
          "NULL, body TEXT NOT NULL)")


def erasures_of(store: EmbeddedStore) -> list[ErasureRequest]:
    """The erasure requests recorded in the store, oldest first."""
    db = store._db
    db.execute(_TABLE)
    return [ErasureRequest.model_validate_json(b)
            for (b,) in db.execute("SELECT body FROM erasures ORDER BY requested_at")]


def _strip_sensory(body: str, ledger: ErasureLedger) -> str | None:
    state = SensoryBufferState.model_validate_json(body)
    kept = [t for t in state.turns if not ledger.drops(state.tenant, t.user or state.user, None)]
    if len(kept) == len(state.turns):
        return body
    if not kept:
        return None
    user = state.user if any((t.user or state.user) == state.user for t in kept) else (
        kept[0].user or state.user)
    return state.model_copy(update={"turns": kept, "user": user,
                                    "last_event_time": max(t.event_time for t in kept)}
                            ).model_dump_json()


def _strip_topic(body: str, ledger: ErasureLedger) -> str | None:
    state = TopicBufferState.model_validate_json(body)
    segments = []
    changed = False
    for seg in state.segments:
        kept = [t for t in seg.turns if not ledger.drops(seg.tenant, t.user or seg.user, None)]
        if len(kept) == len(seg.turns):
            segments.append(seg)
            continue
        changed = True
        if kept:
            user = seg.user if any((t.user or seg.user) == seg.user for t in kept) else (
                kept[0].user or seg.user)
            segments.append(seg.model_copy(update={"turns": kept, "user": user}))
    if not changed:
        return body
    if not segments:
        return None
    user = state.user if not ledger.drops(state.tenant, state.user, None) else segments[0].user
    return state.model_copy(update={"segments": segments, "user": user}).model_dump_json()


def _buffer_users(kind: str, body: str) -> tuple[str, set[str]]:
    if kind == "sensory":
        s = SensoryBufferState.model_validate_json(body)
        return s.conversation, {t.user or s.user for t in s.turns}
    t = TopicBufferState.model_validate_json(body)
    return t.conversation, {turn.user or seg.user for seg in t.segments for turn in seg.turns}


def _rewrite_dead_letter_file(path: Path, ledger: ErasureLedger) -> int:
    """Drop the erased scope's lines from the dead-letter file (atomically); returns how
    many were dropped."""
    if not path.exists():
        return 0
    kept: list[bytes] = []
    dropped = 0
    with path.open("rb") as f:
        for line in f:
            try:
                letter = DeadLetter.parse(line)
            except SchemaError:
                kept.append(line)
                continue
            if dead_letter_erased(letter, ledger):
                dropped += 1
            else:
                kept.append(line)
    if dropped:
        tmp = path.with_suffix(path.suffix + ".erasing")
        tmp.write_bytes(b"".join(kept))
        os.replace(tmp, path)
    return dropped


def forget_embedded(store: EmbeddedStore, request: ErasureRequest, *,
                    dead_letter_path: Path | None = None) -> ErasureReport:
    """Erase ``request``'s scope from the embedded store (see the module docstring).

    Args:
        store: The open store.
        request: The erasure (:func:`~lightmem.streams.erasure.forget.new_request`).
        dead_letter_path: The dead-letter file to clean too (default none).

    Returns:
        The report: one sink per table kind; an unknown scope finds nothing (``found``
        False) and is still recorded in the ledger table.
    """
    from lightmem.schemas import conversation_key

    ledger = ErasureLedger([request])
    tenant, user = request.tenant, request.user
    db: Any = store._db
    scope_sql = "tenant=?" + ("" if user is None else " AND user=?")
    scope_args = [tenant] if user is None else [tenant, user]
    report = ErasureReport(request)
    with store.transaction():
        db.execute(_TABLE)
        # memories and vectors
        rows = db.execute(f"SELECT id, user, conversation FROM entries WHERE {scope_sql}",
                          scope_args).fetchall()
        ids = [r[0] for r in rows]
        users = {r[1] for r in rows}
        conversations = {r[2] for r in rows}
        for entry_id in ids:
            db.execute("DELETE FROM entry_vectors WHERE id=?", (entry_id,))
        db.execute(f"DELETE FROM entries WHERE {scope_sql}", scope_args)
        if ids:
            # FTS5 keeps a deleted row's tokens in its index segments until they merge.
            db.execute("INSERT INTO entry_fts(entry_fts) VALUES('optimize')")
        # changes (every change of an erased memory; any other change of the scope)
        change_rows = db.execute(
            "SELECT seq, memory_id, json_extract(body, '$.user'), json_extract(body, '$.op') "
            "FROM changes WHERE json_extract(body, '$.tenant')=?", (tenant,)).fetchall()
        erased_ids = set(ids)
        doomed = [seq for seq, mid, u, op in change_rows if op != "erase" and (
            mid in erased_ids or user is None or u == user)]
        users |= {u for _, _, u, op in change_rows if op != "erase" and (
            user is None or u == user)}
        for seq in doomed:
            db.execute("DELETE FROM changes WHERE seq=?", (seq,))
        # buffers
        stripped = deleted = 0
        others: dict[str, set[str]] = {}
        for kind, key, body in db.execute("SELECT kind, key, body FROM buffers").fetchall():
            conv, buffer_users = _buffer_users(kind, body)
            new = (_strip_sensory if kind == "sensory" else _strip_topic)(body, ledger)
            if new is body:
                others.setdefault(conv, set()).update(buffer_users)
                continue
            conversations.add(conv)
            users |= {u for u in buffer_users if ledger.drops(tenant, u, None)}
            if new is None:
                db.execute("DELETE FROM buffers WHERE kind=? AND key=?", (kind, key))
                deleted += 1
            else:
                db.execute("UPDATE buffers SET body=? WHERE kind=? AND key=?", (new, kind, key))
                stripped += 1
                others.setdefault(conv, set()).update(
                    u for u in buffer_users if not ledger.drops(tenant, u, None))
        # turn ledger: conversations nobody else (no other user's memory or buffer) had
        for conv, u in db.execute("SELECT conversation, user FROM entries WHERE tenant=?",
                                  (tenant,)):
            others.setdefault(conv, set()).add(u)
        ledger_rows = shared = 0
        for conv in sorted(conversations):
            key = conversation_key(tenant, conv)
            if others.get(conv):
                shared += 1
                continue
            n = db.execute("SELECT count(*) FROM ledger WHERE conversation_key=?",
                           (key,)).fetchone()[0]
            db.execute("DELETE FROM ledger WHERE conversation_key=?", (key,))
            ledger_rows += int(n)
        # dead letters
        letters = 0
        for seq, body in db.execute("SELECT seq, body FROM dead_letters").fetchall():
            if dead_letter_erased(DeadLetter.model_validate_json(body), ledger):
                db.execute("DELETE FROM dead_letters WHERE seq=?", (seq,))
                letters += 1
        file_letters = (_rewrite_dead_letter_file(dead_letter_path, ledger)
                        if dead_letter_path is not None else 0)
        # the ledger and the audit record
        db.execute("INSERT INTO erasures(key, requested_at, body) VALUES(?,?,?) ON CONFLICT(key) "
                   "DO UPDATE SET requested_at=excluded.requested_at, body=excluded.body",
                   (request.key, request.requested_at.isoformat(), request.to_json()))
        counts = {"memories": len(ids), "changes": len(doomed),
                  "buffers_deleted": deleted, "buffers_rewritten": stripped,
                  "ledger_rows": ledger_rows, "dead_letters": letters + file_letters}
        if user is not None:
            users = {user} if any(counts.values()) else set()
        if users:
            store.append_changes([erase_change(request, u, counts, request.requested_at)
                                  for u in sorted(users)])
    # The write-ahead log still holds the erased pages' old images until a checkpoint.
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    report.sinks = [
        SinkReport("memories", found=len(ids), removed={"memories": len(ids),
                                                        "vectors": len(ids)}),
        SinkReport("history", found=len(doomed), removed={"changes": len(doomed)}),
        SinkReport("buffers", found=deleted + stripped,
                   removed={"deleted": deleted, "rewritten without the scope": stripped}),
        SinkReport("turn ledger", found=ledger_rows,
                   removed={"rows": ledger_rows},
                   pending=[f"{shared} conversation(s) shared with other users keep their "
                            f"turn ids (no text)"] if shared else []),
        SinkReport("dead letters", found=letters + file_letters,
                   removed={"rows": letters, "file lines": file_letters}),
        SinkReport("llm usage", pending=["per (purpose, tenant) counts only, no text: kept"]),
    ]
    return report


def dumps(report: ErasureReport) -> str:
    """The report as one JSON line."""
    return json.dumps(report.as_json(), ensure_ascii=False)


def embedded_status(store: EmbeddedStore, tenant: str, user: str | None = None
                    ) -> ErasureReport | None:
    """What is left of an erasure recorded in the embedded store (None: none recorded)."""
    from lightmem.processors.erasure import to_ms

    ledger = ErasureLedger(erasures_of(store))
    requests = [r for r in erasures_of(store)
                if r.tenant == tenant and r.user in (None, user)]
    if not requests:
        return None
    request = max(requests, key=lambda r: r.requested_at)
    db: Any = store._db
    scope_sql = "tenant=?" + ("" if user is None else " AND user=?")
    scope_args = [tenant] if user is None else [tenant, user]
    left = 0
    for u, ingest_time in db.execute(f"SELECT user, json_extract(body, '$.ingest_time') FROM "
                                     f"entries WHERE {scope_sql}", scope_args):
        if ledger.drops(tenant, u, to_ms(datetime.fromisoformat(ingest_time))):
            left += 1
    buffered = 0
    for kind, _key, body in db.execute("SELECT kind, key, body FROM buffers").fetchall():
        _, users = _buffer_users(kind, body)
        state = json.loads(body)
        if state.get("tenant") == tenant and any(user is None or u == user for u in users):
            buffered += 1
    report = ErasureReport(request)
    report.sinks = [
        SinkReport("memories", found=left, confirmed=not left,
                   pending=[f"{left} memorie(s) of the scope from before the erasure"]
                   if left else []),
        SinkReport("buffers", found=buffered, confirmed=True,
                   pending=[f"{buffered} open buffer(s) hold turns of the scope written "
                            f"after the erasure"] if buffered else []),
    ]
    return report
