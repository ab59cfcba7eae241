"""Conversations through the gateway's HTTP API against real NATS and Postgres, no persister
running unless a test stores messages itself: read your writes, paging, isolation."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import msgspec
import pytest
import pytest_asyncio

from baton.devtoken import make_token
from services.gateway import adapters
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
from tests.support import connect_bus, decode_all, read_subject, service_metrics, user_event

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


async def _resume(g: Gateway, cid: str, after: str) -> list[Any]:
    """The events a resume of ``cid`` from ``after`` replays (the live watch is let go)."""
    watch = await g.api.watch(Principal("p1", "u1"), cid, after)
    g.api.hub.leave(watch.topic, watch.queue)
    return list(watch.replay)


async def _stored_one_then_a_second(g: Gateway) -> tuple[str, str, str]:
    """A conversation whose first message is stored and whose second is only accepted."""
    first = await g.post("one")
    cid = first["conversation_id"]
    await _store_all(g, 1)
    second = await g.post("two", cid)
    return cid, first["id"], second["id"]


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
    cid, first, second = await _stored_one_then_a_second(gateway)
    third = (await gateway.post("three", cid))["id"]
    r = await gateway.get(f"/api/conversations/{cid}/messages")
    got = [(x["id"], x["pending"]) for x in r.json()["messages"]]
    assert got == [(first, False), (second, True), (third, True)]
    # Once stored, each message is there once, no longer pending.
    await _store_all(gateway, 3)
    r = await gateway.get(f"/api/conversations/{cid}/messages")
    got = [(x["id"], x["pending"]) for x in r.json()["messages"]]
    assert got == [(first, False), (second, False), (third, False)]


async def test_a_resume_replays_the_accepted_message_before_it_is_stored(gateway: Gateway) -> None:
    first = await gateway.post("replay me")
    cid = first["conversation_id"]
    replay = await _resume(gateway, cid, "unknown-id")
    assert [(e[0], e[1]) for e in replay] == [("message.created", f"msg:{first['id']}")]


class StoredDuringTheRead(ReadModel):
    """The read model, with the persister storing what was accepted just after a read of a
    conversation's messages: the moment a replay's reads can straddle (the database first,
    CHAT_IN's pending messages second)."""

    def __init__(self, pool: Any, store: Any) -> None:
        super().__init__(pool)
        self.store = store

    async def messages(self, conversation_id: str) -> list[dict[str, Any]]:
        rows = await super().messages(conversation_id)
        store, self.store = self.store, None
        if store is not None:
            await store()
        return rows


async def test_a_resume_from_a_message_stored_between_the_replays_reads_repeats_nothing(
    gateway: Gateway,
) -> None:
    # Found by the WebSocket drill beside a load: a client saw the second message live and
    # resumed from it; the persister stored it after the replay read the stored messages and
    # before it looked for pending ones, which dropped it as stored. The replay then did not
    # know the message and sent the whole conversation again (the first message twice).
    cid, first, second = await _stored_one_then_a_second(gateway)
    gateway.api.reads = StoredDuringTheRead(gateway.pool, lambda: _store_all(gateway, 2))
    replay = await _resume(gateway, cid, f"msg:{second}")
    assert gateway.api.reads.store is None  # the second message was stored during the replay
    assert replay == []
    # From the first message: the second, once.
    replay = await _resume(gateway, cid, f"msg:{first}")
    assert [(e[0], e[1]) for e in replay] == [("message.created", f"msg:{second}")]


async def test_a_resume_from_a_message_stored_with_a_much_later_one_during_the_replay_repeats_nothing(
    gateway: Gateway,
) -> None:
    # The persister catches up on two messages at once, between the replay's reads, and the
    # second was accepted 40 s after the first: more than the pending read's 30 s of slack.
    # The database's last stored user message then names a time past the message the client
    # resumes from, so a pending read from there (not from the replay's own read) misses it.
    cid, _, second = await _stored_one_then_a_second(gateway)
    [accepted] = [
        e
        for e in decode_all(
            await read_subject(gateway.bus, subjects.STREAM_CHAT_IN, "chat.in.>", 2),
            m.UserMessageAccepted,
        )
        if e.message_id == second
    ]
    third = msgspec.structs.replace(
        user_event("three", conversation_id=cid),
        created_at=accepted.created_at + timedelta(seconds=40),
    )

    async def catch_up() -> None:
        await gateway.bus.publish(subjects.chat_in("p1", cid), third, msg_id=third.event_id)
        await _store_all(gateway, 3)

    gateway.api.reads = StoredDuringTheRead(gateway.pool, catch_up)
    replay = await _resume(gateway, cid, f"msg:{second}")
    assert gateway.api.reads.store is None
    assert [(e[0], e[1]) for e in replay] == [("message.created", f"msg:{third.message_id}")]


async def test_nobody_else_reads_an_accepted_but_unstored_conversation(gateway: Gateway) -> None:
    cid = (await gateway.post("mine"))["conversation_id"]
    for who in ({"user": "u2"}, {"project": "p2"}):
        for path in ("messages", "state"):
            r = await gateway.get(f"/api/conversations/{cid}/{path}", **who)
            assert r.status_code == 404, (who, path)
    missing = await gateway.get(f"/api/conversations/{uuid.uuid4()}/messages")
    assert missing.status_code == 404


# ---- paging and listing -----------------------------------------------------------------


def _events(cid: str, n: int, project: str = "p1", user: str = "u1") -> list[m.UserMessageAccepted]:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    return [
        msgspec.structs.replace(
            user_event(project=project, user=user, conversation_id=cid, content=f"m{i}"),
            created_at=start + timedelta(seconds=i),
        )
        for i in range(n)
    ]


async def _stored_conversation(g: Gateway, n: int, **who: str) -> str:
    cid = str(uuid.uuid4())
    await Store(g.pool).insert_user_messages(_events(cid, n, **who))
    return cid


async def test_messages_page_backwards_from_the_newest_and_forwards_again(gateway: Gateway) -> None:
    cid = await _stored_conversation(gateway, 25)
    base = f"/api/conversations/{cid}/messages"
    newest = (await gateway.get(f"{base}?limit=10")).json()
    assert [x["content"] for x in newest["messages"]] == [f"m{i}" for i in range(15, 25)]
    assert (newest["has_older"], newest["has_newer"]) == (True, False)
    seen = [x["content"] for x in newest["messages"]]
    cursor = newest["before"]
    while cursor is not None:
        page = (await gateway.get(f"{base}?limit=10&before={cursor}")).json()
        assert page["has_newer"] is True
        seen = [x["content"] for x in page["messages"]] + seen
        cursor = page["before"]
    assert seen == [f"m{i}" for i in range(25)]
    # Appending does not move a page: the same cursor gives the same messages, then the new one.
    after = newest["after"]
    assert (await gateway.get(f"{base}?after={after}")).json()["messages"] == []
    await Store(gateway.pool).insert_user_message(
        user_event(project="p1", user="u1", conversation_id=cid, content="late")
    )
    again = (await gateway.get(f"{base}?limit=10&before={newest['before']}")).json()
    assert [x["content"] for x in again["messages"]] == [f"m{i}" for i in range(5, 15)]
    fresh = (await gateway.get(f"{base}?after={after}")).json()
    assert [x["content"] for x in fresh["messages"]] == ["late"]


async def test_the_default_page_is_the_newest_hundred(gateway: Gateway) -> None:
    cid = await _stored_conversation(gateway, 130)
    page = (await gateway.get(f"/api/conversations/{cid}/messages")).json()
    assert len(page["messages"]) == 100 and page["messages"][-1]["content"] == "m129"
    too_many = await gateway.get(f"/api/conversations/{cid}/messages?limit=1001")
    assert too_many.status_code == 400 and too_many.json()["error"]["code"] == "invalid_limit"


async def test_the_list_shows_the_callers_conversations_by_recent_activity(
    gateway: Gateway,
) -> None:
    cids = [await _stored_conversation(gateway, 1 + i % 3) for i in range(7)]
    other = await _stored_conversation(gateway, 2, user="u2")
    # Activity in the oldest conversation moves it to the top.
    await Store(gateway.pool).insert_user_message(
        user_event(project="p1", user="u1", conversation_id=cids[0], content="bump")
    )
    listed: list[dict[str, Any]] = []
    cursor = None
    while True:
        q = "?limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = (await gateway.get(f"/api/conversations{q}")).json()
        assert len(page["conversations"]) <= 3
        listed += page["conversations"]
        cursor = page["cursor"]
        if cursor is None:
            break
    assert listed[0]["id"] == cids[0]
    assert sorted(c["id"] for c in listed) == sorted(cids)
    assert other not in {c["id"] for c in listed}
    by_id = {c["id"]: c for c in listed}
    assert by_id[cids[0]]["message_count"] == 2 and by_id[cids[2]]["message_count"] == 3
    stamps = [c["last_activity_at"] for c in listed]
    assert stamps == sorted(stamps, reverse=True)
    one = (await gateway.get(f"/api/conversations/{cids[2]}")).json()
    assert (one["id"], one["message_count"], one["title"]) == (cids[2], 3, "")
    assert one["settings"] == {
        "model": None,
        "system_prompt": None,
        "model_allowed": None,
        "model_reason": "",
    }


async def test_a_conversation_only_accepted_so_far_has_metadata_at_once(gateway: Gateway) -> None:
    first = await gateway.post("brand new")
    r = await gateway.get(f"/api/conversations/{first['conversation_id']}")
    assert r.status_code == 200, r.text
    assert (r.json()["message_count"], r.json()["pending"]) == (1, True)


@pytest.mark.parametrize(
    "query",
    [
        "before=abc",
        "after=abc",
        "before=" + "A" * 300,
        "limit=0",
        "limit=-1",
        "limit=ten",
        "limit=99999999999999999999",
        "before=WyJjIiwxLCIwMDAwMDAwMC0wMDAwLTAwMDAtMDAwMC0wMDAwMDAwMDAwMDAiXQ",  # a list cursor
        "before=WyJtIiwxLCJ4Il0",  # ["m",1,"x"]
        "before=WyJtIiwtMSwiMSJd",  # ["m",-1,"1"]
        "before=WyJtIiwxLCI5OTk5OTk5OTk5OTk5OTk5OTk5Il0",  # a seq past bigint
        "before=WyJtIiw5OTk5OTk5OTk5OTk5OTk5OTk5OTk5LCIxIl0",  # a time past any datetime
        "before=WyJtIiwxLCIxIl0&after=WyJtIiwxLCIxIl0",  # both
    ],
)
async def test_bad_cursors_and_limits_are_400(gateway: Gateway, query: str) -> None:
    cid = await _stored_conversation(gateway, 2)
    r = await gateway.get(f"/api/conversations/{cid}/messages?{query}")
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] in ("invalid_cursor", "invalid_limit")


@pytest.mark.parametrize("query", ["cursor=abc", "cursor=WyJtIiwxLCIxIl0", "limit=101", "limit="])
async def test_bad_list_cursors_and_limits_are_400(gateway: Gateway, query: str) -> None:
    r = await gateway.get(f"/api/conversations?{query}")
    assert r.status_code == 400, r.text


async def test_every_conversation_route_is_404_for_others_and_400_for_malformed_ids(
    gateway: Gateway,
) -> None:
    cid = await _stored_conversation(gateway, 2)
    paths = ("", "/messages", "/state")
    for who in ({"user": "u2"}, {"project": "p2"}):
        for path in paths:
            r = await gateway.get(f"/api/conversations/{cid}{path}", **who)
            assert r.status_code == 404, (who, path)
    for path in paths:
        assert (await gateway.get(f"/api/conversations/{uuid.uuid4()}{path}")).status_code == 404
        for bad in ("not-a-uuid", "%00", "1" * 500, "' OR 1=1 --"):
            r = await gateway.get(f"/api/conversations/{bad}{path}")
            assert r.status_code in (400, 404), (bad, path, r.status_code)
            if r.status_code == 400:
                assert r.json()["error"]["code"] == "invalid_id"
    # A foreign user's listing never shows this one.
    listed = (await gateway.get("/api/conversations", user="u2")).json()["conversations"]
    assert cid not in {c["id"] for c in listed}


async def test_pages_are_index_range_scans(gateway: Gateway) -> None:
    big = await _stored_conversation(gateway, 3000)
    for _ in range(3):
        await _stored_conversation(gateway, 1)
    async with gateway.pool.acquire() as con:
        await con.execute(
            "INSERT INTO conversations (id, project_id, user_id, created_at) "
            "SELECT gen_random_uuid(), 'p' || (i % 2), 'u' || (i % 2), now() - i * interval '1 s' "
            "FROM generate_series(1, 6000) AS i"
        )
        await con.execute("ANALYZE messages; ANALYZE conversations")
        at = datetime(2026, 1, 1, 0, 20, tzinfo=UTC)
        plans = {
            "newest": (adapters.MESSAGES_NEWEST, uuid.UUID(big), 100),
            "before": (adapters.MESSAGES_BEFORE, uuid.UUID(big), at, 10**9, 100),
            "after": (adapters.MESSAGES_AFTER, uuid.UUID(big), at, 0, 100),
            "list": (adapters.CONVERSATIONS_NEWEST, "p1", "u1", 20),
            "list_before": (adapters.CONVERSATIONS_BEFORE, "p1", "u1", at, uuid.uuid4(), 20),
        }
        for name, (sql, *args) in plans.items():
            await con.execute("SET plan_cache_mode = force_generic_plan")
            plan = "\n".join(r[0] for r in await con.fetch(f"EXPLAIN {sql}", *args))
            index = "conversations_recent" if name.startswith("list") else "messages_conversation"
            assert f"Index Scan Backward using {index}" in plan or (
                f"Index Scan using {index}" in plan
            ), (name, plan)
            assert "Sort" not in plan and "Seq Scan" not in plan, (name, plan)


async def test_the_openapi_document_describes_the_conversation_routes(gateway: Gateway) -> None:
    spec = (await gateway.client.get("/openapi.json")).json()
    paths = spec["paths"]
    listed = paths["/api/conversations"]["get"]
    assert {p["name"] for p in listed["parameters"]} >= {"limit", "cursor"}
    page = paths["/api/conversations/{conversation_id}/messages"]["get"]
    assert {p["name"] for p in page["parameters"]} >= {"limit", "before", "after"}
    assert "get" in paths["/api/conversations/{conversation_id}"]
    schemas = spec["components"]["schemas"]
    for name in ("MessagesPage", "ConversationsPage", "Conversation", "Message"):
        assert any(k.endswith(name) for k in schemas), name
