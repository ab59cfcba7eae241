"""The gateway's uvicorn protocol: a response's head and body leave in one write, in order."""

from __future__ import annotations

import asyncio
from typing import Any

from services.gateway.server import OneWritePerTurn


class Transport:
    """What the protocol sees of a socket: the writes it was given, and whether it closed."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 8000) if name == "sockname" else default


def _joined(run: Any) -> Transport:
    transport = Transport()

    async def main() -> None:
        joined = OneWritePerTurn(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
        await run(joined)
        await asyncio.sleep(0)  # the turn ends

    asyncio.run(main())
    return transport


def test_writes_in_one_turn_leave_as_one_write_in_their_order() -> None:
    async def respond(joined: OneWritePerTurn) -> None:
        joined.write(b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\n\r\n")
        joined.write(b"{}")

    assert _joined(respond).writes == [b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\n\r\n{}"]


def test_writes_in_later_turns_leave_separately() -> None:
    async def stream(joined: OneWritePerTurn) -> None:
        for event in (b"a", b"b", b"c"):
            joined.write(event)
            await asyncio.sleep(0)

    assert _joined(stream).writes == [b"a", b"b", b"c"]


def test_closing_sends_what_is_pending_first() -> None:
    async def respond_and_close(joined: OneWritePerTurn) -> None:
        joined.write(b"head")
        joined.write(b"body")
        joined.close()

    transport = _joined(respond_and_close)
    assert transport.writes == [b"headbody"] and transport.closed


def test_a_write_to_a_connection_that_went_away_is_dropped() -> None:
    async def lost(joined: OneWritePerTurn) -> None:
        joined.write(b"late")
        joined.transport.close()  # the peer went away before the turn ended

    assert _joined(lost).writes == []


def test_everything_else_is_the_transports() -> None:
    async def ask(joined: OneWritePerTurn) -> None:
        assert joined.get_extra_info("sockname") == ("127.0.0.1", 8000)
        assert not joined.is_closing()

    _joined(ask)
