"""API keys (each bound to one tenant, or an admin key bound to none; stored hashed) and
the per-key rate limit.

A key looks like ``lmk_<key id>_<secret>``: the id (public, 12 hex digits) finds the record,
the whole key's SHA-256 is compared in constant time. Keys are 32 random bytes, so a plain
hash is as strong as a slow one (there is no dictionary to try); only hashes are stored, in
a JSON keys file (``LIGHTMEM_API_KEYS_FILE``, default ``DATA_DIR/api-keys.json``, mode 0600)
that ``lightmem keys create --tenant T`` appends to, printing the key once. An admin key
(``lightmem keys create --admin``) has no tenant: it may call the ops routes
(:mod:`lightmem.service.admin`) and no route of a tenant's data.

Rate limit: a token bucket per key (``LIGHTMEM_API_RATE_PER_S`` tokens per second, bursts of
``LIGHTMEM_API_RATE_BURST``); an empty bucket answers 429 with the seconds until the next
token in ``Retry-After``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, Field, model_validator

__all__ = ["KEY_PREFIX", "ApiKey", "KeysFile", "KeyRing", "RateLimiter", "create_key", "hash_key"]

KEY_PREFIX = "lmk"


def hash_key(key: str) -> str:
    """``sha256:<hex>`` of the whole key."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


class ApiKey(BaseModel):
    """One configured key: its public id, its tenant (none for an admin key) and the hash
    of the key."""

    key_id: str
    tenant: str | None = Field(default=None, min_length=1, max_length=256)
    #: Ops routes only; bound to no tenant.
    admin: bool = False
    hash: str
    created_at: datetime

    @model_validator(mode="after")
    def _tenant_or_admin(self) -> ApiKey:
        if (self.tenant is None) != self.admin:
            raise ValueError(f"key {self.key_id}: a key has a tenant, or is an admin key "
                             "with none (not both, not neither)")
        return self


class KeysFile(BaseModel):
    keys: list[ApiKey] = Field(default_factory=list)


def _key_id(key: str) -> str | None:
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1]


class KeyRing:
    """The configured keys, looked up by key id."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self._by_id = {k.key_id: k for k in keys}

    @classmethod
    def load(cls, path: Path) -> KeyRing:
        """The keys in ``path`` (none when it does not exist).

        Raises:
            ValueError: the file is not a keys file (named, with pydantic's reasons).
        """
        if not path.exists():
            return cls([])
        try:
            return cls(KeysFile.model_validate_json(path.read_bytes()).keys)
        except ValueError as exc:
            raise ValueError(f"{path}: not a LightMem keys file: {exc}") from None

    def __len__(self) -> int:
        return len(self._by_id)

    def authenticate(self, key: str) -> ApiKey | None:
        """The record of ``key``, or None when it is not a configured key."""
        key_id = _key_id(key)
        record = self._by_id.get(key_id) if key_id is not None else None
        if record is None:
            return None
        return record if hmac.compare_digest(record.hash, hash_key(key)) else None


def create_key(path: Path, tenant: str | None, *, admin: bool = False,
               now: datetime | None = None) -> tuple[str, ApiKey]:
    """Make a new key for ``tenant`` (or, with ``admin`` and no tenant, an admin key) and
    add its hash to the keys file ``path``.

    Returns:
        The key (shown once; only its hash is stored) and its record.

    Raises:
        ValueError: both a tenant and ``admin``, or neither.
    """
    key_id = secrets.token_hex(6)
    key = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
    record = ApiKey(key_id=key_id, tenant=tenant, admin=admin, hash=hash_key(key),
                    created_at=now or datetime.now(UTC))
    current = KeysFile(keys=list(KeyRing.load(path)._by_id.values()))
    current.keys.append(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # Owner-only from the first byte, then an atomic rename: never a half-written file.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(current.model_dump(mode="json"), indent=2) + "\n")
    os.replace(tmp, path)
    return key, record


class RateLimiter:
    """Token buckets per key id.

    Args:
        rate_per_s: Tokens added per second (0 = no limit).
        burst: Bucket size.
        clock: Monotonic seconds (tests pass a fake).
    """

    def __init__(self, rate_per_s: float, burst: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate_per_s
        self.burst = max(1, burst)
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key_id: str) -> float | None:
        """Take one token: None when allowed, else the seconds until one is available."""
        if self.rate <= 0:
            return None
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.get(key_id, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key_id] = (tokens - 1.0, now)
                return None
            self._buckets[key_id] = (tokens, now)
            return (1.0 - tokens) / self.rate
