"""The typical journey: messages in two conversations of two projects, through all five services."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import httpx
import pytest

from tests.e2e.conftest import Pipeline
from tests.e2e.resume import feed

pytestmark = pytest.mark.e2e


async def _sse(
    client: httpx.AsyncClient,
    url: str,
    token: str,
    until_completed: int,
    out: list[dict[str, Any]],
    ready: asyncio.Event,
) -> None:
    """Collect SSE events until ``until_completed`` message.completed events arrived."""
    headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
    async with client.stream("GET", url, headers=headers, timeout=None) as resp:
        assert resp.status_code == 200
        event: dict[str, Any] = {}
        completed = 0
        async for line in resp.aiter_lines():
            if line.startswith(":"):
                ready.set()
            if not feed(event, line):
                continue
            if "event" in event:
                out.append(event)
                if event["event"] == "message.completed":
                    completed += 1
                    if completed >= until_completed:
                        return
            event = {}


async def _conversation(
    client: httpx.AsyncClient, p: Pipeline, project: str, user: str, prompts: list[str]
) -> dict[str, Any]:
    token = p.token(project, user)
    auth = {"Authorization": f"Bearer {token}"}
    cid = str(uuid.uuid4())
    events: list[dict[str, Any]] = []
    ready = asyncio.Event()
    listener = asyncio.create_task(
        _sse(
            client,
            f"{p.gateway}/api/conversations/{cid}/events",
            token,
            len(prompts),
            events,
            ready,
        )
    )
    await asyncio.wait_for(ready.wait(), 10)
    accepted = []
    for i, prompt in enumerate(prompts):
        r = await client.post(
            f"{p.gateway}/api/chat",
            json={"conversation_id": cid, "content": prompt},
            headers={**auth, "Idempotency-Key": f"{cid}-{i}"},
        )
        assert r.status_code == 202, r.text
        accepted.append(r.json()["message"])
        # Wait for this answer before the next message, like a person would.
        while sum(e["event"] == "message.completed" for e in events) < i + 1:
            assert not listener.done(), listener
            await asyncio.sleep(0.02)
    await asyncio.wait_for(listener, 30)
    messages = (
        await client.get(f"{p.gateway}/api/conversations/{cid}/messages", headers=auth)
    ).json()
    # The run row is eventually consistent: its verdict travels on another consumer than the
    # answer, so wait (briefly) until every run shows both.
    for _ in range(100):
        state = (
            await client.get(f"{p.gateway}/api/conversations/{cid}/state", headers=auth)
        ).json()
        if len(state["runs"]) == len(prompts) and all(r["verdict"] for r in state["runs"]):
            break
        await asyncio.sleep(0.05)
    usage = (await client.get(f"{p.gateway}/api/usage", headers=auth)).json()
    return {
        "cid": cid,
        "accepted": accepted,
        "events": events,
        "messages": messages,
        "state": state,
        "usage": usage,
        "auth": auth,
    }


async def test_two_projects_two_conversations_each_get_every_answer_once(
    pipeline: Pipeline,
) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        results = await asyncio.wait_for(
            asyncio.gather(
                _conversation(
                    client,
                    pipeline,
                    "acme",
                    "alice",
                    ["What is JetStream?", "And what is a consumer?"],
                ),
                _conversation(
                    client,
                    pipeline,
                    "globex",
                    "bob",
                    ["Explain idempotency keys please", "Thanks! One more: what is a PubAck?"],
                ),
            ),
            60,
        )
        for res in results:
            msgs = res["messages"]["messages"]
            # In conversation order: user, assistant, user, assistant.
            assert [x["role"] for x in msgs] == ["user", "assistant", "user", "assistant"]
            assert [x["content"] for x in msgs[::2]] == [a["content"] for a in res["accepted"]]
            assert [x["id"] for x in msgs[::2]] == [a["id"] for a in res["accepted"]]
            answers = msgs[1::2]
            assert all(a["content"] and a["kind"] == "answer" for a in answers)
            # The streamed tokens, concatenated per run, are exactly the stored answers.
            for answer in answers:
                tokens = sorted(
                    (
                        e["data"]
                        for e in res["events"]
                        if e["event"] == "token" and e["data"]["run_id"] == answer["run_id"]
                    ),
                    key=lambda d: d["seq"],
                )
                assert tokens, "no tokens streamed"
                assert "".join(t["text"] for t in tokens) == answer["content"]
            completed = [e["data"] for e in res["events"] if e["event"] == "message.completed"]
            assert [c["content"] for c in completed] == [a["content"] for a in answers]
            created = [e["data"]["id"] for e in res["events"] if e["event"] == "message.created"]
            assert created == [a["id"] for a in res["accepted"]]
            statuses = {e["data"]["status"] for e in res["events"] if e["event"] == "run.status"}
            assert "running" in statuses
            runs = res["state"]["runs"]
            assert [(r["status"], r["verdict"], r["attempts"]) for r in runs] == [
                ("completed", "approve", 1)
            ] * 2
            assert [r["run_id"] for r in runs] == [a["run_id"] for a in answers]
            usage = res["usage"]
            assert usage["runs"] == 2
            # Every model call is billed: each run's answer and the classification deciding it.
            assert [r["classification"]["calls"] for r in runs] == [1, 1]
            for kind in ("input_tokens", "output_tokens"):
                answered = sum(r["usage"][kind] for r in runs)
                classified = sum(r["classification"][kind] for r in runs)
                assert usage[kind] == answered + classified and answered > 0 and classified > 0
            assert usage["cost_usd"] > 0

        # Conversations are private: the other project's token sees nothing.
        acme, globex = results
        r = await client.get(
            f"{pipeline.gateway}/api/conversations/{acme['cid']}/messages", headers=globex["auth"]
        )
        assert r.status_code == 404

    # Billing reconciles with the model's own count of what it served: to the executor and to
    # the agent, model by model (the whole ledger: nothing it served goes unbilled).
    by_model = pipeline.model.stats()["by_model"]
    assert by_model["claude-sonnet-4-6"]["calls"] == 4
    assert by_model["claude-haiku-4-5"]["calls"] == 4
    con = await asyncpg.connect(pipeline.database_url)
    try:
        rows = await con.fetch(
            "SELECT model, purpose, sum(output_tokens) AS o, sum(input_tokens) AS i, "
            "count(*) AS n FROM usage GROUP BY model, purpose"
        )
        billed = {(r["model"], r["purpose"]): (r["n"], r["o"], r["i"]) for r in rows}
        assert billed == {
            (name, purpose): (4, by_model[name]["output_tokens"], by_model[name]["input_tokens"])
            for name, purpose in (
                ("claude-sonnet-4-6", "answer"),
                ("claude-haiku-4-5", "classification"),
            )
        }
        assert await con.fetchval("SELECT count(*) FROM messages") == 8
    finally:
        await con.close()
