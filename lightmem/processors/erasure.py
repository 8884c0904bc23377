"""The erasure ledger: which scopes were forgotten, and since when (pure: no I/O, no clock).

A request to forget a user (tenant, user) or a whole tenant is recorded once, on the
compacted topic ``lightmem.erasures.v1`` (the embedded store keeps the same records in a
table). Every stage folds those records into an :class:`ErasureLedger` and asks it, per
record, :meth:`ErasureLedger.drops`: a record of an erased scope produced at or before the
erasure time is dropped (counted, never dead-lettered); one produced after it is a new
beginning and goes through. "Produced" is the time the record entered the pipeline: the
Kafka timestamp of the source turn, carried downstream by the stages (a segment or an entry
made later from an erased turn is still "before").

:func:`strip_turns` removes an erased scope's turns from a buffered list of turns (the
sensory and topic buffers of a conversation may hold several users' turns).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from lightmem.schemas import ErasureRequest

__all__ = ["ErasureLedger", "Erased", "strip_turns", "raw_scopes", "to_ms"]

T = TypeVar("T")


def to_ms(t: datetime) -> int:
    """Milliseconds since the epoch (the unit of Kafka timestamps)."""
    return int(t.timestamp() * 1000)


@dataclass(frozen=True)
class Erased:
    """The newest erasure of one scope (``user`` None: the whole tenant)."""

    tenant: str
    user: str | None
    at_ms: int
    erasure_id: str


class ErasureLedger:
    """The erased scopes, folded from :class:`~lightmem.schemas.ErasureRequest` records.

    A scope erased twice keeps the later time (the compacted topic keeps the later record
    too). A user is erased at the later of its own erasure and its tenant's.
    """

    def __init__(self, requests: Iterable[ErasureRequest] = ()) -> None:
        self._scopes: dict[tuple[str, str | None], Erased] = {}
        #: Bumped by every change: a follower compares it to know when to sweep buffers.
        self.version = 0
        for r in requests:
            self.apply(r)

    def apply(self, request: ErasureRequest) -> bool:
        """Fold one request in; True when it changed the ledger."""
        key = (request.tenant, request.user)
        at = to_ms(request.requested_at)
        old = self._scopes.get(key)
        if old is not None and old.at_ms >= at:
            return False
        self._scopes[key] = Erased(request.tenant, request.user, at, request.erasure_id)
        self.version += 1
        return True

    def __len__(self) -> int:
        return len(self._scopes)

    def __bool__(self) -> bool:
        return bool(self._scopes)

    def entries(self) -> list[Erased]:
        """Every erased scope, tenants first."""
        return sorted(self._scopes.values(), key=lambda e: (e.tenant, e.user or ""))

    def erased_at(self, tenant: str, user: str | None) -> int | None:
        """When the scope was last erased (ms), counting its tenant's erasure; None: never."""
        keys = [(tenant, None)] if user is None else [(tenant, None), (tenant, user)]
        times = [e.at_ms for e in map(self._scopes.get, keys) if e is not None]
        return max(times) if times else None

    def drops(self, tenant: str, user: str | None, produced_ms: int | None) -> bool:
        """Whether a record of (tenant, user) produced at ``produced_ms`` is erased.

        ``produced_ms`` None (not known, e.g. state written before the ledger existed)
        counts as before the erasure: an erasure never lets unknown old text through.
        """
        if not self._scopes:
            return False
        at = self.erased_at(tenant, user)
        return at is not None and (produced_ms is None or produced_ms <= at)

    def tenant_touched(self, tenant: str) -> bool:
        """Whether any scope of ``tenant`` (or the tenant) is erased: a cheap pre-check."""
        return any(t == tenant for t, _ in self._scopes)


def strip_turns(turns: Sequence[T], *, default_user: str, user_of: Callable[[T], str | None],
                origin_of: Callable[[T], int | None], tenant: str,
                ledger: ErasureLedger) -> list[T]:
    """``turns`` without those the ledger drops (a turn's user: its own, else
    ``default_user``; its time: ``origin_of``)."""
    if not ledger.tenant_touched(tenant):
        return list(turns)
    return [t for t in turns
            if not ledger.drops(tenant, user_of(t) or default_user, origin_of(t))]


def raw_scopes(raw: bytes) -> set[tuple[str, str | None]]:
    """The (tenant, user) scopes a raw record says it belongs to, read leniently (it may be
    a record no stage could parse): a JSON object's ``tenant`` and ``user``, its turns'
    users, a summarizer payload's segments. (tenant, None) when it names no user; nothing
    when it is not JSON."""
    try:
        payload = json.loads(raw)
    except (ValueError, TypeError):
        return set()
    out: set[tuple[str, str | None]] = set()

    def add(obj: Any) -> None:
        if not isinstance(obj, dict) or not isinstance(obj.get("tenant"), str):
            return
        tenant = obj["tenant"]
        user = obj.get("user") if isinstance(obj.get("user"), str) else None
        out.add((tenant, user))
        for turn in obj.get("turns") or []:
            if isinstance(turn, dict) and isinstance(turn.get("user"), str):
                out.add((tenant, turn["user"]))

    add(payload)
    if isinstance(payload, dict):
        for seg in payload.get("segments") or []:
            add(seg)
    return out
