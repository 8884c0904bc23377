"""The memory service's errors: raised by the service core, mapped to HTTP statuses by the
app, and raised again by both SDK classes, so a caller handles one set of types whether it
runs the memory in-process (:class:`~lightmem.service.sdk.Memory`) or over HTTP
(:class:`~lightmem.service.client.MemoryClient`).

Exceptions::

    Exception
     └── MemoryServiceError        base; ``status`` is the HTTP status it maps to
          ├── InvalidInput         422: every problem as {loc, msg, type}
          ├── Unauthorized         401: no API key, or not a valid one
          ├── Forbidden            403: a valid key on routes it may not call (an admin key
          │                        on tenant data, a tenant's key on ops routes)
          ├── NotFound             404: no such memory for this tenant (other tenants' ids too)
          ├── Conflict             409: a request id reused with another payload
          ├── RateLimited          429: ``retry_after`` seconds to wait
          ├── Unavailable          503: a store or Kafka does not answer
          └── ServerError          500 and other 5xx answers the client got (HTTP only)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "MemoryServiceError",
    "InvalidInput",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "Conflict",
    "RateLimited",
    "Unavailable",
    "ServerError",
    "error_for_status",
]


class MemoryServiceError(Exception):
    """Base of the service's errors.

    Attributes:
        status: The HTTP status this error is answered with.
        errors: ``[{"loc": [...], "msg": ..., "type": ...}]``, every problem.
    """

    status = 500
    kind = "error"

    def __init__(self, msg: str, *, loc: Sequence[str | int] = (),
                 errors: list[dict[str, Any]] | None = None) -> None:
        self.errors = errors or [{"loc": list(loc), "msg": msg, "type": self.kind}]
        super().__init__(msg if errors is None else "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in self.errors))


class InvalidInput(MemoryServiceError):
    status = 422
    kind = "value_error"


class Unauthorized(MemoryServiceError):
    status = 401
    kind = "unauthorized"


class Forbidden(MemoryServiceError):
    status = 403
    kind = "forbidden"


class NotFound(MemoryServiceError):
    status = 404
    kind = "not_found"


class Conflict(MemoryServiceError):
    status = 409
    kind = "conflict"


class RateLimited(MemoryServiceError):
    status = 429
    kind = "rate_limited"

    def __init__(self, msg: str, *, retry_after: float, **kwargs: Any) -> None:
        super().__init__(msg, **kwargs)
        #: Seconds to wait before the next request.
        self.retry_after = retry_after


class Unavailable(MemoryServiceError):
    status = 503
    kind = "unavailable"


class ServerError(MemoryServiceError):
    status = 500
    kind = "server_error"


_BY_STATUS: dict[int, type[MemoryServiceError]] = {
    c.status: c for c in (InvalidInput, Unauthorized, Forbidden, NotFound, Conflict, Unavailable)
}


def error_for_status(status: int, body: Any, *, retry_after: float | None = None
                     ) -> MemoryServiceError:
    """The error an HTTP answer with ``status`` and JSON ``body`` stands for (client side)."""
    detail = body.get("detail") if isinstance(body, dict) else None
    errors = detail if isinstance(detail, list) and all(
        isinstance(e, dict) for e in detail) else None
    msg = str(detail) if errors is None and detail is not None else f"HTTP {status}"
    if status == 429:
        return RateLimited(msg, retry_after=retry_after or 0.0, errors=errors)
    cls = _BY_STATUS.get(status)
    if cls is None:
        cls = InvalidInput if 400 <= status < 500 else ServerError
    err = cls(msg, errors=errors)
    err.status = status
    return err
