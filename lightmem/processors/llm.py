"""The LLM seen by the processors: a narrow chat protocol, usage accounting, errors.

The processors never import an SDK: ``lightmem.streams.models.openai_chat.OpenAIChatModel`` (any
OpenAI-compatible endpoint) implements :class:`ChatModel`, and tests may pass their own.

Exceptions::

    LLMError
     ├── LLMTransientError   timeouts, 429, 5xx after the client's own retries: retry later
     ├── LLMPermanentError   400-class errors, refusals: dead-letter the input
     └── LLMConfigError      401/403/404: the endpoint, key or model is wrong; stop, since
                             every input would fail the same way (dead-lettering them all
                             would bury the real problem)
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

__all__ = [
    "ChatMessage",
    "Completion",
    "ChatModel",
    "LLMError",
    "LLMTransientError",
    "LLMPermanentError",
    "LLMConfigError",
    "UsageMeter",
    "UsageTotals",
]


@dataclass(frozen=True)
class ChatMessage:
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True)
class Completion:
    """One chat completion with the usage the endpoint reported."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    model: str = ""
    #: True when the endpoint reported no usage and the token counts are an estimate.
    usage_estimated: bool = False
    #: Why generation stopped, as the endpoint said: "stop", "length" (the ``max_tokens``
    #: cap cut the answer), "content_filter", ...; None when it did not say.
    finish_reason: str | None = None

    @property
    def truncated(self) -> bool:
        """True when the answer was cut at ``max_tokens``: its text is incomplete."""
        return self.finish_reason == "length"


class LLMError(Exception):
    """Base of every LLM failure."""


class LLMTransientError(LLMError):
    """The endpoint is unavailable or throttling; the same request may succeed later."""


class LLMPermanentError(LLMError):
    """The request itself is rejected; retrying it will not help."""


class LLMConfigError(LLMError):
    """The endpoint rejects us, not the input (bad key, no access, unknown model)."""


class ChatModel(Protocol):
    """Anything that answers a chat: ``complete(messages, purpose=..., tenant=...)``.

    Implementations record every call in their :class:`UsageMeter` under ``purpose`` and
    ``tenant`` (cost is the product's headline), and raise :class:`LLMError` subclasses.
    """

    meter: UsageMeter

    def complete(
        self,
        messages: Sequence[ChatMessage],
        *,
        purpose: str,
        tenant: str,
        json_mode: bool = False,
        max_tokens: int | None = None,
    ) -> Completion: ...


@dataclass
class UsageTotals:
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    errors: int = 0

    def add(self, other: UsageTotals) -> None:
        self.calls += other.calls
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.latency_s += other.latency_s
        self.errors += other.errors


@dataclass
class UsageMeter:
    """Counts LLM calls, prompt/completion tokens and latency per (purpose, tenant).

    Thread-safe: consolidation runs targets concurrently.
    """

    _totals: dict[tuple[str, str], UsageTotals] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, purpose: str, tenant: str, completion: Completion) -> None:
        """Count one successful call."""
        with self._lock:
            t = self._totals.setdefault((purpose, tenant), UsageTotals())
            t.calls += 1
            t.prompt_tokens += completion.prompt_tokens
            t.completion_tokens += completion.completion_tokens
            t.latency_s += completion.latency_s

    def record_error(self, purpose: str, tenant: str, latency_s: float = 0.0) -> None:
        """Count one failed call (it still cost a round trip)."""
        with self._lock:
            t = self._totals.setdefault((purpose, tenant), UsageTotals())
            t.errors += 1
            t.latency_s += latency_s

    def merge(self, purpose: str, tenant: str, totals: UsageTotals) -> None:
        """Add totals recorded elsewhere (e.g. loaded from a persisted run)."""
        with self._lock:
            self._totals.setdefault((purpose, tenant), UsageTotals()).add(totals)

    def by_key(self) -> dict[tuple[str, str], UsageTotals]:
        """A copy of the per-(purpose, tenant) totals."""
        with self._lock:
            return {k: UsageTotals(**vars(v)) for k, v in self._totals.items()}

    def total(self, purpose: str | None = None, tenant: str | None = None) -> UsageTotals:
        """Sum over every key matching ``purpose`` and ``tenant`` (None = any)."""
        out = UsageTotals()
        for (s, t), v in self.by_key().items():
            if (purpose is None or s == purpose) and (tenant is None or t == tenant):
                out.add(v)
        return out
