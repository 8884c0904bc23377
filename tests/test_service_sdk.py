"""The same SDK test body against ``lightmem.Memory`` (in-process) and ``lightmem.MemoryClient``
(HTTP, a real ``lightmem serve`` process in dev mode on 127.0.0.1)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from service_server import start_server, stop_server

from lightmem import Memory, MemoryClient
from lightmem.service import InvalidInput, NotFound
from lightmem.service.models import (
    AddResponse,
    AnswerResponse,
    ChangeItem,
    DeleteAllResponse,
    DeleteResponse,
    MemoryItem,
    SearchHit,
)
from lightmem.settings import Settings

pytestmark = pytest.mark.models


@pytest.fixture(scope="module", params=["Memory", "MemoryClient"])
def memory(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Any]:
    data = tmp_path_factory.mktemp(request.param)
    if request.param == "Memory":
        with Memory(settings=Settings(data_dir=data, compressor="none")) as m:
            yield m
        return
    # No keys file: dev mode, which the service allows on 127.0.0.1 only.
    server = start_server(["--data-dir", str(data)], log=data / "serve.log")
    assert "dev mode" in server.output()
    try:
        with MemoryClient(server.url, timeout=120.0) as client:
            yield client
    finally:
        stop_server(server)


def test_sdk(memory: Any) -> None:
    user = f"user-{uuid.uuid4().hex[:8]}"
    when = datetime(2024, 3, 4, 18, 5, tzinfo=UTC)
    texts = ["I adopted a dog named Pepper.", "My sister lives in Lisbon.",
             "I play the cello.", "I am allergic to peanuts.", "I run marathons."]
    added = memory.add([{"role": "user", "content": t, "timestamp": when} for t in texts],
                       user_id=user, conversation_id="c1", flush=True)
    assert isinstance(added, AddResponse) and added.memories == len(texts)

    hits = memory.search("what is the dog called", user_id=user, k=2)
    assert [type(h) for h in hits] == [SearchHit, SearchHit]
    assert "Pepper" in hits[0].text and hits[0].rendered.startswith("[2024-03-04, Monday]")
    assert memory.search("dog", user_id=user, conversation_id="other") == []

    answer = memory.answer("where does my sister live", user_id=user)
    assert isinstance(answer, AnswerResponse) and "Lisbon" in answer.answer

    everything = list(memory.get_all(user_id=user, page_size=2))
    assert all(isinstance(m, MemoryItem) for m in everything)
    assert len({m.id for m in everything}) == len(everything) == len(texts)

    one = memory.get(hits[0].id)
    assert isinstance(one, MemoryItem) and one.id == hits[0].id
    deleted = memory.delete(one.id)
    assert deleted == DeleteResponse(id=one.id)
    with pytest.raises(NotFound):
        memory.get(one.id)
    changes = memory.history(one.id)
    assert all(isinstance(c, ChangeItem) for c in changes)
    assert [c.op for c in changes] == ["add", "delete"]

    with pytest.raises(InvalidInput) as info:
        memory.search("x", user_id=user, k=0)
    assert info.value.errors[0]["loc"] == ["body", "k"]

    wiped = memory.delete_all(user_id=user)
    assert isinstance(wiped, DeleteAllResponse)
    assert wiped.deleted == len(texts) - 1 and wiped.confirmed
    assert list(memory.get_all(user_id=user)) == []
    with pytest.raises(NotFound):
        memory.history(one.id)  # the erasure removed the change history too
