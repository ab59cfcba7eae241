"""Conversations through the gateway's HTTP API against real NATS and Postgres, no persister
running unless a test stores messages itself: read your writes, paging, isolation."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest_asyncio

from baton.devtoken import make_token
from services.gateway.adapters import Hub, Publisher, ReadModel, TokenLog
from services.gateway.config import Settings
from services.gateway.core import Principal
from services.gateway.handlers import Api
from services.gateway.main import build_app
from services.persister.adapters import Store
from shared import messages as m
from shared import subjects
from shared.bus import Bus
from shared.db import create_pool
from tests.integration.conftest import Infra
from tests.support import connect_bus, decode_all, read_subject, service_metrics

SECRET = "test-secret-" + "y" * 32


class Gateway(msgspec.Struct):
    client: Any
    bus: Bus
    pool: Any
    api: Api

    def auth(self, project: str = "p1", user: str = "u1") -> dict[str, str]:
        return {"Authorization": f"Bearer {make_token(SECRET, project, user)}"}

    async def post(self, content: str, cid: str | None = None, **who: str) -> dict[str, Any]:
        body: dict[str, Any] = {"content": content}
        if cid is not None:
            body["conversation_id"] = cid
        r = await self.client.post("/api/chat", json=body, headers=self.auth(**who))
        assert r.status_code == 202, r.text
        message: dict[str, Any] = r.json()["message"]
        return message

    async def get(self, path: str, **who: str) -> httpx.Response:
        r: httpx.Response = await self.client.get(path, headers=self.auth(**who))
        return r


@pytest_asyncio.fixture
async def gateway(infra: Infra) -> AsyncIterator[Gateway]:
    settings = Settings(jwt_secret=SECRET, max_content_chars=1000, max_body_bytes=8192)  # type: ignore[arg-type]
    bus = await connect_bus(infra.nats_url, "gateway")
    pool = await create_pool(infra.database_url)
    reads = ReadModel(pool)
    hub = Hub(bus, 64, bus.log)
    await hub.start()
    api = Api(
        settings, Publisher(bus, 2.0), reads, hub, service_metrics("gateway"), TokenLog(bus, 2.0)
    )
    app = build_app(api, bus, reads, settings)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        yield Gateway(client, bus, pool, api)
    await hub.stop()
    await bus.close()
    await pool.close()


async def _store_all(g: Gateway, at_least: int) -> None:
    """Do what the persister would: store every accepted message (in stream order)."""
    events = decode_all(
        await read_subject(g.bus, subjects.STREAM_CHAT_IN, "chat.in.>", at_least),
        m.UserMessageAccepted,
    )
    store = Store(g.pool)
    for e in events:
        await store.insert_user_message(e)


# ---- read your writes -------------------------------------------------------------------


async def test_an_accepted_message_is_read_back_at_once_while_nothing_stores_it(
    gateway: Gateway,
) -> None:
    first = await gateway.post("hello")
    cid = first["conversation_id"]
    r = await gateway.get(f"/api/conversations/{cid}/messages")
    assert r.status_code == 200, r.text
    [shown] = r.json()["messages"]
    assert (shown["id"], shown["content"], shown["pending"]) == (first["id"], "hello", True)
    state = (await gateway.get(f"/api/conversations/{cid}/state")).json()
    assert [(x["message_id"], x["status"]) for x in state["runs"]] == [(first["id"], "pending")]


async def test_a_second_message_appears_after_the_stored_first_in_its_place(
    gateway: Gateway,
) -> None:
    first = await gateway.post("one")
    cid = first["conversation_id"]
    await _store_all(gateway, 1)
    second = await gateway.post("two", cid)
    third = await gateway.post("three", cid)
    r = await gateway.get(f"/api/conversations/{cid}/messages")
    got = [(x["id"], x["pending"]) for x in r.json()["messages"]]
    assert got == [(first["id"], False), (second["id"], True), (third["id"], True)]
    # Once stored, each message is there once, no longer pending.
    await _store_all(gateway, 3)
    r = await gateway.get(f"/api/conversations/{cid}/messages")
    got = [(x["id"], x["pending"]) for x in r.json()["messages"]]
    assert got == [(first["id"], False), (second["id"], False), (third["id"], False)]


async def test_a_resume_replays_the_accepted_message_before_it_is_stored(gateway: Gateway) -> None:
    first = await gateway.post("replay me")
    cid = first["conversation_id"]
    watch = await gateway.api.watch(Principal("p1", "u1"), cid, "unknown-id")
    gateway.api.hub.leave(watch.topic, watch.queue)
    assert [(e[0], e[1]) for e in watch.replay] == [("message.created", f"msg:{first['id']}")]


async def test_nobody_else_reads_an_accepted_but_unstored_conversation(gateway: Gateway) -> None:
    cid = (await gateway.post("mine"))["conversation_id"]
    for who in ({"user": "u2"}, {"project": "p2"}):
        for path in ("messages", "state"):
            r = await gateway.get(f"/api/conversations/{cid}/{path}", **who)
            assert r.status_code == 404, (who, path)
    missing = await gateway.get(f"/api/conversations/{uuid.uuid4()}/messages")
    assert missing.status_code == 404
