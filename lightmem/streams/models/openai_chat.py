"""A :class:`~lightmem.processors.llm.ChatModel` over any OpenAI-compatible endpoint.

OpenAI itself, vLLM, Ollama, llama.cpp server and ``transformers serve`` all speak the
chat-completions protocol, so one client covers them. The openai SDK does the transport
retries (408, 409, 429 and 5xx, with exponential backoff and ``Retry-After``); this module
sets ``timeout`` and ``max_retries`` explicitly, meters every call and sorts what is left
into the processors' error hierarchy::

    APITimeoutError, APIConnectionError                   -> LLMTransientError
    APIStatusError 408/409/429/5xx (RateLimitError,
        InternalServerError), after the SDK's retries     -> LLMTransientError
    APIResponseValidationError (not a chat completion)    -> LLMTransientError
    401, 403, 404 (bad key, no access, unknown model)     -> LLMConfigError (stop the run)
    APIStatusError, any other 4xx (400, 422, ...)         -> LLMPermanentError
    a reply with no text (refusal, tool calls only)       -> LLMPermanentError
        (except one cut at max_tokens: an empty completion, finish_reason "length")

Exceptions raised: only those of :mod:`lightmem.processors.llm` (``LLMError`` and its two
subclasses); the SDK's exception is chained as ``__cause__`` for debugging.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import openai

from lightmem.processors.llm import (
    ChatMessage,
    Completion,
    LLMConfigError,
    LLMError,
    LLMPermanentError,
    LLMTransientError,
    UsageMeter,
)

__all__ = ["OpenAIChatModel"]

#: Status codes the SDK itself retries; still failing after its retries means "try later".
_TRANSIENT_STATUS = frozenset({408, 409, 429})
#: The endpoint, key or model is wrong: every request would fail alike.
_CONFIG_STATUS = frozenset({401, 403, 404})

#: Local servers (vLLM, Ollama, llama.cpp) ignore the key but the SDK insists on one.
_PLACEHOLDER_KEY = "not-needed"


class OpenAIChatModel:
    """Chat completions from an OpenAI-compatible endpoint, metered per purpose and tenant.

    Thread-safe: the underlying ``openai.OpenAI`` client (an httpx connection pool) may be
    shared by concurrent callers, e.g. the consolidator's worker threads.

    Args:
        base_url: The endpoint's API root, e.g. ``https://api.openai.com/v1`` or
            ``http://127.0.0.1:8000/v1``.
        model: Model name sent with every request.
        api_key: Secret key. An empty string is replaced by a placeholder for local servers
            that need none. It is never written into error messages or ``repr``.
        timeout: Seconds allowed per HTTP attempt (default 60.0).
        max_retries: Transport retries done by the SDK on timeouts, connection errors, 408,
            409, 429 and 5xx, with exponential backoff (default 3).
        meter: Where calls, tokens, latency and errors are counted; a fresh
            :class:`UsageMeter` when None.
        temperature: Sampling temperature; None (default) leaves the endpoint's default,
            because some models reject any explicit value.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str,
        *,
        timeout: float = 60.0,
        max_retries: int = 3,
        meter: UsageMeter | None = None,
        temperature: float | None = None,
    ) -> None:
        self.base_url = base_url
        self.model = model
        self.timeout = timeout
        self.max_retries = max_retries
        self.temperature = temperature
        self.meter: UsageMeter = meter if meter is not None else UsageMeter()
        # Kept only to scrub it from error text; never logged or shown in repr.
        self._secret = api_key
        # The key is passed explicitly so the SDK never falls back to reading
        # OPENAI_API_KEY from the environment (only the settings module reads os.environ).
        self._client = openai.OpenAI(
            base_url=base_url,
            api_key=api_key or _PLACEHOLDER_KEY,
            timeout=timeout,
            max_retries=max_retries,
        )
        # None = not known yet; False once the endpoint has rejected response_format.
        self._json_mode_supported: bool | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"OpenAIChatModel(base_url={self.base_url!r}, model={self.model!r})"

    @property
    def json_mode_supported(self) -> bool | None:
        """Whether the endpoint accepts ``response_format`` (None until a JSON-mode call)."""
        return self._json_mode_supported

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._client.close()

    def __enter__(self) -> OpenAIChatModel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def complete(
        self,
        messages: Sequence[ChatMessage],
        *,
        purpose: str,
        tenant: str,
        json_mode: bool = False,
        max_tokens: int | None = None,
    ) -> Completion:
        """Send one chat completion request and meter it under ``(purpose, tenant)``.

        Args:
            messages: The conversation to complete.
            purpose: What the call is for, the key it is billed under ("summarize", "consolidate",
                "answer", ...).
            tenant: Tenant the call is billed to.
            json_mode: Ask for a JSON object (``response_format={"type": "json_object"}``).
                If the endpoint answers 400 to that, the request is sent once more without
                it and, if that succeeds, JSON mode is not requested again from this client
                (the prompt still asks for JSON).
            max_tokens: Cap on completion tokens; None = the endpoint's default.

        Returns:
            The completion text with token usage, latency (SDK retries and backoff
            included) and ``finish_reason``. A reply cut at ``max_tokens`` is returned,
            counted and flagged (``Completion.truncated``), not raised: the caller decides
            (the summarizer splits its batch).

        Raises:
            LLMTransientError: Timeout, connection failure, 408/409/429/5xx after the SDK's
                retries.
            LLMPermanentError: Any other 4xx, or a reply without text.
        """
        payload = [{"role": m.role, "content": m.content} for m in messages]
        use_json = json_mode and self._json_mode_supported is not False
        started = time.perf_counter()
        try:
            try:
                response = self._create(payload, json_mode=use_json, max_tokens=max_tokens)
            except openai.BadRequestError:
                if not use_json:
                    raise
                # Many OpenAI-compatible servers reject response_format outright. The 400
                # might also be about something else, so only remember "unsupported" when
                # the same request without it goes through.
                self.meter.record_error(purpose, tenant, time.perf_counter() - started)
                started = time.perf_counter()
                response = self._create(payload, json_mode=False, max_tokens=max_tokens)
                with self._lock:
                    self._json_mode_supported = False
            else:
                if use_json and self._json_mode_supported is None:
                    with self._lock:
                        self._json_mode_supported = True
        except openai.APIError as exc:
            self.meter.record_error(purpose, tenant, time.perf_counter() - started)
            raise self._translate(exc) from exc
        latency = time.perf_counter() - started

        try:
            completion = self._to_completion(response, payload, latency)
        except LLMError:
            self.meter.record_error(purpose, tenant, latency)
            raise
        self.meter.record(purpose, tenant, completion)
        return completion

    def _create(
        self, payload: list[dict[str, str]], *, json_mode: bool, max_tokens: int | None
    ) -> Any:
        kwargs: dict[str, Any] = {"model": self.model, "messages": payload}
        if json_mode:
            kwargs["response_format"] = {"type": "json_object"}
        if max_tokens is not None:
            # max_tokens rather than max_completion_tokens: vLLM, Ollama and llama.cpp
            # all accept it, and OpenAI still does for chat models.
            kwargs["max_tokens"] = max_tokens
        if self.temperature is not None:
            kwargs["temperature"] = self.temperature
        return self._client.chat.completions.create(**kwargs)

    def _to_completion(
        self, response: Any, payload: list[dict[str, str]], latency: float
    ) -> Completion:
        if not response.choices:
            raise LLMPermanentError(f"model {self.model!r} returned no choices")
        choice = response.choices[0]
        message = choice.message
        text = message.content
        finish_reason = getattr(choice, "finish_reason", None)
        if text is None and finish_reason == "length":
            # The cap was spent before any visible text (e.g. on hidden reasoning): that is
            # a truncated answer the caller can act on (a smaller request), not a refusal.
            text = ""
        if text is None:
            refusal = getattr(message, "refusal", None)
            reason = f"refused: {refusal!r}" if refusal else "returned no text content"
            raise LLMPermanentError(self._scrub(f"model {self.model!r} {reason}"))
        usage = response.usage
        if usage is not None and usage.prompt_tokens is not None:
            prompt_tokens = int(usage.prompt_tokens)
            completion_tokens = int(usage.completion_tokens or 0)
            estimated = False
        else:
            # Some local servers omit usage. Estimate with the common ~4 characters per
            # token rule so cost dashboards are not silently zero; flagged as estimated.
            prompt_tokens = _estimate_tokens("".join(m["content"] for m in payload))
            completion_tokens = _estimate_tokens(text)
            estimated = True
        return Completion(
            text=text,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            latency_s=latency,
            model=getattr(response, "model", "") or self.model,
            usage_estimated=estimated,
            finish_reason=finish_reason,
        )

    def _translate(self, exc: openai.APIError) -> LLMError:
        """Sort an SDK error into transient (retry later) or permanent (dead-letter)."""
        if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
            return LLMTransientError(
                self._scrub(f"{type(exc).__name__} calling {self.base_url}: {exc.message}")
            )
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            text = self._scrub(f"HTTP {status} from {self.base_url} ({self.model}): {exc.message}")
            if status in _TRANSIENT_STATUS or status >= 500:
                return LLMTransientError(text)
            if status in _CONFIG_STATUS:
                return LLMConfigError(text)
            return LLMPermanentError(text)
        # APIResponseValidationError and friends: the endpoint answered something that is
        # not a chat completion. That is a server fault, not the input's, so retry later.
        return LLMTransientError(self._scrub(f"{type(exc).__name__}: {exc}"))

    def _scrub(self, text: str) -> str:
        """Remove the API key from text that may echo request data (some proxies do)."""
        if self._secret:
            text = text.replace(self._secret, "***")
        return text


def _estimate_tokens(text: str) -> int:
    return max(1, (len(text) + 3) // 4) if text else 0
