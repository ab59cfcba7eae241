"""``DELETE /api/conversations/{id}`` ends the conversation's open push streams (issue 16).

Two gateways (real uvicorn each, in this process) on one real NATS and Postgres: an SSE stream
and a WebSocket on the first, an SSE stream on the second, an AI SDK UI message stream, all on one conversation with a run
still streaming (the test publishes its token deltas into CHAT_STREAM, as the executor does).
The delete is answered by the first. Every stream on the deleted conversation ends within a few
seconds and none of them gets a token published after the ``202``; a stream of the same user on
another conversation goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest_asyncio
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from services.gateway.adapters import topic
from shared import messages as m
from shared import subjects
from shared.bus import Bus
from tests.integration.conftest import Infra
from tests.integration.test_gateway_ws import Gateway, _serve, auth, stored

ENDS_WITHIN_S = 5.0


async def _tokens(bus: Bus, e: m.UserMessageAccepted, seqs: range, text: str) -> None:
    for seq in seqs:
        delta = m.TokenDelta(
            conversation_id=e.conversation_id,
            run_id=f"run-{e.message_id}",
            attempt=1,
            seq=seq,
            text=f"{text}{seq} ",
        )
        await bus.publish(
            subjects.token_stream(e.project_id, e.conversation_id), delta, msg_id=str(uuid.uuid4())
        )


def _http(g: Gateway) -> str:
    return g.url.replace("ws://", "http://", 1)


class SseReader:
    """Reads one SSE stream in a task: the token seqs it got, and whether (when) it ended."""

    def __init__(self, client: httpx.AsyncClient, url: str, ai_sdk: bool = False) -> None:
        self.client = client
        self.url = url
        self.ai_sdk = ai_sdk
        self.seqs: list[int] = []
        self.status: int | None = None
        self.ended_at: float | None = None
        self.opened = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            # The gateway going away under it (teardown of a failed test) ends it too.
            with contextlib.suppress(httpx.TransportError):
                await self._read()
        finally:
            self.opened.set()
            self.ended_at = time.monotonic()

    async def _read(self) -> None:
        async with self.client.stream("GET", self.url, headers=auth()) as r:
            self.status = r.status_code
            self.opened.set()
            event = ""
            async for line in r.aiter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event == "token":
                    self.seqs.append(int(json.loads(line.split(":", 1)[1])["seq"]))
                elif line.startswith("data:") and self.ai_sdk and line != "data: [DONE]":
                    # A UI message stream: text deltas ``doomed-<seq> ``, one part each.
                    part = json.loads(line.split(":", 1)[1])
                    if part.get("type") == "text-delta":
                        self.seqs.append(int(str(part["delta"]).split("-")[1]))

    async def wait_for(self, seq: int) -> None:
        ends = time.monotonic() + ENDS_WITHIN_S
        while seq not in self.seqs:
            assert self.ended_at is None, f"ended early, got {self.seqs}"
            assert time.monotonic() < ends, f"no token {seq}, got {self.seqs}"
            await asyncio.sleep(0.02)

    async def ended(self) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.task), ENDS_WITHIN_S)
        return self.task.done()


class WsReader:
    def __init__(self, url: str) -> None:
        self.url = url
        self.frames: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.ready = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            async with connect(self.url, additional_headers=auth(), open_timeout=5) as ws:
                while True:
                    frame = json.loads(await ws.recv())
                    self.frames.append(frame)
                    if frame["event"] == "ready":
                        self.ready.set()
        except ConnectionClosed as closed:
            self.close_code = closed.rcvd.code if closed.rcvd is not None else None
        finally:
            self.ready.set()

    def seqs(self) -> list[int]:
        return [int(f["data"]["seq"]) for f in self.frames if f["event"] == "token"]


@pytest_asyncio.fixture
async def two(infra: Infra) -> AsyncIterator[tuple[Gateway, Gateway]]:
    async with contextlib.AsyncExitStack() as stack:
        gens = [_serve(infra), _serve(infra)]
        gws = [await anext(g) for g in gens]
        for g in gens:
            stack.push_async_callback(_finish, g)
        yield gws[0], gws[1]


async def _finish(gen: AsyncIterator[Gateway]) -> None:
    with contextlib.suppress(StopAsyncIteration):
        await anext(gen)


async def test_a_delete_ends_every_open_stream_of_the_conversation_on_every_replica(
    two: tuple[Gateway, Gateway],
) -> None:
    first, second = two
    doomed = await stored(first)
    kept = await stored(first)  # the same user's other conversation
    assert (doomed.user_id, kept.user_id) == ("u1", "u1")
    events = "/api/conversations/{}/events"
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, connect=5)) as client:
        sse_first = SseReader(client, _http(first) + events.format(doomed.conversation_id))
        sse_second = SseReader(client, _http(second) + events.format(doomed.conversation_id))
        sse_kept = SseReader(client, _http(first) + events.format(kept.conversation_id))
        ai_sdk = SseReader(
            client, _http(first) + f"/api/ai-sdk/chat/{doomed.conversation_id}/stream", ai_sdk=True
        )
        ws = WsReader(first.ws(doomed.conversation_id))
        for r in (sse_first, sse_second, sse_kept, ai_sdk):
            await asyncio.wait_for(r.opened.wait(), 5)
            assert r.status == 200
        await asyncio.wait_for(ws.ready.wait(), 5)
        # The run streams: every stream gets its first tokens.
        await _tokens(first.bus, doomed, range(1, 3), "doomed-")
        await _tokens(first.bus, kept, range(1, 3), "kept-")
        for r in (sse_first, sse_second, sse_kept, ai_sdk):
            await r.wait_for(2)
        ends = time.monotonic() + ENDS_WITHIN_S
        while 2 not in ws.seqs():
            assert time.monotonic() < ends, ws.frames
            await asyncio.sleep(0.02)

        deleted = await client.delete(
            _http(first) + f"/api/conversations/{doomed.conversation_id}", headers=auth()
        )
        assert deleted.status_code == 202, deleted.text
        # The run's last tokens, published after the 202 (as a cancelled run's may be).
        await _tokens(first.bus, doomed, range(3, 9), "doomed-")
        await _tokens(first.bus, kept, range(3, 9), "kept-")

        assert await sse_first.ended(), sse_first.seqs
        assert await sse_second.ended(), sse_second.seqs
        assert await ai_sdk.ended(), ai_sdk.seqs
        await asyncio.wait_for(ws.task, ENDS_WITHIN_S)
        assert sse_first.seqs == [1, 2]
        assert sse_second.seqs == [1, 2]
        assert ai_sdk.seqs == [1, 2]
        assert ws.seqs() == [1, 2]
        error = ws.frames[-1]
        assert error["event"] == "error", ws.frames
        assert error["data"]["code"] == "conversation_deleted"
        assert ws.close_code == 4404

        # The other conversation's stream is untouched: it gets the rest and stays open.
        await sse_kept.wait_for(8)
        assert sse_kept.seqs == list(range(1, 9))
        assert sse_kept.ended_at is None

        # A reconnect is refused.
        for g in (first, second):
            again = await client.get(
                _http(g) + events.format(doomed.conversation_id), headers=auth()
            )
            assert again.status_code == 404, again.text
        sse_kept.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sse_kept.task


async def test_a_delete_by_another_replica_ends_a_websocket_with_its_error_frame(
    two: tuple[Gateway, Gateway],
) -> None:
    """The tombstone alone (no local call) ends the stream: the WebSocket's error and close."""
    first, second = two
    e = await stored(first)
    ws = WsReader(second.ws(e.conversation_id))
    await asyncio.wait_for(ws.ready.wait(), 5)
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.delete(
            _http(first) + f"/api/conversations/{e.conversation_id}", headers=auth()
        )
    assert r.status_code == 202, r.text
    await asyncio.wait_for(ws.task, ENDS_WITHIN_S)
    assert ws.frames[-1]["event"] == "error", ws.frames
    assert ws.frames[-1]["data"]["code"] == "conversation_deleted"
    assert ws.close_code == 4404
    # A watcher joining the deleted topic late (between the tombstone and its ownership read)
    # ends at once; the same user's other conversation still joins as usual.
    late = second.hub.join(topic("p1", e.conversation_id))
    assert late.get_nowait() is None and second.hub.was_deleted(late)
    other_topic = topic("p1", str(uuid.uuid4()))
    other = second.hub.join(other_topic)
    assert other.empty() and not second.hub.was_deleted(other)
    second.hub.leave(other_topic, other)
    second.hub.leave(topic("p1", e.conversation_id), late)
