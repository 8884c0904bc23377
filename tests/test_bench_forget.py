"""``lightmem bench forget --no-stream``: the embedded half of the erasure benchmark runs and
erases exactly one user's memories (the numbers themselves are not checked)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from lightmem.ops.bench.forget import synthetic_memories
from lightmem.ops.cli import app


def test_synthetic_memories_are_spread_over_the_users_with_unit_vectors() -> None:
    batches = list(synthetic_memories(7, 50, chunk=16))
    entries = [e for b in batches for e in b]
    assert [len(b) for b in batches] == [16, 16, 16, 2]
    assert len({e.id for e in entries}) == 50
    assert {e.user for e in entries} == {f"u{i:05d}" for i in range(7)}
    norms = [sum(x * x for x in e.embedding) ** 0.5 for e in entries]
    assert all(abs(n - 1.0) < 1e-3 for n in norms)


def test_bench_forget_embedded_only(tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / "forget.json"
    result = CliRunner().invoke(app, ["bench", "forget", "--no-stream", "--users", "10",
                                      "--memories", "200", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    embedded = report["embedded"]
    assert embedded["removed"] == 20 and embedded["deleted_alone"] == 20
    assert embedded["confirmed"] and embedded["others_intact"]
    assert "elasticsearch" not in report and "ingest" not in report
