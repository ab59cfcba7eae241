"""The gateway's one ASGI wrapper: a client that reads nothing is let go, and still counted."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from services.gateway.edge import ON_SEND_TIMEOUT, HttpEdge
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
