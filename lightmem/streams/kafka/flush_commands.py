"""Control messages that travel in-band on the pipeline topics.

An explicit flush is a record on the turns topic (``lightmem flush``) or the segments topic
(written by the sensory stage) carrying the header ``lightmem-control: flush``. Travelling
in-band keeps it ordered with the conversation's data: a flush keyed with the conversation's
key (:func:`~lightmem.schemas.keys.conversation_key`) lands in that conversation's partition
after every turn produced before it, and a replay of the turns topic meets the same flushes
at the same places (so it cuts the same segments).

- keyed ``conversation_key(tenant, conversation)``: flush that conversation;
- no key (one record sent to every partition): flush every conversation of the partition,
  optionally only one tenant's.

The value is JSON for humans (``lightmem dlq list``, console consumers); the header decides.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from lightmem.schemas import conversation_key, decode_conversation_key

__all__ = ["CONTROL_HEADER", "FLUSH", "FlushCommand", "control_kind", "flush_headers"]

#: Header naming a control record; its value is the command (``flush``).
CONTROL_HEADER = "lightmem-control"
FLUSH = "flush"


@dataclass(frozen=True)
class FlushCommand:
    """Flush buffers: one conversation, or (``conversation`` None) all of a partition's,
    optionally limited to one tenant."""

    tenant: str | None = None
    conversation: str | None = None
    issued_at: datetime | None = None
    issued_by: str = "ops"

    @classmethod
    def for_key(cls, key: bytes, *, issued_at: datetime | None = None,
                issued_by: str = "ops") -> FlushCommand:
        """The command that flushes the conversation whose record/slot key is ``key`` (an
        idle flush starts from a table key).

        Raises:
            KeyFormatError: ``key`` is not a conversation key.
        """
        tenant, conversation = decode_conversation_key(key)
        return cls(tenant=tenant, conversation=conversation, issued_at=issued_at,
                   issued_by=issued_by)

    @property
    def key(self) -> bytes | None:
        """Kafka key: the conversation's key (the same bytes as its turns'), else None."""
        if self.tenant is not None and self.conversation is not None:
            return conversation_key(self.tenant, self.conversation).encode()
        return None

    def to_bytes(self) -> bytes:
        return json.dumps({
            "control": FLUSH,
            "tenant": self.tenant,
            "conversation": self.conversation,
            "issued_at": self.issued_at.isoformat() if self.issued_at else None,
            "issued_by": self.issued_by,
        }).encode()

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> FlushCommand:
        """Decode a flush record's value; a value that does not decode means "flush all"."""
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        issued = body.get("issued_at")
        try:
            issued_at = datetime.fromisoformat(issued) if isinstance(issued, str) else None
        except ValueError:
            issued_at = None
        tenant = body.get("tenant")
        conversation = body.get("conversation")
        return cls(
            tenant=tenant if isinstance(tenant, str) else None,
            conversation=conversation if isinstance(conversation, str) else None,
            issued_at=issued_at,
            issued_by=str(body.get("issued_by", "ops")),
        )

    def matches(self, tenant: str, conversation: str) -> bool:
        """Whether this command flushes the conversation ``(tenant, conversation)``."""
        if self.tenant is not None and self.tenant != tenant:
            return False
        return self.conversation is None or self.conversation == conversation


def flush_headers() -> list[tuple[str, bytes]]:
    return [(CONTROL_HEADER, FLUSH.encode())]


def control_kind(headers: Mapping[str, Any] | Iterable[tuple[str, Any]] | None) -> str | None:
    """The control command named by a record's headers, or None for a data record.

    Accepts both header shapes the clients use: a mapping (faust) or ``(name, value)`` pairs
    (confluent-kafka, aiokafka).
    """
    if not headers:
        return None
    items = headers.items() if isinstance(headers, Mapping) else headers
    for name, value in items:
        if name == CONTROL_HEADER:
            if isinstance(value, bytes | bytearray):
                return bytes(value).decode("utf-8", errors="replace")
            return str(value)
    return None
