"""The WebSocket stream through the whole pipeline: a live run, and resumes at random positions."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import uuid
from collections import Counter
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.e2e.conftest import Pipeline
from tests.e2e.test_sse_resume import answer_tokens, stored_answers

pytestmark = pytest.mark.e2e

Event = dict[str, Any]


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


async def test_a_run_streams_live_over_websocket_and_matches_the_stored_answer(
    pipeline: Pipeline,
) -> None:
    token = pipeline.token("acme", "dana")
    cid = str(uuid.uuid4())
    async with httpx.AsyncClient(timeout=10) as client:
        live = asyncio.create_task(read_ws(ws_url(pipeline, cid), token, limit=10_000))
        await asyncio.sleep(0.5)
        r = await client.post(
            f"{pipeline.gateway}/api/chat",
            json={"conversation_id": cid, "content": "Stream this to my browser"},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 202
        seen = await asyncio.wait_for(live, 30)
        [answer] = await stored_answers(client, pipeline, cid, token)
    kinds = [e["event"] for e in seen]
    assert kinds[0] == "message.created" and kinds[-1] == "message.completed"
    assert "run.status" in kinds
    assert seen[0]["data"]["content"] == "Stream this to my browser"
    assert seen[0]["id"] == f"msg:{r.json()['message']['id']}"
    tokens = answer_tokens(seen, answer["run_id"])
    assert [t["seq"] for t in tokens] == list(range(1, len(tokens) + 1)) and len(tokens) >= 2
    assert "".join(t["text"] for t in tokens) == answer["content"]
    assert seen[-1]["data"]["content"] == answer["content"]
    assert seen[-1]["id"] == f"msg:{answer['id']}"


async def test_thirty_random_websocket_drops_reassemble_exactly_the_stored_answers(
    pipeline: Pipeline,
) -> None:
    pipeline.model.update_settings(tokens_per_second=40, words_per_reply=60)
    rnd = random.Random(20261123)
    token = pipeline.token("acme", "erin")
    cid = str(uuid.uuid4())
    url = ws_url(pipeline, cid)
    prompts = [f"Tell me about WebSocket resumes, part {i}" for i in range(10)]
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
            first = asyncio.create_task(read_ws(url, token, limit=2))
            await asyncio.sleep(0.3)
            await post(0)
            seen.extend(await first)
            posted = 1
            while True:
                done = sum(e["event"] == "message.completed" for e in seen)
                if done == posted and ((resumes >= 30 and done >= 2) or done == len(prompts)):
                    return
                if done == posted:
                    await post(posted)
                    posted += 1
                resumes += 1
                seen.extend(
                    await read_ws(
                        url,
                        token,
                        seen[-1]["id"],
                        limit=rnd.randint(1, 4),
                        first_frame=resumes % 2 == 0,
                    )
                )

        await asyncio.wait_for(run(), 60)
        answers = await stored_answers(client, pipeline, cid, token)

    assert resumes >= 30, resumes
    ids = Counter(e["id"] for e in seen if e["event"] != "run.status")
    assert [i for i, n in ids.items() if n > 1] == [], "an event arrived twice"
    created = [e["data"]["content"] for e in seen if e["event"] == "message.created"]
    assert created == prompts[: len(answers)]
    completed = [e["data"]["content"] for e in seen if e["event"] == "message.completed"]
    assert completed == [a["content"] for a in answers]
    for answer in answers:
        tokens = answer_tokens(seen, answer["run_id"])
        assert [t["seq"] for t in tokens] == list(range(1, len(tokens) + 1))
        assert len(tokens) > 10
        assert "".join(t["text"] for t in tokens) == answer["content"]
