"""Each model fault as an SSE client sees it: the retry and its class, the tokens, the answer."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from baton.embedded import PostgresServer
from tests.conftest import ExternalPostgres
from tests.e2e.conftest import Pipeline, calls_for, fresh, module_stack
from tests.e2e.resume import until_open

pytestmark = pytest.mark.e2e

ANSWER_MODEL = "claude-sonnet-4-6"


@pytest.fixture(scope="module")
def _watched_stack(
    postgres_server: PostgresServer | ExternalPostgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    # A short stall timeout so a stall is noticed in a test's time; frequent SSE heartbeats.
    extra = {"EXECUTOR_STALL_TIMEOUT_S": "1.5", "GATEWAY_SSE_HEARTBEAT_S": "0.3"}
    yield from module_stack(postgres_server, tmp_path_factory.mktemp("watched"), extra)


@pytest.fixture
def watched(_watched_stack: Pipeline) -> Pipeline:
    """The module's one stack, the model reset (no faults, default pace); tests count their own
    calls."""
    return fresh(_watched_stack)


class Seen:
    """What one SSE client received: events in order, and heartbeat comments between them."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.heartbeats: list[int] = []  # for each heartbeat, how many events came before it
        self.opened = asyncio.Event()  # at the stream's first line: the gateway holds the watch

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e["data"] for e in self.events if e["event"] == kind]

    def tokens(self, attempt: int) -> list[dict[str, Any]]:
        return [t for t in self.of("token") if t["attempt"] == attempt]


async def watch(p: Pipeline, cid: str, token: str, seen: Seen) -> None:
    """Read the conversation's SSE stream until its run ends (an answer or a failure notice)."""
    url = f"{p.gateway}/api/conversations/{cid}/events"
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        httpx.AsyncClient(timeout=None) as client,
        client.stream("GET", url, headers=headers) as resp,
    ):
        assert resp.status_code == 200
        event: dict[str, Any] = {}
        async for line in resp.aiter_lines():
            seen.opened.set()
            if line == ": heartbeat":
                seen.heartbeats.append(len(seen.events))
            elif line.startswith(("event:", "id:", "data:")):
                field, _, value = line.partition(": ")
                event[field.rstrip(":")] = json.loads(value) if field == "data" else value
            elif not line and "event" in event:
                seen.events.append(event)
                if event["event"] in ("message.completed", "run.failed"):
                    return
                event = {}


async def ask(p: Pipeline, content: str, final: str = "completed") -> tuple[Seen, dict[str, Any]]:
    """Post a message while an SSE client watches; what it saw, and the stored outcome."""
    token = p.token("acme", "alice")
    auth = {"Authorization": f"Bearer {token}"}
    cid = str(uuid.uuid4())
    seen = Seen()
    reader = asyncio.create_task(watch(p, cid, token, seen))
    await until_open(reader, seen.opened)
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(
            f"{p.gateway}/api/chat", json={"conversation_id": cid, "content": content}, headers=auth
        )
        assert r.status_code == 202, r.text
        await asyncio.wait_for(reader, 60)
        for _ in range(300):
            msgs = await client.get(f"{p.gateway}/api/conversations/{cid}/messages", headers=auth)
            state = await client.get(f"{p.gateway}/api/conversations/{cid}/state", headers=auth)
            runs = state.json()["runs"]
            if runs and runs[0]["status"] == final and len(msgs.json()["messages"]) == 2:
                [message, reply] = msgs.json()["messages"]
                return seen, {"message": message, "reply": reply, "run": runs[0]}
            await asyncio.sleep(0.1)
    raise AssertionError(f"no outcome\n{p.log_tail()}")


def calls(p: Pipeline, out: dict[str, Any]) -> list[dict[str, Any]]:
    """The answer model's calls for this test's message (the stack is the module's)."""
    return calls_for(p, out["message"]["id"], ANSWER_MODEL)


@pytest.mark.parametrize(
    ("fault", "error_class", "partial"),
    [
        ({"kind": "429"}, "rate_limited", False),
        ({"kind": "529"}, "overloaded", False),
        ({"kind": "midstream_error", "after_tokens": 3}, "overloaded", True),
        ({"kind": "stall", "after_tokens": 2, "stall_seconds": 30}, "timeout", True),
    ],
    ids=["rate-limited", "overloaded", "error-mid-stream", "stalled-stream"],
)
async def test_the_client_sees_the_retry_with_its_class_then_exactly_the_stored_answer(
    watched: Pipeline, fault: dict[str, Any], error_class: str, partial: bool
) -> None:
    watched.model.set_faults([{**fault, "model": ANSWER_MODEL, "count": 1}])
    seen, out = await ask(watched, "What is a durable consumer?")
    answer, run = out["reply"], out["run"]
    assert (answer["kind"], run["status"], run["attempts"]) == ("answer", "completed", 2)
    # The client is told the run moved on to attempt 2, and why, in the failure class policy saw.
    retry = [s for s in seen.of("run.status") if s["attempt"] == 2]
    assert retry, seen.of("run.status")
    # (after the default backoff of POLICY_RETRY_BACKOFF_S: 1 s, then 4 s)
    assert retry[0]["reason"] == f"retry in 1s after {error_class} on attempt 1"
    # A cut stream's partial text reached the client before the retry; a refused call sent none.
    first = seen.tokens(1)
    assert bool(first) == partial, first
    if partial:
        cut = seen.events.index(next(e for e in seen.events if e["event"] == "token"))
        retried = seen.events.index(next(e for e in seen.events if e["data"] == retry[0]))
        assert cut < retried
    # Then every token of attempt 2, in order, making the stored answer, and the answer itself.
    second = seen.tokens(2)
    assert [t["seq"] for t in second] == list(range(1, len(second) + 1))
    assert "".join(t["text"] for t in second) == answer["content"]
    assert seen.of("message.completed")[0]["content"] == answer["content"]
    assert seen.events[-1]["event"] == "message.completed"
    # Both calls billed with what the model served (the cut one's partial output too).
    served = calls(watched, out)
    assert sorted(c["outcome"] for c in served) == sorted([fault["kind"], "completed"])
    assert run["usage"]["calls"] == 2
    assert run["usage"]["output_tokens"] == sum(c["output_tokens"] for c in served)
    assert run["usage"]["input_tokens"] == sum(c["input_tokens"] for c in served)
    if partial:
        [cut_call] = [c for c in served if c["outcome"] != "completed"]
        assert cut_call["output_tokens"] == fault["after_tokens"]


async def test_a_model_that_keeps_failing_ends_in_a_run_failed_event(watched: Pipeline) -> None:
    watched.model.set_faults([{"kind": "529", "model": ANSWER_MODEL, "count": -1}])
    seen, out = await ask(watched, "Tell me about backpressure", final="failed")
    notice, run = out["reply"], out["run"]
    assert (notice["kind"], run["attempts"], run["usage"]["calls"]) == ("failure", 3, 3)
    assert seen.of("token") == []
    reasons = [s["reason"] for s in seen.of("run.status") if s["attempt"] > 1]
    assert "retry in 1s after overloaded on attempt 1" in reasons
    assert "retry in 4s after overloaded on attempt 2" in reasons
    [failed] = seen.of("run.failed")
    assert seen.events[-1]["event"] == "run.failed"
    assert (failed["kind"], failed["content"]) == ("failure", notice["content"])
    assert "overloaded" in failed["content"]


async def test_a_very_slow_stream_arrives_whole_and_heartbeats_keep_the_client_alive(
    watched: Pipeline,
) -> None:
    # A word a second: slower than the heartbeat, quicker than the executor's 1.5 s stall timeout.
    watched.model.update_settings(words_per_reply=6)
    watched.model.set_faults(
        [{"kind": "slow", "stall_seconds": 1.0, "model": ANSWER_MODEL, "count": 1}]
    )
    seen, out = await ask(watched, "Take your time please")
    answer, run = out["reply"], out["run"]
    # No timeout, no retry: one call, completed, billed once.
    assert (run["status"], run["attempts"], run["usage"]["calls"]) == ("completed", 1, 1)
    [call] = calls(watched, out)
    assert call["outcome"] == "completed"
    assert run["usage"]["output_tokens"] == call["output_tokens"] == 6
    # Every word arrived as it was written (one token event each), and they are the answer.
    tokens = seen.tokens(1)
    assert [t["seq"] for t in tokens] == [1, 2, 3, 4, 5, 6]
    assert "".join(t["text"] for t in tokens) == answer["content"]
    assert seen.of("message.completed")[0]["content"] == answer["content"]
    # Between the first and the last word, the idle stream carried heartbeats.
    first = seen.events.index(next(e for e in seen.events if e["event"] == "token"))
    last = len(seen.events) - 2
    assert any(first < n <= last for n in seen.heartbeats), (seen.heartbeats, first, last)
