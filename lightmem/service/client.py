"""``lightmem.MemoryClient``: the memory service over HTTP, with the methods and return types
of :class:`~lightmem.service.sdk.Memory`.

httpx with explicit timeouts; 429 and 5xx answers (and connection failures) are retried up
to ``max_retries`` times, waiting what ``Retry-After`` says (capped at ``max_wait_s``) or an
exponential backoff. Other 4xx answers are not retried: they would fail the same way. Every
failure is one of :mod:`lightmem.service.errors` (``Unauthorized``, ``NotFound``,
``InvalidInput`` with pydantic's loc/msg, ``Conflict``, ``RateLimited``, ``Unavailable``,
``ServerError``); a service that cannot be reached at all raises ``Unavailable`` too.
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import httpx

from .errors import InvalidInput, Unavailable, error_for_status
from .models import (
    AddResponse,
    AnswerResponse,
    ChangeItem,
    DeleteAllResponse,
    DeleteResponse,
    HistoryResponse,
    MemoryItem,
    MemoryPage,
    Retrieval,
    SearchHit,
    SearchResponse,
)
from .sdk import Messages, _messages

__all__ = ["MemoryClient"]

_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class MemoryClient:
    """Client of ``lightmem serve``.

    Args:
        base_url: The service, e.g. ``http://127.0.0.1:8420``.
        api_key: The tenant's key (``lightmem keys create``); None for a dev-mode service.
        timeout: Seconds per request (default 30; connect 5).
        max_retries: Retries of 429/5xx answers and connection failures (default 3).
        max_wait_s: Longest wait between retries, whatever ``Retry-After`` says (default 30).
        transport: An httpx transport (tests).
        sleep: How to wait between retries (tests).
    """

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 30.0,
                 max_retries: int = 3, max_wait_s: float = 30.0,
                 transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers,
                                  timeout=httpx.Timeout(timeout, connect=min(5.0, timeout)),
                                  transport=transport)
        self.max_retries = max_retries
        self.max_wait_s = max_wait_s
        self._sleep = sleep

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> MemoryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing

    def _wait(self, attempt: int, response: httpx.Response | None) -> float:
        header = response.headers.get("Retry-After") if response is not None else None
        try:
            wait = float(header) if header is not None else 0.5 * 2 ** attempt
        except ValueError:
            wait = 0.5 * 2 ** attempt
        return min(max(wait, 0.0), self.max_wait_s)

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        for attempt in range(self.max_retries + 1):
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if attempt == self.max_retries:
                    raise Unavailable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
                self._sleep(self._wait(attempt, None))
                continue
            if response.status_code < 400:
                return response.json()
            if response.status_code in _RETRY_STATUSES and attempt < self.max_retries:
                self._sleep(self._wait(attempt, response))
                continue
            try:
                body = response.json()
            except ValueError:
                body = {"detail": response.text[:500]}
            retry = response.headers.get("Retry-After")
            raise error_for_status(response.status_code, body,
                                   retry_after=float(retry) if retry else None)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- the SDK

    def add(self, messages: Messages, *, user_id: str, conversation_id: str | None = None,
            session_id: str | None = None, flush: bool = False,
            wait_searchable_s: float | None = None) -> AddResponse:
        """Add chat turns to ``user_id``'s memory (see ``POST /v1/memories``);
        ``wait_searchable_s`` is ``?wait=searchable&timeout_s=...``."""
        body = {"user": user_id, "conversation": conversation_id, "session": session_id,
                "messages": _json(_messages(messages)), "flush": flush}
        params = ({} if wait_searchable_s is None
                  else {"wait": "searchable", "timeout_s": wait_searchable_s})
        extra: dict[str, Any] = {} if wait_searchable_s is None else {
            "timeout": httpx.Timeout(wait_searchable_s + self._http.timeout.read, connect=5.0)}
        return AddResponse.model_validate(self._request("POST", "/v1/memories", json=body,
                                                        params=params, **extra))

    def search(self, query: str, *, user_id: str, k: int = 20,
               conversation_id: str | None = None, after: datetime | None = None,
               before: datetime | None = None, retrieval: Retrieval = None,
               include_events: bool = True, hybrid: bool = False) -> list[SearchHit]:
        """``user_id``'s memories nearest to ``query``, best first; ``retrieval`` ``knn``
        or ``hybrid`` (None: the server's; ``hybrid=True`` is the old spelling of
        ``retrieval="hybrid"``)."""
        body: dict[str, Any] = {
            "user": user_id, "query": query, "k": k, "conversation": conversation_id,
            "after": _time(after), "before": _time(before), "retrieval": retrieval,
            "include_events": include_events}
        if hybrid:  # only when set: a server from before `retrieval` still understands it
            body["hybrid"] = True
        return SearchResponse.model_validate(
            self._request("POST", "/v1/search", json=body)).results

    def answer(self, question: str, *, user_id: str, k: int = 20,
               retrieval: Retrieval = None) -> AnswerResponse:
        """Answer ``question`` from ``user_id``'s memories."""
        body: dict[str, Any] = {"user": user_id, "question": question, "k": k}
        if retrieval is not None:
            body["retrieval"] = retrieval
        return AnswerResponse.model_validate(self._request("POST", "/v1/answer", json=body))

    def get_all(self, *, user_id: str, page_size: int = 100, include_events: bool = True
                ) -> Iterator[MemoryItem]:
        """Every memory of ``user_id``, oldest first (pages through all of them), with the
        turns not summarized yet as provisional events unless ``include_events=False``."""
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"user": user_id, "limit": page_size,
                                      "include_events": include_events}
            if cursor is not None:
                params["cursor"] = cursor
            page = MemoryPage.model_validate(self._request("GET", "/v1/memories",
                                                           params=params))
            yield from page.results
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def get(self, memory_id: str) -> MemoryItem:
        """One memory (``NotFound`` when it is not this tenant's)."""
        return MemoryItem.model_validate(self._request("GET", f"/v1/memories/{_seg(memory_id)}"))

    def history(self, memory_id: str) -> list[ChangeItem]:
        """Every add/update/delete of one memory, oldest first."""
        return HistoryResponse.model_validate(
            self._request("GET", f"/v1/memories/{_seg(memory_id)}/history")).results

    def delete(self, memory_id: str) -> DeleteResponse:
        """Delete one memory (a ``delete`` change is recorded)."""
        return DeleteResponse.model_validate(
            self._request("DELETE", f"/v1/memories/{_seg(memory_id)}"))

    def delete_all(self, *, user_id: str) -> DeleteAllResponse:
        """Delete all of ``user_id``'s memories; says what was not erased."""
        return DeleteAllResponse.model_validate(
            self._request("DELETE", "/v1/memories", params={"user": user_id}))


def _time(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()


def _json(messages: list[Any]) -> list[Any]:
    out = []
    for m in messages:
        m = dict(m)
        if isinstance(m.get("timestamp"), datetime):
            m["timestamp"] = m["timestamp"].isoformat()
        out.append(m)
    return out


def _seg(memory_id: str) -> str:
    """``memory_id`` as one path segment (quoted: it cannot reach another route)."""
    if not memory_id:
        raise InvalidInput("not a memory id: ''", loc=("memory_id",))
    return urllib.parse.quote(memory_id, safe="")
