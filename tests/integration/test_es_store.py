"""The Elasticsearch store against a real Elasticsearch, and its twin, the embedded store.

The behavioural tests at the top run the SAME body on both stores (the ``store`` fixture is
parametrized), so the two satisfy one store interface: idempotent upserts, scoped kNN with
cosine scores, the event-time bound, optimistic replace/delete, listing and counts. The
embedded variant needs no server; the Elasticsearch one uses the session's local node.

Below them: what only the Elasticsearch store has (mapping, alias promotion, hybrid search,
bulk failures and retries, credentials) and the ``lightmem index`` CLI. Writes use
``refresh=True`` or ``refresh()``; nothing sleeps to synchronise.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from lightmem.processors.store import MemoryStore, ScoredEntry, VersionConflict
from lightmem.schemas import MemoryEntry
from lightmem.settings import Settings
from lightmem.streams.embedded.store import EmbeddedStore

es = pytest.importorskip("elasticsearch", reason="elasticsearch (the stream extra) is missing")

from lightmem.ops.commands import index as index_cli  # noqa: E402 - needs the elasticsearch client
from lightmem.streams.elastic.store import (  # noqa: E402
    BulkWriteError,
    ElasticsearchStore,
    IncompatibleIndex,
    IndexExists,
    IndexNotFound,
)
from lightmem.streams.elastic.store import es_client as make_es_client  # noqa: E402

DIM = 8
T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


def unit(*components: float) -> list[float]:
    """A unit vector of DIM floats starting with ``components``."""
    v = np.zeros(DIM, dtype=np.float64)
    v[: len(components)] = components
    return (v / np.linalg.norm(v)).tolist()


def cosine(a: list[float], b: list[float]) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def entry(
    entry_id: str,
    vector: list[float] | None,
    *,
    tenant: str = "acme",
    user: str = "alice",
    day: float = 0,
    fact: str | None = None,
    version: int = 1,
) -> MemoryEntry:
    return MemoryEntry(
        id=entry_id,
        tenant=tenant,
        user=user,
        conversation="c1",
        topic_id="topic-1",
        speaker=user,
        fact=fact or f"memory {entry_id}",
        event_time=T0 + timedelta(days=day),
        ingest_time=T0 + timedelta(days=30),
        source_turn_ids=[f"turn-{entry_id}"],
        original_text=f"original {entry_id}",
        compressed_text=f"compressed {entry_id}",
        mode="extractive",
        version=version,
        embedding=vector,
    )


def ids(hits: list[ScoredEntry]) -> list[str]:
    return [h.entry.id for h in hits]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def es_stores(es_client, unique_id: Callable[[str], str]) -> Iterator[Callable[..., Any]]:  # noqa: ANN001
    """Factory: ``es_stores()`` -> a store on a fresh alias (``<alias>-v1`` created).

    Everything under each alias (indices, template) and any extra index named through
    ``es_stores.track(name)`` is deleted after the test.
    """
    aliases: list[str] = []
    extra: list[str] = []

    def make(**kwargs: Any) -> ElasticsearchStore:
        alias = kwargs.pop("alias", None) or unique_id("lightmem-test-mem")
        aliases.append(alias)
        store = ElasticsearchStore(es_client, alias=alias, dim=DIM, refresh=True, **kwargs)
        store.ensure_index()
        return store

    make.track = extra.append  # type: ignore[attr-defined]
    yield make
    for alias in aliases:
        names = list(es_client.indices.get(index=f"{alias}-*", expand_wildcards="all"))
        for name in names + extra:
            es_client.indices.delete(index=name, ignore_unavailable=True)
        es_client.options(ignore_status=404).indices.delete_index_template(name=f"{alias}-template")
    for name in extra:
        es_client.indices.delete(index=name, ignore_unavailable=True)


@pytest.fixture(params=["embedded", pytest.param("elasticsearch", marks=pytest.mark.integration)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MemoryStore]:
    """The store under test: the embedded twin or the Elasticsearch store (same tests)."""
    if request.param == "embedded":
        embedded = EmbeddedStore(tmp_path / "memories.db", dim=DIM)
        yield embedded
        embedded.close()
    else:
        yield request.getfixturevalue("es_stores")()


# --------------------------------------------------------------------------- one interface


def test_upsert_twice_keeps_one_document_per_id(store) -> None:  # noqa: ANN001
    store.upsert([entry("a", unit(1)), entry("b", unit(0, 1))])
    store.upsert([entry("a", unit(1), fact="a, replayed"), entry("b", unit(0, 1))])
    if isinstance(store, ElasticsearchStore):
        store.refresh()

    assert store.count_entries() == {("acme", "alice"): 2}
    assert sorted(e.id for e in store.iter_entries()) == ["a", "b"]
    assert [e.fact for e in store.get(["a"])] == ["a, replayed"]


def test_upsert_without_embedding_writes_nothing(store) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="no embedding"):
        store.upsert([entry("a", unit(1)), entry("b", None)])
    assert store.get(["a", "b"]) == []


def test_search_returns_nearest_within_the_scope_only(store) -> None:  # noqa: ANN001
    query = unit(1, 0.05)
    store.upsert(
        [
            entry("near", unit(1, 0.1)),
            entry("mid", unit(1, 1)),
            entry("far", unit(0, 1)),
            # Near-identical memories of another user and of another tenant's "alice".
            entry("bob-same", query, user="bob"),
            entry("other-tenant-same", query, tenant="globex"),
        ]
    )

    hits = store.search("acme", "alice", query, 10)
    assert ids(hits) == ["near", "mid", "far"]
    vectors = {"near": unit(1, 0.1), "mid": unit(1, 1), "far": unit(0, 1)}
    for hit in hits:
        assert hit.score == pytest.approx(cosine(query, vectors[hit.entry.id]), abs=1e-5)
        assert hit.entry.embedding is None
    # The other scopes' closer vectors do not crowd this scope's memories out of the top k.
    assert ids(store.search("acme", "alice", query, 2)) == ["near", "mid"]
    assert ids(store.search("acme", "bob", query, 5)) == ["bob-same"]
    assert ids(store.search("acme", "carol", query, 5)) == []


def test_not_after_bounds_event_time_inclusively(store) -> None:  # noqa: ANN001
    store.upsert([entry(f"d{d}", unit(1, d / 10), day=d) for d in (1, 2, 3)])
    query = unit(1)

    bounded = store.search("acme", "alice", query, 10, not_after=T0 + timedelta(days=2))
    assert sorted(ids(bounded)) == ["d1", "d2"]
    assert store.search("acme", "alice", query, 10, not_after=T0) == []
    assert len(store.search("acme", "alice", query, 10)) == 3


def test_get_keeps_the_order_asked_and_skips_missing(store) -> None:  # noqa: ANN001
    store.upsert([entry("a", unit(1)), entry("b", unit(0, 1))])

    got = store.get(["b", "missing", "a"])
    assert [e.id for e in got] == ["b", "a"]
    assert all(e.embedding is None for e in got)
    with_vectors = store.get(["b"], with_embedding=True)
    assert with_vectors[0].embedding == pytest.approx(unit(0, 1), abs=1e-6)
    assert store.get([]) == []


def test_replace_is_optimistic(store) -> None:  # noqa: ANN001
    store.upsert([entry("a", unit(1))])
    updated = entry("a", unit(1, 1), fact="a, merged with newer detail", version=2)

    store.replace(updated, expected_version=1)
    assert [(e.version, e.fact) for e in store.get(["a"])] == [(2, updated.fact)]
    assert ids(store.search("acme", "alice", unit(1, 1), 1)) == ["a"]

    # A writer that read version 1 before the update lost the race.
    with pytest.raises(VersionConflict, match="stored 2, expected 1"):
        store.replace(entry("a", unit(0, 1), fact="stale", version=2), expected_version=1)
    assert [e.fact for e in store.get(["a"])] == [updated.fact]
    with pytest.raises(VersionConflict):
        store.replace(entry("ghost", unit(1), version=2), expected_version=1)


def test_delete_is_optimistic(store) -> None:  # noqa: ANN001
    store.upsert([entry("a", unit(1)), entry("b", unit(0, 1))])

    with pytest.raises(VersionConflict, match="stored 1, expected 2"):
        store.delete("a", expected_version=2)
    assert [e.id for e in store.get(["a"])] == ["a"]

    store.delete("a", expected_version=1)
    assert store.get(["a"]) == []
    assert ids(store.search("acme", "alice", unit(1), 5)) == ["b"]
    with pytest.raises(VersionConflict):
        store.delete("a", expected_version=1)


def test_iter_entries_and_count_entries(store) -> None:  # noqa: ANN001
    store.upsert(
        [
            entry("z-late", unit(1), day=3),
            entry("b-tie", unit(1), day=1),
            entry("a-tie", unit(1), day=1),
            entry("early", unit(1), day=0),
            entry("bob-1", unit(1), user="bob", day=2),
            entry("globex-1", unit(1), tenant="globex", day=5),
        ]
    )
    if isinstance(store, ElasticsearchStore):
        store.refresh()

    assert [e.id for e in store.iter_entries("acme", "alice")] == [
        "early",
        "a-tie",
        "b-tie",
        "z-late",
    ]
    assert [e.id for e in store.iter_entries("acme")] == [
        "early",
        "a-tie",
        "b-tie",
        "bob-1",
        "z-late",
    ]
    assert len(list(store.iter_entries())) == 6
    if isinstance(store, ElasticsearchStore):  # pages with search_after, none lost or repeated
        paged = [e.id for e in store.iter_entries("acme", page_size=2)]
        assert paged == [e.id for e in store.iter_entries("acme")]
    assert store.count_entries() == {
        ("acme", "alice"): 4,
        ("acme", "bob"): 1,
        ("globex", "alice"): 1,
    }
    assert [e.embedding for e in store.iter_entries("globex", with_embedding=True)] == [
        pytest.approx(unit(1), abs=1e-6)
    ]


# --------------------------------------------------------------------------- Elasticsearch only


@pytest.mark.integration
def test_ensure_index_creates_the_mapping_behind_the_alias(es_stores, es_client) -> None:  # noqa: ANN001
    store: ElasticsearchStore = es_stores()

    first = f"{store.alias}-v1"
    assert store.current_index() == first
    assert store.ensure_index() == first  # idempotent: no second index, alias unchanged
    assert list(es_client.indices.get_alias(name=store.alias)) == [first]
    props = es_client.indices.get_mapping(index=first)[first]["mappings"]["properties"]
    vector = props["embedding"]
    assert (vector["type"], vector["dims"], vector["similarity"], vector["index"]) == (
        "dense_vector",
        DIM,
        "cosine",
        True,
    )
    assert vector["index_options"]["type"] == "hnsw"
    for name in ("id", "tenant", "user", "conversation", "topic_id", "speaker", "mode"):
        assert props[name]["type"] == "keyword", name
    assert props["source_turn_ids"]["type"] == "keyword"
    assert props["event_time"]["type"] == props["ingest_time"]["type"] == "date"
    assert props["fact"]["type"] == "text"
    assert props["version"]["type"] == "integer"
    templates = es_client.indices.get_index_template(name=store.template_name)
    assert templates["index_templates"][0]["index_template"]["index_patterns"] == [
        f"{store.alias}-*"
    ]


@pytest.mark.integration
def test_bulk_create_keeps_the_first_write(es_stores) -> None:  # noqa: ANN001
    """The index sink's write: a redelivered entry never overwrites a later update."""
    store = es_stores()
    assert store.bulk_create([entry("a", unit(1)), entry("b", unit(0, 1))]) == ["a", "b"]
    [a] = store.get(["a"])
    store.replace(a.model_copy(update={"fact": "a, updated", "version": 2,
                                       "embedding": unit(1)}), expected_version=1)
    assert store.bulk_create([entry("a", unit(1)), entry("c", unit(1, 1))]) == ["c"]
    assert [(e.fact, e.version) for e in store.get(["a"])] == [("a, updated", 2)]
    assert sorted(e.id for e in store.iter_entries()) == ["a", "b", "c"]


def test_hybrid_search_finds_an_exact_keyword_match(es_stores) -> None:  # noqa: ANN001
    store: ElasticsearchStore = es_stores()
    query = unit(1)
    # Other users' memories make the index big enough for BM25's IDF to mean something
    # (a rare term in a handful of documents scores below 1, like any kNN hit).
    others = [
        entry(f"other{i}", unit(1, i / 40), user=f"user{i % 4}", fact=f"went hiking on day {i}")
        for i in range(40)
    ]
    store.upsert(
        others
        + [entry(f"sem{i}", unit(1, i / 10), fact=f"likes hiking trip {i}") for i in range(5)]
        + [
            # Far from the query vector: only the keyword can find it.
            entry("ferry", unit(0, 0, 1), fact="Booked the ferry to Zanzibar for Friday"),
            entry("bob-ferry", unit(0, 0, 1), user="bob", fact="Bob also loves Zanzibar"),
        ]
    )

    assert "ferry" not in ids(store.search("acme", "alice", query, 3))
    hybrid = store.hybrid_search("acme", "alice", "zanzibar", query, 3)
    assert ids(hybrid)[0] == "ferry"
    assert hybrid[0].score > 1.0  # BM25 + nothing from kNN: not a cosine
    assert len(hybrid) == 3 and set(ids(hybrid)) <= {"ferry", "sem0", "sem1", "sem2"}
    # With the text weight off, the ranking is the kNN one again.
    semantic = store.hybrid_search("acme", "alice", "zanzibar", query, 3, text_boost=0.0)
    assert ids(semantic) == ids(store.search("acme", "alice", query, 3))


@pytest.mark.integration
def test_search_time_range_with_not_before(es_stores) -> None:  # noqa: ANN001
    store: ElasticsearchStore = es_stores()
    store.upsert([entry(f"d{d}", unit(1, d / 10), day=d) for d in (1, 2, 3, 4)])

    hits = store.search(
        "acme",
        "alice",
        unit(1),
        10,
        not_before=T0 + timedelta(days=2),
        not_after=T0 + timedelta(days=3),
    )
    assert sorted(ids(hits)) == ["d2", "d3"]


@pytest.mark.integration
def test_promote_switches_the_alias_atomically(
    es_stores,
    es_client,
    monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    blue: ElasticsearchStore = es_stores()
    old = blue.current_index()
    blue.upsert([entry("old-1", unit(1)), entry("old-2", unit(1, 1))])

    # Backfill into the next version through a store bound to the concrete index.
    new = f"{blue.alias}-v2"
    assert blue.create_index(new) is True
    green = ElasticsearchStore(es_client, alias=blue.alias, dim=DIM, index=new, refresh=True)
    green.upsert([entry("new-1", unit(1)), entry("new-2", unit(0, 1)), entry("new-3", unit(1, 2))])
    assert ids(blue.search("acme", "alice", unit(1), 10)) == ["old-1", "old-2"]

    # A reader searching through the alias while it moves sees one index or the other,
    # never both, never none.
    seen: list[frozenset[str]] = []
    promoted = threading.Event()

    def read() -> None:
        after = 0
        while after < 5:
            seen.append(frozenset(ids(blue.search("acme", "alice", unit(1), 10))))
            after += promoted.is_set()

    calls: list[list[dict[str, Any]]] = []
    real = es_client.indices.update_aliases

    def spy(*, actions: list[dict[str, Any]], **kwargs: Any) -> Any:
        calls.append(actions)
        return real(actions=actions, **kwargs)

    monkeypatch.setattr(es_client.indices, "update_aliases", spy)
    reader = threading.Thread(target=read)
    reader.start()
    try:
        assert blue.promote(new) == old
    finally:
        promoted.set()
        reader.join(timeout=60)
    assert not reader.is_alive()

    assert calls == [
        [
            {"remove": {"index": old, "alias": blue.alias}},
            {"add": {"index": new, "alias": blue.alias}},
        ]
    ]
    assert blue.current_index() == new
    assert set(ids(blue.search("acme", "alice", unit(1), 10))) == {"new-1", "new-2", "new-3"}
    assert set(seen) <= {frozenset({"old-1", "old-2"}), frozenset({"new-1", "new-2", "new-3"})}
    assert frozenset({"new-1", "new-2", "new-3"}) in seen
    # Writes through the alias now land in the new index; rolling back is another promote.
    blue.upsert([entry("new-4", unit(1))])
    assert es_client.count(index=new)["count"] == 4
    assert blue.promote(old) == new
    assert blue.current_index() == old
    assert [i.name for i in blue.list_indices() if i.current] == [old]
    assert {i.name: i.docs for i in blue.list_indices()} == {old: 2, new: 4}


@pytest.mark.integration
def test_promote_refuses_missing_or_foreign_indices(
    es_stores,
    es_client,
    unique_id,  # noqa: ANN001
) -> None:
    store: ElasticsearchStore = es_stores()
    current = store.current_index()

    with pytest.raises(IndexNotFound, match="does not exist"):
        store.promote(f"{store.alias}-v9")
    # Outside <alias>-*, or the template would give it the memory mapping.
    foreign = unique_id("lightmem-test-foreign")
    es_stores.track(foreign)
    es_client.indices.create(index=foreign, mappings={"properties": {"x": {"type": "keyword"}}})
    with pytest.raises(IncompatibleIndex, match="no dense_vector"):
        store.promote(foreign)
    wrong_dim = f"{store.alias}-dim4"
    ElasticsearchStore(es_client, alias=store.alias, dim=4).create_index(wrong_dim)
    with pytest.raises(IncompatibleIndex, match="dims=4"):
        store.promote(wrong_dim)
    with pytest.raises(IndexNotFound, match="alias"):
        store.promote(store.alias)
    with pytest.raises(IndexExists):
        store.create_index(current)
    assert store.current_index() == current


@pytest.mark.integration
def test_ensure_index_refuses_an_alias_name_taken_by_an_index(
    es_stores,
    es_client,
    unique_id,  # noqa: ANN001
) -> None:
    taken = unique_id("lightmem-test-taken")
    es_stores.track(taken)
    es_client.indices.create(index=taken)
    with pytest.raises(IncompatibleIndex, match="concrete index"):
        es_stores(alias=taken)


@pytest.mark.integration
def test_bulk_upsert_lists_every_permanently_failed_id(es_stores) -> None:  # noqa: ANN001
    store: ElasticsearchStore = es_stores()
    zero = [0.0] * DIM  # cosine similarity rejects zero-magnitude vectors (400)

    with pytest.raises(BulkWriteError) as info:
        store.bulk_upsert(
            [
                entry("ok-1", unit(1)),
                entry("bad-1", zero),
                entry("ok-2", unit(0, 1)),
                entry("bad-2", zero),
            ]
        )
    assert sorted(info.value.failures) == ["bad-1", "bad-2"]
    assert "'bad-1'" in str(info.value) and "zero magnitude" in str(info.value)
    assert store.count_entries() == {("acme", "alice"): 2}
    # Idempotent: the same good entries again are still two documents.
    assert store.bulk_upsert([entry("ok-1", unit(1)), entry("ok-2", unit(0, 1))]) == 2
    assert store.count_entries() == {("acme", "alice"): 2}


@pytest.mark.integration
def test_replace_loses_to_a_concurrent_writer(es_stores, monkeypatch) -> None:  # noqa: ANN001
    """A write between our read and our write is a 409 from Elasticsearch: VersionConflict."""
    store: ElasticsearchStore = es_stores()
    store.upsert([entry("a", unit(1))])
    read = store._read_version

    def read_then_someone_writes(entry_id: str) -> tuple[int | None, int, int]:
        seen = read(entry_id)
        # Same stored version, new seq_no: only if_seq_no can tell.
        store.client.index(
            index=store.target,
            id=entry_id,
            document=entry("a", unit(1)).model_dump(mode="json"),
            refresh=True,
        )
        return seen

    monkeypatch.setattr(store, "_read_version", read_then_someone_writes)
    with pytest.raises(VersionConflict, match="another writer"):
        store.replace(entry("a", unit(0, 1), version=2), expected_version=1)
    with pytest.raises(VersionConflict, match="another writer"):
        store.delete("a", expected_version=1)


# --------------------------------------------------------------------------- fake server


@pytest.fixture
def no_es_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials of the caller's own cluster must not leak into the scripted-server tests."""
    for name in ("API_KEY", "USERNAME", "PASSWORD", "CA_CERTS"):
        monkeypatch.delenv(f"LIGHTMEM_ES_{name}", raising=False)


class _FakeElasticsearch:
    """A scripted HTTP server that speaks just enough Elasticsearch for client-side tests.

    ``respond(method, path, body)`` returns ``(status, json_body)``; every request is kept
    in ``requests`` as ``(method, path, lower-cased headers, body bytes)``.
    """

    def __init__(self, respond: Callable[[str, str, bytes], tuple[int, dict[str, Any]]]):
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                fake.requests.append((self.command, self.path, headers, body))
                status, payload = respond(self.command, self.path, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Elastic-Product", "Elasticsearch")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _serve

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _FakeElasticsearch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _bulk_ids(body: bytes) -> list[str]:
    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
    return [line["index"]["_id"] for line in lines[::2]]


@pytest.mark.usefixtures("no_es_credentials")
def test_bulk_upsert_retries_429_and_5xx_only() -> None:
    statuses = {"ok": [201], "busy": [429, 201], "flaky": [503, 201], "bad": [400], "down": [502]}

    def respond(method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        items = []
        for doc_id in _bulk_ids(body):
            status = statuses[doc_id].pop(0) if len(statuses[doc_id]) > 1 else statuses[doc_id][0]
            item: dict[str, Any] = {"_index": "i", "_id": doc_id, "status": status}
            if status >= 300:
                item["error"] = {"type": f"status_{status}", "reason": f"scripted {status}"}
            items.append({"index": item})
        return 200, {"took": 1, "errors": True, "items": items}

    with _FakeElasticsearch(respond) as fake:
        client = make_es_client(Settings(es_url=fake.url), max_retries=0)
        store = ElasticsearchStore(
            client, alias="fake", dim=DIM, max_retries=2, retry_backoff_s=0.001
        )
        with pytest.raises(BulkWriteError) as info:
            store.bulk_upsert([entry(i, unit(1)) for i in ("ok", "busy", "flaky", "bad", "down")])
        client.close()

    sent = [_bulk_ids(body) for _, path, _, body in fake.requests if "_bulk" in path]
    assert sent[0] == ["ok", "busy", "flaky", "bad", "down"]
    # The 400 is never resent; the 429 and the 503 once; the persistent 502 until the end.
    assert sent[1:] == [["busy", "flaky", "down"], ["down"]]
    assert sorted(info.value.failures) == ["bad", "down"]
    assert "status_400" in info.value.failures["bad"]


SECRET_PASSWORD = "pw-9f3c-do-not-print"
SECRET_API_KEY = "a2V5LWRvLW5vdC1wcmludC03NzE="


@pytest.mark.usefixtures("no_es_credentials")
@pytest.mark.parametrize(
    ("overrides", "expected_auth"),
    [
        (
            {"es_username": "elastic", "es_password": SECRET_PASSWORD},
            "Basic " + base64.b64encode(f"elastic:{SECRET_PASSWORD}".encode()).decode(),
        ),
        ({"es_api_key": SECRET_API_KEY}, f"ApiKey {SECRET_API_KEY}"),
        (
            {"url_userinfo": f"elastic:{SECRET_PASSWORD}"},
            "Basic " + base64.b64encode(f"elastic:{SECRET_PASSWORD}".encode()).decode(),
        ),
    ],
    ids=["basic-auth", "api-key", "credentials-in-url"],
)
def test_auth_failure_passes_credentials_but_never_prints_them(
    overrides: dict[str, str], expected_auth: str, caplog: pytest.LogCaptureFixture
) -> None:
    def respond(method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        reason = "unable to authenticate user [elastic] for REST request [" + path + "]"
        error = {"type": "security_exception", "reason": reason}
        return 401, {"error": {**error, "root_cause": [error]}, "status": 401}

    caplog.set_level(logging.DEBUG)
    with _FakeElasticsearch(respond) as fake:
        options = dict(overrides)
        url = fake.url
        if "url_userinfo" in options:
            url = url.replace("http://", f"http://{options.pop('url_userinfo')}@")
        settings = Settings(es_url=url, **options)
        client = make_es_client(settings, max_retries=0)
        store = ElasticsearchStore(client, alias="fake", dim=DIM)
        with pytest.raises(es.AuthenticationException) as info:
            store.ensure_index()
        client.close()

    assert fake.requests, "the fake server was not called"
    assert {r[2].get("authorization") for r in fake.requests} == {expected_auth}
    for secret in (SECRET_PASSWORD, SECRET_API_KEY, expected_auth.split(" ", 1)[1]):
        assert secret not in str(info.value)
        assert secret not in repr(info.value)
        assert secret not in caplog.text
        assert secret not in repr(client)
        if "url_userinfo" not in overrides:
            # es_url is a plain str in Settings: credentials written into it show in the
            # settings' repr (SecretStr fields do not). Prefer es_username/es_password.
            assert secret not in repr(settings)
    assert "security_exception" in str(info.value)


@pytest.mark.usefixtures("no_es_credentials")
def test_unreachable_cluster_error_does_not_print_url_credentials(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    # Port 1 on loopback: connection refused at once.
    client = make_es_client(
        Settings(es_url=f"http://elastic:{SECRET_PASSWORD}@127.0.0.1:1"), max_retries=0
    )
    with pytest.raises(es.ConnectionError) as info:
        ElasticsearchStore(client, alias="x", dim=DIM).current_index()
    assert SECRET_PASSWORD not in str(info.value) + repr(info.value) + caplog.text


@pytest.mark.usefixtures("no_es_credentials")
def test_es_client_settings_pass_through_and_are_checked() -> None:
    import certifi

    client = make_es_client(
        Settings(
            es_url="https://es.example:9243",
            es_api_key=SECRET_API_KEY,
            es_ca_certs=Path(certifi.where()),
        )
    )
    node = client.transport.node_pool.get()
    assert (node.config.scheme, node.config.host, node.config.port) == ("https", "es.example", 9243)
    assert node.config.ca_certs == certifi.where()
    client.close()

    with pytest.raises(ValueError) as info:
        make_es_client(
            Settings(es_api_key=SECRET_API_KEY, es_username="elastic", es_password=SECRET_PASSWORD)
        )
    assert "es_api_key" in str(info.value)
    assert SECRET_API_KEY not in str(info.value) and SECRET_PASSWORD not in str(info.value)
    with pytest.raises(ValueError, match="es_password is set without es_username"):
        make_es_client(Settings(es_password=SECRET_PASSWORD))
    with pytest.raises(ValueError, match=r"\*\*\*@") as info:
        make_es_client(Settings(es_url=f"elastic:{SECRET_PASSWORD}@es.example:9200"))
    assert SECRET_PASSWORD not in str(info.value)


# --------------------------------------------------------------------------- CLI


@pytest.mark.integration
def test_index_cli_create_promote_list(es_url: str, es_client, unique_id) -> None:  # noqa: ANN001
    runner = CliRunner()
    alias = unique_id("lightmem-test-cli")
    env = {"LIGHTMEM_ES_URL": es_url}
    common = ["--alias", alias, "--dim", str(DIM)]
    v1, v2 = f"{alias}-v1", f"{alias}-v2"
    try:
        result = runner.invoke(index_cli.app, ["list", "--alias", alias, "--json"], env=env)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout) == {"alias": alias, "indices": []}

        for name in (v1, v2):
            result = runner.invoke(index_cli.app, ["create", name, *common], env=env)
            assert result.exit_code == 0, result.output
        result = runner.invoke(index_cli.app, ["create", v1, *common], env=env)
        assert result.exit_code == 1
        assert "already exists" in result.stderr

        result = runner.invoke(index_cli.app, ["promote", f"{alias}-v9", *common], env=env)
        assert result.exit_code == 1
        assert f"'{alias}-v9' does not exist" in result.stderr
        assert ElasticsearchStore(es_client, alias=alias, dim=DIM).current_index() is None

        assert runner.invoke(index_cli.app, ["promote", v1, *common], env=env).exit_code == 0
        store = ElasticsearchStore(es_client, alias=alias, dim=DIM, refresh=True)
        store.upsert([entry("a", unit(1)), entry("b", unit(0, 1))])
        result = runner.invoke(index_cli.app, ["promote", v2, *common], env=env)
        assert result.exit_code == 0, result.output
        assert f"was {v1}" in result.stderr
        assert store.current_index() == v2

        result = runner.invoke(index_cli.app, ["list", "--alias", alias, "--json"], env=env)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["indices"] == [
            {"index": v1, "docs": 2, "dims": DIM, "alias": False},
            {"index": v2, "docs": 0, "dims": DIM, "alias": True},
        ]
        table = runner.invoke(index_cli.app, ["list", "--alias", alias], env=env)
        assert table.exit_code == 0 and v2 in table.stdout and "*" in table.stdout

        # Promoting an index of another dimension is refused; the alias stays.
        wrong = runner.invoke(index_cli.app, ["promote", v1, "--alias", alias], env=env)
        assert wrong.exit_code == 1 and "dims=8" in wrong.stderr
        assert store.current_index() == v2
    finally:
        for name in (v1, v2):
            es_client.indices.delete(index=name, ignore_unavailable=True)


@pytest.mark.usefixtures("no_es_credentials")
def test_index_cli_usage_and_connection_errors() -> None:
    runner = CliRunner()
    result = runner.invoke(index_cli.app, ["create", "x-v1", "--dim", "0"])
    assert result.exit_code == 2
    url = f"http://elastic:{SECRET_PASSWORD}@127.0.0.1:1"
    result = runner.invoke(index_cli.app, ["list", "--es-url", url])
    assert result.exit_code == 1
    assert "cannot reach http://***@127.0.0.1:1" in result.stderr
    assert SECRET_PASSWORD not in result.output
    result = runner.invoke(
        index_cli.app, ["list"], env={"LIGHTMEM_ES_API_KEY": "k", "LIGHTMEM_ES_USERNAME": "u"}
    )
    assert result.exit_code == 2 and "es_api_key" in result.stderr


class _RacingClient:
    """The Elasticsearch client, except that right after each search another writer (as the
    index sink retiring a stream event) deletes the first document it found."""

    def __init__(self, client: Any, index: str) -> None:
        self._client, self._index = client, index
        self.raced: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def search(self, **kwargs: Any) -> Any:
        found = self._client.search(**kwargs)
        hits = found["hits"]["hits"]
        if hits:
            self._client.delete(index=self._index, id=hits[0]["_id"], refresh=True)
            self.raced.append(hits[0]["_id"])
        return found


@pytest.mark.integration
def test_erasure_by_search_takes_a_document_deleted_meanwhile_as_erased(  # noqa: ANN001
    es_stores, es_client  # noqa: ANN001
) -> None:
    """The erasure's search + bulk-delete rounds (clusters without ``_delete_by_query``): a
    document gone between the search and the delete is erased already, not a failure; a
    round where every delete raced is followed by another search, which finds nothing."""
    from lightmem.streams.erasure.es_sink import _delete_by_search, _scope_query

    store = es_stores()
    store.bulk_create([entry("a", unit(1)), entry("b", unit(0, 1)),
                       entry("c", unit(1, 1), user="bob")])
    [index] = store.alias_indices()
    racing = _RacingClient(es_client, index)
    assert _delete_by_search(racing, index, _scope_query("acme", "alice")) == 1
    assert len(racing.raced) == 1  # the second search found nothing left
    assert sorted(e.id for e in store.iter_entries()) == ["c"]
    # Only the racer's delete in a round: nothing deleted here, and no error.
    store.bulk_create([entry("d", unit(1))])
    racing.raced.clear()
    assert _delete_by_search(racing, index, _scope_query("acme", "alice")) == 0
    assert racing.raced == ["d"] and sorted(e.id for e in store.iter_entries()) == ["c"]
