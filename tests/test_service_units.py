"""The service's parts without models or a server: OpenAPI document, keys, rate limit,
error mapping, and the HTTP client's retries."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from lightmem.ops.cli import app as cli
from lightmem.service import (
    Auth,
    InvalidInput,
    KeyRing,
    MemoryClient,
    NotFound,
    RateLimited,
    RateLimiter,
    Unavailable,
    create_app,
    create_key,
)
from lightmem.service.models import MemoryPage
from lightmem.service.openapi import OPENAPI_PATH, render_openapi


def test_checked_in_openapi_matches_the_app() -> None:
    assert OPENAPI_PATH.read_text() == render_openapi(), "run `lightmem openapi export`"
    doc = json.loads(OPENAPI_PATH.read_text())
    for path in ("/v1/memories", "/v1/memories/{memory_id}", "/v1/memories/{memory_id}/history",
                 "/v1/search", "/v1/answer", "/add", "/search", "/health", "/ready"):
        assert path in doc["paths"], path
    assert CliRunner().invoke(cli, ["openapi", "check"]).exit_code == 0


def test_keys_are_stored_hashed_and_bound_to_a_tenant(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    key_a, rec_a = create_key(path, "acme")
    key_b, _ = create_key(path, "globex")
    text = path.read_text()
    assert key_a not in text and key_a.split("_", 2)[2] not in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    ring = KeyRing.load(path)
    assert len(ring) == 2
    assert ring.authenticate(key_a).tenant == "acme"  # type: ignore[union-attr]
    assert ring.authenticate(key_b).tenant == "globex"  # type: ignore[union-attr]
    forged = f"lmk_{rec_a.key_id}_{key_b.split('_', 2)[2]}"
    assert ring.authenticate(forged) is None
    assert ring.authenticate("garbage") is None and ring.authenticate("") is None


def test_keys_create_prints_the_key_once(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    result = CliRunner().invoke(cli, ["keys", "create", "--tenant", "acme", "--keys-file",
                                      str(path)])
    assert result.exit_code == 0, result.output
    key = result.stdout.strip()
    assert key.startswith("lmk_") and KeyRing.load(path).authenticate(key) is not None


def test_rate_limiter_token_bucket() -> None:
    now = [0.0]
    limiter = RateLimiter(2.0, 3, clock=lambda: now[0])
    assert [limiter.take("k") for _ in range(3)] == [None, None, None]
    assert limiter.take("k") == pytest.approx(0.5)
    assert limiter.take("other") is None  # per key
    now[0] += 0.5
    assert limiter.take("k") is None
    assert RateLimiter(0, 1).take("k") is None  # 0 = no limit


class _FakeService:
    def list(self, tenant: str, user: str, *, limit: int, cursor: str | None,
             include_events: bool = False) -> MemoryPage:
        return MemoryPage(results=[], next_cursor=None)

    def get(self, tenant: str, memory_id: str) -> Any:
        raise NotFound(f"no memory {memory_id!r}", loc=("path", "memory_id"))


def _app(tmp_path: Path, rate: float = 0.0, burst: int = 1) -> tuple[TestClient, str]:
    key, _ = create_key(tmp_path / "keys.json", "acme")
    auth = Auth(keys=KeyRing.load(tmp_path / "keys.json"), limiter=RateLimiter(rate, burst))
    app = create_app(None, auth)
    app.state.service = _FakeService()
    return TestClient(app), key


def test_rate_limit_answers_429_with_retry_after(tmp_path: Path) -> None:
    client, key = _app(tmp_path, rate=0.25, burst=2)
    headers = {"Authorization": f"Bearer {key}"}
    assert client.get("/v1/memories", params={"user": "u"}, headers=headers).status_code == 200
    assert client.get("/v1/memories", params={"user": "u"}, headers=headers).status_code == 200
    r = client.get("/v1/memories", params={"user": "u"}, headers=headers)
    assert r.status_code == 429 and r.headers["Retry-After"] == "4"
    assert r.json()["detail"][0]["type"] == "rate_limited"


def test_auth_errors_and_not_found_shape(tmp_path: Path) -> None:
    client, key = _app(tmp_path)
    r = client.get("/v1/memories/x")
    assert r.status_code == 401
    assert r.json() == {"detail": [{"loc": ["header", "authorization"], "msg": (
        "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"),
        "type": "unauthorized"}]}
    r = client.get("/v1/memories/x", headers={"X-API-Key": key})
    assert r.status_code == 404 and r.json()["detail"][0]["loc"] == ["path", "memory_id"]


def _client(handler: Any, sleeps: list[float], retries: int = 3) -> MemoryClient:
    return MemoryClient("http://memory.test", "lmk_x_y", transport=httpx.MockTransport(handler),
                        max_retries=retries, sleep=sleeps.append)


def test_client_retries_429_and_5xx_honouring_retry_after() -> None:
    answers = [httpx.Response(429, headers={"Retry-After": "2"}, json={"detail": []}),
               httpx.Response(503, json={"detail": []}),
               httpx.Response(200, json={"id": "m1", "deleted": True})]
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers.pop(0)

    sleeps: list[float] = []
    assert _client(handler, sleeps).delete("m1").id == "m1"
    assert sleeps == [2.0, 1.0] and len(seen) == 3
    assert seen[0].headers["Authorization"] == "Bearer lmk_x_y"


def test_client_typed_errors_without_retrying_4xx() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path.endswith("/missing"):
            return httpx.Response(404, json={"detail": [{"loc": ["path", "memory_id"],
                                                         "msg": "no memory", "type": "x"}]})
        if request.url.path == "/v1/search":
            return httpx.Response(422, json={"detail": [{"loc": ["body", "k"],
                                                         "msg": "too big", "type": "y"}]})
        return httpx.Response(503, json={"detail": []})

    sleeps: list[float] = []
    client = _client(handler, sleeps, retries=2)
    with pytest.raises(NotFound):
        client.get("missing")
    with pytest.raises(InvalidInput) as info:
        client.search("q", user_id="u", k=5)
    assert info.value.errors == [{"loc": ["body", "k"], "msg": "too big", "type": "y"}]
    assert calls == ["/v1/memories/missing", "/v1/search"] and sleeps == []
    with pytest.raises(Unavailable):
        client.history("m")
    assert sleeps == [0.5, 1.0]

    def rate_limited(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": "7"}, json={"detail": []})

    with pytest.raises(RateLimited) as limited:
        _client(rate_limited, [], retries=0).get("m")
    assert limited.value.retry_after == 7.0


def test_oversized_body_is_refused_before_it_is_read(tmp_path: Path) -> None:
    key, _ = create_key(tmp_path / "keys.json", "acme")
    app = create_app(None, Auth(keys=KeyRing.load(tmp_path / "keys.json"),
                                limiter=RateLimiter(0, 1)), max_body_bytes=1000)
    r = TestClient(app).post("/v1/memories", content=b"x" * 2000,
                             headers={"X-API-Key": key, "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["detail"][0]["loc"] == ["body"]


def test_serve_refuses_dev_mode_off_loopback(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "--data-dir",
                                      str(tmp_path)])
    assert result.exit_code == 1
    assert "no API keys" in result.stderr and "127.0.0.1 only" in result.stderr


def test_query_batcher_batches_concurrent_queries_in_order() -> None:
    import threading

    import numpy as np

    from lightmem.service.batching import QueryBatcher

    release = threading.Event()
    calls: list[list[str]] = []

    def embed(texts: list[str]) -> np.ndarray:
        calls.append(list(texts))
        if len(calls) == 1:
            release.wait(10)  # the first call blocks while the others queue up
        if "boom" in texts:
            raise RuntimeError("encoder failed")
        return np.array([[float(t.split()[-1]), 1.0] for t in texts])

    batcher = QueryBatcher(embed, max_batch=4)
    results: dict[int, object] = {}

    def ask(i: int) -> None:
        results[i] = batcher([f"query {i}"])[0][0]

    first = threading.Thread(target=ask, args=(0,))
    first.start()
    while not calls:
        threading.Event().wait(0.01)
    others = [threading.Thread(target=ask, args=(i,)) for i in range(1, 7)]
    for t in others:
        t.start()
    while batcher._queue.qsize() < 6:
        threading.Event().wait(0.01)
    release.set()
    for t in [first, *others]:
        t.join(10)
    assert results == {i: float(i) for i in range(7)}
    assert [len(c) for c in calls] == [1, 4, 2]  # 6 waiting queries: batches of 4 and 2
    assert batcher([f"q {i}" for i in (7, 8)]).tolist() == [[7.0, 1.0], [8.0, 1.0]]
    with pytest.raises(RuntimeError, match="encoder failed"):
        batcher(["boom"])
    batcher.close()


def test_admin_keys_have_no_tenant(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    admin_key, record = create_key(path, None, admin=True)
    tenant_key, _ = create_key(path, "acme")
    ring = KeyRing.load(path)
    admin = ring.authenticate(admin_key)
    assert admin is not None and admin.admin and admin.tenant is None and record.admin
    tenant = ring.authenticate(tenant_key)
    assert tenant is not None and not tenant.admin and tenant.tenant == "acme"
    for bad in ({"tenant": "acme", "admin": True}, {"tenant": None, "admin": False}):
        with pytest.raises(ValueError):
            create_key(path, bad["tenant"], admin=bad["admin"])  # type: ignore[arg-type]
    assert len(KeyRing.load(path)) == 2  # nothing written by the refused ones


def test_keys_create_admin_from_the_cli(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    result = CliRunner().invoke(cli, ["keys", "create", "--admin", "--keys-file", str(path)])
    assert result.exit_code == 0, result.output
    record = KeyRing.load(path).authenticate(result.stdout.strip())
    assert record is not None and record.admin and record.tenant is None
    listed = CliRunner().invoke(cli, ["keys", "list", "--keys-file", str(path)])
    assert "(admin)" in listed.stdout
    for args in ([], ["--admin", "--tenant", "acme"]):
        refused = CliRunner().invoke(cli, ["keys", "create", "--keys-file", str(path), *args])
        assert refused.exit_code == 2, refused.output
    assert len(KeyRing.load(path)) == 1


def test_items_show_what_render_text_says() -> None:
    """LIGHTMEM_RENDER_TEXT reaches the service's items: an extractive memory shows its
    source turn as said (default) or its compressed line."""
    from datetime import UTC, datetime

    from lightmem.schemas import EntryMode, MemoryEntry
    from lightmem.service.models import MemoryItem

    when = datetime(2024, 3, 5, 18, 0, tzinfo=UTC)
    entry = MemoryEntry(id="m1", tenant="acme", user="alice", conversation="c1", topic_id="t1",
                        speaker="alice", fact="alice: adopted dog Rex", event_time=when,
                        ingest_time=when, source_turn_ids=["turn-1"],
                        original_text="I adopted a dog, his name is Rex",
                        compressed_text="adopted dog Rex", mode=EntryMode.extractive)
    assert "I adopted a dog, his name is Rex" in MemoryItem.of(entry).rendered
    assert "I adopted a dog" not in MemoryItem.of(entry, "compressed").rendered
    assert "adopted dog Rex" in MemoryItem.of(entry, "compressed").rendered
