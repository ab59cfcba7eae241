"""A conversation's life end to end, each service as its own NATS user and database role:
created with settings (policy's verdict on the model, the executor's system prompt), then
deleted — during a run — until neither Postgres nor any stream holds a word of it."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import httpx
import nats
import nats.js.errors
import pytest

from baton import permissions
from baton.embedded import PostgresServer
from tests.conftest import ExternalPostgres
from tests.e2e.conftest import SecurePipeline, fresh, secure_module_stack
from tests.e2e.test_lifecycle import Client, Events

pytestmark = pytest.mark.e2e

DEFAULT_MODEL = "claude-sonnet-4-6"
OTHER_MODEL = "claude-haiku-4-5"


@pytest.fixture(scope="module")
def _secure_stack(
    postgres_server: PostgresServer | ExternalPostgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SecurePipeline]:
    yield from secure_module_stack(postgres_server, tmp_path_factory.mktemp("lifecycle"))


@pytest.fixture
def secure_pipeline(_secure_stack: SecurePipeline) -> SecurePipeline:
    """One stack for the module, the model reset. Each test has conversations of its own and
    looks only for its own words (a secret made for it, its own answers) in every table and
    stream; the model requests it checks are its own run's."""
    fresh(_secure_stack)
    return _secure_stack


def _wait(p: SecurePipeline, check: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what}: not in time\n{p.log_tail(60)}")


def _create(c: Client, body: dict[str, Any]) -> str:
    r = httpx.post(f"{c.p.gateway}/api/conversations", json=body, headers=c.auth)
    assert r.status_code == 202, r.text
    cid: str = r.json()["conversation"]["id"]
    c.cid = cid
    return cid


def _get(c: Client, path: str = "") -> httpx.Response:
    return httpx.get(f"{c.p.gateway}/api/conversations/{c.cid}{path}", headers=c.auth)


def test_a_conversations_settings_choose_its_model_and_system_prompt(
    secure_pipeline: SecurePipeline,
) -> None:
    p = secure_pipeline
    c = Client(p)
    marker = f"prompt-{uuid.uuid4().hex[:8]}"
    cid = _create(
        c,
        {"title": "Haiku please", "model": OTHER_MODEL, "system_prompt": f"You are {marker}."},
    )
    assert _get(c).json()["title"] == "Haiku please"  # at once: read your writes
    # Policy's verdict is recorded on the conversation.
    settings = _wait(
        p,
        lambda: (s := _get(c).json()["settings"])["model_allowed"] is not None and s,
        "model verdict",
    )
    assert settings["model_allowed"] is True and OTHER_MODEL in settings["model_reason"]
    run = c.send("Hello there, who are you?")
    done = c.wait_status(run, "completed")
    assert done["model"] == OTHER_MODEL
    calls = [r for r in p.model.requests() if r["call_id"].startswith(f"task:{run}:")]
    assert calls and all(marker in str(r["body"]["system"]) for r in calls)

    # A model the project does not allow: recorded as refused; its runs use policy's choice.
    c2 = Client(p)
    _create(c2, {"model": "gpt-unknown-9"})
    settings = _wait(
        p,
        lambda: (s := _get(c2).json()["settings"])["model_allowed"] is not None and s,
        "model verdict",
    )
    assert settings["model_allowed"] is False and "not allowed" in settings["model_reason"]
    assert c2.wait_status(c2.send("Hi"), "completed")["model"] == DEFAULT_MODEL

    # A first POST /api/chat without a conversation still works as before.
    c3 = Client(p)
    r = httpx.post(f"{p.gateway}/api/chat", json={"content": "no conversation"}, headers=c3.auth)
    assert r.status_code == 202, r.text
    c3.cid = r.json()["message"]["conversation_id"]
    assert c3.wait_status(f"run-{r.json()['message']['id']}", "completed")["model"]
    assert cid != c3.cid


def test_deleting_a_conversation_during_a_run_leaves_none_of_it_in_postgres_or_any_stream(
    secure_pipeline: SecurePipeline,
) -> None:
    p = secure_pipeline
    c = Client(p)
    secret = f"kestrel{uuid.uuid4().hex[:10]}"
    _create(
        c,
        {
            "title": f"title {secret}",
            "system_prompt": f"Remember {secret}.",
            "metadata": {"k": secret},
        },
    )
    first = c.send(f"My secret word is {secret}, keep it.")
    c.wait_status(first, "completed")
    answers = [m["content"] for m in c.messages() if m["role"] == "assistant"]
    assert answers
    # A second run, slowed down, is under way when the conversation is deleted.
    p.model.update_settings(tokens_per_second=8, words_per_reply=400)
    second = c.send(f"Tell me a long story about {secret}.")
    c.open_call(second)
    r = httpx.delete(f"{p.gateway}/api/conversations/{c.cid}", headers=c.auth)
    assert r.status_code == 202, r.text
    assert r.json()["duplicate"] is False
    # At once: every read is 404, a resume replays nothing, the id takes no new message.
    for path in ("", "/messages", "/state", "/events"):
        assert _get(c, path).status_code == 404, path
    resume = httpx.get(
        f"{p.gateway}/api/conversations/{c.cid}/events",
        headers={**c.auth, "Last-Event-ID": f"msg:{first[4:]}"},
    )
    assert resume.status_code == 404
    again = httpx.post(
        f"{p.gateway}/api/chat",
        json={"conversation_id": c.cid, "content": f"back again {secret}"},
        headers=c.auth,
    )
    assert again.status_code == 404, again.text
    listed = httpx.get(f"{p.gateway}/api/conversations", headers=c.auth).json()
    assert c.cid not in [x["id"] for x in listed["conversations"]]
    twice = httpx.delete(f"{p.gateway}/api/conversations/{c.cid}", headers=c.auth)
    assert twice.status_code == 202 and twice.json()["duplicate"] is True
    p.model.update_settings(tokens_per_second=0, words_per_reply=24)

    # The run in flight was cancelled, its model call stopped; usage keeps the numbers.
    _wait(
        p,
        lambda: _db(p, "SELECT status FROM runs WHERE run_id = $1", second) == [("cancelled",)],
        "run cancelled",
    )
    billed = _wait(
        p,
        lambda: _db(
            p,
            "SELECT run_id, input_tokens FROM usage WHERE run_id = ANY($1::text[]) AND purpose = 'answer'",
            [first, second],
        ),
        "usage rows",
    )
    assert {r[0] for r in billed} == {first, second} and all(r[1] > 0 for r in billed)
    row = _db(
        p,
        "SELECT title, metadata::text, system_prompt, deleted_at IS NOT NULL, message_count FROM conversations WHERE id = $1",
        uuid.UUID(c.cid),
    )
    assert row == [("", "{}", None, True, 0)]

    # Nothing left anywhere: every table of the database, every message of every stream.
    needles = [secret, *answers]
    _wait(p, lambda: not _found_in_streams(p, needles), "content gone from the streams", 60)
    assert _found_in_database(p, needles) == []
    assert _found_in_streams(p, needles) == []


def test_a_delete_ends_the_open_stream_of_the_conversation_during_its_run(
    secure_pipeline: SecurePipeline,
) -> None:
    """The gateway's own NATS user hears the tombstone: the open SSE stream ends, the cancelled
    run's status never reaches it (the cancel happens after the delete), a reconnect is 404."""
    p = secure_pipeline
    c = Client(p)
    _create(c, {"title": "soon gone"})
    p.model.update_settings(tokens_per_second=8, words_per_reply=400)
    try:
        with Events(c) as events:
            run = c.send("Tell me a long story.")
            _wait(p, lambda: any(e == "token" for e, _ in list(events.events)), "a token")
            r = httpx.delete(f"{p.gateway}/api/conversations/{c.cid}", headers=c.auth)
            assert r.status_code == 202, r.text
            events.thread.join(5)
            assert not events.thread.is_alive(), "the stream is still open after the delete"
            assert "cancelled" not in [s for _, s in events.statuses(run)], events.statuses(run)
        assert _get(c, "/events").status_code == 404
        cancelled = "SELECT status FROM runs WHERE run_id = $1"
        _wait(p, lambda: _db(p, cancelled, run) == [("cancelled",)], "run cancelled")
    finally:
        p.model.update_settings(tokens_per_second=0, words_per_reply=24)


def test_someone_elses_conversation_cannot_be_deleted(secure_pipeline: SecurePipeline) -> None:
    p = secure_pipeline
    mine = Client(p)
    _create(mine, {"title": "mine"})
    for who in (Client(p, user="mallory"), Client(p, project="other")):
        r = httpx.delete(f"{p.gateway}/api/conversations/{mine.cid}", headers=who.auth)
        assert r.status_code == 404, r.text
    unknown = httpx.delete(f"{p.gateway}/api/conversations/{uuid.uuid4()}", headers=mine.auth)
    assert unknown.status_code == 404
    assert _get(mine).status_code == 200


def _db(p: SecurePipeline, query: str, *args: Any) -> list[tuple[Any, ...]]:
    async def run() -> list[tuple[Any, ...]]:
        con = await asyncpg.connect(p.database_url)
        try:
            return [tuple(r) for r in await con.fetch(query, *args)]
        finally:
            await con.close()

    return asyncio.run(run())


def _found_in_database(p: SecurePipeline, needles: list[str]) -> list[str]:
    """Tables whose rows (as text) hold any of the needles."""

    async def run() -> list[str]:
        con = await asyncpg.connect(p.database_url)
        try:
            tables = [
                r["tablename"]
                for r in await con.fetch(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                )
            ]
            hits = []
            for table in tables:
                for needle in needles:
                    n = await con.fetchval(
                        f'SELECT count(*) FROM "{table}" t WHERE t::text LIKE $1',
                        f"%{needle}%",
                    )
                    if n:
                        hits.append(f"{table}: {needle[:20]}")
            return hits
        finally:
            await con.close()

    return asyncio.run(run())


def _found_in_streams(p: SecurePipeline, needles: list[str]) -> list[str]:
    """Streams (every one, KV buckets and dead letters too) holding any of the needles."""

    async def run() -> list[str]:
        nc = await nats.connect(
            p.nats_url, user=permissions.ADMIN, password=p.passwords[permissions.ADMIN]
        )
        try:
            js = nc.jetstream()
            hits = []
            for name in await js.streams_info():
                state = name.state
                if not state.messages:
                    continue
                for seq in range(max(state.first_seq, 1), state.last_seq + 1):
                    try:
                        msg = await js.get_msg(name.config.name, seq)
                    except nats.js.errors.NotFoundError:
                        continue
                    data = (msg.data or b"").decode(errors="replace")
                    hits += [
                        f"{name.config.name}#{seq} ({msg.subject})"
                        for needle in needles
                        if needle in data
                    ]
            return hits
        finally:
            await nc.close()

    return asyncio.run(run())
