"""OpenAIChatModel against the OpenAI-protocol stub server, over real HTTP."""

from __future__ import annotations

import json
import socket
import threading
from typing import Any

import httpx
import pytest

from lightmem.ops.bench.llm_stub import OpenAIStubServer, StubReply, count_words, scripted_responder
from lightmem.processors.llm import (
    ChatMessage,
    LLMConfigError,
    LLMPermanentError,
    LLMTransientError,
    UsageMeter,
)
from lightmem.streams.models.openai_chat import OpenAIChatModel

KEY = "sk-test-0123456789abcdef"
MESSAGES = [
    ChatMessage(role="system", content="You answer in JSON."),
    ChatMessage(role="user", content="Say hello to Caroline please"),
]
PROMPT_WORDS = sum(count_words(m.content) for m in MESSAGES)


def model_for(server: OpenAIStubServer, **kwargs: Any) -> OpenAIChatModel:
    kwargs.setdefault("max_retries", 0)
    kwargs.setdefault("timeout", 5.0)
    return OpenAIChatModel(server.base_url, "stub-model", KEY, **kwargs)


def test_completion_usage_is_metered_per_stage_and_tenant() -> None:
    meter = UsageMeter()
    with OpenAIStubServer(lambda request: "hello there Caroline") as server:
        chat = model_for(server, meter=meter)
        first = chat.complete(MESSAGES, purpose="summarize", tenant="acme")
        chat.complete(MESSAGES, purpose="summarize", tenant="acme")
        chat.complete(MESSAGES, purpose="consolidate", tenant="globex", max_tokens=7)

    assert first.text == "hello there Caroline"
    assert (first.prompt_tokens, first.completion_tokens) == (PROMPT_WORDS, 3)
    assert first.model == "stub-model"
    assert not first.usage_estimated
    assert first.latency_s > 0

    totals = meter.by_key()
    assert set(totals) == {("summarize", "acme"), ("consolidate", "globex")}
    acme = totals[("summarize", "acme")]
    assert (acme.calls, acme.prompt_tokens, acme.completion_tokens, acme.errors) == (
        2,
        2 * PROMPT_WORDS,
        6,
        0,
    )
    assert totals[("consolidate", "globex")].calls == 1
    assert meter.total().calls == 3

    # What went over the wire: the model, the messages, the key as a bearer token.
    request = server.requests[-1]
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.body is not None
    assert request.body["model"] == "stub-model"
    assert request.body["max_tokens"] == 7
    assert request.body["messages"][1] == {"role": "user", "content": MESSAGES[1].content}
    assert "response_format" not in request.body


def test_json_mode_sends_response_format() -> None:
    with OpenAIStubServer(lambda request: '{"ok": true}') as server:
        chat = model_for(server)
        completion = chat.complete(MESSAGES, purpose="summarize", tenant="acme", json_mode=True)
    assert json.loads(completion.text) == {"ok": True}
    assert server.chat_requests[0]["response_format"] == {"type": "json_object"}
    assert chat.json_mode_supported is True


def test_json_mode_rejected_with_400_falls_back_once_and_is_remembered() -> None:
    with OpenAIStubServer(lambda request: '{"ok": true}', reject_response_format=True) as server:
        chat = model_for(server)
        first = chat.complete(MESSAGES, purpose="summarize", tenant="acme", json_mode=True)
        second = chat.complete(MESSAGES, purpose="summarize", tenant="acme", json_mode=True)

    assert first.text == second.text == '{"ok": true}'
    sent = ["response_format" in body for body in server.chat_requests]
    # Rejected once, re-sent without it, and never sent again.
    assert sent == [True, False, False]
    assert chat.json_mode_supported is False
    totals = chat.meter.total()
    assert (totals.calls, totals.errors) == (2, 1)


def test_400_unrelated_to_json_mode_is_permanent_and_not_remembered() -> None:
    reply = StubReply(status=400, content="messages[1].content is too long")
    with OpenAIStubServer(lambda request: reply) as server:
        chat = model_for(server)
        with pytest.raises(LLMPermanentError, match="HTTP 400.*too long"):
            chat.complete(MESSAGES, purpose="summarize", tenant="acme", json_mode=True)
        with pytest.raises(LLMPermanentError):
            chat.complete(MESSAGES, purpose="summarize", tenant="acme")

    # json mode: the original request plus the one retry without response_format;
    # then the plain call once. 4xx is never retried by the SDK.
    assert len(server.chat_requests) == 3
    assert chat.json_mode_supported is None
    totals = chat.meter.total(purpose="summarize", tenant="acme")
    assert (totals.calls, totals.errors) == (0, 3)


def test_429_then_success_is_retried_by_the_client() -> None:
    script = scripted_responder(
        [StubReply(status=429, content="slow down", retry_after_s=0.001), "fine now"]
    )
    with OpenAIStubServer(script) as server:
        chat = model_for(server, max_retries=2)
        completion = chat.complete(MESSAGES, purpose="summarize", tenant="acme")

    assert completion.text == "fine now"
    assert len(server.chat_requests) == 2
    totals = chat.meter.total()
    assert (totals.calls, totals.errors) == (1, 0)


def test_500_forever_is_transient_after_the_retries() -> None:
    script = scripted_responder([StubReply(status=500, content="boom", retry_after_s=0.001)])
    with OpenAIStubServer(script) as server:
        chat = model_for(server, max_retries=2)
        with pytest.raises(LLMTransientError, match="HTTP 500"):
            chat.complete(MESSAGES, purpose="summarize", tenant="acme")

    assert len(server.chat_requests) == 3  # the first try and two retries
    totals = chat.meter.total()
    assert (totals.calls, totals.errors) == (0, 1)


def test_auth_error_is_a_config_error_without_the_api_key() -> None:
    # Some proxies echo the request (headers included) in their error body.
    reply = StubReply(status=401, content=f"invalid key Bearer {KEY}")
    with OpenAIStubServer(lambda request: reply) as server:
        chat = model_for(server)
        # Not a permanent (dead-letter) error: a bad key must stop the run, not bury
        # every input in the dead-letter queue.
        with pytest.raises(LLMConfigError) as caught:
            chat.complete(MESSAGES, purpose="summarize", tenant="acme")
    assert KEY not in str(caught.value)
    assert "***" in str(caught.value)
    assert KEY not in repr(chat)


def test_timeout_is_transient() -> None:
    with OpenAIStubServer(lambda request: "late", latency_s=0.5) as server:
        chat = model_for(server, timeout=0.05)
        with pytest.raises(LLMTransientError, match="APITimeoutError"):
            chat.complete(MESSAGES, purpose="summarize", tenant="acme")
    assert chat.meter.total().errors == 1


def test_connection_refused_is_transient() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port any more.
    chat = OpenAIChatModel(f"http://127.0.0.1:{port}/v1", "m", KEY, max_retries=0, timeout=2.0)
    with pytest.raises(LLMTransientError, match="APIConnectionError"):
        chat.complete(MESSAGES, purpose="summarize", tenant="acme")


def test_missing_usage_is_estimated_and_flagged() -> None:
    reply = StubReply(content="a reply of some length", include_usage=False)
    with OpenAIStubServer(lambda request: reply) as server:
        completion = model_for(server).complete(MESSAGES, purpose="summarize", tenant="acme")
    assert completion.usage_estimated
    assert completion.prompt_tokens > 0 and completion.completion_tokens > 0


def test_stub_serves_concurrent_requests_and_lists_models() -> None:
    # Four requests can only pass the barrier together: proof that the stub serves them
    # concurrently (benchmarks rely on it), with no timing assumption.
    barrier = threading.Barrier(4, timeout=10)

    def responder(request: dict[str, Any]) -> str:
        barrier.wait()
        return "together"

    with OpenAIStubServer(responder) as server:
        chat = model_for(server)
        results: list[str] = []
        threads = [
            threading.Thread(
                target=lambda: results.append(
                    chat.complete(MESSAGES, purpose="summarize", tenant="acme").text
                )
            )
            for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        models = httpx.get(f"{server.base_url}/models").json()

    assert results == ["together"] * 4
    assert models["object"] == "list"
    assert models["data"][0]["id"] == "stub-model"


def test_a_stopped_stub_hangs_up_on_pooled_connections() -> None:
    server = OpenAIStubServer(lambda request: "up").start()
    chat = model_for(server)
    assert chat.complete(MESSAGES, purpose="summarize", tenant="acme").text == "up"
    server.stop()
    # The client's keep-alive connection must not keep talking to a stopped server.
    with pytest.raises(LLMTransientError, match="APIConnectionError"):
        chat.complete(MESSAGES, purpose="summarize", tenant="acme")


def test_the_stub_cuts_at_max_tokens_and_the_client_reports_length() -> None:
    # Real endpoints stop at max_tokens with finish_reason "length"; the stub must too, or
    # no test over HTTP can exercise what a cut answer does to its caller.
    answer = '{"data": [{"source_id": 0, "fact": "Caroline adopted a dog."}]}'
    meter = UsageMeter()
    with OpenAIStubServer(lambda request: answer) as server:
        chat = model_for(server, meter=meter)
        cut = chat.complete(MESSAGES, purpose="summarize", tenant="acme", max_tokens=4)
        whole = chat.complete(MESSAGES, purpose="summarize", tenant="acme", max_tokens=64)
        uncapped = chat.complete(MESSAGES, purpose="summarize", tenant="acme")
        # max_completion_tokens (OpenAI's newer name) is honoured too.
        raw = httpx.post(
            f"{server.base_url}/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}],
                  "max_completion_tokens": 2},
        ).json()

    # The exact prefix of the answer, spacing kept: JSON that stops mid-way.
    assert cut.text == '{"data": [{"source_id": 0, "fact":'
    assert (cut.finish_reason, cut.truncated, cut.completion_tokens) == ("length", True, 4)
    for full in (whole, uncapped):
        assert (full.text, full.finish_reason, full.truncated) == (answer, "stop", False)
    assert raw["choices"][0]["finish_reason"] == "length"
    assert raw["choices"][0]["message"]["content"] == '{"data": [{"source_id":'
    # The cut call is a call like any other: counted, with the tokens it cost.
    usage = meter.by_key()[("summarize", "acme")]
    assert (usage.calls, usage.errors) == (3, 0)
    assert usage.completion_tokens == 4 + 2 * count_words(answer)


def test_a_reply_cut_before_any_text_is_a_truncated_empty_completion() -> None:
    # A reasoning model can spend the whole cap before writing: content null, "length".
    # The caller can retry smaller; a refusal (null content, "stop") stays permanent.
    cut = StubReply(content=None, finish_reason="length")
    refused = StubReply(content=None)
    with OpenAIStubServer(scripted_responder([cut, refused])) as server:
        chat = model_for(server)
        completion = chat.complete(MESSAGES, purpose="summarize", tenant="acme", max_tokens=8)
        with pytest.raises(LLMPermanentError, match="no text content"):
            chat.complete(MESSAGES, purpose="summarize", tenant="acme", max_tokens=8)
    assert (completion.text, completion.truncated) == ("", True)
    usage = chat.meter.by_key()[("summarize", "acme")]
    assert (usage.calls, usage.errors) == (1, 1)
