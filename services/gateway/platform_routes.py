"""Routes around the chat API: stream tokens for browsers and the build's version."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from litestar import Request, Response, get, post
from litestar.params import FromPath

from services.gateway import auth, openapi
from services.gateway.handlers import Api
from shared import build

STARTED = time.monotonic()


def routes(api: Api) -> list[Any]:
    """Litestar route handlers bound to one Api instance (kept apart from handlers.routes)."""

    @post(
        "/api/conversations/{conversation_id:str}/stream-token",
        status_code=201,
        summary="A short-lived token that opens this conversation's events or ws (?access_token=)",
        **openapi.doc(400, 404, 503, params={"conversation_id": openapi.UUID}),
    )
    async def stream_token(
        request: Request[Any, Any, Any], conversation_id: FromPath[str]
    ) -> Response[Any]:
        p = await api.principal(request)
        cid = await api.own(p, conversation_id)
        key = request.headers.get("x-api-key")  # it authenticated p: its streams follow it
        key_hash = None if key is None else auth.api_key_hash(key)
        token, expires = api.stream_tokens.mint(p, cid, key_hash)
        body = {
            "token": token,
            "conversation_id": cid,
            "expires_at": datetime.fromtimestamp(expires, UTC).isoformat(),
            "expires_in": max(0, int(expires - time.time())),
        }
        return Response(body, status_code=201, headers={"Cache-Control": "no-store"})

    @get(
        "/version",
        summary="The running build: version, commit, build time, uptime",
        **openapi.doc(secured=False),
    )
    async def version() -> dict[str, Any]:
        info = build.info()
        return {**info, "uptime_s": round(time.monotonic() - STARTED, 3)}

    return [stream_token, version]
