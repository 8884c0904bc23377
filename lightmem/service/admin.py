"""The memory service's ops routes (``/v1/admin/...``), for admin keys only.

An admin key (``lightmem keys create --admin``) is bound to no tenant: it may call these
routes and nothing else (a tenant route answers it 403: it has no tenant whose data it could
read), and a tenant's key gets 403 here. The tenant an ops route acts on is named in the
request, since the admin key has none; it is the only place a tenant comes from a request.

=========================================  ==================================================
``POST /v1/admin/erasures``                forget a user of a tenant (or the whole tenant):
                                           the erasure of ``lightmem forget``, its report
``GET /v1/admin/erasures?tenant=T&user=U`` what is left of the scope's recorded erasure
                                           (``lightmem forget --status``); 404: none recorded
``GET /v1/admin/tenants``                  memories and users per tenant (the store's counts)
=========================================  ==================================================
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field, model_validator

from .errors import NotFound
from .models import ErasureSink, Name, _Body

if TYPE_CHECKING:
    from lightmem.streams.erasure.forget import ErasureReport

    from .core import MemoryService

__all__ = [
    "AdminEraseRequest",
    "ErasureReportResponse",
    "TenantStatsItem",
    "TenantsResponse",
    "admin_erase",
    "admin_erasure_status",
    "tenant_stats",
]


class AdminEraseRequest(_Body):
    """Forget a user of a tenant, or a whole tenant (``POST /v1/admin/erasures``)."""

    #: The tenant whose user is forgotten.
    tenant: Name
    #: The user to forget; leave it out only with ``whole_tenant``.
    user: Name | None = None
    #: Forget every user of the tenant. Must be said explicitly: a missing ``user`` alone
    #: is an error, never a whole-tenant erasure.
    whole_tenant: bool = False
    #: Why (kept with the request, e.g. a ticket number).
    reason: str = Field(default="", max_length=1000)

    @model_validator(mode="after")
    def _one_scope(self) -> AdminEraseRequest:
        if self.user is None and not self.whole_tenant:
            raise ValueError("name the user, or set whole_tenant: true to forget every user "
                             "of the tenant")
        if self.user is not None and self.whole_tenant:
            raise ValueError("either a user or whole_tenant, not both")
        return self


class ErasureReportResponse(BaseModel):
    """One erasure's report: every store's part and what is not erased (yet)."""

    erasure_id: str
    tenant: str
    #: None: the whole tenant.
    user: str | None
    #: When the erasure took effect (what was written after it is a new beginning).
    requested_at: datetime
    #: Every store confirmed its part.
    confirmed: bool
    #: Something of the scope was found anywhere (False: an unknown scope; the request is
    #: recorded all the same).
    found: bool
    #: What still holds the scope's data, or did not confirm yet: ``sink: what``.
    not_erased: list[str]
    sinks: list[ErasureSink]

    @classmethod
    def of(cls, report: ErasureReport) -> ErasureReportResponse:
        sinks = [ErasureSink(**s.as_json()) for s in report.sinks]
        return cls(erasure_id=report.request.erasure_id, tenant=report.request.tenant,
                   user=report.request.user, requested_at=report.request.requested_at,
                   confirmed=report.confirmed, found=report.found,
                   not_erased=[f"{s.sink}: {p}" for s in sinks for p in s.pending]
                   + [f"{s.sink}: not confirmed" for s in sinks
                      if not s.confirmed and not s.pending],
                   sinks=sinks)


class TenantStatsItem(BaseModel):
    tenant: str
    #: Users with at least one memory.
    users: int
    memories: int


class TenantsResponse(BaseModel):
    """Memories and users per tenant, as the store counts them now (Elasticsearch: as of
    its last refresh); provisional events are not counted."""

    tenants: list[TenantStatsItem]


def admin_erase(service: MemoryService, request: AdminEraseRequest, *, requested_by: str
                ) -> ErasureReportResponse:
    """Forget ``request``'s scope: the erasure ``lightmem forget`` runs, on the served store."""
    report = service.backend.erase(
        request.tenant, request.user, requested_by=requested_by,
        reason=request.reason or "memory service: admin erasure")
    return ErasureReportResponse.of(report)


def admin_erasure_status(service: MemoryService, tenant: str, user: str | None
                         ) -> ErasureReportResponse:
    """What is left of the scope's recorded erasure (changes nothing); 404 when none is."""
    report = service.backend.erasure_status(tenant, user)
    if report is None:
        scope = f"tenant {tenant!r}" + ("" if user is None else f", user {user!r}")
        raise NotFound(f"no erasure of {scope} is recorded", loc=("query", "user"))
    return ErasureReportResponse.of(report)


def tenant_stats(service: MemoryService) -> TenantsResponse:
    """Memories and users per tenant, sorted by tenant."""
    rows: dict[str, TenantStatsItem] = {}
    for (tenant, _user), n in service.backend.count_entries().items():
        row = rows.setdefault(tenant, TenantStatsItem(tenant=tenant, users=0, memories=0))
        row.users += 1
        row.memories += n
    return TenantsResponse(tenants=[rows[t] for t in sorted(rows)])
