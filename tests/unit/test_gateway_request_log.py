"""The gateway's ASGI wrapper: one log line per request with a trace id, whatever the headers say."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from services.gateway.main import HttpMetrics
from shared import tracing
from shared.metrics import ServiceMetrics

# The SDK provider the service installs at boot (no exporter without OTEL_* variables).
tracing.setup("gateway")


async def _app(scope: Any, receive: Any, send: Any) -> None:
    structlog.contextvars.bind_contextvars(message_id="m-1")
    await send({"type": "http.response.start", "status": 202, "headers": []})
    await send({"type": "http.response.body", "body": b"secret answer text"})


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
    assert line["message_id"] == "m-1" and len(line["trace_id"]) == 32
    assert line["duration_ms"] >= 0 and line["route"] == "unmatched"
    assert "secret answer text" not in repr(line) and "Bearer" not in repr(line)


def test_a_client_traceparent_is_continued_and_a_hostile_one_ignored() -> None:
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    hostile = [
        b"00-zzzz-yyyy-01",
        b"00-" + b"f" * 4000 + b"-00f067aa0ba902b7-01",
        b"\xff\xfe\x00garbage",
        b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
    ]
    with capture_logs() as logs:
        _request(
            _wrapper(), "/api/chat", [(b"traceparent", f"00-{trace}-00f067aa0ba902b7-01".encode())]
        )
        for value in hostile:
            _request(_wrapper(), "/api/chat", [(b"traceparent", value)])
    assert logs[0]["trace_id"] == trace
    fresh = [line["trace_id"] for line in logs[1:]]
    assert all(len(t) == 32 and t != trace and t != "0" * 32 for t in fresh)
    assert len(set(fresh)) == len(hostile)


def test_a_later_request_does_not_inherit_the_ids_of_an_earlier_one() -> None:
    async def plain(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    wrapper = _wrapper()
    with capture_logs() as logs:
        _request(wrapper, "/api/chat", [])
        _request(
            HttpMetrics(plain, ServiceMetrics("gateway", registry=CollectorRegistry())), "/x", []
        )
    assert logs[0]["message_id"] == "m-1"
    assert "message_id" not in logs[1] and logs[1]["outcome"] == "client_error"
