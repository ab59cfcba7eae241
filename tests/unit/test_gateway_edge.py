"""The gateway's HTTP edge: a client that reads nothing is let go, and every request is counted."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from services.gateway.edge import ON_SEND_TIMEOUT, HttpEdge
from services.gateway.fastpath import FastAccept
from shared.metrics import ServiceMetrics


def _edge(app: Any, timeout_s: float = 0.05) -> tuple[HttpEdge, ServiceMetrics]:
    metrics = ServiceMetrics("gateway", registry=CollectorRegistry())
    return HttpEdge(app, metrics, timeout_s), metrics


async def _streaming(scope: Any, receive: Any, send: Any) -> None:
    scope[ON_SEND_TIMEOUT] = lambda: scope.setdefault("ended", []).append(True)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    while True:
        await send({"type": "http.response.body", "body": b"data: x\n\n", "more_body": True})


def _call(edge: HttpEdge, send: Any) -> dict[str, Any]:
    scope: dict[str, Any] = {"type": "http", "method": "GET", "path": "/s", "headers": []}

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        return {}

    asyncio.run(asyncio.wait_for(edge(scope, receive, send), 30))
    return scope


def test_a_body_send_that_never_completes_ends_the_response_and_its_cleanup_runs_once() -> None:
    sends: list[str] = []

    async def stuck(message: Any) -> None:
        sends.append(message["type"])
        if message["type"] == "http.response.body":
            await asyncio.Event().wait()  # a peer that stopped reading

    edge, metrics = _edge(_streaming)
    with capture_logs() as logs:
        scope = _call(edge, stuck)
    assert scope["ended"] == [True]
    assert sends == ["http.response.start", "http.response.body"]
    assert [(line["status"], line["outcome"]) for line in logs] == [(200, "ok")]
    count = metrics.registry.get_sample_value(
        "baton_gateway_http_requests_total",
        {"method": "GET", "route": "unmatched", "status": "200"},
    )
    assert count == 1


def test_other_failures_are_not_taken_for_a_slow_client() -> None:
    async def broken(message: Any) -> None:
        if message["type"] == "http.response.body":
            raise ConnectionResetError("peer went away")

    edge, _ = _edge(_streaming)
    with capture_logs() as logs, pytest.raises(ConnectionResetError):
        _call(edge, broken)
    assert [line["status"] for line in logs] == [200]


def test_a_response_that_is_read_at_once_is_not_cut() -> None:
    got: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 202, "headers": []})
        for _ in range(3):
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
            await asyncio.sleep(
                0.02
            )  # three sends over more than one timeout: each is bounded alone
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def send(message: Any) -> None:
        got.append(message.get("body", b""))

    edge, _ = _edge(app, timeout_s=0.03)
    scope = _call(edge, send)
    assert got == [b"", b"x", b"x", b"x", b""] and "ended" not in scope


class _Api:
    """Accepts everything: what the fast path needs of ``handlers.Api``."""

    async def submit(
        self, authorization: Any, key: Any, body: bytes, traceparent: Any, line: dict[str, str]
    ) -> tuple[dict[str, str], dict[str, str]]:
        line.update(message_id="m-9", trace_id=traceparent[3:35])
        return {"status": "accepted"}, {}


def _accept(send: Any) -> tuple[Any, ServiceMetrics]:
    async def framework(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the accept route never reaches the framework")

    edge, metrics = _edge(framework)
    app = FastAccept(edge, _Api(), 1024, edge)  # type: ignore[arg-type]
    scope = {"type": "http", "method": "POST", "path": "/api/chat", "headers": []}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))
    return app, metrics


def test_the_accept_route_counts_itself_and_writes_its_line_with_the_messages_ids() -> None:
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    with capture_logs() as logs:
        _, metrics = _accept(send)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    [line] = logs
    assert (line["route"], line["status"], line["message_id"]) == ("/api/chat", 202, "m-9")
    assert len(line["trace_id"]) == 32
    count = metrics.registry.get_sample_value(
        "baton_gateway_http_requests_total",
        {"method": "POST", "route": "/api/chat", "status": "202"},
    )
    assert count == 1


def test_an_accept_whose_answer_is_never_read_is_let_go_and_still_counted() -> None:
    async def stuck(message: Any) -> None:
        await asyncio.Event().wait()  # a peer that stopped reading

    with capture_logs() as logs:
        _accept(stuck)
    assert [(line["route"], line["status"]) for line in logs] == [("/api/chat", 202)]
