"""``lightmem.Memory``: the memory in-process (embedded runtime), with the methods and return
types of :class:`~lightmem.service.client.MemoryClient`, so code moves from a laptop to the
cluster unchanged::

    from lightmem import Memory, MemoryClient

    memory = Memory(data_dir=".lightmem")            # or MemoryClient(url, api_key=...)
    memory.add([{"role": "user", "content": "I adopted a dog named Pepper."}],
               user_id="alice", flush=True)
    hits = memory.search("what is my dog called", user_id="alice")

Errors are those of :mod:`lightmem.service.errors` (``NotFound``, ``InvalidInput``, ...).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lightmem.settings import Settings, load_settings

from .errors import InvalidInput
from .models import (
    AddRequest,
    AddResponse,
    AnswerRequest,
    AnswerResponse,
    ChangeItem,
    DeleteAllResponse,
    DeleteResponse,
    MemoryItem,
    MessageIn,
    Retrieval,
    SearchHit,
    SearchRequest,
)

__all__ = ["Memory", "Messages"]

#: Messages as dicts (``{"role", "content", "timestamp"?, ...}``) or :class:`MessageIn`.
Messages = Sequence[Mapping[str, Any] | MessageIn]


def _validated(model: type, loc: str = "body", **fields: Any) -> Any:
    """``model(**fields)``, its validation errors as :class:`InvalidInput` (like a 422)."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise InvalidInput("invalid input", errors=[
            {"loc": [loc, *e["loc"]], "msg": e["msg"], "type": e["type"]}
            for e in exc.errors(include_url=False)]) from None


def _messages(messages: Messages) -> list[Any]:
    return [m.model_dump(exclude_none=True) if isinstance(m, MessageIn) else dict(m)
            for m in messages]


class Memory:
    """LightMem in this process over the embedded store.

    Args:
        data_dir: The data directory (default: ``settings.data_dir``, ``.lightmem``).
        tenant: The tenant every call acts for (default ``default``).
        settings: Configuration (default: from the environment).
    """

    def __init__(self, data_dir: Path | str | None = None, *, tenant: str = "default",
                 settings: Settings | None = None) -> None:
        from .backends import EmbeddedBackend
        from .core import MemoryService

        settings = settings or load_settings()
        if data_dir is not None:
            settings = settings.model_copy(update={"data_dir": Path(data_dir)})
        self.tenant = tenant
        self._service = MemoryService(EmbeddedBackend(settings), settings)

    def close(self) -> None:
        self._service.close()

    def __enter__(self) -> Memory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, messages: Messages, *, user_id: str, conversation_id: str | None = None,
            session_id: str | None = None, flush: bool = False,
            wait_searchable_s: float | None = None) -> AddResponse:
        """Add chat turns to ``user_id``'s memory (see ``POST /v1/memories``);
        ``wait_searchable_s`` is ``?wait=searchable&timeout_s=...``."""
        request = _validated(AddRequest, user=user_id, conversation=conversation_id,
                             session=session_id, messages=_messages(messages), flush=flush)
        return self._service.add(self.tenant, request, wait_s=wait_searchable_s)

    def search(self, query: str, *, user_id: str, k: int = 20,
               conversation_id: str | None = None, after: datetime | None = None,
               before: datetime | None = None, retrieval: Retrieval = None,
               include_events: bool = True, hybrid: bool = False) -> list[SearchHit]:
        """``user_id``'s memories nearest to ``query``, best first; ``retrieval`` ``knn``
        or ``hybrid`` (None: the configured ``retrieval``; ``hybrid=True`` is the old
        spelling of ``retrieval="hybrid"``)."""
        request = _validated(SearchRequest, user=user_id, query=query, k=k,
                             conversation=conversation_id, after=after, before=before,
                             retrieval=retrieval, hybrid=hybrid,
                             include_events=include_events)
        return self._service.search(self.tenant, request).results

    def answer(self, question: str, *, user_id: str, k: int = 20,
               retrieval: Retrieval = None) -> AnswerResponse:
        """Answer ``question`` from ``user_id``'s memories."""
        request = _validated(AnswerRequest, user=user_id, question=question, k=k,
                             retrieval=retrieval)
        return self._service.answer(self.tenant, request)

    def get_all(self, *, user_id: str, page_size: int = 100, include_events: bool = True
                ) -> Iterator[MemoryItem]:
        """Every memory of ``user_id``, oldest first (pages through all of them), with the
        turns not summarized yet as provisional events unless ``include_events=False``."""
        cursor = None
        while True:
            page = self._service.list(self.tenant, user_id, limit=page_size, cursor=cursor,
                                      include_events=include_events)
            yield from page.results
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def get(self, memory_id: str) -> MemoryItem:
        """One memory (``NotFound`` when it is not this tenant's)."""
        return self._service.get(self.tenant, memory_id)

    def history(self, memory_id: str) -> list[ChangeItem]:
        """Every add/update/delete of one memory, oldest first."""
        return self._service.history(self.tenant, memory_id).results

    def delete(self, memory_id: str) -> DeleteResponse:
        """Delete one memory (a ``delete`` change is recorded)."""
        return self._service.delete(self.tenant, memory_id)

    def delete_all(self, *, user_id: str) -> DeleteAllResponse:
        """Delete all of ``user_id``'s memories; says what was not erased."""
        return self._service.delete_all(self.tenant, user_id)
