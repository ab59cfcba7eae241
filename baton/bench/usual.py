"""Peer (a), the usual design: one Litestar+uvicorn endpoint that inserts, then answers.

Same framework, same auth and validation as the gateway, one ``INSERT`` per request on an
asyncpg pool, then ``202``. ``python -m baton.bench.usual --port P --dsn DSN --secret S``
"""

from __future__ import annotations

import argparse
import signal
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import uvicorn
import uvloop
from litestar import Litestar, Request, Response, post

from services.gateway import auth, core

TABLE = """
CREATE TABLE IF NOT EXISTS bench_usual_messages (
    id uuid PRIMARY KEY,
    conversation_id uuid NOT NULL,
    project_id text NOT NULL,
    user_id text NOT NULL,
    content text NOT NULL,
    created_at timestamptz NOT NULL
)"""


def build(dsn: str, secret: str) -> Litestar:
    state: dict[str, Any] = {}

    async def startup() -> None:
        state["pool"] = await asyncpg.create_pool(dsn, min_size=4, max_size=10)
        async with state["pool"].acquire() as con:
            await con.execute(TABLE)

    async def shutdown() -> None:
        await state["pool"].close()

    @post("/api/chat", status_code=202)
    async def chat(request: Request[Any, Any, Any]) -> Response[Any]:
        p = auth.authenticate(request.headers.get("authorization"), secret)
        req = core.parse_chat(await request.body(), 32_000)
        message_id = str(uuid.uuid4())
        conversation_id = req.conversation_id or str(uuid.uuid4())
        now = datetime.now(UTC)
        async with state["pool"].acquire() as con:
            await con.execute(
                "INSERT INTO bench_usual_messages VALUES ($1, $2, $3, $4, $5, $6)",
                uuid.UUID(message_id),
                uuid.UUID(conversation_id),
                p.project,
                p.user,
                req.content,
                now,
            )
        body = {
            "status": "accepted",
            "duplicate": False,
            "message": {
                "id": message_id,
                "conversation_id": conversation_id,
                "role": "user",
                "content": req.content,
                "created_at": now,
            },
        }
        return Response(body, status_code=202)

    def on_api_error(_: Request[Any, Any, Any], exc: core.ApiError) -> Response[Any]:
        return Response({"error": exc.message}, status_code=exc.status)

    return Litestar(
        route_handlers=[chat],
        on_startup=[startup],
        on_shutdown=[shutdown],
        exception_handlers={core.ApiError: on_api_error},
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m baton.bench.usual", description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--dsn", required=True)
    p.add_argument("--secret", required=True)
    a = p.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    config = uvicorn.Config(
        build(a.dsn, a.secret),
        host="127.0.0.1",
        port=a.port,
        loop="none",
        log_level="warning",
        access_log=False,
    )
    uvloop.run(uvicorn.Server(config).serve())


if __name__ == "__main__":
    main()
