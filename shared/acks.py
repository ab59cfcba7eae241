"""Requests whose replies come back on one subscription: JetStream PubAcks, cheaply."""

from __future__ import annotations

import asyncio
import contextlib

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

NO_RESPONDERS = "503"  # the status the server replies with when nothing takes the subject


class Acks:
    """Request/reply over one reply subscription per connection, as nats-py's ``request``.

    nats-py draws a random token per request (a system call), builds the reply subject in
    byte arrays and arms a timer per request; on the accept path that was a tenth of the
    gateway's CPU. Here a reply subject is a counter, and one sweep every ``tick_s`` fails
    the requests whose time is up (so a timeout fires up to ``tick_s`` late).
    """

    def __init__(self, nc: NATS, tick_s: float = 0.25) -> None:
        self.nc = nc
        self.tick_s = tick_s
        self.prefix = ""
        self.seq = 0
        self.waiting: dict[str, tuple[float, asyncio.Future[Msg]]] = {}
        self.sub: Subscription | None = None
        self.sweeper: asyncio.Task[None] | None = None

    async def open(self) -> None:
        # A new inbox per connection: replicas of one service share the inbox prefix.
        self.prefix = self.nc.new_inbox()
        self.sub = await self.nc.subscribe(f"{self.prefix}.*", cb=self._reply)
        self.sweeper = asyncio.create_task(self._sweep())

    async def close(self) -> None:
        """Stop the sweep; a request still waiting fails now rather than wait for ever, and a
        new one is refused (its reply could no longer arrive, nor its deadline be swept)."""
        self.sub = None
        if self.sweeper is not None:
            self.sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.sweeper
        for _, reply in self.waiting.values():
            if not reply.done():
                reply.set_exception(nats.errors.ConnectionClosedError())

    async def request(
        self, subject: str, payload: bytes, headers: dict[str, str], timeout: float
    ) -> Msg:
        """Publish with a reply subject and wait for the reply; ``nats.errors`` as nats-py's."""
        if self.sub is None:
            raise nats.errors.ConnectionClosedError
        self.seq += 1
        token = str(self.seq)
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Msg] = loop.create_future()
        self.waiting[token] = (loop.time() + timeout, reply)
        try:
            await self.nc.publish(subject, payload, reply=f"{self.prefix}.{token}", headers=headers)
            msg = await reply
        finally:
            del self.waiting[token]
        if msg.headers and msg.headers.get("Status") == NO_RESPONDERS:
            raise nats.errors.NoRespondersError
        return msg

    async def _reply(self, msg: Msg) -> None:
        waiting = self.waiting.get(msg.subject[len(self.prefix) + 1 :])
        if waiting is not None and not waiting[1].done():
            waiting[1].set_result(msg)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.tick_s)
            now = loop.time()
            for deadline, reply in list(self.waiting.values()):
                if deadline <= now and not reply.done():
                    reply.set_exception(nats.errors.TimeoutError())
