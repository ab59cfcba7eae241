"""The tool edge on a real gateway, NATS and Postgres: approvals, pending calls, tool events.

Policy's part is played by publishing what it publishes (``ToolApprovalRequested`` on
``tool.requested``, a run verdict, ``ToolResult``) straight onto the real bus; the persister's
by its real ``Store``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import msgspec
import pytest
import pytest_asyncio
from websockets.asyncio.client import connect

from baton.chat import Chat
from services.gateway import core
from services.persister.adapters import Store
from shared import messages as m
from shared import runs as vocab
from shared import subjects
from shared.bus import Bus
from tests.integration.conftest import Infra
from tests.integration.test_gateway_ws import Gateway, _serve, auth, frames, publish_tokens
from tests.support import decode_all, eventually, read_subject, run_verdict, user_event

ARGS = {"title": "call John", "due": "tomorrow"}


@pytest_asyncio.fixture
async def gateway(infra: Infra) -> AsyncIterator[Gateway]:
    async for g in _serve(infra):
        yield g


def http(g: Gateway) -> str:
    return g.url.replace("ws://", "http://")


class Run(msgspec.Struct):
    e: m.UserMessageAccepted

    @property
    def id(self) -> str:
        return vocab.run_id(self.e.message_id)

    @property
    def cid(self) -> str:
        return self.e.conversation_id

    def path(self) -> str:
        return f"/api/conversations/{self.cid}/runs/{self.id}/tool-approvals"


async def a_run(g: Gateway, status: str = "requires_action", project: str = "p1") -> Run:
    """A stored user message and its run, as the persister would have them."""
    e = user_event(project=project)
    store = Store(g.pool)
    await store.insert_user_message(e)
    await store.upsert_run(run_verdict(e, status))
    return Run(e)


async def ask(
    g: Gateway,
    run: Run,
    call_id: str = "toolu_01",
    args: Any = None,
    expires_in_s: float = 600,
    round_: int = 0,
) -> m.ToolApprovalRequested:
    """What policy publishes when an "ask" call waits for the user."""
    args = ARGS if args is None else args
    call = m.ToolCall(id=call_id, name="create_task", input=args, input_digest=m.input_digest(args))
    req = m.ToolApprovalRequested(
        event_id=f"approval-requested:{m.call_key(run.id, call_id)}",
        message_id=run.e.message_id,
        conversation_id=run.cid,
        project_id=run.e.project_id,
        run_id=run.id,
        user_id=run.e.user_id,
        round=round_,
        call=call,
        server="demo",
        expires_at=datetime.now(UTC) + timedelta(seconds=expires_in_s),
    )
    await g.bus.publish(
        subjects.tool_requested(run.e.project_id, run.cid), req, msg_id=req.event_id
    )
    return req


def result(run: Run, call_id: str = "toolu_01", content: str = "task created") -> m.ToolResult:
    return m.ToolResult(
        event_id=f"toolresult:{m.call_key(run.id, call_id)}",
        message_id=run.e.message_id,
        conversation_id=run.cid,
        project_id=run.e.project_id,
        run_id=run.id,
        round=0,
        call_id=call_id,
        name="create_task",
        outcome="ok",
        is_error=False,
        content=content,
        input_digest=m.input_digest(ARGS),
        executions=1,
    )


async def publish_result(g: Gateway, run: Run, r: m.ToolResult) -> None:
    await g.bus.publish(subjects.tool_result(run.e.project_id, run.cid), r, msg_id=r.event_id)


async def persist_result(g: Gateway, run: Run, r: m.ToolResult) -> None:
    """The persister's part: store the result, then announce it (what the gateway pushes)."""
    await Store(g.pool).store_tool_result(r)
    p = m.ToolResultPersisted(
        event_id=f"persisted:toolresult:{m.call_key(run.id, r.call_id)}",
        message_id=run.e.message_id,
        conversation_id=run.cid,
        project_id=run.e.project_id,
        result=r,
    )
    await g.bus.publish(
        subjects.persisted_tool_result(run.e.project_id, run.cid), p, msg_id=p.event_id
    )


async def decisions(bus: Bus, at_least: int = 0) -> list[m.ToolApprovalDecided]:
    msgs = await read_subject(bus, subjects.STREAM_TOOLS, "tool.approval.>", at_least)
    return decode_all(msgs, m.ToolApprovalDecided)


async def post(
    g: Gateway, run: Run, body: Any, headers: dict[str, str] | None = None
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=http(g), timeout=10) as client:
        if isinstance(body, bytes):
            hdrs = {**(headers or auth()), "Content-Type": "application/json"}
            return await client.post(run.path(), content=body, headers=hdrs)
        return await client.post(run.path(), json=body, headers=headers or auth())


def approve(call_id: str = "toolu_01", yes: bool = True, **more: Any) -> dict[str, Any]:
    return {"decisions": [{"tool_call_id": call_id, "approve": yes, **more}]}


# ---- the route -----------------------------------------------------------------------------


async def test_an_approval_is_accepted_once_jetstream_has_it_bound_to_the_shown_arguments(
    gateway: Gateway,
) -> None:
    run = await a_run(gateway)
    req = await ask(gateway, run)
    r = await post(gateway, run, approve(reason="fine"))
    assert r.status_code == 202, r.text
    digest = m.input_digest(ARGS)
    assert r.json() == {
        "status": "accepted",
        "run_id": run.id,
        "decisions": [
            {
                "tool_call_id": "toolu_01",
                "approve": True,
                "input_digest": digest,
                "duplicate": False,
            }
        ],
    }
    [d] = await decisions(gateway.bus, 1)
    assert d.event_id == f"approval:{m.call_key(run.id, 'toolu_01')}"
    assert (d.run_id, d.call_id, d.approve, d.reason) == (run.id, "toolu_01", True, "fine")
    assert d.input_digest == req.call.input_digest == digest
    assert (d.user_id, d.project_id, d.conversation_id, d.message_id) == (
        "u1",
        "p1",
        run.cid,
        run.e.message_id,
    )


async def test_a_repeat_is_a_duplicate_and_another_answer_never_replaces_the_first(
    gateway: Gateway,
) -> None:
    run = await a_run(gateway)
    await ask(gateway, run)
    first = await post(gateway, run, approve(yes=False, reason="no"))
    assert first.status_code == 202
    again = await post(gateway, run, approve(yes=False, reason="still no"))
    assert again.status_code == 202
    assert again.json()["decisions"][0]["duplicate"] is True
    other = await post(gateway, run, approve(yes=True))
    assert (other.status_code, other.json()["error"]["code"]) == (409, "already_decided")
    [d] = await decisions(gateway.bus, 1)
    assert (d.approve, d.reason) == (False, "no")


async def test_two_different_answers_at_once_make_one_decision(gateway: Gateway) -> None:
    run = await a_run(gateway)
    await ask(gateway, run)
    for _ in range(3):
        answers = await asyncio.gather(
            *(post(gateway, run, approve(yes=yes)) for yes in (True, False, True, False))
        )
        assert sorted(a.status_code for a in answers)[0] == 202
        [d] = await decisions(gateway.bus, 1)
        for a, yes in zip(answers, (True, False, True, False), strict=True):
            expected = 202 if yes == d.approve else 409
            assert a.status_code == expected, a.text


async def test_a_call_the_run_is_not_waiting_for_is_409_and_publishes_nothing(
    gateway: Gateway,
) -> None:
    run = await a_run(gateway)
    # No request for the call at all.
    r = await post(gateway, run, approve("toolu_nobody"))
    assert (r.status_code, r.json()["error"]["code"]) == (409, "not_waiting")
    # A request of another run with the same tool_use id does not count for this one.
    other = await a_run(gateway)
    await ask(gateway, other, "toolu_same")
    r = await post(gateway, run, approve("toolu_same"))
    assert (r.status_code, r.json()["error"]["code"]) == (409, "not_waiting")
    # A call that already has a result (policy timed it out, or it ran).
    await ask(gateway, run, "toolu_done")
    await publish_result(gateway, run, result(run, "toolu_done"))
    r = await post(gateway, run, approve("toolu_done"))
    assert (r.status_code, r.json()["error"]["code"]) == (409, "not_waiting")
    # One already stored (and gone from the stream's view) counts too.
    await ask(gateway, run, "toolu_stored")
    await Store(gateway.pool).store_tool_result(result(run, "toolu_stored"))
    r = await post(gateway, run, approve("toolu_stored"))
    assert (r.status_code, r.json()["error"]["code"]) == (409, "not_waiting")
    # Expired.
    await ask(gateway, run, "toolu_late", expires_in_s=-1)
    r = await post(gateway, run, approve("toolu_late"))
    assert (r.status_code, r.json()["error"]["code"]) == (409, "approval_expired")
    # One bad decision among good ones: none is published.
    await ask(gateway, run, "toolu_ok")
    body = {
        "decisions": [
            {"tool_call_id": "toolu_ok", "approve": True},
            {"tool_call_id": "toolu_nobody", "approve": True},
        ]
    }
    r = await post(gateway, run, body)
    assert r.status_code == 409
    assert await decisions(gateway.bus) == []


async def test_a_digest_other_than_the_shown_arguments_is_409(gateway: Gateway) -> None:
    run = await a_run(gateway)
    await ask(gateway, run)
    other = m.input_digest({"title": "wire money"})
    r = await post(gateway, run, approve(input_digest=other))
    assert (r.status_code, r.json()["error"]["code"]) == (409, "digest_mismatch")
    assert await decisions(gateway.bus) == []
    ok = await post(gateway, run, approve(input_digest=m.input_digest(ARGS)))
    assert ok.status_code == 202


async def test_a_finished_run_is_409_run_finished(gateway: Gateway) -> None:
    run = await a_run(gateway, status="cancelled")
    await ask(gateway, run)
    r = await post(gateway, run, approve())
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "run_finished"
    assert r.json()["error"]["run_status"] == "cancelled"


async def test_other_users_projects_and_unknown_ids_get_404(gateway: Gateway) -> None:
    run = await a_run(gateway)
    await ask(gateway, run)
    for headers in (auth(user="mallory"), auth(project="p2")):
        r = await post(gateway, run, approve(), headers)
        assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found"), r.text
    # A conversation nobody has yet, and a run id no message of the conversation has.
    ghost = Run(user_event())
    r = await post(gateway, ghost, approve())
    assert r.status_code == 404
    stranger = Run(user_event(conversation_id=run.cid))
    r = await post(gateway, stranger, approve())
    assert r.status_code == 404
    assert await decisions(gateway.bus) == []
    # The owner is not refused.
    assert (await post(gateway, run, approve())).status_code == 202


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"", 400, "invalid_body"),
        (b"{nope", 400, "invalid_json"),
        (b"\xff\xfe", 400, "invalid_json"),
        (b"[]", 400, "invalid_body"),
        (b'{"decisions": {}}', 400, "invalid_body"),
        (b'{"decisions": [{"tool_call_id": "toolu_01"}]}', 400, "invalid_body"),
        (b'{"decisions": [{"tool_call_id": "toolu_01", "approve": 1}]}', 400, "invalid_body"),
        (b'{"decisions": [{"tool_call_id": "toolu_01", "approve": "yes"}]}', 400, "invalid_body"),
        (b'{"decisions": [], "x": 1}', 400, "invalid_body"),
        (
            b'{"decisions": [{"tool_call_id": "toolu_01", "approve": true, "run_id": "r"}]}',
            400,
            "invalid_body",
        ),
        (b'{"decisions": []}', 422, "invalid_decisions"),
        (b'{"decisions": [{"tool_call_id": "a.>", "approve": true}]}', 400, "invalid_id"),
        (b'{"decisions": [{"tool_call_id": "", "approve": true}]}', 400, "invalid_id"),
        (
            msgspec.json.encode({"decisions": [{"tool_call_id": "t" * 129, "approve": True}]}),
            400,
            "invalid_id",
        ),
        (
            msgspec.json.encode({"decisions": [{"tool_call_id": "t", "approve": True}] * 2}),
            422,
            "duplicate_decision",
        ),
        (
            msgspec.json.encode(
                {"decisions": [{"tool_call_id": f"t{i}", "approve": True} for i in range(65)]}
            ),
            422,
            "invalid_decisions",
        ),
        (
            msgspec.json.encode(approve(reason="r" * 1001)),
            422,
            "invalid_reason",
        ),
        (msgspec.json.encode(approve(reason="a\x00b")), 422, "invalid_reason"),
        (msgspec.json.encode(approve(input_digest="ABC")), 422, "invalid_digest"),
        (msgspec.json.encode(approve(reason="x" * 70_000)), 413, "body_too_large"),
    ],
    ids=[
        "empty",
        "not-json",
        "not-utf8",
        "array",
        "decisions-object",
        "no-approve",
        "approve-int",
        "approve-string",
        "unknown-field",
        "unknown-decision-field",
        "no-decisions",
        "wildcard-call-id",
        "empty-call-id",
        "long-call-id",
        "twice",
        "too-many",
        "long-reason",
        "nul-reason",
        "bad-digest",
        "oversized",
    ],
)
async def test_malformed_bodies_get_a_clear_4xx_and_publish_nothing(
    gateway: Gateway, body: bytes, status: int, code: str
) -> None:
    run = await a_run(gateway)
    await ask(gateway, run)
    r = await post(gateway, run, body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert await decisions(gateway.bus) == []


async def test_malformed_path_ids_are_400(gateway: Gateway) -> None:
    run = await a_run(gateway)
    async with httpx.AsyncClient(base_url=http(gateway), timeout=10) as client:
        for path in (
            f"/api/conversations/nope/runs/{run.id}/tool-approvals",
            f"/api/conversations/{run.cid}/runs/run-NOPE/tool-approvals",
            f"/api/conversations/{run.cid}/runs/{run.e.message_id}/tool-approvals",
        ):
            r = await client.post(path, json=approve(), headers=auth())
            assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_id"), path


# ---- /state ------------------------------------------------------------------------------


async def test_state_lists_the_calls_waiting_for_the_user(gateway: Gateway) -> None:
    run = await a_run(gateway)
    req = await ask(gateway, run, "toolu_a")
    await ask(gateway, run, "toolu_b", args={"title": "b"})
    await ask(gateway, run, "toolu_c", args={"title": "c"})
    await publish_result(gateway, run, result(run, "toolu_c"))

    async def pending() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=http(gateway), timeout=10) as client:
            r = await client.get(f"/api/conversations/{run.cid}/state", headers=auth())
        assert r.status_code == 200, r.text
        [state] = [x for x in r.json()["runs"] if x["run_id"] == run.id]
        assert state["status"] == "requires_action"
        calls: list[dict[str, Any]] = state["pending_tool_calls"]
        return calls

    calls = await pending()
    assert [c["tool_call_id"] for c in calls] == ["toolu_a", "toolu_b"]
    assert calls[0] == {
        "tool_call_id": "toolu_a",
        "tool": "create_task",
        "server": "demo",
        "arguments": ARGS,
        "input_digest": m.input_digest(ARGS),
        "round": 0,
        "expires_at": req.expires_at.isoformat(),
    }
    assert (await post(gateway, run, approve("toolu_a"))).status_code == 202
    assert [c["tool_call_id"] for c in await pending()] == ["toolu_b"]
    # Another user of the project sees nothing of it.
    async with httpx.AsyncClient(base_url=http(gateway), timeout=10) as client:
        r = await client.get(f"/api/conversations/{run.cid}/state", headers=auth(user="eve"))
    assert r.status_code == 404


# ---- events --------------------------------------------------------------------------------


async def sse(
    g: Gateway, cid: str, until: str, last_id: str | None = None, idle_s: float = 3.0
) -> list[tuple[str, str, dict[str, Any]]]:
    """SSE events (event, id, data) until one named ``until`` or ``idle_s`` of silence."""
    headers = {**auth(), "Accept": "text/event-stream"}
    if last_id:
        headers["Last-Event-ID"] = last_id
    out: list[tuple[str, str, dict[str, Any]]] = []
    async with (
        httpx.AsyncClient(base_url=http(g), timeout=None) as client,
        client.stream("GET", f"/api/conversations/{cid}/events", headers=headers) as resp,
    ):
        assert resp.status_code == 200
        event, ident, data = "", "", ""
        lines = resp.aiter_lines()
        with contextlib.suppress(TimeoutError, StopAsyncIteration):
            while True:
                line = await asyncio.wait_for(anext(lines), idle_s)
                if line.startswith(":"):
                    continue
                if not line:
                    if event:
                        out.append((event, ident, json.loads(data)))
                        if event == until:
                            return out
                    event, ident, data = "", "", ""
                    continue
                field, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if field == "event":
                    event = value
                elif field == "id":
                    ident = value
                elif field == "data":
                    data += value
    return out


async def test_sse_carries_requires_action_tool_requested_and_tool_result(
    gateway: Gateway,
) -> None:
    run = await a_run(gateway, status="running")
    reader = asyncio.create_task(sse(gateway, run.cid, "tool.result"))
    await eventually(lambda: _watching(gateway, run), timeout=10)
    await gateway.bus.publish(
        subjects.policy_verdict("p1", run.cid),
        run_verdict(run.e, "requires_action"),
        msg_id=str(uuid.uuid4()),
    )
    req = await ask(gateway, run)
    await persist_result(gateway, run, result(run))
    got = await asyncio.wait_for(reader, 15)
    kinds = [(e, i) for e, i, _ in got]
    assert kinds == [
        ("run.status", f"run:{run.id}:1:requires_action"),
        ("tool.requested", f"tool:{run.id}:toolu_01:requested"),
        ("tool.result", f"tool:{run.id}:toolu_01:result"),
    ]
    assert got[0][2]["status"] == "requires_action"
    assert got[1][2] == {
        "run_id": run.id,
        "message_id": run.e.message_id,
        **core.pending_call(req),
    }
    assert got[2][2] == {
        "run_id": run.id,
        "message_id": run.e.message_id,
        "tool_call_id": "toolu_01",
        "tool": "create_task",
        "round": 0,
        "outcome": "ok",
        "is_error": False,
        "content": "task created",
    }


async def _watching(g: Gateway, run: Run) -> bool | None:
    return bool(g.hub.clients.get(f"p1.{run.cid}")) or None


async def tokens(g: Gateway, run: Run, attempt: int, n: int, text: str) -> None:
    """A model call's token deltas (each round's call is an attempt of its own)."""
    for seq in range(1, n + 1):
        delta = m.TokenDelta(
            conversation_id=run.cid, run_id=run.id, attempt=attempt, seq=seq, text=f"{text}{seq} "
        )
        await g.bus.publish(subjects.token_stream("p1", run.cid), delta, msg_id=str(uuid.uuid4()))


async def test_a_resume_replays_the_tool_events_it_missed_without_gap_or_repeat(
    gateway: Gateway,
) -> None:
    """Round 0's tokens, its calls and their results, round 1's tokens: resumed from each id."""
    run = await a_run(gateway, status="requires_action")
    await tokens(gateway, run, 1, 3, "first")
    await ask(gateway, run, "toolu_a")
    await ask(gateway, run, "toolu_b", args={"title": "b"})
    await persist_result(gateway, run, result(run, "toolu_a"))
    await persist_result(gateway, run, result(run, "toolu_b", "second task"))
    # Round 1: the next attempt.
    await Store(gateway.pool).upsert_run(run_verdict(run.e, "running", attempt=2))
    await tokens(gateway, run, 2, 2, "then")
    full = await sse(gateway, run.cid, "", last_id="unknown", idle_s=1.5)
    ids = [i for _, i, _ in full]
    assert ids == [
        f"msg:{run.e.message_id}",
        f"run:{run.id}:2:running",
        f"tool:{run.id}:toolu_a:requested",
        f"tool:{run.id}:toolu_b:requested",
        f"tool:{run.id}:toolu_a:result",
        f"tool:{run.id}:toolu_b:result",
        f"tok:{run.id}:2:1",
        f"tok:{run.id}:2:2",
    ]
    # From any event id: exactly what came after it.
    for k in range(len(ids)):
        again = await sse(gateway, run.cid, "", last_id=ids[k], idle_s=1.0)
        assert [i for _, i, _ in again] == ids[k + 1 :], ids[k]
    # A token of round 0: the next attempt's status, the tool calls and round 1 are all new.
    for seq in (1, 3):
        early = await sse(gateway, run.cid, "", last_id=f"tok:{run.id}:1:{seq}", idle_s=1.0)
        assert [i for _, i, _ in early] == ids[1:]


async def test_tool_events_of_the_round_in_progress_come_after_its_tokens(
    gateway: Gateway,
) -> None:
    run = await a_run(gateway, status="requires_action")
    await publish_tokens(gateway.bus, run.e, 2, "let me")
    await ask(gateway, run, "toolu_a")
    full = await sse(gateway, run.cid, "", last_id="unknown", idle_s=1.5)
    ids = [i for _, i, _ in full]
    assert ids == [
        f"msg:{run.e.message_id}",
        f"run:{run.id}:1:requires_action",
        f"tok:{run.id}:1:1",
        f"tok:{run.id}:1:2",
        f"tool:{run.id}:toolu_a:requested",
    ]
    after_token = await sse(gateway, run.cid, "", last_id=f"tok:{run.id}:1:1", idle_s=1.0)
    assert [i for _, i, _ in after_token] == ids[3:]


async def test_websocket_carries_the_same_tool_events(gateway: Gateway) -> None:
    run = await a_run(gateway, status="requires_action")
    await ask(gateway, run)
    async with connect(gateway.ws(run.cid), additional_headers=auth()) as ws:
        got = await frames(ws, until="ready")
        assert got[0]["event"] == "ready"
        await persist_result(gateway, run, result(run))
        live = await frames(ws, until="tool.result", idle_s=5)
        assert [f["event"] for f in live] == ["tool.result"]
        assert live[0]["id"] == f"tool:{run.id}:toolu_01:result"
    async with connect(
        gateway.ws(run.cid) + f"?last_event_id=msg:{run.e.message_id}", additional_headers=auth()
    ) as ws:
        replay = await frames(ws, idle_s=1.5, count=1 + 3)
        assert [f["id"] for f in replay[1:]] == [
            f"run:{run.id}:1:requires_action",
            f"tool:{run.id}:toolu_01:requested",
            f"tool:{run.id}:toolu_01:result",
        ]


# ---- baton chat ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["asked-yes", "asked-no", "--yes"])
async def test_baton_chat_shows_a_pending_call_and_sends_the_answer(
    gateway: Gateway, mode: str
) -> None:
    """The client against a real gateway; the test plays the services behind it."""

    questions: list[str] = []

    def answer(prompt: str) -> bool:
        questions.append(prompt)
        return mode == "asked-yes"

    token = auth()["Authorization"].removeprefix("Bearer ")
    out, notes = io.StringIO(), io.StringIO()
    chat = Chat(
        http(gateway), token, None, out=out, notes=notes, approve_all=mode == "--yes", ask=answer
    )
    sending = asyncio.create_task(chat.send("Please remind me to call John."))
    [accepted] = decode_all(
        await read_subject(gateway.bus, subjects.STREAM_CHAT_IN, "chat.in.>", 1),
        m.UserMessageAccepted,
    )
    await Store(gateway.pool).insert_user_message(accepted)
    await Store(gateway.pool).upsert_run(run_verdict(accepted, "requires_action"))
    run = Run(accepted)
    await ask(gateway, run)
    [d] = await decisions(gateway.bus, 1)
    assert d.approve is (mode != "asked-no")
    assert d.input_digest == m.input_digest(ARGS)
    assert questions == ([] if mode == "--yes" else ["approve? [y/N] "])
    # The rest of the run, as the persister would announce it.
    if d.approve:
        await persist_result(gateway, run, result(run))
    reply = m.AssistantMessagePersisted(
        event_id=vocab.persisted_id(run.id),
        message_id=str(uuid.uuid4()),
        conversation_id=run.cid,
        project_id="p1",
        run_id=run.id,
        reply_to=accepted.message_id,
        kind="answer",
        content="Done. The tool said: task created",
        created_at=datetime.now(UTC),
        status="completed",
    )
    await gateway.bus.publish(
        subjects.persisted_assistant("p1", run.cid), reply, msg_id=reply.event_id
    )
    assert await asyncio.wait_for(sending, 30) == reply.content
    assert out.getvalue() == reply.content + "\n"
    shown = notes.getvalue()
    assert '[tool call] create_task (demo) {"due": "tomorrow", "title": "call John"}' in shown
    if d.approve:
        assert "[tool create_task: ok] task created" in shown
