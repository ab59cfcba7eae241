"""uvicorn as the gateway runs it: each response leaves in one send, push streams end first."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class OneWritePerTurn:
    """A transport whose writes within one event-loop turn leave together, in one ``send``.

    uvicorn writes a response's head and its body separately: two system calls per request,
    each waking the client on loopback. Joined, a small response is one. Writes wait at most
    until the loop's next turn; closing sends what is pending first.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self.loop = loop
        self.pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self.pending:
            self.loop.call_soon(self.flush)
        self.pending.append(data)

    def flush(self) -> None:
        if not self.pending:
            return
        data = self.pending[0] if len(self.pending) == 1 else b"".join(self.pending)
        self.pending = []
        if not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over ``OneWritePerTurn``; an upgrade gets the plain transport."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(OneWritePerTurn(transport, self.loop))  # type: ignore[arg-type]

    def handle_websocket_upgrade(self) -> None:
        joined = self.transport
        if isinstance(joined, OneWritePerTurn):
            joined.flush()
            self.transport = joined.transport
        super().handle_websocket_upgrade()


class GatewayServer(uvicorn.Server):
    """uvicorn that ends push streams first, so shutdown does not wait on idle SSE clients."""

    def __init__(
        self, config: uvicorn.Config, before_shutdown: Callable[[], Awaitable[None]]
    ) -> None:
        super().__init__(config)
        self.before_shutdown = before_shutdown

    async def shutdown(self, sockets: Any = None) -> None:
        await self.before_shutdown()
        await super().shutdown(sockets)
