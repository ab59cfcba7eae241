"""The WebSocket stream through the whole pipeline: a live run, and resumes at random positions."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest

from tests.e2e.conftest import Pipeline
from tests.e2e.resume import (
    Event,
    answer_tokens,
    assert_faulty_reassembled,
    assert_reassembled,
    drill_seed,
    drop_and_resume,
    drop_and_resume_faulty,
    faulty_plan,
    read_ws,
    stored_answers,
    ws_url,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def pipeline(module_pipeline: Pipeline) -> Pipeline:
    """One stack for the module: each test has a user and conversations of its own."""
    return module_pipeline


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
    token = pipeline.token("acme", "erin")
    cid = str(uuid.uuid4())
    url = ws_url(pipeline, cid)
    prompts = [f"Tell me about WebSocket resumes, part {i}" for i in range(10)]
    async with httpx.AsyncClient(timeout=10) as client:

        async def resume(last_id: str, limit: int, n: int) -> list[Event]:
            # Every other reconnect authenticates like a browser, with a first frame.
            return await read_ws(url, token, last_id, limit=limit, first_frame=n % 2 == 0)

        seen, answers, resumes = await drop_and_resume(
            pipeline,
            client,
            cid,
            token,
            prompts,
            lambda opened: read_ws(url, token, limit=2, opened=opened),
            resume,
            seed=20261123,
            resumes_wanted=30,
            answers_wanted=2,
            timeout_s=240,  # bounds a drill that times nothing: 4-9 s quiet, 150 at load 30
        )
    assert resumes >= 30, resumes
    assert_reassembled(seen, answers, prompts)


async def test_websocket_drops_through_retried_and_cancelled_runs_repeat_nothing_and_miss_nothing(
    pipeline: Pipeline,
) -> None:
    pipeline.model.update_settings(tokens_per_second=40, words_per_reply=30)
    token = pipeline.token("acme", "gina")
    cid = str(uuid.uuid4())
    url = ws_url(pipeline, cid)
    plan = faulty_plan(6, "sockets that fail and stop")
    async with httpx.AsyncClient(timeout=10) as client:

        async def resume(last_id: str, limit: int, n: int) -> list[Event]:
            full = last_id.startswith("unknown-")
            return await read_ws(
                url,
                token,
                last_id,
                limit=limit,
                first_frame=n % 2 == 0,
                idle_s=2.0 if full else 10.0,
                stop_at_answer=not full,
            )

        seen, fulls, runs = await drop_and_resume_faulty(
            pipeline,
            client,
            cid,
            token,
            plan,
            lambda opened: read_ws(url, token, limit=2, opened=opened),
            resume,
            seed=drill_seed(20261202),
            timeout_s=150,
        )
        answers = await stored_answers(client, pipeline, cid, token)
    assert len(fulls) >= 3
    assert_faulty_reassembled(seen, fulls, runs, answers, plan)
