"""Tracing setup follows the standard OTEL_* variables; statements get low-cardinality names."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from shared import tracing

ENDPOINT = "http://127.0.0.1:4318"


@pytest.mark.parametrize(
    ("environ", "exports"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ""}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{ENDPOINT}/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_SDK_DISABLED": "false"}, True),
    ],
)
def test_export_happens_only_when_an_otlp_endpoint_is_set(environ: dict, exports: bool) -> None:
    assert tracing.exporting(environ) is exports


def _processors(provider: object) -> list[object]:
    return list(provider._active_span_processor._span_processors)  # type: ignore[attr-defined]


def test_without_an_endpoint_the_provider_has_no_exporter() -> None:
    provider = tracing.provider("agent", "agent-1", environ={})
    assert _processors(provider) == []
    assert provider.resource.attributes["service.name"] == "baton-agent"
    assert provider.resource.attributes["service.instance.id"] == "agent-1"


def test_with_an_endpoint_the_provider_exports_over_otlp_http(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", ENDPOINT)
    provider = tracing.provider("policy", environ={"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT})
    try:
        [processor] = _processors(provider)
        assert isinstance(processor, BatchSpanProcessor)
        assert isinstance(processor.span_exporter, OTLPSpanExporter)
    finally:
        provider.shutdown()


@pytest.mark.parametrize(
    ("query", "name", "operation"),
    [
        ("INSERT INTO messages (id) SELECT * FROM unnest($1::uuid[])", "INSERT messages", "INSERT"),
        ("  select user_id from messages where id = $1", "SELECT messages", "SELECT"),
        ("UPDATE runs SET status = $2 WHERE run_id = $1", "UPDATE runs", "UPDATE"),
        ("DELETE FROM usage WHERE call_id = $1", "DELETE usage", "DELETE"),
        (
            "WITH u AS (SELECT id FROM messages WHERE id = $1), used AS (INSERT INTO usage "
            "(call_id) SELECT $2 FROM u RETURNING call_id) SELECT * FROM used",
            "INSERT usage",
            "INSERT",
        ),
        ("WITH x AS (SELECT 1 FROM runs) SELECT * FROM x", "SELECT runs", "SELECT"),
        ("BEGIN;", "BEGIN", "BEGIN"),
        ("COMMIT", "COMMIT", "COMMIT"),
        ("SELECT 1", "SELECT", "SELECT"),
        ("", "QUERY", "QUERY"),
    ],
)
def test_statement_names_are_operation_and_table(query: str, name: str, operation: str) -> None:
    assert tracing.statement_name(query) == (name, operation)


def test_a_new_traceparent_is_a_valid_w3c_header_a_consumer_continues() -> None:
    seen = set()
    for _ in range(1000):
        header = tracing.new_traceparent()
        assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-00", header), header
        context = trace.get_current_span(propagate.extract({"traceparent": header}))
        span = context.get_span_context()
        assert span.is_valid and format(span.trace_id, "032x") == tracing.trace_id_of(header)
        seen.add(tracing.trace_id_of(header))
    assert len(seen) == 1000


class _Connection:
    def __init__(self) -> None:
        self.loggers: list[Any] = []

    def add_query_logger(self, callback: Any) -> None:
        self.loggers.append(callback)


@pytest.mark.parametrize(("recording", "loggers"), [(False, 0), (True, 1)])
def test_statements_become_spans_only_when_spans_are_recorded(
    monkeypatch: pytest.MonkeyPatch, recording: bool, loggers: int
) -> None:
    monkeypatch.setitem(tracing._state, "recording", recording)
    con = _Connection()
    asyncio.run(tracing.trace_queries(con))
    assert len(con.loggers) == loggers
