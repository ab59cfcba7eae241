"""Resuming the SSE stream with Last-Event-ID: no gap, no duplicate token, the stored answer."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import nats
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
    read_events,
    stored_answers,
    until_open,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def pipeline(module_pipeline: Pipeline) -> Pipeline:
    """One stack for the module: each test has a user and conversations of its own."""
    return module_pipeline


async def test_fifty_random_drops_reassemble_exactly_the_stored_answers(
    pipeline: Pipeline,
) -> None:
    pipeline.model.update_settings(tokens_per_second=40, words_per_reply=80)
    token = pipeline.token("acme", "alice")
    cid = str(uuid.uuid4())
    url = f"{pipeline.gateway}/api/conversations/{cid}/events"
    prompts = [f"Tell me about resumable streams, part {i}" for i in range(12)]
    async with httpx.AsyncClient(timeout=10) as client:

        async def resume(last_id: str, limit: int, n: int) -> list[Event]:
            # Every fifth reconnect names its position as a query parameter instead.
            return await read_events(client, url, token, last_id, limit=limit, query=n % 5 == 0)

        seen, answers, resumes = await drop_and_resume(
            pipeline,
            client,
            cid,
            token,
            prompts,
            lambda opened: read_events(client, url, token, limit=2, opened=opened),
            resume,
            seed=20261122,
            resumes_wanted=50,
            answers_wanted=3,
            timeout_s=240,  # bounds a drill that times nothing: 4-9 s quiet, 150 at load 30
        )
    assert resumes >= 50, resumes
    assert_reassembled(seen, answers, prompts)


async def test_random_drops_through_retried_and_cancelled_runs_repeat_nothing_and_miss_nothing(
    pipeline: Pipeline,
) -> None:
    pipeline.model.update_settings(tokens_per_second=40, words_per_reply=40)
    token = pipeline.token("acme", "frank")
    cid = str(uuid.uuid4())
    url = f"{pipeline.gateway}/api/conversations/{cid}/events"
    plan = faulty_plan(6, "streams that fail and stop")
    async with httpx.AsyncClient(timeout=10) as client:

        async def resume(last_id: str, limit: int, n: int) -> list[Event]:
            full = last_id.startswith("unknown-")
            return await read_events(
                client,
                url,
                token,
                last_id,
                limit=limit,
                query=n % 5 == 0,
                idle_s=2.0 if full else 10.0,
                stop_at_answer=not full,
            )

        seen, fulls, runs = await drop_and_resume_faulty(
            pipeline,
            client,
            cid,
            token,
            plan,
            lambda opened: read_events(client, url, token, limit=2, opened=opened),
            resume,
            seed=drill_seed(20261201),
            timeout_s=150,
        )
        answers = await stored_answers(client, pipeline, cid, token)
    assert len(fulls) >= 3
    assert_faulty_reassembled(seen, fulls, runs, answers, plan)


async def test_resume_after_the_run_finished_and_with_unknown_ids(pipeline: Pipeline) -> None:
    token = pipeline.token("acme", "bob")
    cid = str(uuid.uuid4())
    url = f"{pipeline.gateway}/api/conversations/{cid}/events"
    async with httpx.AsyncClient(timeout=10) as client:
        opened = asyncio.Event()
        live = asyncio.create_task(read_events(client, url, token, limit=10_000, opened=opened))
        await until_open(live, opened)
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

        # From a token in the middle: the rest of the tokens, then the stored answer. (Each read
        # ends at the answer; only the read that expects nothing waits a short idle time.)
        rest = await read_events(client, url, token, f"tok:{run_id}:1:2")
        assert [e["event"] for e in rest] == ["token"] * (len(tokens) - 2) + ["message.completed"]
        assert (
            "".join(t["text"] for t in tokens[:2]) + "".join(e["data"]["text"] for e in rest[:-1])
            == answer["content"]
        )
        assert rest[-1]["data"]["content"] == answer["content"]
        # From the user message (as a query parameter): every token, then the answer.
        rest = await read_events(client, url, token, f"msg:{user_id}", query=True)
        assert [e["id"] for e in rest] == [f"tok:{run_id}:1:{t['seq']}" for t in tokens] + [
            f"msg:{answer['id']}"
        ]
        # From the answer itself: nothing is missing.
        assert await read_events(client, url, token, f"msg:{answer['id']}", idle_s=0.5) == []

        # Ids this conversation never had, or that are not ids at all: the whole conversation.
        for garbage in ("garbage", "tok:run-nope:1:1", f"msg:{uuid.uuid4()}", "tok:x:y:z"):
            full = await read_events(client, url, token, garbage)
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
        rest = await read_events(client, url, token, f"tok:{run_id}:1:2")
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
