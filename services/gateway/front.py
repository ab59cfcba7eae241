"""The outermost ASGI layer: a request id on every request and response, and CORS.

In front of the accept fast path and the framework alike, so both routes and errors get the
same headers. One layer for both concerns: each layer costs a closure and a call per request.
"""

from __future__ import annotations

import contextvars
import re
import secrets
import time
from typing import Any

import msgspec

from services.gateway.cors import EXPOSED, Policy
from shared.requests import REQUEST_ID

# The id of the request being handled; error bodies, log lines and spans read it.
# The same variable the bus stamps published events from (shared/requests.py).
_request_id: contextvars.ContextVar[str] = REQUEST_ID
SCOPE_KEY = "baton.request_id"
MAX_REQUEST_ID_CHARS = 128
# Letters, digits and a few separators: safe in a header, a log line and a JSON string.
_SAFE_ID = re.compile(rf"[A-Za-z0-9._:@/+=-]{{1,{MAX_REQUEST_ID_CHARS}}}")
_EXPOSE = ", ".join(EXPOSED).encode()


def request_id() -> str:
    """The current request's id ("" outside a request)."""
    return _request_id.get()


def accepted_request_id(value: bytes | None) -> str:
    """A client's X-Request-ID if it is 1..128 safe characters, else a new random one.

    Never refused: a request id is for finding log lines, not worth a 400; an unusable one is
    replaced (the response says which id was used).
    """
    if value is not None:
        text = value.decode("latin-1")
        if _SAFE_ID.fullmatch(text):
            return text
    return secrets.token_hex(16)


class Front:
    """Request ids and CORS around ``app``; ``edge`` (if any) counts and logs preflights."""

    def __init__(self, app: Any, cors: Policy, edge: Any = None) -> None:
        self.app = app
        self.cors = cors
        self.edge = edge

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = origin = preflight = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                given = value
            elif name == b"origin":
                origin = value.decode("latin-1")
            elif name == b"access-control-request-method":
                preflight = value.decode("latin-1")
        rid = accepted_request_id(given)
        scope[SCOPE_KEY] = rid
        token = _request_id.set(rid)
        try:
            if scope["type"] == "websocket":
                await self.app(scope, receive, send)
                return
            extra = [(b"x-request-id", rid.encode())]
            if self.cors.origins:
                extra.append((b"vary", b"Origin"))
                if origin is not None and self.cors.allows(origin):
                    extra += [
                        (b"access-control-allow-origin", origin.encode()),
                        (b"access-control-expose-headers", _EXPOSE),
                    ]
            if scope["method"] == "OPTIONS" and origin is not None and preflight is not None:
                await self._preflight(scope, send, origin, preflight, extra)
                return

            async def with_headers(message: Any) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", []), *extra]
                await send(message)

            await self.app(scope, receive, with_headers)
        finally:
            _request_id.reset(token)

    async def _preflight(
        self, scope: Any, send: Any, origin: str, method: str, extra: list[tuple[bytes, bytes]]
    ) -> None:
        """A CORS preflight, answered here: 204 with the allowed methods and headers, or 403."""
        started = time.perf_counter()
        requested = ""
        for name, value in scope["headers"]:
            if name == b"access-control-request-headers":
                requested = value.decode("latin-1")
        refused = self.cors.preflight(origin, method, requested)
        if refused is None:
            status, body, headers = 204, b"", [*extra, *self.cors.preflight_headers()]
        else:
            status, headers = 403, [*extra, (b"content-type", b"application/json")]
            body = msgspec.json.encode(
                {
                    "error": {
                        "status": 403,
                        "code": "cors_refused",
                        "message": f"cross-origin request refused: {refused}",
                        "request_id": request_id(),
                    }
                }
            )
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        if self.edge is not None:
            self.edge.handled(
                "OPTIONS", "cors_preflight", status, time.perf_counter() - started, {}
            )
