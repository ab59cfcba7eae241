"""The WebSocket edge's sends keep a cancel: the reader (which answers pings) is stopped by one
when the stream ends, and a lost cancel would leave the connection open with no close frame."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.gateway.config import Settings
from services.gateway.ws import WebSockets


class _SentAsCancelled:
    """A socket whose send completes in the very loop turn the sending task is cancelled in."""

    def __init__(self) -> None:
        self.task: asyncio.Task[Any] | None = None

    async def send_text(self, _text: str) -> None:
        loop = asyncio.get_running_loop()
        sent = loop.create_future()

        def both() -> None:
            sent.set_result(None)
            assert self.task is not None
            self.task.cancel()

        loop.call_soon(both)
        await sent


async def test_a_cancel_landing_as_a_frame_goes_out_is_not_lost() -> None:
    # Python 3.11's ``asyncio.wait_for`` returns the send's result and drops the cancel here.
    ws = object.__new__(WebSockets)  # only its settings are read by ``_send``
    ws.settings = Settings()
    socket = _SentAsCancelled()
    socket.task = asyncio.create_task(ws._send(socket, asyncio.Lock(), b'{"type":"pong"}'))  # type: ignore[arg-type]
    with pytest.raises(asyncio.CancelledError):
        await socket.task
