"""The AI SDK's own client (the pinned ``ai`` npm package) against baton's chat protocol route.

A Node script (tests/clients/ai-sdk/client.mjs) sends through ``DefaultChatTransport`` and reads
with ``readUIMessageStream``; ``make client-tools`` installs the package with ``npm ci``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from baton.mcp_server import MCPServerProcess
from tests.e2e.conftest import Pipeline
from tests.e2e.test_tools_journey import tool_stack

pytestmark = pytest.mark.e2e
HERE = Path(__file__).parent / "ai-sdk"


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the AI SDK client tests need Node and npm")
    if not (HERE / "node_modules" / "ai" / "package.json").exists():
        pytest.skip(
            "the ai package is not installed: `make client-tools` runs npm ci in " + str(HERE)
        )
    return node


async def client(p: Pipeline, token: str, **args: Any) -> dict[str, Any]:
    """One run of the Node client; its JSON answer."""
    payload = {"api": f"{p.gateway}/api/ai-sdk/chat", "token": token, **args}
    proc = await asyncio.create_subprocess_exec(
        _node(),
        str(HERE / "client.mjs"),
        json.dumps(payload),
        cwd=HERE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


def headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def only_conversation(p: Pipeline, token: str) -> str:
    async with httpx.AsyncClient(timeout=10) as h:
        r = await h.get(f"{p.gateway}/api/conversations", headers=headers(token))
    [conversation] = r.json()["conversations"]
    return str(conversation["id"])


async def stored(p: Pipeline, token: str, cid: str, answers: int = 1) -> list[dict[str, Any]]:
    """The conversation's messages once ``answers`` replies are stored."""
    async with httpx.AsyncClient(timeout=10) as h:
        for _ in range(600):
            r = await h.get(f"{p.gateway}/api/conversations/{cid}/messages", headers=headers(token))
            messages: list[dict[str, Any]] = r.json()["messages"]
            if sum(m["role"] == "assistant" and not m["pending"] for m in messages) >= answers:
                return messages
            await asyncio.sleep(0.05)
    raise AssertionError(f"no stored answer: {messages}")


async def test_send_through_the_sdk_transport_and_read_the_answer_back(pipeline: Pipeline) -> None:
    token = pipeline.token("acme", "alice")
    chat_id = "chat-" + uuid.uuid4().hex[:12]  # like useChat's generated ids: not a UUID
    got = await client(pipeline, token, chatId=chat_id, messageId="msg-1", text="Hello there")
    sent = got["sent"]
    assert sent["errors"] == [] and "error" not in got, got
    assert sent["types"][:2] == ["start", "start-step"]
    assert sent["types"][-2:] == ["finish-step", "finish"]
    assert {"text-start", "text-delta", "text-end", "data-baton-status"} <= set(sent["types"])
    cid = await only_conversation(pipeline, token)
    [question, answer] = await stored(pipeline, token, cid)
    assert (question["role"], question["content"]) == ("user", "Hello there")
    assert sent["text"] == answer["content"] and sent["id"] == answer["run_id"]
    assert "reset-step" not in sent["types"]
    # Nothing runs now: the reconnect answers 204, which the SDK reads as "no stream".
    assert await client(pipeline, token, chatId=chat_id) == {"resumed": None}


async def test_a_cut_mid_answer_resumes_with_no_gap_and_no_repeat(pipeline: Pipeline) -> None:
    pipeline.model.update_settings(tokens_per_second=25, words_per_reply=60)
    token = pipeline.token("acme", "bob")
    chat_id = str(uuid.uuid4())  # a UUID chat id is the conversation's id itself
    got = await client(
        pipeline, token, chatId=chat_id, messageId="m-cut", text="Tell me more", cutAfter=5
    )
    assert "error" not in got, got
    partial, resumed = got["sent"], got["resumed"]
    assert partial["types"].count("text-delta") == 5 and "finish" not in partial["types"]
    assert resumed is not None and resumed["errors"] == []
    assert resumed["types"][0] == "start" and resumed["types"][-1] == "finish"
    [_, answer] = await stored(pipeline, token, chat_id)
    assert resumed["text"] == answer["content"]
    # Gapless by itself, not rescued at the end by the stored text (which would reset the step).
    assert "reset-step" not in resumed["types"]
    assert answer["content"].startswith(partial["text"]) and partial["text"] != answer["content"]


async def test_a_resend_of_the_same_message_id_is_not_a_second_message(pipeline: Pipeline) -> None:
    token = pipeline.token("acme", "carol")
    chat_id = str(uuid.uuid4())
    first = await client(pipeline, token, chatId=chat_id, messageId="same-id", text="Once")
    again = await client(pipeline, token, chatId=chat_id, messageId="same-id", text="Once")
    assert first["sent"]["text"] == again["sent"]["text"] and again["sent"]["errors"] == []
    messages = await stored(pipeline, token, chat_id)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    # The same id with another text is refused, as a reused Idempotency-Key is.
    other = await client(pipeline, token, chatId=chat_id, messageId="same-id", text="Twice")
    assert other["error"]["status"] == 422, other


async def test_tenants_cannot_reach_each_others_chats(pipeline: Pipeline) -> None:
    alice = pipeline.token("acme", "tina")
    chat_id = str(uuid.uuid4())
    pipeline.model.update_settings(tokens_per_second=10, words_per_reply=80)
    body = {
        "id": chat_id,
        "messages": [{"id": "a1", "role": "user", "parts": [{"type": "text", "text": "mine"}]}],
        "trigger": "submit-message",
    }
    url = f"{pipeline.gateway}/api/ai-sdk/chat"
    async with httpx.AsyncClient(timeout=30) as h:
        async with h.stream("POST", url, json=body, headers=headers(alice)) as r:
            assert r.status_code == 200
            assert r.headers["x-vercel-ai-ui-message-stream"] == "v1"
            assert r.headers["content-type"].startswith("text/event-stream")
            async for line in r.aiter_lines():
                if '"text-delta"' in line:
                    break  # alice's run is streaming now
        for who in (pipeline.token("acme", "mallory"), pipeline.token("other", "alice")):
            # Someone else's conversation id: not posted into, not streamed, no existence leak.
            theirs = {**body, "messages": [{**body["messages"][0], "id": "m9"}]}
            r = await h.post(url, json=theirs, headers=headers(who))
            assert r.status_code == 404, r.text
            r = await h.get(f"{url}/{chat_id}/stream", headers=headers(who))
            assert r.status_code == 404, r.text
            # The same non-UUID chat id is each caller's own chat: nothing runs in theirs.
            r = await h.get(f"{url}/my-chat/stream", headers=headers(who))
            assert r.status_code == 204
        # The owner's reconnect gets the active run; an id never used is 204.
        async with h.stream("GET", f"{url}/{chat_id}/stream", headers=headers(alice)) as r:
            assert r.status_code == 200
            first = [line async for line in _first_lines(r, 1)]
        assert json.loads(first[0].removeprefix("data: "))["type"] == "start"
        r = await h.get(f"{url}/{uuid.uuid4()}/stream", headers=headers(alice))
        assert r.status_code == 204
        assert (await h.get(f"{url}/x/stream")).status_code == 401
        # Bad bodies are clear 4xx.
        for bad, status in [
            (b"", 400),
            (b"{", 400),
            (json.dumps({"id": "c", "messages": []}).encode(), 422),
            (json.dumps({**body, "trigger": "regenerate-message"}).encode(), 422),
            (json.dumps({**body, "id": "has space"}).encode(), 400),
            (
                json.dumps(
                    {"id": "c", "messages": [{"id": "x", "role": "user", "parts": []}]}
                ).encode(),
                422,
            ),
        ]:
            r = await h.post(
                url, content=bad, headers={**headers(alice), "Content-Type": "application/json"}
            )
            assert r.status_code == status, (bad, r.text)


async def _first_lines(r: httpx.Response, n: int) -> Any:
    async for line in r.aiter_lines():
        if line.startswith("data: "):
            yield line
            n -= 1
            if n == 0:
                return


async def test_a_retried_answer_ends_as_the_stored_text_in_the_sdk(pipeline: Pipeline) -> None:
    """A call cut mid-stream is retried by policy: the SDK drops the first attempt's words."""
    pipeline.model.update_settings(tokens_per_second=60, words_per_reply=30)
    pipeline.model.set_faults(
        [{"kind": "midstream_error", "after_tokens": 6, "model": "claude-sonnet-4-6"}]
    )
    token = pipeline.token("acme", "rita")
    chat_id = str(uuid.uuid4())
    got = await client(pipeline, token, chatId=chat_id, messageId="r1", text="A flaky question")
    sent = got["sent"]
    assert "error" not in got and sent["errors"] == [], got
    [_, answer] = await stored(pipeline, token, chat_id)
    assert answer["kind"] != "failure"
    assert sent["text"] == answer["content"]
    assert "reset-step" in sent["types"]  # the partial first attempt left the message


@pytest.fixture
def tools(database_url: str, tmp_path: Path) -> Iterator[tuple[Pipeline, MCPServerProcess]]:
    """The stack with the demo MCP server and the offline model's tool_use (test_tools_journey)."""
    with tool_stack(database_url, tmp_path, secure=False) as s:
        yield s


async def test_an_ask_tool_in_the_sdk_input_approval_request_output_and_answer(
    tools: tuple[Pipeline, MCPServerProcess],
) -> None:
    """The SDK's own reader sees the call's input, the approval request (answered through
    baton's approvals route with what the request's descriptor names), the output and the final
    text; the MCP server ran the call once."""
    p, mcp = tools
    token = p.token("acme", "dana")
    chat_id = "chat-" + uuid.uuid4().hex[:12]
    proc, request = await _until_approval(
        p, token, chatId=chat_id, messageId="msg-tool-1", text="Please remind me to call John."
    )
    try:
        assert mcp.executions() == []  # nothing ran before the approval
        d = request["approvalDescriptor"]
        assert request["toolCallId"] == request["approvalId"] == d["tool_call_id"]
        cid = await only_conversation(p, token)
        assert d["conversation_id"] == cid and d["run_id"].startswith("run-")
        decision = {"tool_call_id": d["tool_call_id"], "approve": True}
        decision["input_digest"] = d["input_digest"]
        async with httpx.AsyncClient(timeout=10) as h:
            r = await h.post(
                p.gateway + d["approvals_url"],
                json={"decisions": [decision]},
                headers=headers(token),
            )
        assert r.status_code == 202, r.text
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    sent = json.loads(out.decode().strip().splitlines()[-1])["sent"]
    assert sent["errors"] == [], sent
    call = d["tool_call_id"]
    assert sent["toolStates"] == [
        f"{call}:input-available",
        f"{call}:approval-requested",
        f"{call}:output-available",
    ]
    [tool] = sent["tools"]
    assert tool["toolName"] == "create_task" and tool["input"] == {"title": "call John"}
    assert tool["approval"]["id"] == call
    task = json.loads(tool["output"])
    assert task["title"] == "call John" and task["task_id"] in sent["text"]
    assert sent["types"][-1] == "finish" and "reset-step" not in sent["types"]
    [execution] = mcp.executions()  # the MCP server's ledger: one execution
    assert task["task_id"] in json.dumps(execution)


async def test_an_auto_tool_and_a_denied_ask_tool_in_the_sdk(
    tools: tuple[Pipeline, MCPServerProcess],
) -> None:
    """An auto call's part (no input in baton's events) and a refused ask call's
    ``output-denied`` pass the SDK's own strict chunk parser; the refused call never runs."""
    p, mcp = tools
    token = p.token("acme", "erin")
    chat_id = "chat-" + uuid.uuid4().hex[:12]
    auto = await client(
        p, token, chatId=chat_id, messageId="msg-auto", text="What time is it in Berlin?"
    )
    sent = auto["sent"]
    assert sent["errors"] == [] and "error" not in auto, auto
    [tool] = sent["tools"]
    call = tool["toolCallId"]
    assert sent["toolStates"] == [f"{call}:input-streaming", f"{call}:output-available"]
    assert tool["toolName"] == "current_time" and tool["output"] in sent["text"]

    proc, request = await _until_approval(
        p, token, chatId=chat_id, messageId="msg-ask", text="Please remind me to call John."
    )
    try:
        d = request["approvalDescriptor"]
        async with httpx.AsyncClient(timeout=10) as h:
            r = await h.post(
                p.gateway + d["approvals_url"],
                json={"decisions": [{"tool_call_id": d["tool_call_id"], "approve": False}]},
                headers=headers(token),
            )
        assert r.status_code == 202, r.text
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    denied = json.loads(out.decode().strip().splitlines()[-1])["sent"]
    assert denied["errors"] == [], denied
    call = d["tool_call_id"]
    assert denied["toolStates"][-1] == f"{call}:output-denied"
    assert denied["types"][-1] == "finish" and denied["text"]
    assert mcp.executions() == []  # a refused call never runs


async def _until_approval(p: Pipeline, token: str, **args: Any) -> tuple[Any, dict[str, Any]]:
    """The Node client started; the first approval request it printed (the process goes on)."""
    payload = {"api": f"{p.gateway}/api/ai-sdk/chat", "token": token, **args}
    proc = await asyncio.create_subprocess_exec(
        _node(),
        str(HERE / "client.mjs"),
        json.dumps(payload),
        cwd=HERE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        return proc, json.loads(line)["approval"]
    except BaseException:
        proc.kill()
        await proc.wait()
        raise


async def test_a_reconnect_while_a_call_waits_shows_the_approval_request_again(
    tools: tuple[Pipeline, MCPServerProcess],
) -> None:
    """useChat's resume (a reload) during requires_action: the replay has the call's input and
    approval request again; approving then ends the resumed stream with the output and text."""
    p, mcp = tools
    token = p.token("acme", "fay")
    chat_id = "chat-" + uuid.uuid4().hex[:12]
    first, request = await _until_approval(
        p, token, chatId=chat_id, messageId="msg-r", text="Please remind me to call John."
    )
    first.kill()  # the tab is closed while the call waits
    await first.wait()
    again, replayed = await _until_approval(p, token, chatId=chat_id)  # reconnect only
    try:
        assert replayed == request
        d = replayed["approvalDescriptor"]
        decision = {"tool_call_id": d["tool_call_id"], "approve": True}
        async with httpx.AsyncClient(timeout=10) as h:
            r = await h.post(
                p.gateway + d["approvals_url"],
                json={"decisions": [decision]},
                headers=headers(token),
            )
        assert r.status_code == 202, r.text
        out, err = await asyncio.wait_for(again.communicate(), 120)
    finally:
        if again.returncode is None:
            again.kill()
            await again.wait()
    assert again.returncode == 0, err.decode()
    resumed = json.loads(out.decode().strip().splitlines()[-1])["resumed"]
    assert resumed["errors"] == [], resumed
    call = d["tool_call_id"]
    assert resumed["toolStates"][-1] == f"{call}:output-available"
    task = json.loads(resumed["tools"][0]["output"])
    assert task["task_id"] in resumed["text"]
    assert len(mcp.executions()) == 1
