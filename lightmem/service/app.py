"""The HTTP memory service: a FastAPI app over :class:`~lightmem.service.core.MemoryService`.

Routes (JSON; the OpenAPI document is ``lightmem/service/openapi.json``, checked in):

=========================================  ==================================================
``POST /v1/memories``                      add chat turns (200 embedded, 202 stream)
``POST /v1/search``                        search a user's memories
``POST /v1/answer``                        answer a question from them
``GET /v1/memories?user=U``                list them, oldest first, cursor pagination
``DELETE /v1/memories?user=U``             forget a user (the erasure, issue 14)
``GET /v1/memories/{id}``                  one memory
``GET /v1/memories/{id}/history``          its add/update/delete changes
``DELETE /v1/memories/{id}``               delete it (a ``delete`` change is recorded)
``POST /add``, ``POST /search``            the Agent Memory Leaderboard contract
``GET /health``, ``GET /ready``            liveness; readiness (store, and Kafka)
``GET /metrics``                           Prometheus
``/v1/admin/...``                          ops routes, admin keys only (:mod:`.admin`)
=========================================  ==================================================

The tenant of every ``/v1`` and AML route comes from the API key (``Authorization: Bearer``
or ``X-API-Key``; :mod:`lightmem.service.auth`), never from the path or the body: bodies
forbid unknown fields, so one naming a tenant is refused. An admin key has no tenant: those
routes answer it 403, and the ops routes answer a tenant's key 403. Errors are always
``{"detail": [{"loc", "msg", "type"}]}``; bad input is a 4xx and writes nothing.
Handlers are plain functions (FastAPI runs them in its thread pool): the stores and models
are blocking.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .admin import (
    AdminEraseRequest,
    ErasureReportResponse,
    TenantsResponse,
    admin_erase,
    admin_erasure_status,
    tenant_stats,
)
from .auth import KeyRing, RateLimiter
from .core import MAX_PAGE, MemoryService
from .errors import Forbidden, MemoryServiceError, RateLimited, Unauthorized
from .metrics import record_request, scrape
from .models import (
    AddRequest,
    AddResponse,
    AmlAddRequest,
    AmlAddResponse,
    AmlSearchRequest,
    AmlSearchResponse,
    AnswerRequest,
    AnswerResponse,
    DeleteAllResponse,
    DeleteResponse,
    ErrorResponse,
    HealthResponse,
    HistoryResponse,
    MemoryItem,
    MemoryPage,
    Name,
    ReadyResponse,
    SearchRequest,
    SearchResponse,
)

__all__ = ["Auth", "Caller", "create_app", "API_VERSION"]

log = logging.getLogger(__name__)

API_VERSION = "1.0.0"
#: The key id rate limits count dev-mode requests under.
DEV_KEY_ID = "dev"


@dataclass
class Auth:
    """How callers are identified.

    Args:
        keys: The configured API keys.
        limiter: Per-key rate limit.
        dev_tenant: Without keys: every request is this tenant (dev mode, 127.0.0.1 only;
            ``lightmem serve`` refuses it on another address), and may call the ops routes
            too (the one operator of a local service). None: keys are required.
    """

    keys: KeyRing
    limiter: RateLimiter
    dev_tenant: str | None = None


_api_key = APIKeyHeader(name="X-API-Key", auto_error=False,
                        description="An API key from `lightmem keys create`.")
_bearer = HTTPBearer(auto_error=False, description="The API key as a bearer token.")


@dataclass(frozen=True)
class Caller:
    """Who calls: the key's id, its tenant (None for an admin key) and whether it may call
    the ops routes."""

    key_id: str
    tenant: str | None
    admin: bool


def caller(
    request: Request,
    api_key: Annotated[str | None, Security(_api_key)] = None,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)] = None,
) -> Caller:
    """The caller, from its API key (401 without a valid one; 429 over its rate)."""
    auth: Auth = request.app.state.auth
    key = api_key or (bearer.credentials if bearer is not None else None)
    if auth.dev_tenant is not None:
        who = Caller(key_id=DEV_KEY_ID, tenant=auth.dev_tenant, admin=True)
    elif not key:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' or "
                           "'X-API-Key: <key>'", loc=("header", "authorization"))
    else:
        record = auth.keys.authenticate(key)
        if record is None:
            raise Unauthorized("invalid API key", loc=("header", "authorization"))
        who = Caller(key_id=record.key_id, tenant=record.tenant, admin=record.admin)
    wait = auth.limiter.take(who.key_id)
    if wait is not None:
        raise RateLimited(f"rate limit of this key exceeded: retry in {wait:.2f} s",
                          retry_after=wait)
    return who


def caller_tenant(who: Annotated[Caller, Depends(caller)]) -> str:
    """The caller's tenant, from its API key (the only source of a tenant); 403 for an
    admin key, which has none."""
    if who.tenant is None:
        raise Forbidden("an admin key has no tenant: its routes are /v1/admin/...; use a "
                        "tenant's key for its data", loc=("header", "authorization"))
    return who.tenant


def admin_caller(who: Annotated[Caller, Depends(caller)]) -> Caller:
    """The caller of an ops route: 403 unless its key is an admin key."""
    if not who.admin:
        raise Forbidden("an ops route: it needs an admin key (`lightmem keys create "
                        "--admin`)", loc=("header", "authorization"))
    return who


Tenant = Annotated[str, Depends(caller_tenant)]
Admin = Annotated[Caller, Depends(admin_caller)]


def _service(request: Request) -> MemoryService:
    return request.app.state.service


Service = Annotated[MemoryService, Depends(_service)]
User = Annotated[Name, Query(description="The end user whose memories these are.")]

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": what} for code, what in (
        (401, "No API key, or not a valid one"),
        (403, "A key that may not call this route (an admin key on tenant data, a "
              "tenant's key on an ops route)"),
        (422, "Invalid input: every problem with its loc and msg"),
        (429, "Rate limit exceeded (see Retry-After)"),
    )
}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "No such memory for this tenant"}}


def _error_body(errors: list[dict[str, Any]]) -> dict[str, Any]:
    return {"detail": [{"loc": list(e.get("loc", [])), "msg": str(e.get("msg", "")),
                        "type": str(e.get("type", "error"))} for e in errors]}


#: Largest request body (bytes): a session of chat turns fits many times over; bulk imports
#: go through ``lightmem produce`` / ``lightmem ingest``.
MAX_BODY_BYTES = 16 * 1024 * 1024


def create_app(service: MemoryService | None, auth: Auth, *,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The app serving ``service`` (None: routes only, e.g. to render the OpenAPI document).

    The service's models load in the app's lifespan, before the first request. A body
    declared larger than ``max_body_bytes`` is refused (413) before it is read.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if service is not None:
            await run_in_threadpool(service.warm_up)
        try:
            yield
        finally:
            if service is not None:
                service.close()

    app = FastAPI(
        title="LightMem memory service",
        version=API_VERSION,
        description="Long-term memory for LLM chat platforms: add turns, search and list a "
                    "user's memories. The tenant always comes from the API key.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.auth = auth

    # -- errors: always {"detail": [{loc, msg, type}]}, never a bare 500 for bad input

    @app.exception_handler(MemoryServiceError)
    async def _service_error(request: Request, exc: MemoryServiceError) -> JSONResponse:
        headers = None
        if isinstance(exc, RateLimited):
            headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
        return JSONResponse(_error_body(exc.errors), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # pydantic's loc/msg/type; the input is not echoed (it may be 100 KB of text).
        return JSONResponse(_error_body(list(exc.errors())), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(_error_body([{"loc": [], "msg": str(exc.detail),
                                          "type": "http_error"}]),
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(_error_body([{"loc": [], "msg": f"internal error: "
                                          f"{type(exc).__name__}", "type": "internal_error"}]),
                            status_code=500)

    @app.middleware("http")
    async def _metrics(request: Request,
                       call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        status = 500
        try:
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_body_bytes:
                status = 413
                return JSONResponse(_error_body([{
                    "loc": ["body"], "type": "too_large",
                    "msg": f"request body of {declared} bytes is larger than {max_body_bytes}"
                           " (send fewer messages per request)"}]), status_code=413)
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            record_request(getattr(route, "path", "<unmatched>"), request.method, status,
                           time.perf_counter() - started)

    # -- health

    @app.get("/health", response_model=HealthResponse, tags=["health"])
    def health() -> HealthResponse:
        """Liveness: the process answers."""
        return HealthResponse()

    @app.get("/ready", response_model=ReadyResponse, tags=["health"],
             responses={503: {"model": ReadyResponse, "description": "Not ready"}})
    def ready(service: Service, response: Response) -> ReadyResponse:
        """Readiness: the store answers (and, for the stream backend, Kafka and its topics)."""
        answer = service.ready()
        if not answer.ready:
            response.status_code = 503
        return answer

    @app.get("/metrics", response_class=PlainTextResponse, tags=["health"])
    def metrics() -> PlainTextResponse:
        """Prometheus text exposition of the process's metrics."""
        return PlainTextResponse(scrape(), media_type="text/plain; version=0.0.4")

    # -- /v1

    @app.post("/v1/memories", response_model=AddResponse, tags=["memories"],
              responses={**_ERRORS, 202: {"model": AddResponse,
                                          "description": "Queued (stream backend)"}})
    def add(
        body: AddRequest, tenant: Tenant, service: Service, response: Response,
        wait: Annotated[Literal["searchable"] | None, Query(
            description="searchable: flush the conversation and wait until the turns' "
                        "memories are searchable (or timeout_s says which are not)")] = None,
        timeout_s: Annotated[float, Query(gt=0, le=300, description="How long to wait")
                             ] = 30.0,
    ) -> AddResponse:
        """Add chat turns to a user's memory.

        Embedded: applied before the call returns (``flush`` makes their memories now).
        Stream: produced to the turns topic, 202 with the turn ids (200 when
        ``?wait=searchable`` saw all of them searchable).
        """
        answer = service.add(tenant, body, wait_s=timeout_s if wait else None)
        if answer.status == "queued" and not answer.searchable:
            response.status_code = 202
        return answer

    @app.post("/v1/search", response_model=SearchResponse, tags=["memories"],
              responses=_ERRORS)
    def search(body: SearchRequest, tenant: Tenant, service: Service) -> SearchResponse:
        """The user's memories nearest to the query, best first."""
        return service.search(tenant, body)

    @app.post("/v1/answer", response_model=AnswerResponse, tags=["memories"],
              responses=_ERRORS)
    def answer(body: AnswerRequest, tenant: Tenant, service: Service) -> AnswerResponse:
        """Answer from the user's memories (one LLM call when configured, else extractive)."""
        return service.answer(tenant, body)

    @app.get("/v1/memories", response_model=MemoryPage, tags=["memories"], responses=_ERRORS)
    def list_memories(
        user: User, tenant: Tenant, service: Service,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Page size")] = 100,
        cursor: Annotated[str | None, Query(max_length=4096,
                                            description="next_cursor of the page before")
                          ] = None,
        include_events: Annotated[bool, Query(
            description="Also the turns not summarized yet (provisional, kind event)")
        ] = True,
    ) -> MemoryPage:
        """One page of the user's memories, oldest first; follow ``next_cursor`` to the end."""
        return service.list(tenant, user, limit=limit, cursor=cursor,
                            include_events=include_events)

    @app.delete("/v1/memories", response_model=DeleteAllResponse, tags=["memories"],
                responses=_ERRORS)
    def delete_all(user: User, tenant: Tenant, service: Service) -> DeleteAllResponse:
        """Forget the user (the erasure: memories, history, buffers, turn ledger, dead
        letters, kept out of replays); the answer says what was not erased (yet)."""
        return service.delete_all(tenant, user)

    @app.get("/v1/memories/{memory_id}", response_model=MemoryItem, tags=["memories"],
             responses={**_ERRORS, **_NOT_FOUND})
    def get_memory(memory_id: str, tenant: Tenant, service: Service) -> MemoryItem:
        """One memory (404 when it is not this tenant's)."""
        return service.get(tenant, memory_id)

    @app.get("/v1/memories/{memory_id}/history", response_model=HistoryResponse,
             tags=["memories"], responses={**_ERRORS, **_NOT_FOUND})
    def history(memory_id: str, tenant: Tenant, service: Service) -> HistoryResponse:
        """Every add/update/delete of one memory, oldest first."""
        return service.history(tenant, memory_id)

    @app.delete("/v1/memories/{memory_id}", response_model=DeleteResponse, tags=["memories"],
                responses={**_ERRORS, **_NOT_FOUND})
    def delete(memory_id: str, tenant: Tenant, service: Service) -> DeleteResponse:
        """Delete one memory; a ``delete`` change is recorded in its history."""
        return service.delete(tenant, memory_id)

    # -- ops routes (admin keys)

    @app.post("/v1/admin/erasures", response_model=ErasureReportResponse, tags=["admin"],
              responses=_ERRORS)
    def admin_erasure(body: AdminEraseRequest, who: Admin, service: Service
                      ) -> ErasureReportResponse:
        """Forget a user of a tenant (or, with ``whole_tenant``, every user): the erasure
        ``lightmem forget`` runs, on the store this service serves; its report says what
        each store removed and what is not erased yet."""
        return admin_erase(service, body, requested_by=f"admin key {who.key_id}")

    @app.get("/v1/admin/erasures", response_model=ErasureReportResponse, tags=["admin"],
             responses={**_ERRORS, 404: {"model": ErrorResponse,
                                         "description": "No erasure of the scope recorded"}})
    def admin_erasure_get(
        who: Admin, service: Service,
        tenant: Annotated[Name, Query(description="The tenant of the scope")],
        user: Annotated[Name | None, Query(description="The user; none: the tenant's "
                                                       "whole-tenant erasure")] = None,
    ) -> ErasureReportResponse:
        """What is left of the scope's recorded erasure (``lightmem forget --status``);
        changes nothing."""
        return admin_erasure_status(service, tenant, user)

    @app.get("/v1/admin/tenants", response_model=TenantsResponse, tags=["admin"],
             responses=_ERRORS)
    def admin_tenants(who: Admin, service: Service) -> TenantsResponse:
        """Memories and users per tenant (the store's counts)."""
        return tenant_stats(service)

    # -- the Agent Memory Leaderboard contract

    @app.post("/add", response_model=AmlAddResponse, tags=["aml"],
              responses={**_ERRORS, 409: {"model": ErrorResponse,
                                          "description": "request_id reused with another "
                                                         "payload"}})
    def aml_add(body: AmlAddRequest, tenant: Tenant, service: Service) -> AmlAddResponse:
        """Add a session's messages; idempotent by ``request_id``."""
        return service.aml_add(tenant, body)

    @app.post("/search", response_model=AmlSearchResponse, tags=["aml"], responses=_ERRORS)
    def aml_search(body: AmlSearchRequest, tenant: Tenant, service: Service
                   ) -> AmlSearchResponse:
        """The user's ``top_k`` memories nearest to the query."""
        return service.aml_search(tenant, body)

    return app
