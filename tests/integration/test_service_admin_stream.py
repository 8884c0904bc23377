"""The ops routes on ``lightmem serve --stream`` (real Kafka and Elasticsearch): an admin key
counts tenants, erases one user of one tenant through the stream erasure (the one of
``lightmem forget --stream``) and reads the erasure's status; tenant keys see the result."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from service_server import Server, start_server, stop_server

from lightmem.service.auth import create_key
from lightmem.settings import Settings

pytest.importorskip("confluent_kafka")
pytest.importorskip("elasticsearch")

from lightmem.streams.elastic.store import ElasticsearchStore  # noqa: E402
from lightmem.streams.kafka.topics import Topics  # noqa: E402

from .test_service_stream import _env, deployment  # noqa: E402, F401 - the seeded deployment

pytestmark = [pytest.mark.integration, pytest.mark.models]


@pytest.fixture
def served(deployment: tuple[Settings, Topics, ElasticsearchStore], tmp_path: Path  # noqa: F811
           ) -> Iterator[tuple[Server, dict[str, str]]]:
    settings, _, _ = deployment
    keys_file = tmp_path / "keys.json"
    keys = {"a": create_key(keys_file, "tenant-a")[0], "b": create_key(keys_file, "tenant-b")[0],
            "admin": create_key(keys_file, None, admin=True)[0]}
    server = start_server(["--stream", "--alias", settings.es_alias, "--keys-file",
                           str(keys_file), "--data-dir", str(tmp_path)],
                          env=_env(settings), log=tmp_path / "serve.log")
    try:
        yield server, keys
    finally:
        stop_server(server)


def test_admin_erases_a_user_on_the_stream(served: tuple[Server, dict[str, str]]) -> None:
    server, keys = served

    def client(key: str) -> httpx.Client:
        return httpx.Client(base_url=server.url, timeout=120.0,
                            headers={"Authorization": f"Bearer {key}"})

    with client(keys["a"]) as a, client(keys["b"]) as b, client(keys["admin"]) as admin:
        tenants = admin.get("/v1/admin/tenants")
        assert tenants.status_code == 200, tenants.text
        assert tenants.json()["tenants"] == [
            {"tenant": "tenant-a", "users": 1, "memories": 3},
            {"tenant": "tenant-b", "users": 1, "memories": 1}]
        assert a.get("/v1/admin/tenants").status_code == 403
        assert admin.post("/v1/search", json={"user": "alice", "query": "dog"}
                          ).status_code == 403

        r = admin.post("/v1/admin/erasures", json={"tenant": "tenant-a", "user": "alice"})
        assert r.status_code == 200, r.text
        report = r.json()
        assert report["tenant"] == "tenant-a" and report["user"] == "alice" and report["found"]
        es = next(s for s in report["sinks"] if s["sink"] == "elasticsearch")
        assert es["removed"].get("memories") == 3, report
        # No ingest worker runs here: its buffers cannot confirm, and the report says so.
        assert any(line.startswith("turns:") for line in report["not_erased"]), report

        for kw in ({"retrieval": "knn"}, {"retrieval": "hybrid"}):
            hits = a.post("/v1/search", json={"user": "alice", "query": "dog", **kw})
            assert hits.status_code == 200 and hits.json()["results"] == [], hits.text
        other = b.post("/v1/search", json={"user": "alice", "query": "dog"})
        assert [h["text"] for h in other.json()["results"]] == ["alice: My dog is called Rex."]

        status = admin.get("/v1/admin/erasures", params={"tenant": "tenant-a", "user": "alice"})
        assert status.status_code == 200, status.text
        assert status.json()["erasure_id"] == report["erasure_id"]
        assert admin.get("/v1/admin/erasures", params={"tenant": "tenant-b", "user": "alice"}
                         ).status_code == 404
