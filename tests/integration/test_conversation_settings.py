"""Creating, changing and deleting conversations through the gateway against real NATS and
Postgres, no persister running: shapes and sizes, read your writes, the tombstone, isolation."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from shared import messages as m
from shared import subjects
from tests.integration.test_conversations import Gateway, gateway  # noqa: F401 (fixture)
from tests.support import decode_all, read_subject


async def _create(g: Gateway, body: Any, **who: str) -> httpx.Response:
    r: httpx.Response = await g.client.post("/api/conversations", json=body, headers=g.auth(**who))
    return r


async def test_a_created_conversation_reads_back_at_once_with_its_settings(g: Gateway) -> None:
    r = await _create(
        g,
        {
            "title": "Trip to Lisbon",
            "model": "claude-haiku-4-5",
            "system_prompt": "You answer like a travel agent.",
            "metadata": {"folder": "travel", "pinned": True},
        },
    )
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == "accepted" and body["duplicate"] is False
    cid = body["conversation"]["id"]
    assert body["conversation"]["pending"] is True
    got = await g.get(f"/api/conversations/{cid}")
    assert got.status_code == 200, got.text
    conv = got.json()
    assert conv["title"] == "Trip to Lisbon"
    assert conv["metadata"] == {"folder": "travel", "pinned": True}
    assert conv["settings"]["model"] == "claude-haiku-4-5"
    assert conv["settings"]["system_prompt"] == "You answer like a travel agent."
    # On the bus: one creation on the conversation's settings subject.
    [event] = decode_all(
        await read_subject(g.bus, subjects.STREAM_CONVERSATIONS, "conv.settings.>", 1),
        m.ConversationChanged,
    )
    assert (event.op, event.conversation_id, event.event_id) == ("create", cid, f"convcreate:{cid}")


async def test_an_empty_body_creates_a_conversation_with_defaults(g: Gateway) -> None:
    r = await g.client.post("/api/conversations", headers=g.auth())
    assert r.status_code == 202, r.text
    assert r.json()["conversation"]["settings"]["model"] is None


async def test_a_retried_create_with_its_key_is_the_same_conversation(g: Gateway) -> None:
    headers = {**g.auth(), "Idempotency-Key": "create-1"}
    first = await g.client.post("/api/conversations", json={"title": "a"}, headers=headers)
    again = await g.client.post("/api/conversations", json={"title": "a"}, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json()["duplicate"] is True
    assert again.headers["idempotent-replayed"] == "true"
    assert first.json()["conversation"]["id"] == again.json()["conversation"]["id"]
    other = await g.client.post("/api/conversations", json={"title": "b"}, headers=headers)
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    # Another user's same key is another conversation.
    theirs = await g.client.post(
        "/api/conversations",
        json={"title": "a"},
        headers={**g.auth(user="u2"), "Idempotency-Key": "create-1"},
    )
    assert theirs.json()["conversation"]["id"] != first.json()["conversation"]["id"]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{", 400, "invalid_json"),
        (b"[]", 400, "invalid_body"),
        (b'{"title": 5}', 400, "invalid_body"),
        (b'{"colour": "red"}', 400, "invalid_body"),
        (b'{"model": "no spaces allowed"}', 400, "invalid_body"),
        (b'{"model": ""}', 400, "invalid_body"),
        (b'{"system_prompt": ""}', 400, "invalid_body"),
        (b'{"metadata": [1]}', 400, "invalid_body"),
        (('{"title": "' + "x" * 201 + '"}').encode(), 400, "invalid_body"),
        (b'{"title": "tab\\there"}', 422, "invalid_title"),
        (b'{"system_prompt": "nul\\u0000"}', 422, "invalid_system_prompt"),
        (('{"metadata": {"k": "' + "v" * 5000 + '"}}').encode(), 422, "invalid_metadata"),
        (
            ("{" + '"metadata": {' + ",".join(f'"k{i}": {i}' for i in range(33)) + "}}").encode(),
            422,
            "invalid_metadata",
        ),
        (b'{"title": "' + b"x" * 9000 + b'"}', 413, "body_too_large"),
    ],
)
async def test_a_bad_create_body_is_a_clear_4xx(
    g: Gateway, body: bytes, status: int, code: str
) -> None:
    r = await g.client.post(
        "/api/conversations",
        content=body,
        headers={**g.auth(), "Content-Type": "application/json"},
    )
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


async def test_a_patch_is_read_back_at_once(g: Gateway) -> None:
    cid = (await _create(g, {"title": "old", "metadata": {"a": 1}})).json()["conversation"]["id"]
    r = await g.client.patch(f"/api/conversations/{cid}", json={"title": "new"}, headers=g.auth())
    assert r.status_code == 202, r.text
    assert r.json()["conversation"]["title"] == "new"
    r = await g.client.patch(
        f"/api/conversations/{cid}", json={"metadata": {"b": 2}}, headers=g.auth()
    )
    conv = (await g.get(f"/api/conversations/{cid}")).json()
    assert (conv["title"], conv["metadata"]) == ("new", {"b": 2})


async def test_a_patch_of_a_conversation_only_chatted_in_so_far_is_accepted(g: Gateway) -> None:
    cid = (await g.post("hello"))["conversation_id"]
    r = await g.client.patch(f"/api/conversations/{cid}", json={"title": "named"}, headers=g.auth())
    assert r.status_code == 202, r.text
    assert r.json()["conversation"]["title"] == "named"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{}", 422, "nothing_to_change"),
        (b'{"model": "claude-haiku-4-5"}', 400, "invalid_body"),
        (b"nope", 400, "invalid_json"),
    ],
)
async def test_a_bad_patch_is_a_clear_4xx(g: Gateway, body: bytes, status: int, code: str) -> None:
    cid = (await _create(g, {})).json()["conversation"]["id"]
    r = await g.client.patch(
        f"/api/conversations/{cid}",
        content=body,
        headers={**g.auth(), "Content-Type": "application/json"},
    )
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


@pytest.mark.parametrize(
    "who", [{"user": "u2"}, {"project": "p2"}, {"project": "p2", "user": "u2"}]
)
async def test_someone_elses_conversation_cannot_be_changed_or_deleted(
    g: Gateway, who: dict[str, str]
) -> None:
    cid = (await _create(g, {"title": "mine"})).json()["conversation"]["id"]
    r = await g.client.patch(
        f"/api/conversations/{cid}", json={"title": "theirs"}, headers=g.auth(**who)
    )
    assert r.status_code == 404, r.text
    r = await g.client.delete(f"/api/conversations/{cid}", headers=g.auth(**who))
    assert r.status_code == 404, r.text
    assert (await g.get(f"/api/conversations/{cid}", **who)).status_code == 404
    # Still mine, unchanged and not deleted.
    conv = (await g.get(f"/api/conversations/{cid}")).json()
    assert conv["title"] == "mine"


async def test_unknown_and_malformed_ids_are_404_and_400(g: Gateway) -> None:
    unknown = str(uuid.uuid4())
    assert (
        await g.client.delete(f"/api/conversations/{unknown}", headers=g.auth())
    ).status_code == 404
    r = await g.client.patch(f"/api/conversations/{unknown}", json={"title": "x"}, headers=g.auth())
    assert r.status_code == 404
    r = await g.client.delete("/api/conversations/not-a-uuid", headers=g.auth())
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_id"
    # Nothing was published for them.
    assert await read_subject(g.bus, subjects.STREAM_CONVERSATIONS, "conv.delete.>", 0) == []


async def test_a_delete_hides_the_conversation_at_once_even_with_no_persister(g: Gateway) -> None:
    # The previous attempt's bug: read your writes (CHAT_IN) still found it after the delete.
    first = await g.post("a secret about the red kite")
    cid = first["conversation_id"]
    assert (await g.get(f"/api/conversations/{cid}/messages")).status_code == 200
    r = await g.client.delete(f"/api/conversations/{cid}", headers=g.auth())
    assert r.status_code == 202, r.text
    assert r.json() == {"status": "deleting", "conversation_id": cid, "duplicate": False}
    for path in ("", "/messages", "/state", "/events"):
        got = await g.get(f"/api/conversations/{cid}{path}")
        assert got.status_code == 404, (path, got.text)
    r = await g.client.post(
        "/api/chat", json={"conversation_id": cid, "content": "again"}, headers=g.auth()
    )
    assert r.status_code == 404, r.text
    r = await g.client.patch(f"/api/conversations/{cid}", json={"title": "x"}, headers=g.auth())
    assert r.status_code == 404
    # Deleting again is a success, marked as a duplicate; one tombstone on the bus.
    again = await g.client.delete(f"/api/conversations/{cid}", headers=g.auth())
    assert again.status_code == 202 and again.json()["duplicate"] is True
    [tomb] = decode_all(
        await read_subject(g.bus, subjects.STREAM_CONVERSATIONS, "conv.delete.>", 1),
        m.ConversationDeleteRequested,
    )
    assert (tomb.event_id, tomb.user_id, tomb.reason) == (f"delete:{cid}", "u1", "user")


async def test_a_second_gateway_sees_a_delete_it_did_not_take(g: Gateway) -> None:
    """The tombstone is in the stream, not in one process: a fresh owner cache still sees it."""
    cid = (await g.post("hello"))["conversation_id"]
    assert (await g.get(f"/api/conversations/{cid}")).status_code == 200  # cached owner
    from shared import deletion

    await deletion.request_delete(
        g.bus, deletion.delete_request("p1", cid, owner="u1", requested_by="retention")
    )
    assert (await g.get(f"/api/conversations/{cid}")).status_code == 404


async def test_a_deleted_conversation_leaves_the_list_before_the_database_knows(
    g: Gateway,
) -> None:
    kept = (await g.post("keep me"))["conversation_id"]
    gone = (await g.post("delete me"))["conversation_id"]
    # The list reads the database: store the conversations as the persister would.
    async with g.pool.acquire() as con:
        for cid in (kept, gone):
            await con.execute(
                "INSERT INTO conversations (id, project_id, user_id) VALUES ($1, 'p1', 'u1')",
                uuid.UUID(cid),
            )
    r = await g.client.delete(f"/api/conversations/{gone}", headers=g.auth())
    assert r.status_code == 202
    ids = [c["id"] for c in (await g.get("/api/conversations")).json()["conversations"]]
    assert kept in ids and gone not in ids


@pytest.fixture
def g(gateway: Gateway) -> Gateway:  # noqa: F811
    return gateway
