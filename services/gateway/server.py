"""uvicorn as the gateway runs it: bounded heads and connections, one send per response, push streams end first."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from services.gateway.limits import (
    BODY_TIMEOUT,
    HEAD_TIMEOUT,
    HEAD_TOO_LARGE,
    TOO_MANY_HEADERS,
    Connections,
    EdgeLimits,
    refusal,
)


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

    def is_closing(self) -> bool:
        # Asked on every read: spelled out, not found through __getattr__'s slow path.
        return self.transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over ``OneWritePerTurn``, with the edge's bounds.

    httptools (llhttp) buffers a head of any size and count and uvicorn never times out
    reading one, so a few slow or endless heads held memory and sockets for ever: the head is
    bounded in bytes and headers (``431``), in time from the connection (or the first byte
    after a keep-alive pause) to its end, and the body in time from there to its last byte
    (``408``); connections are counted per client address and in total (``429``/``503``,
    before anything is read). An upgrade gets the plain transport, and keeps its slot.
    """

    limits: ClassVar[EdgeLimits] = EdgeLimits()
    open_connections: ClassVar[Connections] = Connections(
        EdgeLimits().max_connections, EdgeLimits().max_connections_per_client
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.address = ""
        self.admitted = False  # counted in ``open_connections``, to be released once
        self.reading_head = True  # the next bytes belong to a request head
        self.awaiting_body = False  # the head is in, the body is not (yet)
        self.head_bytes = 0
        self.head_timer: asyncio.TimerHandle | None = None
        self.body_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(OneWritePerTurn(transport, self.loop))  # type: ignore[arg-type]
        self.address = self.client[0] if self.client else ""
        refused = self.open_connections.admit(self.address)
        if refused is not None:
            self.refuse(refused)
            return
        self.admitted = True
        self.head_timer = self.loop.call_later(self.limits.header_timeout_s, self.head_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_timers()
        if self.admitted:
            self.admitted = False
            self.open_connections.release(self.address)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self.admitted or self.transport.is_closing():
            return
        if self.reading_head:
            room = self.limits.max_header_bytes - self.head_bytes
            if len(data) > room:
                # Only as much as the head may still take: what follows it may be a body.
                self.head_bytes += room
                self.feed(data[:room])
                if self.transport.is_closing() or not self.admitted:
                    return
                if self.reading_head:
                    self.refuse(HEAD_TOO_LARGE)
                    return
                self.data_received(data[room:])
                return
            self.head_bytes += len(data)
        self.feed(data)
        self.arm()

    def arm(self) -> None:
        """Start the clock of a head or a body that a read left unfinished.

        Not before: a request that arrives whole (most do) never starts a timer.
        """
        if self.transport.is_closing():
            return
        if self.reading_head:
            if self.head_bytes and self.head_timer is None:
                self.head_timer = self.loop.call_later(self.limits.header_timeout_s, self.head_late)
        elif self.awaiting_body and self.body_timer is None:
            self.body_timer = self.loop.call_later(self.limits.body_timeout_s, self.body_late)

    def feed(self, data: bytes) -> None:
        """uvicorn's ``data_received``, with a head refused for its header count."""
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _Refused):
                self.refuse(exc.__context__.why)
                return
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
        except httptools.HttpParserError:
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    def on_headers_complete(self) -> None:
        # Counted here, not per header: the byte bound already caps the list (a few thousand).
        if len(self.headers) > self.limits.max_headers:
            raise _Refused(TOO_MANY_HEADERS)
        self.reading_head = False
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        super().on_headers_complete()
        self.awaiting_body = not (self.parser.should_upgrade() and self._should_upgrade())

    def on_message_complete(self) -> None:
        self.awaiting_body = False
        if self.body_timer is not None:
            self.body_timer.cancel()
            self.body_timer = None
        # The next bytes start a new head; its clock starts when they arrive.
        self.reading_head = True
        self.head_bytes = 0
        super().on_message_complete()

    def head_late(self) -> None:
        self.head_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a response is still being written; the next bytes restart the clock
        if self.reading_head and not self.transport.is_closing():
            self.refuse(HEAD_TIMEOUT)

    def body_late(self) -> None:
        self.body_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and self.cycle.response_started:
            self.transport.close()  # too late for a status: the response has begun
            return
        self.refuse(BODY_TIMEOUT)

    def refuse(self, why: tuple[int, str, str]) -> None:
        """Answer ``why`` without asking the application, and close the connection."""
        self.stop_timers()
        if self.cycle is not None:
            # An application still waiting for the body learns the client is gone.
            self.cycle.response_complete = True
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.write(refusal(*why))
        self.transport.close()

    def stop_timers(self) -> None:
        for timer in (self.head_timer, self.body_timer):
            if timer is not None:
                timer.cancel()
        self.head_timer = self.body_timer = None

    def handle_websocket_upgrade(self) -> None:
        self.stop_timers()
        joined = self.transport
        if isinstance(joined, OneWritePerTurn):
            joined.flush()
            self.transport = joined.transport
        super().handle_websocket_upgrade()
        if not self.admitted:
            return
        # The WebSocket protocol owns the connection now; its end frees this connection's slot.
        self.admitted = False
        protocol = self.transport.get_protocol()
        lost = protocol.connection_lost
        connections, address = self.open_connections, self.address

        def release(exc: Exception | None) -> None:
            connections.release(address)
            lost(exc)

        protocol.connection_lost = release  # type: ignore[method-assign]


class _Refused(Exception):
    """Raised inside a parser callback to stop a head the edge refuses."""

    def __init__(self, why: tuple[int, str, str]) -> None:
        super().__init__(why[2])
        self.why = why


def protocol_for(limits: EdgeLimits) -> type[HttpProtocol]:
    """``HttpProtocol`` with ``limits``, counting the connections of one server."""
    return type(
        "BoundedHttpProtocol",
        (HttpProtocol,),
        {
            "limits": limits,
            "open_connections": Connections(
                limits.max_connections, limits.max_connections_per_client
            ),
        },
    )


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
