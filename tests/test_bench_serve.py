"""``lightmem bench serve`` end to end on a tiny corpus (behaviour, never timing).

The command builds an embedded corpus, starts a real ``lightmem serve`` process, runs the
searches over HTTP and on the bare path, then adds turns through the service and finds each
of them by search: the JSON report must hold every level and every turn.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lightmem.ops.bench.serve import synthetic_memories
from lightmem.ops.cli import app


def test_synthetic_memories_are_spread_over_users_with_unit_vectors() -> None:
    entries = list(synthetic_memories(1001, 7, dim=16, seed=3))
    assert len(entries) == 1001
    assert len({e.id for e in entries}) == 1001
    per_user = {u: sum(1 for e in entries if e.user == u) for u in {e.user for e in entries}}
    assert len(per_user) == 7 and max(per_user.values()) - min(per_user.values()) <= 1
    norms = np.linalg.norm(np.array([e.embedding for e in entries]), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5)
    again = list(synthetic_memories(1001, 7, dim=16, seed=3))
    assert [e.embedding for e in again] == [e.embedding for e in entries]
    assert {e.tenant for e in entries} == {"bench"}


@pytest.mark.models
def test_bench_serve_runs_end_to_end_on_a_tiny_corpus(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LIGHTMEM_COMPRESSOR", "none")  # the service's logic, not compression
    monkeypatch.setenv("LIGHTMEM_TORCH_THREADS", "1")
    monkeypatch.delenv("LIGHTMEM_LLM_BASE_URL", raising=False)
    out = tmp_path / "serve.json"
    result = CliRunner().invoke(app, [
        "bench", "serve", "--store", "embedded", "--memories", "300", "--users", "5",
        "--queries", "12", "--clients", "1,3", "--fresh-turns", "4", "--fresh-users", "2",
        "--fresh-rate", "20", "--fresh-timeout", "120", "--work-dir", str(tmp_path / "work"),
        "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    (embedded,) = report["results"]
    assert embedded["store"] == "embedded"
    assert [row["clients"] for row in embedded["search"]] == [1, 3]
    for row in embedded["search"]:
        assert row["service"]["qps"] > 0 and row["bare"]["qps"] > 0
        assert row["service"]["p50_ms"] <= row["service"]["p99_ms"]
    fresh = embedded["freshness"]
    # Every added turn was found by a search through the service; on the embedded store the
    # turns still in their buffers are provisional events.
    assert fresh["flowing"]["turns"] + fresh["quiet"]["turns"] == 4
    assert fresh["flowing"]["searchable"] == fresh["flowing"]["turns"]
    assert fresh["quiet"]["searchable"] == fresh["quiet"]["turns"] == 2
    assert fresh["quiet"]["as_event"] == 2
    assert fresh["search_errors"] == []
    # A second run over the same corpus reuses it instead of writing it again.
    again = CliRunner().invoke(app, [
        "bench", "serve", "--store", "embedded", "--memories", "300", "--users", "5",
        "--queries", "4", "--clients", "1", "--fresh-turns", "0",
        "--work-dir", str(tmp_path / "work"), "--json", str(out)])
    assert again.exit_code == 0, again.output
    assert json.loads(out.read_text())["results"][0]["build_s"] == 0.0
