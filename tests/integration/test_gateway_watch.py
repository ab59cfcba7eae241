"""Nobody watches or posts into another tenant's conversation: SSE and WebSocket, real NATS and
Postgres, for ids that exist, ids that do not exist yet, and while the database cannot be read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from services.persister.adapters import Store
from shared import messages as m
from shared import subjects
from tests.integration.conftest import Infra
from tests.integration.test_gateway_ws import Gateway, _serve, auth, publish_tokens
from tests.support import decode_all, eventually, read_subject

SECRET_TEXT = "the victim's secret plan"
# The namespaces keyed ids were once derived from (public: they were in the source).
MESSAGE_NS_V0 = uuid.UUID("5d1c9a3e-7f0b-4c52-9d7e-3b8f6a2e4c91")
CONVERSATION_NS_V0 = uuid.UUID("a8e2f1c4-3b6d-4e9a-8c7f-1d5b2e9a6f03")
ATTACKERS = {"same-project": ("p1", "mallory"), "other-project": ("p2", "u1")}
TRANSPORTS = ("sse", "ws")


@pytest_asyncio.fixture
async def gateway(infra: Infra) -> AsyncIterator[Gateway]:
    async for g in _serve(infra):
        yield g


def http_url(g: Gateway) -> str:
    return g.url.replace("ws://", "http://")


class Watcher:
    """One push stream, SSE or WebSocket, read in the background: its status and all it got."""

    def __init__(self, g: Gateway, transport: str, cid: str, headers: dict[str, str]) -> None:
        self.g, self.transport, self.cid, self.headers = g, transport, cid, headers
        self.status: int | None = None  # HTTP status (SSE) or 200 once the WebSocket is ready
        self.close_code: int | None = None
        self.text = ""  # everything received, raw
        self.ended = asyncio.Event()
        self.opened = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Watcher:
        self.task = asyncio.create_task(self._run())
        await asyncio.wait_for(self.opened.wait(), 10)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    async def _run(self) -> None:
        try:
            if self.transport == "sse":
                await self._sse()
            else:
                await self._ws()
        finally:
            self.opened.set()
            self.ended.set()

    async def _sse(self) -> None:
        path = f"/api/conversations/{self.cid}/events"
        async with (
            httpx.AsyncClient(base_url=http_url(self.g), timeout=None) as client,
            client.stream("GET", path, headers=self.headers) as r,
        ):
            self.status = r.status_code
            if r.status_code != 200:
                self.text = (await r.aread()).decode()
                return
            async for chunk in r.aiter_text():
                self.text += chunk
                if ": connected" in self.text:
                    self.opened.set()

    async def _ws(self) -> None:
        try:
            async with connect(self.g.ws(self.cid), additional_headers=self.headers) as ws:
                try:
                    while True:
                        frame = await ws.recv()
                        self.text += str(frame)
                        if json.loads(frame)["event"] == "ready":
                            self.status = 200
                        self.opened.set()
                except ConnectionClosed:
                    pass
                self.close_code = ws.close_code
        except InvalidStatus as exc:
            self.status = exc.response.status_code

    @property
    def refused(self) -> int | None:
        """The HTTP status a refusal had, by whichever transport (WebSocket close 4xxx → xxx)."""
        if self.transport == "sse":
            return self.status if self.status != 200 else None
        code = self.close_code
        return code - 4000 if code is not None and code >= 4400 else None


async def post(
    g: Gateway, headers: dict[str, str], content: str, cid: str | None = None, key: str = ""
) -> httpx.Response:
    body: dict[str, Any] = {"content": content}
    if cid is not None:
        body["conversation_id"] = cid
    extra = {"Idempotency-Key": key} if key else {}
    async with httpx.AsyncClient(base_url=http_url(g), timeout=10) as client:
        return await client.post("/api/chat", json=body, headers={**headers, **extra})


async def accepted_in(g: Gateway, cid: str) -> list[m.UserMessageAccepted]:
    """What CHAT_IN holds for a conversation (any project), once it holds something (the 202
    said it does). The read's bound only ends a read that failed: one second of it failed a
    fresh-clone run whose first read took longer."""
    found = await read_subject(g.bus, subjects.STREAM_CHAT_IN, f"chat.in.*.{cid}", 1)
    return decode_all(found, m.UserMessageAccepted)


async def store_and_push(g: Gateway, e: m.UserMessageAccepted, tokens: int = 3) -> None:
    """What the pipeline does with an accepted message: store it, announce it, stream tokens."""
    await Store(g.pool).insert_user_message(e)
    persisted = m.UserMessagePersisted(
        event_id=f"persisted:{e.message_id}",
        message_id=e.message_id,
        conversation_id=e.conversation_id,
        project_id=e.project_id,
        user_id=e.user_id,
        content=e.content,
        content_hash=e.content_hash,
        created_at=e.created_at,
        position=1,
    )
    await g.bus.publish(
        subjects.persisted_user(e.project_id, e.conversation_id),
        persisted,
        msg_id=persisted.event_id,
    )
    await publish_tokens(g.bus, e, tokens, text="secret-token-")


async def victim_posts(g: Gateway, cid: str | None = None) -> m.UserMessageAccepted:
    r = await post(g, auth(), SECRET_TEXT, cid)
    assert r.status_code == 202, r.text
    [e] = await accepted_in(g, r.json()["message"]["conversation_id"])
    return e


# ---- finding 1 (a): a stream opened on an id before its owner posts into it ----------------


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("attacker", ATTACKERS.values(), ids=ATTACKERS.keys())
async def test_a_stream_opened_before_someone_else_posts_never_carries_their_conversation(
    gateway: Gateway, transport: str, attacker: tuple[str, str]
) -> None:
    cid = str(uuid.uuid4())
    async with (
        Watcher(gateway, transport, cid, auth()) as victim,
        Watcher(gateway, transport, cid, auth(*attacker)) as spy,
    ):
        e = await victim_posts(gateway, cid)
        await store_and_push(gateway, e)
        # The owner, who opened the stream first too, gets everything (the test can fail).
        await eventually(lambda: _async("secret-token-3" in victim.text))
        if attacker[0] == "p1":
            # Same project, same hub topic: its stream ends at the first event, which it never gets.
            await eventually(lambda: _async(spy.ended.is_set() or "secret-token-3" in spy.text))
        else:
            # Another project's watchers are not even on the topic the events go to.
            assert len(gateway.hub.clients.get(f"p1.{cid}", ())) == 1
    assert SECRET_TEXT in victim.text
    assert SECRET_TEXT not in spy.text and "secret-token" not in spy.text
    if transport == "ws" and attacker[0] == "p1":
        assert spy.close_code == 4404


async def _async(value: bool) -> bool:
    return value


# ---- finding 1 (a), (b): a stream opened on someone else's id that is not stored yet -------


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("attacker", ATTACKERS.values(), ids=ATTACKERS.keys())
async def test_a_stream_on_someone_elses_accepted_but_unstored_conversation_is_404(
    gateway: Gateway, transport: str, attacker: tuple[str, str]
) -> None:
    e = await victim_posts(gateway)  # in JetStream only: the persister has not stored it
    async with Watcher(gateway, transport, e.conversation_id, auth(*attacker)) as spy:
        await asyncio.wait_for(spy.ended.wait(), 10)
    assert spy.refused == 404
    # Its owner may watch it straight after the 202 (the conversation is found in JetStream).
    async with Watcher(gateway, transport, e.conversation_id, auth()) as owner:
        await store_and_push(gateway, e)
        await eventually(lambda: _async("secret-token-3" in owner.text))
    assert owner.refused is None


async def test_ids_derived_from_an_idempotency_key_cannot_be_computed_by_others(
    gateway: Gateway,
) -> None:
    r = await post(gateway, auth(), SECRET_TEXT, key="order-42")
    assert r.status_code == 202
    got = r.json()["message"]
    # The derivation the API used to have: public namespaces over project, user and key.
    scope = "p1\nu1\norder-42"
    assert got["conversation_id"] != str(uuid.uuid5(CONVERSATION_NS_V0, scope))
    assert got["id"] != str(uuid.uuid5(MESSAGE_NS_V0, scope))
    again = await post(gateway, auth(), SECRET_TEXT, key="order-42")
    assert again.json()["message"] == got  # still the same submit when retried


# ---- finding 1 (c): the database cannot be read --------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("attacker", ATTACKERS.values(), ids=ATTACKERS.keys())
async def test_with_the_database_down_someone_elses_conversation_is_never_streamed(
    gateway: Gateway, transport: str, attacker: tuple[str, str]
) -> None:
    stored_only = await victim_posts(gateway)
    await Store(gateway.pool).insert_user_message(stored_only)
    await gateway.bus.js.purge_stream(subjects.STREAM_CHAT_IN)  # stored, gone from the stream
    in_stream = await victim_posts(gateway)  # accepted, not stored yet
    await gateway.pool.close()  # the read model is gone
    for e, status in ((stored_only, 503), (in_stream, 404)):
        async with Watcher(gateway, transport, e.conversation_id, auth(*attacker)) as spy:
            await asyncio.wait_for(spy.ended.wait(), 10)
        assert spy.refused == status, (e.conversation_id, spy.text)
    # The owner's conversation still in JetStream still streams while the database is down.
    async with Watcher(gateway, transport, in_stream.conversation_id, auth()) as owner:
        await publish_tokens(gateway.bus, in_stream, 2, text="live-")
        await eventually(lambda: _async("live-2" in owner.text))


# ---- finding 6: no 202 for a post that the persister would refuse --------------------------


@pytest.mark.parametrize("attacker", ATTACKERS.values(), ids=ATTACKERS.keys())
async def test_with_the_database_down_a_post_into_someone_elses_conversation_is_not_accepted(
    gateway: Gateway, attacker: tuple[str, str]
) -> None:
    stored_only = await victim_posts(gateway)
    await Store(gateway.pool).insert_user_message(stored_only)
    await gateway.bus.js.purge_stream(subjects.STREAM_CHAT_IN)
    in_stream = await victim_posts(gateway)
    await gateway.pool.close()
    r = await post(gateway, auth(*attacker), "sneak", in_stream.conversation_id)
    assert r.status_code == 404, r.text
    r = await post(gateway, auth(*attacker), "sneak", stored_only.conversation_id)
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] and r.json()["error"]["code"] == "database_unavailable"
    # A brand-new id the client chose cannot be told from someone else's stored one either.
    r = await post(gateway, auth(*attacker), "sneak", str(uuid.uuid4()))
    assert r.status_code == 503, r.text
    info = await gateway.bus.js.stream_info(subjects.STREAM_CHAT_IN)
    assert info.state.messages == 1  # the victim's, nothing of the attacker's
    # The owner keeps posting into the conversation JetStream still holds, and new ones start.
    r = await post(gateway, auth(), "more", in_stream.conversation_id)
    assert r.status_code == 202, r.text
    assert (await post(gateway, auth(), "a new conversation")).status_code == 202


@pytest.mark.parametrize("attacker", ATTACKERS.values(), ids=ATTACKERS.keys())
async def test_a_post_into_someone_elses_accepted_but_unstored_conversation_is_404(
    gateway: Gateway, attacker: tuple[str, str]
) -> None:
    e = await victim_posts(gateway)
    r = await post(gateway, auth(*attacker), "sneak", e.conversation_id)
    assert r.status_code == 404, r.text
    assert (await post(gateway, auth(), "mine", e.conversation_id)).status_code == 202
