"""Metrics, logs and the Grafana dashboard without servers (lightmem.streams.observe.metrics,
lightmem.streams.observe.logs, lightmem/ops/grafana/lightmem.json). The HTTP endpoint test binds a
local port; nothing else leaves the process."""

from __future__ import annotations

import io
import json
import logging
import re
import socket
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from lightmem.ops.cli import app
from lightmem.processors.compress import IdentityBackend, SensoryCompressor
from lightmem.processors.llm import Completion
from lightmem.settings import Settings
from lightmem.streams.observe import metrics
from lightmem.streams.observe.logs import (
    REDACTED,
    JsonFormatter,
    configure_logging,
    install_redaction,
    secrets_of,
)
from lightmem.streams.observe.stats import usage_from_metrics

DASHBOARD = Path(__file__).resolve().parents[1] / "lightmem/ops/grafana/lightmem.json"


def value(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- metrics -------------------------------------------------------------------------------------


def test_record_step_counts_out_topics_and_dead_letter_reasons() -> None:
    stage = "unit-step"
    metrics.record_events_in(stage, "t.turns", 5)
    metrics.record_step(stage, seconds=0.2, applied=3, skipped=1,
                        out_topics=["t.segments", "t.segments", "t.dlq"],
                        dead_letter_reasons={"parse": 1})
    assert value("lightmem_events_in_total", stage=stage, topic="t.turns") == 5
    assert value("lightmem_events_applied_total", stage=stage) == 3
    assert value("lightmem_events_skipped_total", stage=stage) == 1
    assert value("lightmem_events_out_total", stage=stage, topic="t.segments") == 2
    assert value("lightmem_events_out_total", stage=stage, topic="t.dlq") == 1
    assert value("lightmem_dead_letters_total", stage=stage, reason="parse") == 1
    assert value("lightmem_batch_seconds_count", stage=stage) == 1
    assert value("lightmem_batch_seconds_sum", stage=stage) == pytest.approx(0.2)


def test_usage_meter_feeds_llm_metrics_and_its_own_totals() -> None:
    meter = metrics.PrometheusUsageMeter()
    done = Completion(text="ok", prompt_tokens=30, completion_tokens=7, latency_s=0.4)
    meter.record("unit-summarize", "acme", done)
    meter.record("unit-summarize", "acme", done)
    meter.record_error("unit-summarize", "acme", 1.5)
    assert meter.total().calls == 2 and meter.total().errors == 1  # still a UsageMeter
    assert value("lightmem_llm_calls_total", purpose="unit-summarize", tenant="acme") == 2
    assert value("lightmem_llm_errors_total", purpose="unit-summarize", tenant="acme") == 1
    assert value("lightmem_llm_tokens_total", purpose="unit-summarize", tenant="acme",
                 kind="prompt") == 60
    assert value("lightmem_llm_tokens_total", purpose="unit-summarize", tenant="acme",
                 kind="completion") == 14
    assert value("lightmem_llm_latency_seconds_count", purpose="unit-summarize") == 3
    # `lightmem stats --stream` reads the same numbers back from a scrape.
    usage = usage_from_metrics([metrics.scrape()])[("unit-summarize", "acme")]
    assert (usage.calls, usage.errors, usage.prompt_tokens, usage.completion_tokens) == (
        2, 1, 60, 14)


def test_consumer_lag_drops_revoked_partitions_and_sleep_window_gauge() -> None:
    metrics.set_consumer_lag({("t.turns", 0): 5, ("t.turns", 1): -3})
    assert value("lightmem_consumer_lag", topic="t.turns", partition="0") == 5
    assert value("lightmem_consumer_lag", topic="t.turns", partition="1") == 0  # never < 0
    metrics.set_consumer_lag({("t.turns", 1): 2})  # partition 0 revoked in a rebalance
    assert metrics.REGISTRY.get_sample_value(
        "lightmem_consumer_lag", {"topic": "t.turns", "partition": "0"}) is None
    assert value("lightmem_consumer_lag", topic="t.turns", partition="1") == 2
    metrics.set_consumer_lag({})
    metrics.set_sleep_window(None, True)
    metrics.set_sleep_window("acme", True)
    metrics.set_sleep_window("acme", False)
    assert value("lightmem_sleep_window_open", tenant="*") == 1
    assert value("lightmem_sleep_window_open", tenant="acme") == 0


def test_sensory_step_reports_dead_letters_by_reason() -> None:
    from lightmem.streams.ingest.stages import Inbound, SensoryStage
    from lightmem.streams.kafka.topics import Topics

    parts = SimpleNamespace(compressor=SensoryCompressor(IdentityBackend(), rate=0.6),
                            idle_timeout=timedelta(hours=1))
    stage = SensoryStage(Settings(max_event_bytes=2048), parts, Topics(prefix="t."))
    batch = [Inbound("t.turns", 0, 0, b"acme/c1", b"not json"),
             Inbound("t.turns", 0, 1, b"acme/c1", b"x" * 4096)]
    result = stage.step(batch, {})
    assert result.dead_letters == 2 and result.dead_letter_reasons == {"parse": 2}


def test_metrics_endpoint_serves_the_registry_on_localhost_only() -> None:
    port = free_port()
    server = metrics.start_metrics_server(port)
    try:
        assert server.url == f"http://127.0.0.1:{port}/metrics"
        body = httpx.get(server.url, timeout=10).text
        names = {f.name for f in text_string_to_metric_families(body)}
        assert {"lightmem_events_in", "lightmem_consumer_lag", "process_cpu_seconds"} <= names
        with pytest.raises(metrics.MetricsServerError, match=str(port)):
            metrics.start_metrics_server(port)  # taken: a clear error, not a traceback
    finally:
        server.close()


def test_metric_names_match_the_registry() -> None:
    families = {f.name: f.type for f in text_string_to_metric_families(metrics.scrape())}
    for name in metrics.METRIC_NAMES:
        family = name.removesuffix("_total")
        assert family in families, name
        assert name.endswith("_total") == (families[family] == "counter"), name


# -- the Grafana dashboard -------------------------------------------------------------------------


def _queries(node: object) -> list[str]:
    if isinstance(node, dict):
        out = [v for k, v in node.items() if k in {"expr", "definition"} and isinstance(v, str)]
        return out + [q for v in node.values() for q in _queries(v)]
    if isinstance(node, list):
        return [q for v in node for q in _queries(v)]
    return []


def test_grafana_dashboard_queries_only_metrics_that_exist_and_all_of_them() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"] and dashboard["panels"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    used = set()
    for query in _queries(dashboard):
        for name in re.findall(r"\blightmem_[a-z_]+", query):
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            assert base in metrics.METRIC_NAMES, f"{name} in {query!r}"
            used.add(base)
    assert used == metrics.METRIC_NAMES  # every metric has a panel


# -- logs ----------------------------------------------------------------------------------------


def _format(record_logger: logging.Logger, fn, formatter: logging.Formatter) -> str:  # noqa: ANN001
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    record_logger.addHandler(handler)
    record_logger.setLevel(logging.INFO)
    record_logger.propagate = False
    try:
        fn()
    finally:
        record_logger.removeHandler(handler)
    return stream.getvalue()


def test_json_formatter_writes_one_object_per_line_with_extra_and_traceback() -> None:
    log = logging.getLogger("lightmem.test.json")

    def emit() -> None:
        log.info("applied %d turns", 3, extra={"stage": "sensory"})
        try:
            raise ValueError("bad\nvalue")
        except ValueError:
            log.exception("step failed")

    lines = _format(log, emit, JsonFormatter()).splitlines()
    assert len(lines) == 2  # the traceback's newlines stay inside the JSON string
    first, second = map(json.loads, lines)
    assert first["message"] == "applied 3 turns" and first["level"] == "INFO"
    assert first["logger"] == "lightmem.test.json" and first["stage"] == "sensory"
    assert first["ts"].endswith("Z")
    assert "ValueError: bad" in second["exc_info"] and second["level"] == "ERROR"


def test_secrets_are_redacted_from_messages_and_tracebacks() -> None:
    key = "sk-test-0123456789abcdef"
    settings = Settings(llm_api_key=key, es_password="hunter2-but-longer")
    assert secrets_of(settings) == [key, "hunter2-but-longer"]
    assert secrets_of(Settings()) == []  # the "not-needed" placeholder is no secret
    install_redaction(secrets_of(settings))
    log = logging.getLogger("lightmem.test.redact")

    def emit() -> None:
        log.warning("calling with key=%s", key)
        try:
            raise RuntimeError(f"401 for {key}")
        except RuntimeError:
            log.exception("request failed")

    for formatter in (JsonFormatter(), logging.Formatter("%(message)s")):
        text = _format(log, emit, formatter)
        assert key not in text and REDACTED in text
        assert "RuntimeError: 401 for ***" in text.replace("\\n", "\n")


def test_configure_logging_json_replaces_the_root_handlers(capsys: pytest.CaptureFixture
                                                            ) -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("json")
        logging.getLogger("lightmem.test.cli").warning("rejected %d lines", 2)
        err = capsys.readouterr().err.strip().splitlines()
        assert json.loads(err[-1])["message"] == "rejected 2 lines"
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


# -- settings and CLI -----------------------------------------------------------------------------


def test_settings_and_cli_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTMEM_METRICS_PORT", "9464")
    monkeypatch.setenv("LIGHTMEM_LOG_FORMAT", "json")
    s = Settings()
    assert (s.metrics_port, s.metrics_addr, s.log_format) == (9464, "127.0.0.1", "json")
    monkeypatch.delenv("LIGHTMEM_LOG_FORMAT")  # json would replace this process's handlers
    runner = CliRunner()
    assert runner.invoke(app, ["worker", "--metrics-port", "70000"]).exit_code == 2
    monkeypatch.setenv("LIGHTMEM_LOG_FORMAT", "yaml")
    result = runner.invoke(app, ["stats", "--help"])
    assert result.exit_code == 2 and "log_format" in result.output
