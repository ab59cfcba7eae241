"""``POST /api/chat`` served straight on ASGI: the hottest route skips the framework's routing.

Everything else goes to the Litestar app, which still documents this route in OpenAPI. Errors
have the same shape and codes as the framework's (``{"error": {status, code, message}}``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
from opentelemetry import trace

from services.gateway import core
from services.gateway.auth import Credentials
from services.gateway.deadlines import Deadlines
from services.gateway.edge import HttpEdge, failure_fields
from services.gateway.front import request_id
from shared import tracing

if TYPE_CHECKING:
    from services.gateway.handlers import Api

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Any  # Litestar types its own scope and events more narrowly

ROUTE = "/api/chat"
_JSON = [(b"content-type", b"application/json")]
_TRACE_HEADERS = (b"traceparent", b"tracestate")
_SPAN_ATTRIBUTES = {"http.request.method": "POST", "http.route": ROUTE}
_encoder = msgspec.json.Encoder()


class _TooLarge(Exception):
    pass


class FastAccept:
    """An ASGI app: ``POST /api/chat`` handled here, anything else passed to ``app``."""

    def __init__(
        self,
        app: ASGIApp,
        api: Api,
        max_body_bytes: int,
        edge: HttpEdge | None = None,
        log_error_details: bool = False,
    ) -> None:
        self.app = app
        self.api = api
        self.max_body_bytes = max_body_bytes
        self.log_error_details = log_error_details
        # Where this route counts itself, writes its line and finds its send bound.
        self.edge = edge
        tick_s = min(1.0, edge.send_timeout_s / 2) if edge is not None else 1.0
        self.deadlines = Deadlines(tick_s)

    def __getattr__(self, name: str) -> Any:
        # Callers that reach for the framework app (openapi_schema, state, …) still find it.
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != ROUTE or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        authorization = key = api_key = acting_user = None
        trace_headers: dict[str, str] = {}
        length = -1
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"x-api-key":
                api_key = value.decode("latin-1")
            elif name == b"x-acting-user":
                acting_user = value.decode("latin-1")
            elif name == b"idempotency-key":
                key = value.decode("latin-1")
            elif name == b"content-length" and value.isdigit():
                length = int(value)
            elif name in _TRACE_HEADERS:
                trace_headers[name.decode()] = value.decode("latin-1")
        creds = Credentials(authorization, api_key, acting_user)
        line: dict[str, str] = {}
        status = 500
        try:
            # Each submitted message starts its own trace, which every later hop continues.
            if not tracing.recording():
                # Nothing records spans: the trace is only its ids, and the publish carries them.
                status, body, headers = await self._accept(
                    creds, key, length, receive, tracing.new_traceparent(), line
                )
                await self._send(send, status, body, headers)
                return
            # A client's traceparent is linked, never continued (as in the Litestar route).
            with tracing.root_span("POST /api/chat", trace_headers, _SPAN_ATTRIBUTES) as span:
                span.set_attribute("baton.request_id", request_id())
                status, body, headers = await self._accept(creds, key, length, receive, None, line)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(trace.Status(trace.StatusCode.ERROR, str(status)))
                await self._send(send, status, body, headers)
        finally:
            if self.edge is not None:
                self.edge.handled("POST", ROUTE, status, time.perf_counter() - started, line)

    async def _send(self, send: Send, status: int, body: bytes, headers: dict[str, str]) -> None:
        if self.edge is None:
            await _send(send, status, body, headers)
            return
        # Bounded as HttpEdge bounds every other route's sends, without a timer per request;
        # returning mid-response makes the server close the connection.
        task = self.deadlines.watch(self.edge.send_timeout_s)
        try:
            await _send(send, status, body, headers)
        except asyncio.CancelledError:
            if not self.deadlines.fired(task):
                raise
        finally:
            self.deadlines.forget(task)

    async def _accept(
        self,
        creds: Credentials,
        key: str | None,
        length: int,
        receive: Receive,
        traceparent: str | None,
        line: dict[str, str],
    ) -> tuple[int, bytes, dict[str, str]]:
        try:
            if length > self.max_body_bytes:
                raise _TooLarge
            body = await self._body(receive)
            payload, headers = await self.api.submit(creds, key, body, traceparent, line)
        except core.ApiError as exc:
            trace.get_current_span().set_attribute("error.type", exc.code)
            return exc.status, _error_body(exc), exc.headers or {}
        except _TooLarge:
            trace.get_current_span().set_attribute("error.type", "body_too_large")
            return 413, _body_of(413, "body_too_large", "Request Entity Too Large"), {}
        except Exception as exc:
            # A bug, not a client error: logged with its traceback, answered in the usual shape.
            structlog.get_logger().bind(service="gateway").error(
                "request_failed", path=ROUTE, **failure_fields(exc, self.log_error_details)
            )
            return 500, _body_of(500, "internal_error", "internal error"), {}
        return 202, _encoder.encode(payload), headers

    async def _body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise core.ApiError(400, "bad_request", "client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _body_of(status: int, code: str, message: str) -> bytes:
    error = {"status": status, "code": code, "message": message, "request_id": request_id()}
    return _encoder.encode({"error": error})


def _error_body(exc: core.ApiError) -> bytes:
    error: dict[str, Any] = {"status": exc.status, "code": exc.code, "message": exc.message}
    error.update(exc.extra)
    error["request_id"] = request_id()
    return _encoder.encode({"error": error})


async def _send(send: Send, status: int, body: bytes, headers: dict[str, str]) -> None:
    raw = [*_JSON, (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
