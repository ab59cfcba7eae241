"""Composition root of the gateway: settings, connections, the Litestar app, uvicorn, shutdown."""

from __future__ import annotations

import signal
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import structlog
import uvicorn
from litestar import Litestar, MediaType, Request, Response, get
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig

from services.gateway import (
    config,
    conversation_routes,
    core,
    openapi,
    platform_routes,
    webpage,
    ws,
)
from services.gateway.adapters import Hub, Publisher, RateGate, ReadModel, TokenLog
from services.gateway.edge import HttpEdge, failure_fields
from services.gateway.fastpath import FastAccept
from services.gateway.front import Front, request_id
from services.gateway.handlers import Api, routes
from services.gateway.server import GatewayServer, protocol_for
from shared import runtime, subjects
from shared.bus import Bus
from shared.db import UNAVAILABLE, create_pool
from shared.errors import ConfigError
from shared.metrics import ServiceMetrics

SERVICE = "gateway"


def error_body(status: int, code: str, message: str) -> dict[str, Any]:
    error = {"status": status, "code": code, "message": message, "request_id": request_id()}
    return {"error": error}


def on_api_error(_: Request[Any, Any, Any], exc: core.ApiError) -> Response[Any]:
    body = error_body(exc.status, exc.code, exc.message)
    body["error"].update(exc.extra)
    return Response(body, status_code=exc.status, headers=exc.headers)


def on_http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    codes = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
    code = codes.get(exc.status_code, "http_error")
    # The framework's headers are part of the answer: a 405's Allow (RFC 9110 15.5.6).
    return Response(
        error_body(exc.status_code, code, str(exc.detail)),
        status_code=exc.status_code,
        headers=exc.headers,
    )


def unexpected_handler(
    log_error_details: bool,
) -> Callable[[Request[Any, Any, Any], Exception], Response[Any]]:
    """What answers a bug: a ``500`` in the usual shape, and a log line without the request."""

    def on_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
        structlog.get_logger().bind(service=SERVICE).error(
            "request_failed", path=request.url.path, **failure_fields(exc, log_error_details)
        )
        return Response(error_body(500, "internal_error", "internal error"), status_code=500)

    return on_unexpected


def build_app(
    api: Api,
    bus: Bus,
    reads: ReadModel,
    settings: config.Settings,
    metrics: ServiceMetrics | None = None,
) -> FastAccept:
    """The accept fast path in front of Litestar.

    With ``metrics`` every request is counted, logged and has its sends bounded
    (``edge.HttpEdge``; the fast path records itself through it).
    """
    app = litestar_app(api, bus, reads, settings)
    details = settings.log_error_details
    if metrics is None:
        return FastAccept(app, api, settings.max_body_bytes, log_error_details=details)
    edge = HttpEdge(app, metrics, settings.sse_send_timeout_s)
    return FastAccept(edge, api, settings.max_body_bytes, edge, details)


def litestar_app(api: Api, bus: Bus, reads: ReadModel, settings: config.Settings) -> Litestar:
    websockets = ws.WebSockets(api)

    @get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @get("/readyz", include_in_schema=False)
    async def readyz() -> Response[Any]:
        checks = {"nats": "ok" if bus.nc.is_connected else "down", "database": "ok"}
        try:
            await reads.ping()
        except UNAVAILABLE:
            checks["database"] = "degraded"
        # Accepting needs only NATS; a down database degrades reads, not submits.
        status = 200 if checks["nats"] == "ok" else 503
        return Response(
            {"status": "ready" if status == 200 else "not_ready", "checks": checks},
            status_code=status,
        )

    @get("/openapi.json", include_in_schema=False, media_type=MediaType.JSON)
    async def openapi_json(request: Request[Any, Any, Any]) -> dict[str, Any]:
        schema: dict[str, Any] = request.app.openapi_schema.to_schema()
        return schema

    return Litestar(
        route_handlers=[
            *conversation_routes.routes(api),  # first: it answers OPTIONS for its paths
            *routes(api),
            *platform_routes.routes(api),
            *webpage.routes(),
            ws.route(websockets),
            healthz,
            readyz,
            openapi_json,
        ],
        exception_handlers={
            core.ApiError: on_api_error,
            HTTPException: on_http_error,
            Exception: unexpected_handler(settings.log_error_details),
        },
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="baton gateway",
            version="0.1.0",
            path="/schema",
            components=openapi.components(),
            security=openapi.SECURITY,
        ),
        debug=False,
    )


def asgi(
    api: Api, bus: Bus, reads: ReadModel, settings: config.Settings, metrics: ServiceMetrics
) -> Any:
    """The whole ASGI app: request ids and CORS, routes, metrics and log lines, bounded sends."""
    fast = build_app(api, bus, reads, settings, metrics)
    return Front(fast, settings.cors(), fast.edge)


async def amain() -> None:
    settings = config.from_env()
    settings.cors()  # a wildcard or malformed origin stops the start, not the first request
    if not str(settings.jwt_secret):
        raise ConfigError("GATEWAY_JWT_SECRET (or BATON_JWT_SECRET) must be set")
    # uvicorn owns the signals here; it shuts the server down and we clean up after it.
    log, metrics, metrics_port, _ = runtime.boot(SERVICE, settings, signals=False)
    # Everything opened is closed on every path, also when a later step fails (NATS down).
    async with AsyncExitStack() as resources:
        await _serve(resources, settings, log, metrics, metrics_port)
    log.info("stopped")


async def _serve(
    resources: AsyncExitStack,
    settings: config.Settings,
    log: Any,
    metrics: ServiceMetrics,
    metrics_port: int,
) -> None:
    pool = await create_pool(str(settings.database_url), max_size=10)
    resources.push_async_callback(pool.close)
    bus = await Bus.connect(settings, SERVICE, metrics, log)
    resources.push_async_callback(bus.close)
    reads = ReadModel(pool)
    hub = Hub(bus, settings.sse_queue_size, log, metrics)
    await hub.start()
    resources.push_async_callback(hub.stop)
    tokens = TokenLog(bus, settings.publish_timeout_s)
    limits_kv = None
    if settings.rate_gate:
        try:
            limits_kv = await bus.js.key_value(subjects.BUCKET_LIMITS)
        except Exception:  # no bucket (old provisioning): policy alone limits
            log.warning("no limits bucket; early 429s are off", bucket=subjects.BUCKET_LIMITS)
    gate = None if limits_kv is None else RateGate(limits_kv, settings.rate_cache_s)
    api = Api(
        settings, Publisher(bus, settings.publish_timeout_s), reads, hub, metrics, tokens, gate
    )
    app = asgi(api, bus, reads, settings, metrics)
    server = GatewayServer(
        uvicorn.Config(
            app,
            host=settings.http_host,
            port=settings.http_port,
            loop="none",
            lifespan="off",
            log_level="warning",
            access_log=False,
            # The client address is the socket's peer (connection limits): X-Forwarded-* is the
            # client's to forge, and rewriting from it costs every request.
            proxy_headers=False,
            # Bounded heads, read timeouts and connection counts (limits.py); httptools itself
            # has none, and uvicorn's h11_max_incomplete_event_size applies only to h11.
            http=protocol_for(settings.edge_limits()),
            timeout_graceful_shutdown=5,
            # Oversized client frames are refused by the protocol (close 1009) before they
            # are buffered; protocol pings find dead peers that never read.
            ws_max_size=settings.ws_max_frame_bytes,
            ws_ping_interval=settings.ws_ping_interval_s,
            ws_ping_timeout=settings.ws_ping_interval_s,
        ),
        hub.stop,
    )
    # uvicorn re-raises the signal it caught once it has shut down; with a no-op handler in
    # place that re-raise returns here, so the cleanup below runs and the process exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    metrics.up.set(1)
    log.info("started", http_port=settings.http_port, metrics_port=metrics_port)
    await server.serve()


def main() -> None:
    runtime.run(amain)
