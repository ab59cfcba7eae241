"""The gateway's ASGI wrapper: one log line per request with a trace id, whatever the headers say."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from opentelemetry import trace
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from services.gateway.edge import HttpEdge as HttpMetrics
from shared import tracing
from shared.metrics import ServiceMetrics

# The SDK provider the service installs at boot (no exporter without OTEL_* variables).
tracing.setup("gateway")


async def _app(scope: Any, receive: Any, send: Any) -> None:
    structlog.contextvars.bind_contextvars(message_id="m-1")
    await send({"type": "http.response.start", "status": 202, "headers": []})
    await send({"type": "http.response.body", "body": b"secret answer text"})


async def _plain(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def _request(wrapper: HttpMetrics, path: str, headers: list[tuple[bytes, bytes]]) -> None:
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(_message: Any) -> None:
        return None

    asyncio.run(wrapper(scope, receive, send))


def _wrapper() -> HttpMetrics:
    return HttpMetrics(_app, ServiceMetrics("gateway", registry=CollectorRegistry()))


def test_one_line_per_request_with_ids_trace_and_outcome_but_no_body() -> None:
    with capture_logs() as logs:
        _request(_wrapper(), "/api/chat", [(b"authorization", b"Bearer abc.def.ghi")])
    assert len(logs) == 1
    line = logs[0]
    assert line["event"] == "handled" and line["status"] == 202 and line["outcome"] == "ok"
    assert line["message_id"] == "m-1" and "trace_id" in line
    assert line["duration_ms"] >= 0 and line["route"] == "unmatched"
    assert "secret answer text" not in repr(line) and "Bearer" not in repr(line)


def test_the_trace_id_is_the_one_the_handler_saw_whatever_the_client_sends() -> None:
    tracer = trace.get_tracer("test")

    async def traced(scope: Any, receive: Any, send: Any) -> None:
        # As the chat route does: its span is over by the time the line is written.
        with tracer.start_as_current_span("POST /api/chat"):
            structlog.contextvars.bind_contextvars(trace_id=tracing.current_trace_id())
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    wrapper = HttpMetrics(traced, ServiceMetrics("gateway", registry=CollectorRegistry()))
    hostile = [b"00-zzzz-yyyy-01", b"\xff\xfe\x00garbage", b"00-" + b"f" * 4000 + b"-01"]
    with capture_logs() as logs:
        for value in hostile:
            _request(wrapper, "/api/chat", [(b"traceparent", value)])
    ids = [line["trace_id"] for line in logs]
    assert all(len(t) == 32 and t != "0" * 32 for t in ids)
    assert len(set(ids)) == len(hostile)


def test_without_a_span_the_line_still_names_its_trace_field() -> None:
    with capture_logs() as logs:
        _request(
            HttpMetrics(_plain, ServiceMetrics("gateway", registry=CollectorRegistry())), "/x", []
        )
    assert logs[0]["trace_id"] == ""


def test_a_later_request_does_not_inherit_the_ids_of_an_earlier_one() -> None:
    wrapper = _wrapper()
    with capture_logs() as logs:
        _request(wrapper, "/api/chat", [])
        _request(
            HttpMetrics(_plain, ServiceMetrics("gateway", registry=CollectorRegistry())), "/x", []
        )
    assert logs[0]["message_id"] == "m-1"
    assert "message_id" not in logs[1] and logs[1]["outcome"] == "client_error"
