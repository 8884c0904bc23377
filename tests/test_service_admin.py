"""The admin key and the ops routes, and the per-request retrieval mode, on a real
``lightmem serve`` process (embedded store) called over HTTP.

An admin key is bound to no tenant: it calls ``/v1/admin/...`` only (a tenant route answers
it 403), a tenant's key gets 403 on the ops routes, and the tenant an ops route acts on is
named in its request. One server for the module; every test uses its own users.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest
from service_server import Server, start_server, stop_server

from lightmem.service import Forbidden, MemoryClient
from lightmem.service.auth import create_key

pytestmark = pytest.mark.models

FACTS = [
    "I adopted a dog named Pepper last week.",
    "My sister Clara lives in Lisbon and works as an architect.",
    "I am training for the Berlin marathon in September.",
    "My favourite food is mushroom risotto.",
]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    path = tmp_path_factory.mktemp("keys") / "api-keys.json"
    return {"path": str(path), "a": create_key(path, "tenant-a")[0],
            "b": create_key(path, "tenant-b")[0],
            "admin": create_key(path, None, admin=True)[0]}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, str]
           ) -> Iterator[Server]:
    data = tmp_path_factory.mktemp("serve-admin")
    # The server's default retrieval is hybrid: a request must be able to force kNN.
    srv = start_server(["--data-dir", str(data), "--keys-file", keys["path"], "--rate", "0"],
                       log=data / "serve.log", env={"LIGHTMEM_RETRIEVAL": "hybrid"})
    yield srv
    assert stop_server(srv) in (0, -15), srv.output()


def _client(server: Server, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=120.0)


def _user() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"


def _add(client: httpx.Client, user: str, texts: list[str] = FACTS) -> dict:
    r = client.post("/v1/memories", json={
        "user": user, "conversation": "c1", "session": "s1", "flush": True,
        "messages": [{"role": "user", "content": t,
                      "timestamp": f"2024-03-04T18:0{i}:00+00:00"}
                     for i, t in enumerate(texts)]})
    assert r.status_code == 200, r.text
    return r.json()


def _ids(client: httpx.Client, user: str) -> list[str]:
    r = client.get("/v1/memories", params={"user": user, "limit": 1000})
    assert r.status_code == 200, r.text
    return [m["id"] for m in r.json()["results"]]


def _forbidden(r: httpx.Response) -> None:
    assert r.status_code == 403, (r.request.method, r.request.url, r.text)
    detail = r.json()["detail"]
    assert detail and detail[0]["type"] == "forbidden" and detail[0]["msg"]


def test_the_admin_key_has_no_tenant_data(server: Server, keys: dict[str, str]) -> None:
    user = _user()
    with _client(server, keys["a"]) as a, _client(server, keys["admin"]) as admin:
        _add(a, user)
        memory_id = _ids(a, user)[0]
        for method, path, kwargs in [
            ("POST", "/v1/search", {"json": {"user": user, "query": "dog"}}),
            ("POST", "/v1/answer", {"json": {"user": user, "question": "dog?"}}),
            ("GET", "/v1/memories", {"params": {"user": user}}),
            ("POST", "/v1/memories", {"json": {"user": user, "messages": [
                {"role": "user", "content": "written by an admin key"}]}}),
            ("DELETE", "/v1/memories", {"params": {"user": user}}),
            ("GET", f"/v1/memories/{memory_id}", {}),
            ("GET", f"/v1/memories/{memory_id}/history", {}),
            ("DELETE", f"/v1/memories/{memory_id}", {}),
            ("POST", "/add", {"json": {"request_id": "r1", "user_id": user,
                                       "session_id": "s", "messages": [
                                           {"role": "user", "content": "hi"}]}}),
            ("POST", "/search", {"json": {"user_id": user, "query": "dog"}}),
        ]:
            _forbidden(admin.request(method, path, **kwargs))
        # Nothing was read, written or deleted through it.
        assert len(_ids(a, user)) == len(FACTS)
        assert memory_id in _ids(a, user)
    # The SDK raises the same error type.
    with MemoryClient(server.url, api_key=keys["admin"], max_retries=0) as sdk, \
            pytest.raises(Forbidden):
        sdk.search("dog", user_id=user)


def test_tenant_keys_get_403_on_ops_routes_and_no_key_401(server: Server,
                                                          keys: dict[str, str]) -> None:
    calls = [("GET", "/v1/admin/tenants", {}),
             ("GET", "/v1/admin/erasures", {"params": {"tenant": "tenant-a", "user": "x"}}),
             ("POST", "/v1/admin/erasures", {"json": {"tenant": "tenant-b", "user": "x"}})]
    with _client(server, keys["a"]) as a:
        for method, path, kwargs in calls:
            _forbidden(a.request(method, path, **kwargs))
    with _client(server, None) as anonymous, _client(server, "lmk_0_nope") as wrong:
        for method, path, kwargs in calls:
            assert anonymous.request(method, path, **kwargs).status_code == 401
            assert wrong.request(method, path, **kwargs).status_code == 401


def test_admin_erases_one_user_of_one_tenant(server: Server, keys: dict[str, str]) -> None:
    user, other = _user(), _user()
    with _client(server, keys["a"]) as a, _client(server, keys["b"]) as b, \
            _client(server, keys["admin"]) as admin:
        _add(a, user)
        _add(a, other)
        _add(b, user)  # the same user name in another tenant: not the same person
        stats = admin.get("/v1/admin/tenants")
        assert stats.status_code == 200, stats.text
        by_tenant = {t["tenant"]: t for t in stats.json()["tenants"]}
        assert by_tenant["tenant-a"]["memories"] >= 2 * len(FACTS)
        assert by_tenant["tenant-a"]["users"] >= 2 and by_tenant["tenant-b"]["users"] >= 1

        # No erasure recorded yet: 404.
        none = admin.get("/v1/admin/erasures", params={"tenant": "tenant-a", "user": user})
        assert none.status_code == 404, none.text

        r = admin.post("/v1/admin/erasures", json={"tenant": "tenant-a", "user": user,
                                                   "reason": "ticket 42"})
        assert r.status_code == 200, r.text
        report = r.json()
        assert report["tenant"] == "tenant-a" and report["user"] == user
        assert report["confirmed"] is True and report["found"] is True
        sinks = {s["sink"]: s for s in report["sinks"]}
        assert sinks["memories"]["removed"]["memories"] == len(FACTS)

        # Gone for tenant A; tenant A's other user and tenant B's same-named user untouched.
        assert _ids(a, user) == []
        hits = a.post("/v1/search", json={"user": user, "query": "dog named Pepper"})
        assert hits.status_code == 200 and hits.json()["results"] == []
        assert len(_ids(a, other)) == len(FACTS)
        assert len(_ids(b, user)) == len(FACTS)

        status = admin.get("/v1/admin/erasures", params={"tenant": "tenant-a", "user": user})
        assert status.status_code == 200, status.text
        assert status.json()["erasure_id"] == report["erasure_id"]
        assert status.json()["confirmed"] is True
        # Tenant B has no erasure of that user.
        other_tenant = admin.get("/v1/admin/erasures",
                                 params={"tenant": "tenant-b", "user": user})
        assert other_tenant.status_code == 404


def test_admin_erasure_input_is_checked(server: Server, keys: dict[str, str]) -> None:
    with _client(server, keys["admin"]) as admin:
        for body, field in [({"tenant": "tenant-a"}, "body"),  # no user, no whole_tenant
                            ({"user": "x"}, "tenant"),
                            ({"tenant": "tenant-a", "user": "x", "whole_tenant": True},
                             "body"),
                            ({"tenant": " ", "user": "x"}, "tenant"),
                            ({"tenant": "tenant-a", "user": "x", "extra": 1}, "extra")]:
            r = admin.post("/v1/admin/erasures", json=body)
            assert r.status_code == 422, (body, r.text)
            assert any(field in [str(p) for p in e["loc"]] for e in r.json()["detail"]), r.text
        missing = admin.get("/v1/admin/erasures", params={"user": "x"})
        assert missing.status_code == 422


def test_a_search_chooses_its_retrieval_mode(server: Server, keys: dict[str, str]) -> None:
    user = _user()
    query = "I adopted a dog named Pepper last week."
    with _client(server, keys["a"]) as a:
        _add(a, user)

        def scores(**extra: object) -> list[float]:
            r = a.post("/v1/search", json={"user": user, "query": query, "k": 4, **extra})
            assert r.status_code == 200, r.text
            hits = r.json()["results"]
            assert "Pepper" in hits[0]["text"]
            return [h["score"] for h in hits]

        # kNN: cosine similarities, the same words scoring high; hybrid (the server's
        # default here): reciprocal-rank-fusion scores, at most 1 / (rrf_k + 1) <= 0.5.
        knn = scores(retrieval="knn")
        assert knn[0] > 0.6 and knn == sorted(knn, reverse=True)
        hybrid = scores(retrieval="hybrid")
        assert max(hybrid) <= 0.5
        assert scores() == hybrid  # null: the server's setting
        assert scores(hybrid=True) == hybrid  # the old flag still works
        for bad in ({"retrieval": "bm25"}, {"retrieval": "knn", "hybrid": True}):
            r = a.post("/v1/search", json={"user": user, "query": query, **bad})
            assert r.status_code == 422, r.text
    with MemoryClient(server.url, api_key=keys["a"]) as sdk:
        by_sdk = sdk.search(query, user_id=user, k=4, retrieval="knn")
        assert [h.score for h in by_sdk] == pytest.approx(knn)
        assert [h.score for h in sdk.search(query, user_id=user, k=4)] == pytest.approx(hybrid)
