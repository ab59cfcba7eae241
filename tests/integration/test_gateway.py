"""The gateway's HTTP API against real NATS and Postgres: 202 only after the PubAck, clear errors."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import msgspec
import pytest
import pytest_asyncio

from baton.devtoken import make_token
from services.gateway.adapters import Hub, Publisher, ReadModel, TokenLog
from services.gateway.config import Settings
from services.gateway.handlers import Api
from services.gateway.main import build_app
from services.persister.adapters import Store
from shared import messages as m
from shared import subjects
from shared.bus import Bus
from shared.db import create_pool
from tests.integration.conftest import Infra
from tests.support import connect_bus, decode_all, read_subject, service_metrics, user_event

SECRET = "test-secret-" + "x" * 32


class Gateway(msgspec.Struct):
    client: Any
    bus: Bus
    pool: Any

    def auth(self, project: str = "p1", user: str = "u1") -> dict[str, str]:
        return {"Authorization": f"Bearer {make_token(SECRET, project, user)}"}


@pytest_asyncio.fixture
async def gateway(infra: Infra) -> AsyncIterator[Gateway]:
    settings = Settings(jwt_secret=SECRET, max_content_chars=1000, max_body_bytes=8192)  # type: ignore[arg-type]
    bus = await connect_bus(infra.nats_url, "gateway")
    pool = await create_pool(infra.database_url)
    reads = ReadModel(pool)
    metrics = service_metrics("gateway")
    hub = Hub(bus, 64, bus.log)
    await hub.start()
    api = Api(settings, Publisher(bus, 2.0), reads, hub, metrics, TokenLog(bus, 2.0))
    app = build_app(api, bus, reads, settings)
    # Same event loop as the NATS connection (Litestar's test client runs the app in a thread).
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        yield Gateway(client, bus, pool)
    await hub.stop()
    await bus.close()
    await pool.close()


async def _accepted(bus: Bus, at_least: int) -> list[m.UserMessageAccepted]:
    return decode_all(
        await read_subject(bus, subjects.STREAM_CHAT_IN, "chat.in.>", at_least),
        m.UserMessageAccepted,
    )


async def test_a_message_is_accepted_once_it_is_in_jetstream(gateway: Gateway) -> None:
    r = await gateway.client.post("/api/chat", json={"content": "hi there"}, headers=gateway.auth())
    assert r.status_code == 202
    body = r.json()
    assert body["status"] == "accepted" and body["duplicate"] is False
    msg = body["message"]
    assert (msg["role"], msg["content"]) == ("user", "hi there")
    [event] = await _accepted(gateway.bus, 1)
    assert (event.message_id, event.conversation_id) == (msg["id"], msg["conversation_id"])
    assert (event.project_id, event.user_id) == ("p1", "u1")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer not-a-jwt"},
        {
            "Authorization": "Bearer "
            + jwt.encode({"sub": "u", "project": "p", "exp": 9999999999}, "wrong-secret")
        },
        {"Authorization": "Bearer " + jwt.encode({"sub": "u", "project": "p", "exp": 1}, SECRET)},
        {
            "Authorization": "Bearer "
            + jwt.encode({"sub": "u", "project": "p.>", "exp": 9999999999}, SECRET)
        },
        {"Authorization": "Bearer " + jwt.encode({"sub": "u", "project": "p"}, SECRET)},
    ],
    ids=["missing", "basic", "garbage", "wrong-secret", "expired", "wildcard-claim", "no-exp"],
)
async def test_requests_without_a_valid_token_get_401_and_publish_nothing(
    gateway: Gateway, headers: dict[str, str]
) -> None:
    r = await gateway.client.post("/api/chat", json={"content": "hi"}, headers=headers)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthenticated"
    info = await gateway.bus.js.stream_info(subjects.STREAM_CHAT_IN)
    assert info.state.messages == 0


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"", 400, "invalid_body"),
        (b"{not json", 400, "invalid_json"),
        (b"[1,2]", 400, "invalid_body"),
        (b'{"content": 5}', 400, "invalid_body"),
        (b'{"text": "hi"}', 400, "invalid_body"),
        (b'{"content": "hi", "role": "system"}', 400, "invalid_body"),
        (b'{"content": "   "}', 422, "empty_content"),
        (b'{"content": "hi\\u0000"}', 422, "invalid_content"),
        (b'{"content": "hi", "conversation_id": "../../etc"}', 400, "invalid_id"),
        (msgspec.json.encode({"content": "x" * 1001}), 413, "content_too_large"),
        (msgspec.json.encode({"content": "x" * 9000}), 413, "body_too_large"),
    ],
    ids=[
        "empty",
        "not-json",
        "array",
        "wrong-type",
        "missing-content",
        "unknown-field",
        "blank",
        "nul",
        "bad-conversation-id",
        "too-long",
        "body-over-limit",
    ],
)
async def test_malformed_bodies_get_a_clear_error_and_publish_nothing(
    gateway: Gateway, body: bytes, status: int, code: str
) -> None:
    headers = {**gateway.auth(), "Content-Type": "application/json"}
    r = await gateway.client.post("/api/chat", content=body, headers=headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"]
    info = await gateway.bus.js.stream_info(subjects.STREAM_CHAT_IN)
    assert info.state.messages == 0


async def test_a_retry_with_the_same_key_returns_the_original_message(gateway: Gateway) -> None:
    headers = {**gateway.auth(), "Idempotency-Key": "key-1"}
    first = await gateway.client.post("/api/chat", json={"content": "once"}, headers=headers)
    again = await gateway.client.post("/api/chat", json={"content": "once"}, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json()["duplicate"] is True
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["message"] == first.json()["message"]
    assert len(await _accepted(gateway.bus, 1)) == 1


async def test_concurrent_submits_with_one_key_make_one_message(gateway: Gateway) -> None:
    headers = {**gateway.auth(), "Idempotency-Key": "burst"}
    replies = await asyncio.gather(
        *(
            gateway.client.post("/api/chat", json={"content": "burst"}, headers=headers)
            for _ in range(20)
        )
    )
    assert {r.status_code for r in replies} == {202}
    assert len({r.json()["message"]["id"] for r in replies}) == 1
    assert sum(not r.json()["duplicate"] for r in replies) == 1
    assert len(await _accepted(gateway.bus, 1)) == 1


async def test_the_same_key_with_another_body_is_refused(gateway: Gateway) -> None:
    headers = {**gateway.auth(), "Idempotency-Key": "key-2"}
    await gateway.client.post("/api/chat", json={"content": "first"}, headers=headers)
    r = await gateway.client.post("/api/chat", json={"content": "second"}, headers=headers)
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "idempotency_key_reused"


async def test_keys_are_scoped_per_user(gateway: Gateway) -> None:
    a = await gateway.client.post(
        "/api/chat",
        json={"content": "x"},
        headers={**gateway.auth(user="a"), "Idempotency-Key": "k"},
    )
    b = await gateway.client.post(
        "/api/chat",
        json={"content": "x"},
        headers={**gateway.auth(user="b"), "Idempotency-Key": "k"},
    )
    assert a.json()["message"]["id"] != b.json()["message"]["id"]
    assert b.json()["duplicate"] is False


async def test_a_key_over_255_characters_is_refused(gateway: Gateway) -> None:
    headers = {**gateway.auth(), "Idempotency-Key": "k" * 256}
    r = await gateway.client.post("/api/chat", json={"content": "x"}, headers=headers)
    assert r.status_code == 400


async def test_a_replay_after_the_message_is_stored_answers_from_the_database(
    gateway: Gateway,
) -> None:
    headers = {**gateway.auth(), "Idempotency-Key": "stored"}
    first = await gateway.client.post("/api/chat", json={"content": "kept"}, headers=headers)
    [event] = await _accepted(gateway.bus, 1)
    await Store(gateway.pool).insert_user_message(event)
    # With the stream purged, only the database can recognise the replay.
    await gateway.bus.js.purge_stream(subjects.STREAM_CHAT_IN)
    again = await gateway.client.post("/api/chat", json={"content": "kept"}, headers=headers)
    assert again.json()["duplicate"] is True
    assert again.json()["message"]["id"] == first.json()["message"]["id"]
    info = await gateway.bus.js.stream_info(subjects.STREAM_CHAT_IN)
    assert info.state.messages == 0


async def test_other_users_and_projects_get_404_for_a_conversation(gateway: Gateway) -> None:
    e = user_event(project="p1", user="u1")
    await Store(gateway.pool).insert_user_message(e)
    cid = e.conversation_id
    own = await gateway.client.get(f"/api/conversations/{cid}/messages", headers=gateway.auth())
    assert own.status_code == 200
    assert [x["content"] for x in own.json()["messages"]] == [e.content]
    for auth in (gateway.auth(user="u2"), gateway.auth(project="p2")):
        for path in ("messages", "state"):
            r = await gateway.client.get(f"/api/conversations/{cid}/{path}", headers=auth)
            assert r.status_code == 404
        post = await gateway.client.post(
            "/api/chat", json={"content": "sneak", "conversation_id": cid}, headers=auth
        )
        assert post.status_code == 404
    missing = await gateway.client.get(
        f"/api/conversations/{uuid.uuid4()}/messages", headers=gateway.auth()
    )
    assert missing.status_code == 404
    bad = await gateway.client.get("/api/conversations/not-a-uuid/messages", headers=gateway.auth())
    assert (bad.status_code, bad.json()["error"]["code"]) == (400, "invalid_id")


async def test_usage_starts_at_zero_for_a_new_project(gateway: Gateway) -> None:
    r = await gateway.client.get("/api/usage", headers=gateway.auth(project="fresh"))
    assert r.status_code == 200
    body = r.json()
    assert (body["input_tokens"], body["output_tokens"], body["runs"], body["cost_usd"]) == (
        0,
        0,
        0,
        0.0,
    )


async def test_health_readiness_and_openapi(gateway: Gateway) -> None:
    assert (await gateway.client.get("/healthz")).status_code == 200
    ready = await gateway.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"nats": "ok", "database": "ok"}
    spec = (await gateway.client.get("/openapi.json")).json()
    assert "/api/chat" in spec["paths"]


async def test_unknown_routes_and_methods_get_json_errors(gateway: Gateway) -> None:
    r = await gateway.client.get("/api/nothing", headers=gateway.auth())
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = await gateway.client.get("/api/chat", headers=gateway.auth())
    assert r.status_code == 405
