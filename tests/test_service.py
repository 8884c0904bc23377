"""The memory service as a real process on a free port, called over HTTP (embedded store).

One server for the module (its model loads once); every test uses its own users, so the
tests do not depend on each other's data.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest
from service_server import Server, start_server, stop_server

from lightmem.service.auth import create_key

pytestmark = pytest.mark.models


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    path = tmp_path_factory.mktemp("keys") / "api-keys.json"
    return {"path": str(path), "a": create_key(path, "tenant-a")[0],
            "b": create_key(path, "tenant-b")[0]}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, str]
           ) -> Iterator[Server]:
    data = tmp_path_factory.mktemp("serve")
    srv = start_server(["--data-dir", str(data), "--keys-file", keys["path"], "--rate", "0"],
                       log=data / "serve.log")
    yield srv
    # uvicorn shuts down on SIGTERM, then re-raises it: dying by the signal is a clean stop.
    assert stop_server(srv) in (0, -15), srv.output()


def _client(server: Server, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=120.0)


@pytest.fixture
def a(server: Server, keys: dict[str, str]) -> Iterator[httpx.Client]:
    with _client(server, keys["a"]) as c:
        yield c


@pytest.fixture
def b(server: Server, keys: dict[str, str]) -> Iterator[httpx.Client]:
    with _client(server, keys["b"]) as c:
        yield c


def _user() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"


FACTS = [
    "I adopted a dog named Pepper last week.",
    "My sister Clara lives in Lisbon and works as an architect.",
    "I am training for the Berlin marathon in September.",
    "My favourite food is mushroom risotto.",
    "I started learning the cello in January.",
    "Our team moved the office to Rotterdam.",
    "I am allergic to peanuts.",
]


def _add(client: httpx.Client, user: str, texts: list[str] = FACTS, **extra: object
         ) -> dict:
    body = {"user": user, "conversation": "c1", "session": "s1", "flush": True,
            "messages": [{"role": "user", "content": t,
                          "timestamp": f"2024-03-04T18:0{i % 10}:00+00:00"}
                         for i, t in enumerate(texts)], **extra}
    r = client.post("/v1/memories", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _all_ids(client: httpx.Client, user: str, limit: int) -> list[str]:
    ids, cursor, pages = [], None, 0
    while True:
        params = {"user": user, "limit": limit, **({"cursor": cursor} if cursor else {})}
        r = client.get("/v1/memories", params=params)
        assert r.status_code == 200, r.text
        page = r.json()
        ids += [m["id"] for m in page["results"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            return ids
        assert pages < 100


def test_health_ready_and_metrics(server: Server) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/ready")
    assert ready.status_code == 200 and ready.json() == {"ready": True,
                                                         "checks": {"store": "ok"}}
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'lightmem_http_requests_total{method="GET",route="/ready",status="200"}' in metrics
    assert "lightmem_http_request_seconds_bucket" in metrics


def test_add_search_list_get_delete_history(a: httpx.Client) -> None:
    user = _user()
    added = _add(a, user)
    assert added["status"] == "applied" and added["searchable"] is True
    assert added["memories"] == len(FACTS) and len(added["turn_ids"]) == len(FACTS)
    assert added["skipped"] == []
    # The same request again adds nothing (derived turn ids).
    again = _add(a, user)
    assert again["turn_ids"] == added["turn_ids"] and again["skipped"] == added["turn_ids"]
    assert again["memories"] == 0

    r = a.post("/v1/search", json={"user": user, "query": "what is my dog called?", "k": 3})
    assert r.status_code == 200, r.text
    hits = r.json()["results"]
    assert len(hits) == 3 and "Pepper" in hits[0]["text"]
    assert hits[0]["rendered"].startswith("[2024-03-04, Monday] ")
    assert hits[0]["kind"] == "memory" and hits[0]["source_turn_ids"] == [added["turn_ids"][0]]
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]

    # Filters: another conversation, a time range that excludes everything.
    r = a.post("/v1/search", json={"user": user, "query": "dog", "conversation": "other"})
    assert r.json()["results"] == []
    r = a.post("/v1/search", json={"user": user, "query": "dog",
                                   "after": "2025-01-01T00:00:00Z"})
    assert r.json()["results"] == []

    # Pages of 3 through 7 memories: no gap, no repeat, same set as one big page.
    paged = _all_ids(a, user, limit=3)
    assert len(paged) == len(set(paged)) == len(FACTS)
    assert paged == _all_ids(a, user, limit=100)

    memory_id = hits[0]["id"]
    got = a.get(f"/v1/memories/{memory_id}")
    assert got.status_code == 200 and got.json()["id"] == memory_id

    r = a.delete(f"/v1/memories/{memory_id}")
    assert r.status_code == 200 and r.json() == {"id": memory_id, "deleted": True}
    assert a.get(f"/v1/memories/{memory_id}").status_code == 404
    assert a.delete(f"/v1/memories/{memory_id}").status_code == 404
    history = a.get(f"/v1/memories/{memory_id}/history")
    assert history.status_code == 200, history.text
    assert [c["op"] for c in history.json()["results"]] == ["add", "delete"]
    assert memory_id not in _all_ids(a, user, limit=100)
    r = a.post("/v1/search", json={"user": user, "query": "what is my dog called?"})
    assert memory_id not in [h["id"] for h in r.json()["results"]]

    r = a.post("/v1/answer", json={"user": user, "question": "Where does my sister live?"})
    assert r.status_code == 200 and r.json()["mode"] == "extractive"
    assert "Lisbon" in r.json()["answer"]

    # Delete all = the erasure: memories, their history and the turn ledger of the user.
    r = a.request("DELETE", "/v1/memories", params={"user": user})
    assert r.status_code == 200, r.text
    wiped = r.json()
    assert wiped["deleted"] == len(FACTS) - 1 and wiped["confirmed"] is True
    sinks = {s["sink"]: s for s in wiped["sinks"]}
    assert sinks["history"]["removed"]["changes"] == len(FACTS) + 1  # 7 adds, 1 delete
    assert wiped["not_erased"] == ["llm usage: per (purpose, tenant) counts only, no text: kept"]
    assert _all_ids(a, user, limit=100) == []
    assert a.get(f"/v1/memories/{memory_id}/history").status_code == 404
    assert a.post("/v1/search", json={"user": user, "query": "dog"}).json()["results"] == []


def test_tenant_isolation(a: httpx.Client, b: httpx.Client, server: Server) -> None:
    user = _user()
    added = _add(a, user, FACTS[:3])
    assert added["memories"] == 3
    ids = _all_ids(a, user, limit=100)
    assert len(ids) == 3
    target = ids[0]

    # B cannot read, list, search, get, history or delete A's memories, by id or by user.
    assert b.get(f"/v1/memories/{target}").status_code == 404
    assert b.get(f"/v1/memories/{target}/history").status_code == 404
    assert b.delete(f"/v1/memories/{target}").status_code == 404
    assert _all_ids(b, user, limit=100) == []
    r = b.post("/v1/search", json={"user": user, "query": "dog"})
    assert r.status_code == 200 and r.json()["results"] == []
    r = b.request("DELETE", "/v1/memories", params={"user": user})
    assert r.status_code == 200 and r.json()["deleted"] == 0
    assert all(s["found"] == 0 for s in r.json()["sinks"])
    for guess in (uuid.uuid4().hex, "0" * 32, "../" + target, target.upper()):
        assert b.get(f"/v1/memories/{guess}").status_code == 404
    # A body naming another tenant changes nothing: refused, nothing written anywhere.
    r = b.post("/v1/memories", json={"tenant": "tenant-a", "user": user,
                                     "messages": [{"role": "user", "content": "hijack"}]})
    assert r.status_code == 422
    assert {"loc": ["body", "tenant"], "msg": "Extra inputs are not permitted",
            "type": "extra_forbidden"} in r.json()["detail"]
    assert _all_ids(a, user, limit=100) == ids and _all_ids(b, user, limit=100) == []
    # A still has everything.
    assert a.get(f"/v1/memories/{target}").status_code == 200

    # Missing or invalid keys: 401, with the error list.
    with _client(server, None) as anon:
        r = anon.post("/v1/search", json={"user": user, "query": "dog"})
        assert r.status_code == 401 and r.json()["detail"][0]["type"] == "unauthorized"
        assert anon.get(f"/v1/memories/{target}").status_code == 401
        assert anon.post("/search", json={"user_id": user, "query": "dog"}).status_code == 401
    for bad in ("nope", "lmk_000000000000_forged", b.headers["Authorization"][7:] + "x"):
        with _client(server, bad) as forged:
            assert forged.get(f"/v1/memories/{target}").status_code == 401
    r = httpx.get(f"{server.url}/v1/memories/{target}",
                  headers={"X-API-Key": a.headers["Authorization"][7:]})
    assert r.status_code == 200  # X-API-Key works as well as the bearer token


def test_aml_contract(a: httpx.Client, b: httpx.Client) -> None:
    user = _user()
    body = {"request_id": f"req-{uuid.uuid4().hex[:8]}", "user_id": user, "session_id": "s1",
            "messages": [{"role": "user", "content": "I moved to Porto in 2021.",
                          "timestamp": "2023-05-08 13:56:00"},
                         {"role": "assistant", "content": "Porto is lovely!"}]}
    first = a.post("/add", json=body)
    assert first.status_code == 200, first.text
    assert first.json()["searchable"] is True and first.json()["memories"] == 2
    # Searchable as soon as /add returned.
    r = a.post("/search", json={"query": "where did I move?", "user_id": user, "top_k": 5})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert set(data[0]) == {"id", "content", "score", "created_at"}
    assert data[0]["content"] == "[2023-05-08, Monday] " + user + ": I moved to Porto in 2021."
    assert data[0]["created_at"].startswith("2023-05-08T13:56:00")
    # Same request id, same payload: the same answer, one set of turns.
    again = a.post("/add", json=body)
    assert again.status_code == 200 and again.json() == first.json()
    assert len(_all_ids(a, user, limit=100)) == 2
    # Same id, another payload: 409, nothing written.
    other = {**body, "messages": [{"role": "user", "content": "Something else."}]}
    r = a.post("/add", json=other)
    assert r.status_code == 409 and r.json()["detail"][0]["loc"] == ["body", "request_id"]
    assert len(_all_ids(a, user, limit=100)) == 2
    # Request ids are per tenant: B's same id is B's own request.
    assert b.post("/add", json=body).status_code == 200
    assert len(_all_ids(a, user, limit=100)) == 2
    r = a.post("/search", json={"query": "x", "user_id": user, "top_k": 1001})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "top_k"]


def test_wait_searchable_flushes_on_the_embedded_store(a: httpx.Client) -> None:
    user = _user()
    body = {"user": user, "messages": [{"role": "user", "content": "I collect old maps."}]}
    r = a.post("/v1/memories", params={"wait": "searchable", "timeout_s": 0}, json=body)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "timeout_s"]
    r = a.post("/v1/memories", params={"wait": "searchable"}, json=body)
    assert r.status_code == 200 and r.json()["searchable"] is True
    assert r.json()["memories"] == 1 and r.json()["not_searchable"] == []
    hits = a.post("/v1/search", json={"user": user, "query": "maps"}).json()["results"]
    assert [h["source_turn_ids"] for h in hits] == [r.json()["turn_ids"]]
    # The same undated words said again later are a new turn (not a retry).
    again = a.post("/v1/memories", params={"wait": "searchable"}, json=body).json()
    assert again["turn_ids"] != r.json()["turn_ids"] and again["skipped"] == []


def test_bad_input_is_4xx_and_writes_nothing(a: httpx.Client) -> None:
    user = _user()
    cases = [
        ("POST", "/v1/memories", {"content": b"{not json", "headers": {
            "Content-Type": "application/json"}}, 422, ["body", 1]),
        ("POST", "/v1/memories", {"json": {"messages": [{"role": "user", "content": "x"}]}},
         422, ["body", "user"]),
        ("POST", "/v1/memories", {"json": {"user": user, "messages": []}}, 422,
         ["body", "messages"]),
        ("POST", "/v1/memories", {"json": {"user": user, "messages": [
            {"role": "user", "content": "x" * 100_001}]}}, 422,
         ["body", "messages", 0, "content"]),
        ("POST", "/v1/memories", {"json": {"user": user, "messages": [
            {"role": "system", "content": "x"}]}}, 422, ["body", "messages", 0, "role"]),
        ("POST", "/v1/memories", {"json": {"user": user, "messages": [
            {"role": "user", "content": "future", "timestamp": "2999-01-01T00:00:00Z"}]}},
         422, ["body", "messages", 0, "timestamp"]),
        ("POST", "/v1/memories", {"json": {"user": "   ", "messages": [
            {"role": "user", "content": "x"}]}}, 422, ["body", "user"]),
        ("POST", "/v1/search", {"json": {"user": user, "query": "x", "k": 0}}, 422,
         ["body", "k"]),
        ("POST", "/v1/search", {"json": {"user": user, "query": "x", "k": 1001}}, 422,
         ["body", "k"]),
        ("GET", "/v1/memories", {"params": {"user": user, "limit": 0}}, 422,
         ["query", "limit"]),
        ("GET", "/v1/memories", {"params": {"user": user, "cursor": "garbage"}}, 422,
         ["query", "cursor"]),
        ("GET", "/v1/memories", {}, 422, ["query", "user"]),
        ("POST", "/add", {"json": {"request_id": "r", "user_id": user, "session_id": "s",
                                   "messages": [{"role": "user", "content": "x",
                                                 "timestamp": "yesterday"}]}}, 422,
         ["body", "messages", 0, "timestamp"]),
        ("GET", "/v1/nothing-here", {}, 404, []),
        ("PUT", "/v1/search", {"json": {}}, 405, []),
    ]
    for method, path, kwargs, status, loc in cases:
        r = a.request(method, path, **kwargs)
        assert r.status_code == status, (method, path, r.text)
        detail = r.json()["detail"]
        assert isinstance(detail, list) and all({"loc", "msg", "type"} <= set(e)
                                                for e in detail), r.text
        assert detail[0]["loc"] == loc, (path, detail)
    assert _all_ids(a, user, limit=100) == []


def test_unsummarized_turns_are_searchable_as_events_then_replaced(a: httpx.Client) -> None:
    user = _user()
    body = {"user": user, "conversation": "c1", "session": "s1", "messages": [
        {"role": "user", "content": "My parrot is called Kiwi.", "turn_id": "t1",
         "timestamp": "2024-06-03T08:00:00Z"},
        {"role": "user", "content": "I bake sourdough bread on Fridays.", "turn_id": "t2",
         "timestamp": "2024-06-03T08:01:00Z"}]}
    added = a.post("/v1/memories", json=body).json()
    assert added["memories"] == 0 and added["searchable"] is False  # still in the buffers
    r = a.post("/v1/search", json={"user": user, "query": "what is the parrot's name"})
    hits = r.json()["results"]
    assert [h["kind"] for h in hits] == ["event", "event"]
    assert hits[0]["id"].startswith("event:") and "Kiwi" in hits[0]["text"]
    assert hits[0]["source_turn_ids"] == [added["turn_ids"][0]]
    assert hits[0]["rendered"] == f"[2024-06-03, Monday] {user}: My parrot is called Kiwi."
    assert a.get(f"/v1/memories/{hits[0]['id']}").status_code == 404  # not a memory
    r = a.post("/v1/search", json={"user": user, "query": "parrot", "include_events": False})
    assert r.json()["results"] == []
    # List pages show them too (in event-time order, one per page here), unless excluded.
    listed, cursor = [], None
    while True:
        page = a.get("/v1/memories", params={"user": user, "limit": 1,
                                             **({"cursor": cursor} if cursor else {})}).json()
        listed += page["results"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [(m["kind"], m["source_turn_ids"]) for m in listed] == [
        ("event", ["t1"]), ("event", ["t2"])]
    assert a.get("/v1/memories", params={"user": user, "include_events": False}
                 ).json()["results"] == []
    r = a.post("/search", json={"user_id": user, "query": "parrot", "top_k": 1})
    assert r.json()["data"][0]["id"] == hits[0]["id"]
    # The flush summarizes them: the memories replace the events (same turns, no duplicate).
    done = a.post("/v1/memories", params={"wait": "searchable"},
                  json={**body, "messages": body["messages"][:1]}).json()
    assert added["turn_ids"] == ["t1", "t2"]
    assert done["skipped"] == ["t1"] and done["memories"] == 2
    r = a.post("/v1/search", json={"user": user, "query": "what is the parrot's name"})
    hits = r.json()["results"]
    assert [h["kind"] for h in hits] == ["memory", "memory"]
    assert sorted(t for h in hits for t in h["source_turn_ids"]) == sorted(added["turn_ids"])
    listed = a.get("/v1/memories", params={"user": user}).json()["results"]
    assert [m["kind"] for m in listed] == ["memory", "memory"]
