"""``lightmem memories list | get | delete`` on the embedded store (issue 14, item 6), through
the CLI, over the memory service's own operations: tenant-scoped reads, a delete gone from
search, list and get (and recorded in history), and nothing listed of an erased user."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lightmem.ops.cli import app
from lightmem.schemas import EntryMode, MemoryEntry

ENV = {"LIGHTMEM_COMPRESSOR": "none", "HF_HUB_OFFLINE": "1"}


def entry(i: int, tenant: str, user: str, fact: str) -> MemoryEntry:
    """A memory of ``(tenant, user)`` whose source turn happened on day ``i`` of March 2024."""
    when = datetime(2024, 3, 4 + i, 18, 0, tzinfo=UTC)
    return MemoryEntry(id=f"{tenant}-{user}-{i}", tenant=tenant, user=user, conversation="c1",
                       topic_id="t1", speaker=user, fact=fact, event_time=when,
                       ingest_time=when, source_turn_ids=[f"turn-{i}"],
                       # As said, without the "speaker: " the fact starts with (what an
                       # extractive memory keeps beside its compressed line).
                       original_text=fact.split(": ", 1)[-1],
                       compressed_text=fact.split(": ", 1)[-1], mode=EntryMode.extractive)


SEED = [
    entry(0, "acme", "alice", "alice: I adopted a dog named Pepper."),
    entry(1, "acme", "alice", "alice: My sister lives in Lisbon."),
    entry(2, "acme", "alice", "alice: I play the cello on Sundays."),
    entry(0, "acme", "bob", "bob: I am allergic to peanuts."),
    entry(0, "globex", "alice", "alice: My dog is called Rex."),
]


def run(*args: str, code: int = 0):  # noqa: ANN201 - click's Result
    result = CliRunner().invoke(app, list(args), env=ENV)
    assert result.exit_code == code, (args, result.output)
    return result


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.models
def test_memories_list_get_delete_embedded(tmp_path: Path) -> None:
    from lightmem.processors.embed import Embedder
    from lightmem.streams.embedded.store import EmbeddedStore
    from lightmem.streams.models.encoder import MINILM_DIM, load_encoder

    data = str(tmp_path / "data")
    store = EmbeddedStore(tmp_path / "data" / "lightmem.db", dim=MINILM_DIM)
    store.upsert(Embedder(load_encoder().sentence_model, batch_size=8).embed_entries(SEED))
    store.close()

    # list: the scope only, oldest first, the service's memory items
    listed = json_lines(run("memories", "list", "--tenant", "acme", "--user", "alice",
                            "--json", "--data-dir", data).stdout)
    assert [m["id"] for m in listed] == ["acme-alice-0", "acme-alice-1", "acme-alice-2"]
    assert listed[0]["text"] == "alice: I adopted a dog named Pepper."
    assert listed[0]["kind"] == "memory" and listed[0]["user"] == "alice"
    plain = run("memories", "list", "--tenant", "acme", "--user", "alice", "--limit", "2",
                "--data-dir", data).stdout.splitlines()
    assert len(plain) == 2 and plain[0].startswith("acme-alice-0  ") and "Pepper" in plain[0]

    # get: within the tenant; another tenant's id is not found (and says nothing of it)
    got = json.loads(run("memories", "get", "acme-alice-0", "--tenant", "acme",
                         "--data-dir", data).stdout)
    assert got["id"] == "acme-alice-0" and got["rendered"].endswith("dog named Pepper.")
    other = run("memories", "get", "acme-alice-0", "--tenant", "globex", "--data-dir", data,
                code=1)
    assert "no memory" in other.output and "Pepper" not in other.output
    run("memories", "get", "no-such-id", "--tenant", "acme", "--data-dir", data, code=1)

    # delete: another tenant cannot delete it; the tenant can, and it is gone everywhere
    run("memories", "delete", "acme-alice-0", "--tenant", "globex", "--data-dir", data, code=1)
    assert run("memories", "get", "acme-alice-0", "--tenant", "acme", "--data-dir", data)
    found = json_lines(run("search", "dog Pepper", "--tenant", "acme", "--user", "alice",
                           "--json", "--data-dir", data).stdout)
    assert found[0]["id"] == "acme-alice-0"
    done = run("memories", "delete", "acme-alice-0", "--tenant", "acme", "--reason",
               "ticket 7", "--data-dir", data)
    assert json.loads(done.stdout) == {"id": "acme-alice-0", "deleted": True}
    run("memories", "get", "acme-alice-0", "--tenant", "acme", "--data-dir", data, code=1)
    run("memories", "delete", "acme-alice-0", "--tenant", "acme", "--data-dir", data, code=1)
    found = json_lines(run("search", "dog Pepper", "--tenant", "acme", "--user", "alice",
                           "--json", "--data-dir", data).stdout)
    assert "acme-alice-0" not in {h["id"] for h in found}
    assert [m["id"] for m in json_lines(run(
        "memories", "list", "--tenant", "acme", "--user", "alice", "--json", "--data-dir",
        data).stdout)] == ["acme-alice-1", "acme-alice-2"]
    history = json_lines(run("history", "acme-alice-0", "--data-dir", data).stdout)
    assert [(c["op"], c["reason"]) for c in history] == [("delete", "ticket 7")]
    # the same user name in another tenant is untouched
    assert [m["id"] for m in json_lines(run(
        "memories", "list", "--tenant", "globex", "--user", "alice", "--json", "--data-dir",
        data).stdout)] == ["globex-alice-0"]

    # an erased user: nothing listed, her ids not found; bob still listed
    run("forget", "--tenant", "acme", "--user", "alice", "--data-dir", data)
    gone = run("memories", "list", "--tenant", "acme", "--user", "alice", "--json",
               "--data-dir", data)
    assert gone.stdout.strip() == "" and "0 memories" in gone.output
    run("memories", "get", "acme-alice-1", "--tenant", "acme", "--data-dir", data, code=1)
    assert [m["id"] for m in json_lines(run(
        "memories", "list", "--tenant", "acme", "--user", "bob", "--json", "--data-dir",
        data).stdout)] == ["acme-bob-0"]
