"""Record keys, buffer keys and scope keys: one unambiguous encoding of a tuple of names.

Why: tenant, user and conversation names may contain any character, ``/`` included. Joined
with ``/``, tenant ``a`` + conversation ``b/c`` and tenant ``a/b`` + conversation ``c`` gave
one key: one buffer, one partition, one segment id, and a search as ``a/b`` found ``a``'s
text. A key is now the *compact JSON array* of its names::

    conversation_key("a", "b/c") == '["a","b/c"]'
    conversation_key("a/b", "c") == '["a/b","c"]'

JSON quotes and escapes every name, so the array parses back to exactly the tuple it came
from: two different tuples can never share a key. It stays readable in console consumers,
and every language writes it the same way: ``JSON.stringify([tenant, conversation])`` in
JavaScript, ``json.dumps([...], separators=(",", ":"), ensure_ascii=False)`` in Python
(UTF-8 bytes on the wire). Kafka partitions by the key *bytes*, so a producer must write
exactly this form: the stages refuse a record whose key is not the canonical key of its
payload (it would land in another partition than the conversation's other records).

The encoding is the same for every key kind; the name says which tuple a key holds:

- :func:`conversation_key`: ``(tenant, conversation)``: turns and segments topics, the
  stream stages' table slots, the embedded runtime's buffers and turn ledger;
- :func:`scope_key`: ``(tenant, user)``: entries topic key, the memory-changes topic's
  partition (its records are keyed per change), the embedded vector index's partition key.

Pure: no I/O, no clock.

Exceptions::

    ValueError
     └── KeyFormatError     a key that is not the canonical encoding of the expected tuple
"""

from __future__ import annotations

import json

__all__ = [
    "KeyFormatError",
    "conversation_key",
    "decode_conversation_key",
    "decode_key",
    "decode_scope_key",
    "encode_key",
    "scope_key",
]


class KeyFormatError(ValueError):
    """A key is not the canonical encoding of a tuple of ``arity`` names."""


def encode_key(*names: str) -> str:
    """The canonical key of ``names``: their compact JSON array (see the module doc).

    Raises:
        TypeError: a name is not a string.
    """
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"key names must be strings (got {name!r})")
    return json.dumps(list(names), ensure_ascii=False, separators=(",", ":"))


def decode_key(key: str | bytes, arity: int) -> tuple[str, ...]:
    """The names a key was made from; the inverse of :func:`encode_key`.

    Args:
        key: The key, as text or as the UTF-8 bytes of a Kafka record key.
        arity: How many names it must hold.

    Raises:
        KeyFormatError: not a JSON array of ``arity`` strings, or not in the canonical form
            (extra spaces, escaped non-ASCII...): such a key would not be the one the
            pipeline writes for the same names, hence not the same partition.
    """
    try:
        text = key.decode("utf-8") if isinstance(key, bytes | bytearray) else key
        names = json.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise KeyFormatError(f"key {key!r}: not a JSON array of {arity} names ({exc})") from None
    if (not isinstance(names, list) or len(names) != arity
            or not all(isinstance(n, str) for n in names)):
        raise KeyFormatError(f"key {key!r}: not a JSON array of {arity} names")
    if encode_key(*names) != text:
        raise KeyFormatError(
            f"key {key!r}: not in canonical form (expected {encode_key(*names)!r})")
    return tuple(names)


def conversation_key(tenant: str, conversation: str) -> str:
    """Key of one conversation: turns/segments record key and buffer key."""
    return encode_key(tenant, conversation)


def decode_conversation_key(key: str | bytes) -> tuple[str, str]:
    """``(tenant, conversation)`` of a :func:`conversation_key`.

    Raises:
        KeyFormatError: see :func:`decode_key`.
    """
    tenant, conversation = decode_key(key, 2)
    return tenant, conversation


def scope_key(tenant: str, user: str) -> str:
    """Key of one memory scope: entries record key (and the memory-changes partition), vector
    partition key."""
    return encode_key(tenant, user)


def decode_scope_key(key: str | bytes) -> tuple[str, str]:
    """``(tenant, user)`` of a :func:`scope_key`.

    Raises:
        KeyFormatError: see :func:`decode_key`.
    """
    tenant, user = decode_key(key, 2)
    return tenant, user
