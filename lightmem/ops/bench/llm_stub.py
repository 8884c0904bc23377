"""An OpenAI-protocol test double: a real HTTP server with scripted answers.

OpenAI is a paid API and the build machine has no internet, so tests and benchmarks talk
to :class:`OpenAIStubServer` instead: it speaks the chat-completions protocol over real HTTP
(``POST /v1/chat/completions`` answers a ``chat.completion`` object, ``GET /v1/models``
lists one model), so the whole client path (the openai SDK, its retries, timeouts, error
mapping and metering) runs exactly as against a real endpoint.

What the assistant says is decided by a *responder*: a function from the request JSON to
the reply text, or to a :class:`StubReply` that can force an HTTP status (429, 500, 400 ...)
for error tests. :func:`fact_extraction_responder` is a deterministic rule-based
"model" for the summarization prompt; :func:`scripted_responder` plays a fixed script.

Usage numbers: the stub counts *words* (``str.split``), not model tokens: prompt tokens are
the words of every message's content, completion tokens the words of the reply. Good
enough for relative cost comparisons in benchmarks; not a tokenizer.

Output cap: like a real endpoint, the stub honours ``max_tokens`` (or
``max_completion_tokens``) in stub tokens: a longer reply is cut after that many words and
answered with ``finish_reason: "length"``, so callers' truncation handling runs over HTTP.

Exceptions: none of its own. A responder that raises makes the server answer HTTP 500
with the exception in the error message (so a broken responder shows up in the test that
uses it, as an ``LLMTransientError``).
"""

from __future__ import annotations

import itertools
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = [
    "OpenAIStubServer",
    "ReceivedRequest",
    "Responder",
    "StubReply",
    "fact_extraction_responder",
    "scripted_responder",
    "count_words",
]


@dataclass(frozen=True)
class StubReply:
    """A scripted answer: reply text, or an HTTP error the client must handle.

    Args:
        content: The assistant message text (status 200) or the error message (otherwise);
            None sends ``"content": null`` (a reasoning model whose cap ran out first).
        status: HTTP status to answer with (default 200).
        retry_after_s: If set, sent as ``retry-after-ms``: the openai SDK then waits this
            long before its retry instead of its 0.5 s+ backoff (keeps retry tests fast).
        headers: Extra response headers.
        include_usage: False omits ``usage`` from the completion, like some local servers.
        finish_reason: ``finish_reason`` of the choice (default "stop"); a reply longer
            than the request's ``max_tokens`` is cut and answered with "length" instead.
    """

    content: str | None = ""
    status: int = 200
    retry_after_s: float | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    include_usage: bool = True
    finish_reason: str = "stop"


#: Request JSON -> reply text or scripted reply.
Responder = Callable[[dict[str, Any]], str | StubReply]


@dataclass(frozen=True)
class ReceivedRequest:
    """One HTTP request the stub received (errors included)."""

    method: str
    path: str
    #: Header names lower-cased.
    headers: dict[str, str]
    #: The decoded JSON body, or None (GET, or a body that was not JSON).
    body: dict[str, Any] | None


def count_words(text: str) -> int:
    """The stub's token count: whitespace-separated words."""
    return len(text.split())


class OpenAIStubServer:
    """An OpenAI-compatible chat-completions server on ``127.0.0.1`` in a background thread.

    A context manager: the server listens on an ephemeral port from ``__enter__`` (or
    :meth:`start`) until ``__exit__`` (or :meth:`stop`). Requests are served concurrently
    (one thread each), so benchmarks can measure parallel callers against ``latency_s``.

    Args:
        responder: Decides each chat completion's reply from the request JSON.
        latency_s: Fixed delay added to every chat completion, simulating model time
            (default 0.0).
        model: Model id listed by ``GET /v1/models`` and echoed when a request names none.
        reject_response_format: Answer 400 to any request carrying ``response_format``,
            like servers without JSON mode (default False).

    Attributes:
        requests: Every request received, in arrival order (read it after the calls
            returned; appends are locked).
    """

    def __init__(
        self,
        responder: Responder,
        *,
        latency_s: float = 0.0,
        model: str = "stub-model",
        reject_response_format: bool = False,
    ) -> None:
        self.responder = responder
        self.latency_s = latency_s
        self.model = model
        self.reject_response_format = reject_response_format
        self.requests: list[ReceivedRequest] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._httpd: _QuietThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> OpenAIStubServer:
        """Bind an ephemeral port and start serving; returns self."""
        if self._httpd is not None:
            return self
        httpd = _QuietThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, name="openai-stub", kwargs={"poll_interval": 0.05}
        )
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port (in-flight handler threads are daemons)."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._httpd.close_connections()
        if self._thread is not None:
            self._thread.join()
        self._httpd = None
        self._thread = None

    def __enter__(self) -> OpenAIStubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port (only while running)."""
        if self._httpd is None:
            raise RuntimeError("OpenAIStubServer is not running: use it as a context manager")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """API root to give an OpenAI client, e.g. ``http://127.0.0.1:41234/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def chat_requests(self) -> list[dict[str, Any]]:
        """JSON bodies of the chat-completion requests received, in order."""
        with self._lock:
            return [
                r.body
                for r in self.requests
                if r.path.rstrip("/").endswith("/chat/completions") and r.body is not None
            ]

    # -- protocol ----------------------------------------------------------------------

    def _record(self, request: ReceivedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _chat_completion(self, body: dict[str, Any]) -> tuple[int, dict[str, str], dict]:
        """Answer one chat completion: (status, extra headers, JSON body)."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error(400, "'messages' must be a non-empty list", param="messages")
        if body.get("stream"):
            return _error(400, "the stub does not implement streaming", param="stream")
        if self.reject_response_format and "response_format" in body:
            return _error(400, "response_format is not supported", param="response_format")
        if self.latency_s > 0:
            # Simulated model time, in this request's own thread: concurrent requests
            # overlap exactly like they would against a real server.
            time.sleep(self.latency_s)
        try:
            reply = self.responder(body)
        except Exception as exc:  # noqa: BLE001 - any responder bug becomes an HTTP 500
            message = f"responder failed: {type(exc).__name__}: {exc}"
            return _error(500, message, kind="server_error")
        if isinstance(reply, str):
            reply = StubReply(content=reply)
        headers = dict(reply.headers)
        if reply.retry_after_s is not None:
            headers["retry-after-ms"] = f"{reply.retry_after_s * 1000:g}"
        if reply.status != 200:
            message = reply.content or HTTPStatus(reply.status).phrase
            status, _, payload = _error(reply.status, message)
            return status, headers, payload
        cap = _max_tokens(body)
        if cap is not None and reply.content is not None:
            content, was_cut = _cut_words(reply.content, cap)
            if was_cut:
                reply = replace(reply, content=content, finish_reason="length")
        completion: dict[str, Any] = {
            "id": f"chatcmpl-stub-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or self.model,
            "system_fingerprint": "lightmem-stub",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply.content, "refusal": None},
                    "logprobs": None,
                    "finish_reason": reply.finish_reason,
                }
            ],
        }
        if reply.include_usage:
            prompt = sum(count_words(_content_text(m)) for m in messages if isinstance(m, dict))
            completion_words = count_words(reply.content or "")
            completion["usage"] = {
                "prompt_tokens": prompt,
                "completion_tokens": completion_words,
                "total_tokens": prompt + completion_words,
            }
        return 200, headers, completion

    def _models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": self.model, "object": "model", "created": 0, "owned_by": "lightmem"}],
        }


def _max_tokens(body: dict[str, Any]) -> int | None:
    """The request's completion cap (``max_completion_tokens`` wins, as at OpenAI)."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


_WORD = re.compile(r"\S+")


def _cut_words(text: str, limit: int) -> tuple[str, bool]:
    """``text`` up to the end of its ``limit``-th word (spacing kept), and whether it was cut.

    Cutting the text itself, not re-joining words, gives what a real cap gives: the exact
    prefix of the answer, e.g. JSON that stops mid-string.
    """
    for n, match in enumerate(_WORD.finditer(text), start=1):
        if n == limit:
            rest = text[match.end():]
            return (text[: match.end()], True) if rest.strip() else (text, False)
    if limit == 0 and text.strip():
        return "", True
    return text, False


def _content_text(message: dict[str, Any]) -> str:
    """A message's text: a string, or the text parts of a content-part list."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


def _error(
    status: int, message: str, *, param: str | None = None, kind: str | None = None
) -> tuple[int, dict[str, str], dict]:
    """An OpenAI-shaped error body: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = kind or _ERROR_TYPES.get(status, "server_error" if status >= 500 else "api_error")
    return status, {}, {"error": {"message": message, "type": kind, "param": param, "code": None}}


class _QuietThreadingHTTPServer(ThreadingHTTPServer):
    # Handler threads die with the process: a client that timed out leaves its handler
    # sleeping in simulated latency, and shutdown must not wait for it.
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Hang up on every client. Without this a pooled keep-alive connection would
        still be answered by its handler thread after the server was stopped."""
        with self._open_lock:
            sockets, self._open = list(self._open), set()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the client

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up (timeout tests) are expected; don't spray tracebacks.
        return


def _make_handler(server: OpenAIStubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.1 keep-alive like real endpoints (the SDK pools connections); the socket
        # timeout frees a handler thread whose client went idle.
        protocol_version = "HTTP/1.1"
        timeout = 30
        # Headers and body go out in two writes; with Nagle on, the client's delayed ACK
        # would add ~40 ms to every call and swamp the simulated latency in benchmarks.
        disable_nagle_algorithm = True
        server_version = "lightmem-openai-stub/1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
            return

        def _send_json(self, status: int, payload: Any, headers: Mapping[str, str]) -> None:
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except OSError:
                # The client gave up (its timeout fired during simulated latency), or
                # stop() hung up on it.
                self.close_connection = True

        def _headers(self) -> dict[str, str]:
            return {k.lower(): v for k, v in self.headers.items()}

        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            path = self.path.split("?", 1)[0].rstrip("/")
            server._record(ReceivedRequest("GET", self.path, self._headers(), None))
            if path.endswith("/models"):
                self._send_json(200, server._models(), {})
            else:
                status, headers, payload = _error(404, f"no route for GET {path}")
                self._send_json(status, payload, headers)

        def do_POST(self) -> None:  # noqa: N802 - http.server naming
            path = self.path.split("?", 1)[0].rstrip("/")
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
            server._record(ReceivedRequest("POST", self.path, self._headers(), body))
            if not path.endswith("/chat/completions"):
                status, headers, payload = _error(404, f"no route for POST {path}")
            elif not isinstance(body, dict):
                status, headers, payload = _error(400, "request body is not a JSON object")
            else:
                status, headers, payload = server._chat_completion(body)
            self._send_json(status, payload, headers)

    return Handler


# -- responders --------------------------------------------------------------------------


def scripted_responder(
    script: Iterable[str | StubReply | Responder], *, repeat_last: bool = True
) -> Responder:
    """Answer successive requests from ``script``: text, a :class:`StubReply`, or a responder.

    Args:
        script: One item per request, in order. A callable item is called with the request.
        repeat_last: When the script runs out, keep answering with its last item (default
            True, e.g. "500 forever"); False answers HTTP 500 "script exhausted" instead.

    Returns:
        A thread-safe responder.
    """
    items = list(script)
    if not items:
        raise ValueError("script: must hold at least one reply (got [])")
    lock = threading.Lock()
    position = 0

    def respond(request: dict[str, Any]) -> str | StubReply:
        nonlocal position
        with lock:
            if position < len(items):
                item = items[position]
                position += 1
            elif repeat_last:
                item = items[-1]
            else:
                return StubReply(status=500, content="scripted_responder: script exhausted")
        return item(request) if callable(item) else item

    return respond


#: A turn line of the summarization prompt: ``[timestamp, weekday] idx.speaker: text``.
_TURN_LINE = re.compile(
    r"^\[(?P<when>[^\]]*)\]\s*(?P<idx>\d+)\.(?P<speaker>[^:]+?):\s?(?P<text>.*)$"
)


def fact_extraction_responder(request: dict[str, Any]) -> str:
    """A deterministic stand-in for the fact-extraction model.

    Reads the turn lines (``[timestamp, weekday] idx.speaker: text``) of every user message
    in the request and returns ``{"data": [{"source_id": idx, "fact": "<speaker> said:
    <text>"}]}``, one fact per turn line, in prompt order. Lines that are not turn lines
    (topic headers, instructions) are ignored; a repair request (the original prompt
    followed by a complaint) gets the same, valid answer.

    Args:
        request: The chat-completions request JSON.

    Returns:
        The reply text (a JSON object).
    """
    facts = []
    for message in request.get("messages", []):
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        for line in _content_text(message).splitlines():
            match = _TURN_LINE.match(line.strip())
            if match is None:
                continue
            text = match["text"].strip()
            facts.append(
                {"source_id": int(match["idx"]), "fact": f"{match['speaker'].strip()} said: {text}"}
            )
    return json.dumps({"data": facts})
