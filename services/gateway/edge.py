"""The ASGI wrapper around every HTTP route: request metrics, the request's log line, bounded sends."""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Mapping
from typing import Any

import structlog

from services.gateway.front import request_id
from shared.metrics import ServiceMetrics

SERVICE = "gateway"
# In an SSE request's ASGI scope: what HttpEdge calls when the client reads nothing.
ON_SEND_TIMEOUT = "baton.on_send_timeout"
# Probes and scrapes would drown the request lines (they are still counted in the metrics).
QUIET_ROUTES = frozenset({"/healthz", "/readyz"})


def failure_fields(exc: BaseException, details: bool = False) -> dict[str, Any]:
    """How a log line names an unexpected exception: its type and where it was raised.

    An exception's message and repr may quote the request (a ``UnicodeDecodeError`` carries
    the bytes it could not decode), so they, and the traceback that repeats them, are logged
    only when ``details`` (``GATEWAY_LOG_ERROR_DETAILS``) says so.
    """
    frames = traceback.extract_tb(exc.__traceback__)[-6:]
    fields: dict[str, Any] = {
        "error_type": type(exc).__name__,
        "where": [f"{f.filename.rpartition('/')[2]}:{f.lineno}:{f.name}" for f in frames],
    }
    if details:
        fields["error"] = repr(exc)
        fields["exc_info"] = exc
    return fields


def outcome_of(status: int) -> str:
    return "ok" if status < 400 else "client_error" if status < 500 else "server_error"


class HttpEdge:
    """Request metrics, one canonical log line per request, and a bound on each body send.

    One wrapper, not one per concern: each layer costs a closure and a call per request (the
    accept fast path, in front of it, records itself through ``handled``). A body send that waits longer than ``send_timeout_s`` lets the client go:
    without it a stream to a peer that stopped reading waits in ``send`` for ever (uvicorn has
    no write timeout), holding its task and socket; a stream registers its cleanup in the scope
    under ``ON_SEND_TIMEOUT``.
    """

    def __init__(
        self,
        app: Any,
        metrics: ServiceMetrics,
        send_timeout_s: float = 10.0,
        log: structlog.stdlib.BoundLogger | None = None,
    ) -> None:
        self.app = app
        self.send_timeout_s = send_timeout_s
        self.log = log or structlog.get_logger().bind(service=SERVICE)
        self.requests = metrics.counter(
            "http_requests_total",
            "HTTP requests, by method, route and status.",
            ("method", "route", "status"),
        )
        self.latency = metrics.histogram(
            "http_request_seconds",
            "HTTP request latency, by method and route.",
            ("method", "route"),
        )
        self.children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def __getattr__(self, name: str) -> Any:
        # Callers that reach for the framework app (openapi_schema, state, …) still find it.
        return getattr(self.app, name)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        timed_out = False

        async def respond(message: Any) -> None:
            nonlocal status, timed_out
            if message["type"] != "http.response.body":
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)
                return
            try:
                async with asyncio.timeout(self.send_timeout_s):
                    await send(message)
            except TimeoutError:
                timed_out = True
                raise

        # Handlers bind what they learn (message and conversation ids, the trace id of the
        # request's span) for this request's one line.
        structlog.contextvars.clear_contextvars()
        try:
            await self.app(scope, receive, respond)
        except Exception:
            if not timed_out:
                raise
            # Returning mid-response makes the server close the connection; nothing to answer.
            on_timeout = scope.get(ON_SEND_TIMEOUT)
            if on_timeout is not None:
                on_timeout()
        finally:
            handler = scope.get("route_handler")
            route = next(iter(handler.paths), "other") if handler is not None else "unmatched"
            elapsed = time.perf_counter() - started
            fields = structlog.contextvars.get_contextvars()
            self.handled(scope.get("method", ""), route, status, elapsed, fields)
            structlog.contextvars.clear_contextvars()

    def handled(
        self, method: str, route: str, status: int, elapsed: float, fields: Mapping[str, Any]
    ) -> None:
        """Count one request and write its line; ``fields`` are what its handler learned (ids)."""
        key = (method, route, status)
        children = self.children.get(key)
        if children is None:
            # Label lookups cost more than the observation itself: once per combination.
            children = (
                self.requests.labels(method, route, str(status)),
                self.latency.labels(method, route),
            )
            self.children[key] = children
        children[0].inc()
        children[1].observe(elapsed)
        if route not in QUIET_ROUTES:
            self.log.info(
                "handled",
                **{"trace_id": "", **fields},
                request_id=request_id(),
                method=method,
                route=route,
                status=status,
                outcome=outcome_of(status),
                duration_ms=round(elapsed * 1000, 2),
            )
