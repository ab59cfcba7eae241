"""The WebSocket edge: the SSE events as JSON frames, with the same resume rules.

``/api/conversations/{id}/ws``. Authenticated by the ``Authorization: Bearer`` header or, for
browsers (which cannot set headers on a WebSocket), by a first frame
``{"type": "auth", "token": …, "last_event_id": …}``, or by a short-lived stream token of this
conversation in ``?access_token=`` (never a bearer token: proxies and browsers keep URLs). Every error is an ``error`` frame, then a close code (see core).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from litestar import WebSocket
from litestar import websocket as websocket_route
from litestar.params import FromPath

from services.gateway import auth, core
from services.gateway.adapters import PushEvent
from services.gateway.handlers import Api, Watch


class _Closed(Exception):
    """The connection is over: the client left, or the gateway closed it with ``code``."""

    def __init__(self, code: int | None = None, reason: str = "") -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class WebSockets:
    """Serves push streams over WebSocket for one Api (one instance per process)."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.settings = api.settings
        self.connections = api.metrics.counter(
            "websocket_connections_total",
            "WebSocket streams, by how they ended (the close code, or client_left).",
            ("end",),
        )

    async def serve(self, socket: WebSocket[Any, Any, Any], conversation_id: str) -> None:
        # Accept first, then refuse with a close code: a browser sees close codes, not statuses.
        await socket.accept()
        lock = asyncio.Lock()
        end = "client_left"
        try:
            watch = await self._open(socket, conversation_id)
            self.api.stream_clients.labels("websocket").inc()
            try:
                await self._pump(socket, watch, lock)
            finally:
                self.api.stream_clients.labels("websocket").dec()
                self.api.hub.leave(watch.topic, watch.queue)
        except core.ApiError as exc:
            end = str(core.WS_TOO_BIG if exc.status == 413 else core.ws_close_code(exc.status))
            await self._refuse(socket, lock, exc)
        except _Closed as closed:
            if closed.code is not None:
                end = str(closed.code)
                await self._close(socket, closed.code, closed.reason)
        self.connections.labels(end).inc()

    async def _open(self, socket: WebSocket[Any, Any, Any], conversation_id: str) -> Watch:
        header = socket.headers.get("authorization")
        last_id = socket.headers.get("last-event-id") or socket.query_params.get("last_event_id")
        if header is None and "x-api-key" in socket.headers:
            credentials = auth.Credentials.of(socket.headers)
            p = await self.api.principals.authenticate(credentials)
            return await self.api.watch(p, conversation_id, last_id, credentials)
        if header is None and "access_token" in socket.query_params:
            p, key_hash = await self.api.watcher(
                socket.headers, socket.query_params, conversation_id
            )
            return await self.api.watch(p, conversation_id, last_id, key_hash=key_hash)
        if header is None:
            frame = await self._first_frame(socket)
            header = f"Bearer {frame.token}"
            last_id = frame.last_event_id or last_id
        # The same rules (and cache) as HTTP: a token and a key together are refused here too.
        credentials = auth.Credentials(
            header, socket.headers.get("x-api-key"), socket.headers.get("x-acting-user")
        )
        p = await self.api.principals.authenticate(credentials)
        return await self.api.watch(p, conversation_id, last_id, credentials)

    async def _first_frame(self, socket: WebSocket[Any, Any, Any]) -> core.ClientFrame:
        try:
            async with asyncio.timeout(self.settings.ws_auth_timeout_s):  # not wait_for: _send
                text = await self._receive(socket)
        except TimeoutError as exc:
            raise core.ApiError(
                401,
                "unauthenticated",
                f"send an auth frame within {self.settings.ws_auth_timeout_s:g} s",
            ) from exc
        frame = core.parse_client_frame(text, self.settings.ws_max_frame_bytes, first=True)
        if frame.type != "auth":
            raise core.ApiError(401, "unauthenticated", "the first frame must be an auth frame")
        return frame

    async def _receive(self, socket: WebSocket[Any, Any, Any]) -> str:
        """The next text frame; _Closed for a client that left or sent a binary frame."""
        message = await socket.receive()
        if message["type"] == "websocket.disconnect":
            raise _Closed()
        text = message.get("text")
        if text is None:
            raise _Closed(core.WS_UNSUPPORTED, "binary frames are not supported")
        return str(text)

    async def _pump(self, socket: WebSocket[Any, Any, Any], w: Watch, lock: asyncio.Lock) -> None:
        """Replay, then live events and heartbeats, until someone ends the connection."""
        reader = asyncio.create_task(self._read(socket, lock))
        try:
            await self._events(socket, w, lock, reader)
        except _Closed as closed:
            if closed.code == core.WS_SLOW:
                self.api.hub.drop(w.topic, w.queue)  # counted once, however noticed
            raise
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, _Closed, core.ApiError):
                await reader

    async def _events(
        self,
        socket: WebSocket[Any, Any, Any],
        w: Watch,
        lock: asyncio.Lock,
        reader: asyncio.Task[None],
    ) -> None:
        ready = {"conversation_id": w.conversation_id, "replayed": len(w.replay)}
        await self._send(socket, lock, core.ws_frame("ready", None, ready))
        for event, event_id, data in w.replay:
            await self._send(socket, lock, core.ws_frame(event, event_id, data))
        while True:
            ev = await self._next(w.queue, reader)
            await self.api.still_allowed(w)  # a revoked key: error frame, close 4401
            if ev is None:
                if self.api.hub.was_slow(w.queue):
                    raise _Closed(core.WS_SLOW, _SLOW)
                raise _Closed(core.WS_GOING_AWAY, "gateway shutting down: reconnect")
            if ev.event == "heartbeat":
                await self._send(socket, lock, core.ws_frame("heartbeat", None, {}))
            elif w.pending and not await self.api.claim(w):
                continue  # nobody's yet: nothing is sent (someone else's raises 4404)
            elif w.live.fresh(ev.event, ev.id, ev.data):
                await self._send(socket, lock, core.ws_frame(ev.event, ev.id, ev.data))

    async def _next(
        self, queue: asyncio.Queue[PushEvent | None], reader: asyncio.Task[None]
    ) -> PushEvent | None:
        """The next event, a heartbeat when idle; raises what ended the reader."""
        if not queue.empty():
            return queue.get_nowait()
        get = asyncio.ensure_future(queue.get())
        done, _ = await asyncio.wait(
            {get, reader},
            timeout=self.settings.ws_heartbeat_s,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if get in done:
            return get.result()
        get.cancel()
        if reader in done:
            reader.result()  # raises _Closed or ApiError
            raise _Closed()
        return _HEARTBEAT

    async def _read(self, socket: WebSocket[Any, Any, Any], lock: asyncio.Lock) -> None:
        """Client frames after the start: pings get a pong, anything else ends the stream."""
        while True:
            text = await self._receive(socket)
            try:
                core.parse_client_frame(text, self.settings.ws_max_frame_bytes, first=False)
            except core.ApiError as exc:
                if exc.status == 413:
                    raise _Closed(core.WS_TOO_BIG, exc.message) from exc
                raise
            await self._send(socket, lock, core.ws_frame("pong", None, {}))

    async def _send(
        self, socket: WebSocket[Any, Any, Any], lock: asyncio.Lock, data: bytes
    ) -> None:
        """Send one frame; a client that takes none for too long is cut off as too slow.

        ``asyncio.timeout``, not ``wait_for``: Python 3.11's ``wait_for`` drops a cancel that
        lands in the loop turn its send completes in, and the reader (which sends pongs) is
        stopped by a cancel that must not be lost, or the connection is never closed."""
        async with lock:
            try:
                async with asyncio.timeout(self.settings.ws_send_timeout_s):
                    await socket.send_text(data.decode())
            except TimeoutError as exc:
                raise _Closed(core.WS_SLOW, _SLOW) from exc
            except Exception as exc:
                raise _Closed() from exc  # the client is gone

    async def _refuse(
        self, socket: WebSocket[Any, Any, Any], lock: asyncio.Lock, exc: core.ApiError
    ) -> None:
        if exc.status == 413:
            await self._close(socket, core.WS_TOO_BIG, exc.message)
            return
        error = {"status": exc.status, "code": exc.code, "message": exc.message}
        with contextlib.suppress(_Closed):
            await self._send(socket, lock, core.ws_frame("error", None, error))
        await self._close(socket, core.ws_close_code(exc.status), exc.code)

    async def _close(self, socket: WebSocket[Any, Any, Any], code: int, reason: str) -> None:
        # The reason of a close frame is limited to 123 bytes.
        reason = reason.encode()[:123].decode(errors="ignore")
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.settings.ws_send_timeout_s):
                await socket.send({"type": "websocket.close", "code": code, "reason": reason})


_HEARTBEAT = PushEvent("heartbeat", "", {})
_SLOW = "slow_client: reconnect with last_event_id"


def route(ws: WebSockets) -> Any:
    """The Litestar WebSocket route handler bound to one WebSockets instance."""

    @websocket_route("/api/conversations/{conversation_id:str}/ws")
    async def conversation_ws(
        socket: WebSocket[Any, Any, Any], conversation_id: FromPath[str]
    ) -> None:
        await ws.serve(socket, conversation_id)

    return conversation_ws
