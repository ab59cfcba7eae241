"""Stream clients for the resume tests (SSE and WebSocket) and the drop-and-resume drill."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.e2e.conftest import Pipeline

Event = dict[str, Any]
# One reconnect: (last event id, how many events to read, which resume this is) -> events.
Resume = Callable[[str, int, int], Awaitable[list[Event]]]


def feed(event: Event, line: str) -> bool:
    """Add one SSE line to ``event``; True at the blank line that ends it (comments ignored)."""
    if not line:
        return True
    field, _, value = line.partition(":")
    value = value.removeprefix(" ")
    if field == "data" and value:
        event["data"] = json.loads(value)
    elif field in ("event", "id"):
        event[field] = value
    return False


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
            if not feed(event, line):
                continue
            if "event" in event:
                out.append(event)
                if limit is not None and event["event"] == "message.completed":
                    break
            event = {}
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


async def read_ws(
    url: str,
    token: str,
    last_id: str | None = None,
    *,
    limit: int | None = None,
    idle_s: float = 10.0,
    first_frame: bool = False,
) -> list[Event]:
    """Events of one WebSocket connection (not ready/heartbeat/pong): until ``limit`` events,
    an answer, or ``idle_s`` idle. Authenticates by header or, like a browser, by a first frame.
    """
    headers = {} if first_frame else {"Authorization": f"Bearer {token}"}
    if last_id is not None and not first_frame:
        headers["Last-Event-ID"] = last_id
    out: list[Event] = []
    async with connect(url, additional_headers=headers) as ws:
        if first_frame:
            await ws.send(json.dumps({"type": "auth", "token": token, "last_event_id": last_id}))
        with contextlib.suppress(TimeoutError, ConnectionClosed):
            while limit is None or len(out) < limit:
                frame = json.loads(await asyncio.wait_for(ws.recv(), idle_s))
                if frame["event"] in ("ready", "heartbeat", "pong"):
                    continue
                assert frame["event"] != "error", frame
                out.append(frame)
                if limit is not None and frame["event"] == "message.completed":
                    break
    return out


def ws_url(p: Pipeline, cid: str) -> str:
    return p.gateway.replace("http://", "ws://") + f"/api/conversations/{cid}/ws"


async def drop_and_resume(
    p: Pipeline,
    client: httpx.AsyncClient,
    cid: str,
    token: str,
    prompts: list[str],
    first: Callable[[], Coroutine[Any, Any, list[Event]]],
    resume: Resume,
    *,
    seed: int,
    resumes_wanted: int,
    answers_wanted: int,
    timeout_s: float,
) -> tuple[list[Event], list[Any], int]:
    """Post prompts one at a time while a client reconnects after 1 to 4 events each time.

    ``first`` is the connection open before the first post (it sees the conversation from its
    start); every later connection resumes from the last event seen. Ends once at least
    ``resumes_wanted`` reconnects and ``answers_wanted`` answers were seen (or every prompt was
    answered). Returns every event seen, the stored answers and the number of reconnects.
    """
    rnd = random.Random(seed)
    seen: list[Event] = []
    resumes = 0

    async def post(i: int) -> None:
        r = await client.post(
            f"{p.gateway}/api/chat",
            json={"conversation_id": cid, "content": prompts[i]},
            headers={"Authorization": f"Bearer {token}", "Idempotency-Key": f"{cid}-{i}"},
        )
        assert r.status_code == 202, r.text

    async def run() -> None:
        nonlocal resumes
        opening = asyncio.create_task(first())
        await asyncio.sleep(0.3)
        await post(0)
        seen.extend(await opening)
        posted = 1
        while True:
            done = sum(e["event"] == "message.completed" for e in seen)
            enough = resumes >= resumes_wanted and done >= answers_wanted
            if done == posted and (enough or done == len(prompts)):
                return
            if done == posted:
                await post(posted)
                posted += 1
            resumes += 1
            seen.extend(await resume(seen[-1]["id"], rnd.randint(1, 4), resumes))

    await asyncio.wait_for(run(), timeout_s)
    return seen, await stored_answers(client, p, cid, token), resumes


def assert_reassembled(seen: list[Event], answers: list[Any], prompts: list[str]) -> None:
    """No event twice; every prompt and answer once, in order; tokens concatenate to answers."""
    ids = Counter(e["id"] for e in seen if e["event"] != "run.status")
    assert [i for i, n in ids.items() if n > 1] == [], "an event arrived twice"
    created = [e["data"]["content"] for e in seen if e["event"] == "message.created"]
    assert created == prompts[: len(answers)]
    completed = [e["data"]["content"] for e in seen if e["event"] == "message.completed"]
    assert completed == [a["content"] for a in answers]
    for answer in answers:
        tokens = answer_tokens(seen, answer["run_id"])
        # Every token once, in order, none missing: they concatenate to the stored answer.
        assert [t["seq"] for t in tokens] == list(range(1, len(tokens) + 1))
        assert len(tokens) > 10
        assert "".join(t["text"] for t in tokens) == answer["content"]
