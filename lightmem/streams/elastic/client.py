"""The Elasticsearch client of every LightMem process, and the store's errors.

:func:`es_client` builds the one client configuration (URL, API key or basic auth, TLS
verification) from :class:`~lightmem.settings.Settings` without ever putting a credential in a
log line or an error; :func:`redact_url` shows a URL without its password. The errors are the
store's (:mod:`lightmem.streams.elastic.store`) and its callers' common vocabulary.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from typing import Any

from elasticsearch import Elasticsearch

from lightmem.settings import Settings

__all__ = [
    "BulkWriteError",
    "EsStoreError",
    "IncompatibleIndex",
    "IndexExists",
    "IndexNotFound",
    "es_client",
    "redact_url",
]


class EsStoreError(Exception):
    """Base of the Elasticsearch store's own failures."""


class BulkWriteError(EsStoreError):
    """Some documents were rejected permanently, or still failed after the retries.

    Attributes:
        failures: ``{entry id: "status type: reason"}`` for every failed document; the
            other documents of the call were written.
    """

    def __init__(self, failures: Mapping[str, str]) -> None:
        self.failures = dict(failures)
        shown = "; ".join(f"{i!r}: {r}" for i, r in list(self.failures.items())[:20])
        more = len(self.failures) - 20
        tail = f"; ... and {more} more" if more > 0 else ""
        super().__init__(
            f"bulk upsert: {len(self.failures)} document(s) failed permanently "
            f"(ids {sorted(self.failures)!r}): {shown}{tail}"
        )


class IndexNotFound(EsStoreError):
    """The named index does not exist (or names an alias, not a concrete index)."""


class IndexExists(EsStoreError):
    """``create_index`` was asked for a name that already exists."""


class IncompatibleIndex(EsStoreError):
    """The index is not a memory index of the expected dimension, or the alias name is taken."""


def redact_url(url: str) -> str:
    """``url`` with any ``user:password@`` replaced by ``***@``, for messages and logs.

    Works on malformed URLs too (no scheme, say): everything before the last ``@`` after
    the scheme is hidden. An ``@`` further right (in a query) over-redacts, which is safe.
    """
    head, at, rest = url.rpartition("@")
    if not at:
        return url
    scheme_end = head.find("//")
    prefix = head[: scheme_end + 2] if scheme_end != -1 else ""
    return f"{prefix}***@{rest}"


def es_client(
    settings: Settings, *, request_timeout: float = 30.0, max_retries: int = 3
) -> Elasticsearch:
    """An Elasticsearch client for ``settings.es_url`` with the configured security.

    Credentials pass through from :class:`~lightmem.settings.Settings`: ``es_api_key``, or
    ``es_username`` + ``es_password`` (basic auth), or ``user:password@`` inside ``es_url``
    (moved into basic auth, so the URL the client logs and puts in errors has none);
    ``es_ca_certs`` verifies the server's certificate. Secrets stay out of logs and messages:
    the settings hold them as ``SecretStr``, the transport logs headers with authorization
    hidden, and every error raised here names settings, never their values.

    Args:
        settings: where and how to connect.
        request_timeout: seconds per HTTP request (default 30).
        max_retries: transport-level retries on connection errors, timeouts and 429/502/503/
            504 (default 3); bulk writes add their own per-document retries on top.

    Returns:
        The client (the caller closes it).

    Raises:
        ValueError: the credentials conflict (an API key and basic auth together, a password
            without a user, credentials both in the URL and in the settings) or the URL is
            malformed; the message shows the URL redacted.
    """
    parts = urllib.parse.urlsplit(settings.es_url)
    url = settings.es_url
    url_auth: tuple[str, str] | None = None
    if "@" in parts.netloc:
        userinfo, host = parts.netloc.rsplit("@", 1)
        user, _, password = userinfo.partition(":")
        url_auth = (urllib.parse.unquote(user), urllib.parse.unquote(password))
        url = urllib.parse.urlunsplit(parts._replace(netloc=host))
    problems = []
    if settings.es_api_key is not None and (
        settings.es_username is not None or url_auth is not None
    ):
        problems.append("es_api_key and basic auth (es_username or user@ in es_url) are both set")
    if settings.es_password is not None and settings.es_username is None:
        problems.append("es_password is set without es_username")
    if url_auth is not None and settings.es_username is not None:
        problems.append("es_url carries credentials and es_username is set too")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        problems.append(f"es_url: not an http(s) URL: {redact_url(settings.es_url)!r}")
    if problems:
        raise ValueError("Elasticsearch settings: " + "; ".join(problems))

    kwargs: dict[str, Any] = {
        "request_timeout": request_timeout,
        "max_retries": max_retries,
        "retry_on_timeout": True,
    }
    if settings.es_api_key is not None:
        kwargs["api_key"] = settings.es_api_key.get_secret_value()
    elif settings.es_username is not None:
        password = settings.es_password.get_secret_value() if settings.es_password else ""
        kwargs["basic_auth"] = (settings.es_username, password)
    elif url_auth is not None:
        kwargs["basic_auth"] = url_auth
    if settings.es_ca_certs is not None:
        kwargs["ca_certs"] = str(settings.es_ca_certs)
    try:
        return Elasticsearch(url, **kwargs)
    except ValueError as exc:
        # The transport's own message would quote the URL it was given; ours is redacted
        # already, but say which setting is at fault without echoing anything else.
        raise ValueError(f"es_url: {redact_url(settings.es_url)!r}: {exc}") from None
