"""Log output of the workers and the CLI: text, or one JSON object per line; no secrets.

``log_format=json`` (``LIGHTMEM_LOG_FORMAT``, ``--log-format``) makes every log record one
line of JSON on stderr, for log shippers::

    {"ts": "2024-05-01T09:00:00.123Z", "level": "INFO", "logger": "lightmem.streams.app",
     "message": "sensory: batches 3, applied 40, ...", "process": 4242, "thread": "MainThread"}

plus ``exc_info`` (the formatted traceback) when there is one and any ``extra={...}`` fields.
``text`` (the default) is the worker's and the CLI's ``[time] [pid] [LEVEL]`` layout.

Secrets (the LLM key, the Elasticsearch key/password, the Kafka SASL password) are replaced
by ``***`` in every record's message and traceback, in both formats
(:func:`install_redaction`): the clients already avoid logging them, this is the net
under them.

Exceptions: none of its own.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from lightmem.settings import Settings

__all__ = [
    "JsonFormatter",
    "configure_logging",
    "install_redaction",
    "quiet_progress_bars",
    "secrets_of",
    "REDACTED",
]

REDACTED = "***"
#: Shorter "secrets" (placeholders like ``x``) would redact ordinary words.
_MIN_SECRET_LEN = 6
#: Placeholder keys for local endpoints: not secret.
_NOT_SECRET = frozenset({"not-needed", "none", "changeme"})

#: Attributes every LogRecord has; anything else came from ``extra=``.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ISO 8601, ms), level, logger, message, process,
    thread, ``exc_info``/``stack_info`` when present, and the record's ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
            "thread": record.threadName,
        }
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            body["exc_info"] = record.exc_text
        if record.stack_info:
            body["stack_info"] = self.formatStack(record.stack_info)
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_") and key not in body:
                body[key] = value
        return json.dumps(body, ensure_ascii=False, default=repr)


# -- redaction ---------------------------------------------------------------------------------

_redact_lock = threading.Lock()
_secrets: tuple[str, ...] = ()
_base_factory: Callable[..., logging.LogRecord] | None = None


def secrets_of(settings: Settings) -> list[str]:
    """The secret values of ``settings`` worth redacting (placeholders and unset ones not)."""
    values = [settings.llm_api_key, settings.es_api_key, settings.es_password,
              settings.kafka_sasl_password]
    out = []
    for v in values:
        raw = v.get_secret_value() if v is not None else ""
        if len(raw) >= _MIN_SECRET_LEN and raw.lower() not in _NOT_SECRET:
            out.append(raw)
    return out


def _redact(text: str, secrets: Iterable[str]) -> str:
    for s in secrets:
        text = text.replace(s, REDACTED)
    return text


def _redacting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    assert _base_factory is not None
    record = _base_factory(*args, **kwargs)
    secrets = _secrets
    if not secrets:
        return record
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a bad format string is logging's own error to report
        return record
    if any(s in message for s in secrets):
        record.msg, record.args = _redact(message, secrets), ()
    if record.exc_info and record.exc_info[1] is not None:
        text = logging.Formatter().formatException(record.exc_info)
        if any(s in text for s in secrets):
            record.exc_text = _redact(text, secrets)
    return record


def install_redaction(secrets: Iterable[str]) -> None:
    """Redact ``secrets`` from every log record created from now on, whatever the handlers
    and formatters: the record factory rewrites the message,
    and the traceback text when an exception carries a secret. Calling it again adds
    secrets; it installs the factory once."""
    global _secrets, _base_factory
    with _redact_lock:
        merged = dict.fromkeys([*_secrets, *(s for s in secrets if s)])
        # Longest first: a secret containing another is replaced whole.
        _secrets = tuple(sorted(merged, key=len, reverse=True))
        if _base_factory is None:
            _base_factory = logging.getLogRecordFactory()
            logging.setLogRecordFactory(_redacting_factory)


# -- configuration -----------------------------------------------------------------------------


def quiet_progress_bars() -> None:
    """Turn off the model libraries' tqdm bars ("Loading weights ...") on stderr: with JSON
    logs every stderr line must be one JSON object."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a core dependency
        return
    hf_logging.disable_progress_bar()  # also huggingface_hub's


#: The text format of the workers' and the CLI's records.
TEXT_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"


def configure_logging(log_format: str, *, level: int | str = logging.WARNING,
                      secrets: Iterable[str] = ()) -> None:
    """Logging of a process: redaction always; with ``json``, one JSON line per record on
    stderr at ``level``. With ``text``, a handler at ``level`` only if the root logger has
    none yet and ``level`` is below WARNING (the CLI keeps Python's default: warnings)."""
    install_redaction(secrets)
    root = logging.getLogger()
    if log_format != "json":
        numeric = logging.getLevelName(level) if isinstance(level, str) else level
        if not root.handlers and isinstance(numeric, int) and numeric < logging.WARNING:
            logging.basicConfig(level=numeric, format=TEXT_FORMAT, stream=sys.stderr)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
