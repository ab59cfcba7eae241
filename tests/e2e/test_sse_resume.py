"""Resuming the SSE stream with Last-Event-ID: no gap, no duplicate token, the stored answer."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections import Counter
from typing import Any

import httpx
import nats
import pytest

from tests.e2e.conftest import Pipeline

pytestmark = pytest.mark.e2e

Event = dict[str, Any]


async def read_events(
    client: httpx.AsyncClient,
    url: str,
    token: str,
    last_id: str | None = None,
    *,
    limit: int | None = None,
    idle_s: float = 10.0,
    query: bool = False,
) -> list[Event]:
    """Events of one SSE connection: until ``limit`` events, an answer, or ``idle_s`` idle."""
    headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
    params = {}
    if last_id is not None:
        if query:
            params["last_event_id"] = last_id
        else:
            headers["Last-Event-ID"] = last_id
    out: list[Event] = []
    async with client.stream("GET", url, headers=headers, params=params, timeout=None) as resp:
        assert resp.status_code == 200, await resp.aread()
        lines = resp.aiter_lines()
        event: Event = {}
        while limit is None or len(out) < limit:
            try:
                line = await asyncio.wait_for(anext(lines), idle_s)
            except TimeoutError:
                break
            if line.startswith(":"):
                continue
            if not line:
                if "event" in event:
                    out.append(event)
                    if limit is not None and event["event"] == "message.completed":
                        break
                event = {}
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "data" and value:
                event["data"] = json.loads(value)
            elif field in ("event", "id"):
                event[field] = value
    return out


def answer_tokens(events: list[Event], run_id: str) -> list[Event]:
    """The tokens of a run's latest attempt, in the order they arrived."""
    tokens = [e["data"] for e in events if e["event"] == "token" and e["data"]["run_id"] == run_id]
    latest = max((t["attempt"] for t in tokens), default=0)
    return [t for t in tokens if t["attempt"] == latest]


async def stored_answers(client: httpx.AsyncClient, p: Pipeline, cid: str, token: str) -> Any:
    r = await client.get(
        f"{p.gateway}/api/conversations/{cid}/messages",
        headers={"Authorization": f"Bearer {token}"},
    )
    return [x for x in r.json()["messages"] if x["role"] == "assistant"]


async def test_fifty_random_drops_reassemble_exactly_the_stored_answers(
    pipeline: Pipeline,
) -> None:
    pipeline.model.update_settings(tokens_per_second=40, words_per_reply=80)
    rnd = random.Random(20261122)
    token = pipeline.token("acme", "alice")
    cid = str(uuid.uuid4())
    url = f"{pipeline.gateway}/api/conversations/{cid}/events"
    prompts = [f"Tell me about resumable streams, part {i}" for i in range(12)]
    seen: list[Event] = []
    resumes = 0
    async with httpx.AsyncClient(timeout=10) as client:

        async def post(i: int) -> None:
            r = await client.post(
                f"{pipeline.gateway}/api/chat",
                json={"conversation_id": cid, "content": prompts[i]},
                headers={"Authorization": f"Bearer {token}", "Idempotency-Key": f"{cid}-{i}"},
            )
            assert r.status_code == 202, r.text

        async def run() -> None:
            nonlocal resumes
            # The first connection sees the conversation from its very start.
            first = asyncio.create_task(read_events(client, url, token, limit=2))
            await asyncio.sleep(0.3)
            await post(0)
            seen.extend(await first)
            posted = 1
            while True:
                done = sum(e["event"] == "message.completed" for e in seen)
                if done == posted and ((resumes >= 50 and done >= 3) or done == len(prompts)):
                    return
                if done == posted:
                    await post(posted)
                    posted += 1
                resumes += 1
                seen.extend(
                    await read_events(
                        client,
                        url,
                        token,
                        seen[-1]["id"],
                        limit=rnd.randint(1, 4),
                        query=resumes % 5 == 0,
                    )
                )

        await asyncio.wait_for(run(), 40)
        answers = await stored_answers(client, pipeline, cid, token)

    assert resumes >= 50, resumes
    prompts = prompts[: len(answers)]
    ids = Counter(e["id"] for e in seen if e["event"] != "run.status")
    assert [i for i, n in ids.items() if n > 1] == [], "an event arrived twice"
    created = [e["data"]["content"] for e in seen if e["event"] == "message.created"]
    assert created == prompts
    completed = [e["data"] for e in seen if e["event"] == "message.completed"]
    assert [c["content"] for c in completed] == [a["content"] for a in answers]
    for answer in answers:
        tokens = answer_tokens(seen, answer["run_id"])
        # Every token once, in order, none missing: they concatenate to the stored answer.
        assert [t["seq"] for t in tokens] == list(range(1, len(tokens) + 1))
        assert len(tokens) > 10
        assert "".join(t["text"] for t in tokens) == answer["content"]


async def test_resume_after_the_run_finished_and_with_unknown_ids(pipeline: Pipeline) -> None:
    token = pipeline.token("acme", "bob")
    cid = str(uuid.uuid4())
    url = f"{pipeline.gateway}/api/conversations/{cid}/events"
    async with httpx.AsyncClient(timeout=10) as client:
        live = asyncio.create_task(read_events(client, url, token, limit=10_000))
        await asyncio.sleep(0.3)
        r = await client.post(
            f"{pipeline.gateway}/api/chat",
            json={"conversation_id": cid, "content": "Finish first, resume later"},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 202
        user_id = r.json()["message"]["id"]
        everything = await live
        [answer] = await stored_answers(client, pipeline, cid, token)
        run_id = answer["run_id"]
        tokens = answer_tokens(everything, run_id)
        assert len(tokens) >= 3

        # From a token in the middle: the rest of the tokens, then the stored answer.
        rest = await read_events(client, url, token, f"tok:{run_id}:1:2", idle_s=0.5)
        assert [e["event"] for e in rest] == ["token"] * (len(tokens) - 2) + ["message.completed"]
        assert (
            "".join(t["text"] for t in tokens[:2]) + "".join(e["data"]["text"] for e in rest[:-1])
            == answer["content"]
        )
        assert rest[-1]["data"]["content"] == answer["content"]
        # From the user message (as a query parameter): every token, then the answer.
        rest = await read_events(client, url, token, f"msg:{user_id}", idle_s=0.5, query=True)
        assert [e["id"] for e in rest] == [f"tok:{run_id}:1:{t['seq']}" for t in tokens] + [
            f"msg:{answer['id']}"
        ]
        # From the answer itself: nothing is missing.
        assert await read_events(client, url, token, f"msg:{answer['id']}", idle_s=0.5) == []

        # Ids this conversation never had, or that are not ids at all: the whole conversation.
        for garbage in ("garbage", "tok:run-nope:1:1", f"msg:{uuid.uuid4()}", "tok:x:y:z"):
            full = await read_events(client, url, token, garbage, idle_s=0.5)
            assert full[0]["event"] == "message.created", garbage
            assert full[-1]["data"]["content"] == answer["content"]
            assert (
                "".join(e["data"]["text"] for e in full if e["event"] == "token")
                == (answer["content"])
            )

        # Once CHAT_STREAM has dropped the tokens (it keeps them an hour), the completion alone
        # carries the answer.
        nc = await nats.connect(pipeline.nats_url)
        try:
            await nc.jetstream().purge_stream("CHAT_STREAM")
        finally:
            await nc.close()
        rest = await read_events(client, url, token, f"tok:{run_id}:1:2", idle_s=0.5)
        assert [e["event"] for e in rest] == ["message.completed"]
        assert rest[0]["data"]["content"] == answer["content"]

        # Someone else's conversation stays a 404, Last-Event-ID or not.
        other = pipeline.token("globex", "eve")
        r = await client.get(
            url, headers={"Authorization": f"Bearer {other}", "Last-Event-ID": "garbage"}
        )
        assert r.status_code == 404


async def test_resume_into_a_newer_attempt_discards_the_partial_text(pipeline: Pipeline) -> None:
    pipeline.model.update_settings(tokens_per_second=40, words_per_reply=80)
    # The first call breaks after a few deltas; policy retries the run as attempt 2.
    pipeline.model.set_faults(
        [{"kind": "midstream_error", "after_tokens": 6, "model": "claude-sonnet-4-6"}]
    )
    token = pipeline.token("acme", "carol")
    auth = {"Authorization": f"Bearer {token}"}
    cid = str(uuid.uuid4())
    url = f"{pipeline.gateway}/api/conversations/{cid}/events"
    async with httpx.AsyncClient(timeout=10) as client:

        async def first_token() -> list[Event]:
            out: list[Event] = []
            while not any(e["event"] == "token" for e in out):
                last = out[-1]["id"] if out else "start"
                out += await read_events(client, url, token, last, limit=1)
            return out

        reader = asyncio.create_task(first_token())
        await asyncio.sleep(0.3)
        r = await client.post(
            f"{pipeline.gateway}/api/chat",
            json={"conversation_id": cid, "content": "Break the first attempt please"},
            headers=auth,
        )
        assert r.status_code == 202
        seen = await asyncio.wait_for(reader, 20)
        assert seen[-1]["data"]["attempt"] == 1
        # Offline until the run is on its second attempt.
        for _ in range(200):
            state = (await client.get(f"{url[:-7]}/state", headers=auth)).json()
            if state["runs"] and state["runs"][0]["attempts"] == 2:
                break
            await asyncio.sleep(0.05)
        rest = await read_events(client, url, token, seen[-1]["id"], limit=10_000)
        [answer] = await stored_answers(client, pipeline, cid, token)

    # The run is on attempt 2: the client is told so first, and only then gets its tokens.
    assert rest[0]["event"] == "run.status" and rest[0]["data"]["attempt"] == 2, rest[0]
    assert rest[-1]["event"] == "message.completed"
    assert rest[-1]["data"]["content"] == answer["content"]
    tokens = [e["data"] for e in rest if e["event"] == "token"]
    assert {t["attempt"] for t in tokens} == {2}
    assert [t["seq"] for t in tokens] == list(range(1, len(tokens) + 1))
    assert "".join(t["text"] for t in tokens) == answer["content"]
