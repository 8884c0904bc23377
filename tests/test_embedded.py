"""The embedded runtime end to end, with the real models (MiniLM, SmolLM2) and no servers:
ingest -> search, restart continues, killed ingest loses and duplicates nothing, bad lines
land in the dead-letter file, LLM mode against an OpenAI-protocol server, consolidation.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lightmem.ops.bench.llm_stub import (
    OpenAIStubServer,
    fact_extraction_responder,
)
from lightmem.ops.bench.sleep import consolidation_responder
from lightmem.ops.cli import app
from lightmem.schemas import DeadLetter, EntryMode
from lightmem.settings import load_settings
from lightmem.streams.embedded.runtime import EmbeddedRuntime

pytestmark = pytest.mark.models


def _runtime(data_dir: Path, **overrides: object) -> EmbeddedRuntime:
    return EmbeddedRuntime(load_settings(data_dir=data_dir, **overrides))


def _entry_ids(rt: EmbeddedRuntime) -> list[str]:
    return sorted(e.id for e in rt.store.iter_entries())


def _source_turns(rt: EmbeddedRuntime) -> list[str]:
    return sorted(t for e in rt.store.iter_entries() for t in e.source_turn_ids)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory, demo_turns: Path) -> EmbeddedRuntime:
    rt = _runtime(tmp_path_factory.mktemp("once"))
    report = rt.ingest_file(demo_turns)
    assert report.processed == 32 and not report.rejected
    return rt


def test_ingest_then_search_returns_the_fact(ingested: EmbeddedRuntime) -> None:
    # k=5: hybrid retrieval (the default) ranks the lines that say "dog" or "name" beside
    # the nearest ones; the naming line is 5th by words, 3rd by vector.
    hits = ingested.search("default", "alice", "What is the name of the dog?", k=5)
    assert any("Pepper" in h.entry.fact for h in hits)
    top = hits[0].entry
    assert top.mode is EntryMode.extractive
    assert top.original_text and top.compressed_text  # both kept, side by side


def test_every_turn_becomes_exactly_one_extractive_memory(ingested: EmbeddedRuntime) -> None:
    turns = [json.loads(line)["turn_id"] for line in
             (Path(__file__).parent.parent / "lightmem/ops/data/demo_turns.jsonl").open()]
    assert _source_turns(ingested) == sorted(turns)
    # Several topic segments, not one blob and not one per turn.
    topics = {e.topic_id for e in ingested.store.iter_entries()}
    assert 3 <= len(topics) < len(turns)


def test_search_never_crosses_scopes(ingested: EmbeddedRuntime) -> None:
    assert ingested.search("default", "bob", "dog", k=5) == []
    assert ingested.search("other-tenant", "alice", "dog", k=5) == []


def test_restart_continues_where_it_stopped(
    tmp_path: Path, demo_turns: Path, ingested: EmbeddedRuntime
) -> None:
    lines = demo_turns.read_bytes().splitlines(keepends=True)
    first = tmp_path / "first.jsonl"
    first.write_bytes(b"".join(lines[:20]))
    data = tmp_path / "data"
    # First run stops after 20 turns with buffers still open (no flush) ...
    report = _runtime(data).ingest_file(first, flush=False)
    assert report.processed == 20
    # ... a new process re-reads the whole file: the 20 are skipped, the rest continue the
    # persisted buffers, and the result is identical to one uninterrupted run.
    again = _runtime(data)
    report = again.ingest_file(demo_turns)
    assert (report.skipped, report.processed) == (20, 12)
    assert _entry_ids(again) == _entry_ids(ingested)
    # Ingesting the same file once more changes nothing.
    report = again.ingest_file(demo_turns)
    assert (report.skipped, report.processed, report.entries) == (32, 0, 0)
    assert _entry_ids(again) == _entry_ids(ingested)


def test_bad_lines_are_reported_dead_lettered_and_the_rest_processed(
    tmp_path: Path, demo_turns: Path
) -> None:
    good = demo_turns.read_text().splitlines()[:6]
    bad = good[2].replace('"role": "user"', '"role": "robot"')
    lines = [good[0], "{not json", good[1], bad, good[3], '{"tenant": "default"}', *good[4:]]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    dlq = tmp_path / "dlq.jsonl"
    result = CliRunner().invoke(
        app, ["ingest", str(path), "--data-dir", str(tmp_path / "d"), "--dead-letters", str(dlq)]
    )
    assert result.exit_code == 1, result.output
    # One clear error per bad line: line number, field, reason.
    assert f"{path}:2" in result.output and f"{path}:4" in result.output
    assert f"{path}:6" in result.output and "role" in result.output
    assert "processed 5" in result.output
    letters = [DeadLetter.parse(line) for line in dlq.read_text().splitlines()]
    assert [d.offset for d in letters] == [2, 4, 6]
    assert letters[0].raw == "{not json" and all(d.step == "parse" for d in letters)
    assert "user: Field required" in letters[2].reason


def test_llm_mode_one_call_per_topic_buffer_flush(tmp_path: Path, demo_turns: Path) -> None:
    with OpenAIStubServer(fact_extraction_responder) as server:
        rt = _runtime(tmp_path, llm_base_url=server.base_url, llm_model="stub")
        report = rt.ingest_file(demo_turns)
        calls = len(server.chat_requests)
    assert report.mode == "llm" and report.entries == 32
    usage = rt.store.usage()[("summarize", "default")]
    assert usage.calls == calls and usage.prompt_tokens > 0
    # Topic buffering: far fewer calls than turns (the per-turn pattern would make 32).
    assert 1 <= calls <= 8
    entries = list(rt.store.iter_entries())
    assert all(e.mode is EntryMode.llm and e.fact.startswith(("Alice said", "assistant said"))
               for e in entries)
    pepper = next(e for e in entries if "named her Pepper" in e.original_text)
    assert pepper.source_turn_ids == ["t003"] and pepper.event_time.day == 4


def _contradiction_responder(request: dict) -> str:
    prompt = "\n".join(m["content"] for m in request["messages"] if isinstance(m["content"], str))
    if '"action"' in prompt or "update" in prompt.lower() and "delete" in prompt.lower():
        if "Boston" in prompt and "Seattle" in prompt:
            return json.dumps({"action": "delete", "reason": "moved to Seattle"})
        return json.dumps({"action": "ignore", "reason": "no conflict"})
    return fact_extraction_responder(request)


def _write_alice_turns(path: Path, rows: list[tuple[str, str, str, str]]) -> None:
    """One user's turns as JSONL: (session, turn id, event time, text) per row."""
    path.write_text("".join(json.dumps({
        "tenant": "default", "user": "alice", "conversation": "c", "session": s, "turn_id": t,
        "role": "user", "speaker": "Alice", "text": text, "event_time": when}) + "\n"
        for s, t, when, text in rows))


def test_consolidate_deletes_the_contradicted_older_memory(tmp_path: Path) -> None:
    turns = tmp_path / "t.jsonl"
    rows = [
        ("s1", "t1", "2024-01-10T10:00:00+00:00", "I live in Boston with my dog."),
        ("s2", "t2", "2024-06-10T10:00:00+00:00", "I moved from Boston to Seattle last week."),
    ]
    _write_alice_turns(turns, rows)
    with OpenAIStubServer(_contradiction_responder) as server:
        rt = _runtime(tmp_path / "d", llm_base_url=server.base_url, compressor="none",
                      update_threshold=0.5)
        rt.ingest_file(turns)
        older, newer = sorted(rt.store.iter_entries(), key=lambda e: e.event_time)
        report = rt.consolidate()
    assert (report.targets, report.deleted) == (1, 1)
    remaining = list(rt.store.iter_entries())
    assert [e.id for e in remaining] == [newer.id]  # the newer one is never touched
    history = rt.store.history(older.id)
    assert [c.op.value for c in history] == ["add", "delete"]
    assert history[1].caused_by == [newer.id]
    assert rt.store.usage()[("consolidate", "default")].calls == 1


def test_killed_ingest_resumes_without_loss_or_duplicates(
    tmp_path: Path, demo_turns: Path
) -> None:
    """kill -9 a real `lightmem ingest` process while it waits on its 2nd LLM call."""
    second_call = threading.Event()
    release = threading.Event()
    seen = []

    def blocking(request: dict) -> str:
        seen.append(1)
        if len(seen) == 2:
            second_call.set()
            release.wait(60)
        return fact_extraction_responder(request)

    data = tmp_path / "data"
    with OpenAIStubServer(blocking) as server:
        # Small batches and topic buffer: several commits and LLM calls before the kill.
        settings = {"ingest_batch_turns": 8, "topic_buffer_tokens": 64}
        env = {**os.environ, "LIGHTMEM_LLM_BASE_URL": server.base_url,
               "LIGHTMEM_DATA_DIR": str(data),
               **{f"LIGHTMEM_{k.upper()}": str(v) for k, v in settings.items()}}
        log = (tmp_path / "ingest.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "lightmem", "ingest", str(demo_turns)],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 600
            while not second_call.wait(1):
                assert proc.poll() is None, (tmp_path / "ingest.log").read_text()
                assert time.monotonic() < deadline, "ingest never reached its 2nd LLM call"
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(30) == -signal.SIGKILL
        finally:
            release.set()
            proc.kill()
        resumed = _runtime(data, llm_base_url=server.base_url, **settings)
        report = resumed.ingest_file(demo_turns)
    assert report.skipped > 0 and report.processed > 0
    with OpenAIStubServer(fact_extraction_responder) as server:
        clean = _runtime(tmp_path / "clean", llm_base_url=server.base_url, **settings)
        clean.ingest_file(demo_turns)
    # Every turn's memory exactly once, and the same memories as an uninterrupted run.
    assert _source_turns(resumed) == _source_turns(clean)
    assert _entry_ids(resumed) == _entry_ids(clean)


def test_cli_search_stats_and_history(ingested: EmbeddedRuntime) -> None:
    data_dir = str(ingested.settings.data_dir)
    runner = CliRunner()
    result = runner.invoke(app, ["search", "--user", "alice", "--data-dir", data_dir, "Seattle"])
    assert result.exit_code == 0 and "Seattle" in result.output
    result = runner.invoke(app, ["stats", "--data-dir", data_dir])
    assert result.exit_code == 0
    assert '"count": 32' in result.output
    memory_id = _entry_ids(ingested)[0]
    result = runner.invoke(app, ["history", memory_id, "--data-dir", data_dir])
    assert result.exit_code == 0 and '"op":"add"' in result.output
    assert runner.invoke(app, ["history", "nope", "--data-dir", data_dir]).exit_code == 1


def _merge_responder(request: dict) -> str:
    prompt = str(request["messages"][-1]["content"])
    if "TARGET memory:" in prompt:
        return consolidation_responder(request)  # "also" in a newer fact: update
    return fact_extraction_responder(request)


def test_consolidate_again_does_not_merge_twice(tmp_path: Path) -> None:
    """A second `consolidate` finds the newer entry folded in already: no LLM call, no second
    update (the same rule the sleep workers use to replay safely)."""
    turns = tmp_path / "t.jsonl"
    rows = [
        ("s1", "t1", "2024-01-10T10:00:00+00:00", "I like tea in the morning."),
        ("s2", "t2", "2024-06-10T10:00:00+00:00", "I also like green tea in the morning."),
    ]
    _write_alice_turns(turns, rows)
    with OpenAIStubServer(_merge_responder) as server:
        rt = _runtime(tmp_path / "d", llm_base_url=server.base_url, compressor="none",
                      update_threshold=0.5)
        rt.ingest_file(turns)
        older, newer = sorted(rt.store.iter_entries(), key=lambda e: e.event_time)
        first = rt.consolidate()
        merged = {e.id: e for e in rt.store.iter_entries()}[older.id]
        second = rt.consolidate()
    assert (first.targets, first.updated, first.reflected) == (1, 1, 0)
    assert merged.version == 2 and "also like green tea" in merged.fact
    assert merged.source_turn_ids == ["t1", "t2"]
    assert (second.targets, second.updated, second.reflected) == (1, 0, 1)
    after = {e.id: e for e in rt.store.iter_entries()}
    assert (after[older.id].fact, after[older.id].version) == (merged.fact, 2)
    assert rt.store.usage()[("consolidate", "default")].calls == 1
    assert [c.op.value for c in rt.store.history(older.id)] == ["add", "update"]
