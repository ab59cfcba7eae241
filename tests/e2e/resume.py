"""Stream clients for the resume tests (SSE and WebSocket) and the drop-and-resume drill."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
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


def ends_run(event: Event) -> bool:
    """Whether nothing more of its run follows: its answer, failure notice or cancel."""
    if event["event"] in ("message.completed", "run.failed"):
        return True
    return event["event"] == "run.status" and event["data"]["status"] in ("cancelled", "failed")


async def read_events(
    client: httpx.AsyncClient,
    url: str,
    token: str,
    last_id: str | None = None,
    *,
    limit: int | None = None,
    idle_s: float = 10.0,
    query: bool = False,
    stop_at_answer: bool = True,
    opened: asyncio.Event | None = None,
) -> list[Event]:
    """Events of one SSE connection: until ``limit`` events, the end of a run (an answer, a
    failure, a cancel; unless told not to stop there), or ``idle_s`` idle. ``opened`` is set at
    the stream's first line (the gateway's ``: connected``, sent once it holds the watch)."""
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
            if opened is not None:
                opened.set()
            if not feed(event, line):
                continue
            if "event" in event:
                out.append(event)
                if stop_at_answer and ends_run(event):
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
    stop_at_answer: bool = True,
    opened: asyncio.Event | None = None,
) -> list[Event]:
    """Events of one WebSocket connection (not ready/heartbeat/pong): until ``limit`` events,
    an answer, or ``idle_s`` idle. Authenticates by header or, like a browser, by a first frame.
    ``opened`` is set at the ``ready`` frame (the gateway holds the watch by then).
    """
    headers = {} if first_frame else {"Authorization": f"Bearer {token}"}
    if last_id is not None and not first_frame:
        headers["Last-Event-ID"] = last_id
    out: list[Event] = []
    # max_queue=None: the reader stops after a few events and leaves, while the gateway may
    # still be sending (a replay's burst). With the client's default of 16 queued frames it
    # stops reading the socket, so it never reads the gateway's close reply and its close waits
    # out close_timeout (10 s). Under load each such wait let the run get further ahead, so the
    # next resume's replay was a burst too: 28-75 s for a drill of 4 s (docs/benchmarks.md).
    async with connect(url, additional_headers=headers, max_queue=None) as ws:
        if first_frame:
            await ws.send(json.dumps({"type": "auth", "token": token, "last_event_id": last_id}))
        with contextlib.suppress(TimeoutError, ConnectionClosed):
            while limit is None or len(out) < limit:
                frame = json.loads(await asyncio.wait_for(ws.recv(), idle_s))
                if frame["event"] == "ready" and opened is not None:
                    opened.set()
                if frame["event"] in ("ready", "heartbeat", "pong"):
                    continue
                assert frame["event"] != "error", frame
                out.append(frame)
                if limit is not None and stop_at_answer and ends_run(frame):
                    break
    return out


def ws_url(p: Pipeline, cid: str) -> str:
    return p.gateway.replace("http://", "ws://") + f"/api/conversations/{cid}/ws"


# The first connection of a drill: told when it is open, it returns the events it saw.
First = Callable[[asyncio.Event], Coroutine[Any, Any, list[Event]]]


async def until_open(
    opening: asyncio.Task[Any], opened: asyncio.Event, timeout_s: float = 60
) -> None:
    """Wait until the connection ``opening`` reads is open (the gateway holds its watch, so a
    post after this is seen from its first event), or has ended (its error is raised where it
    is awaited). A bound on a wait that measures nothing: generous."""
    waiter = asyncio.ensure_future(opened.wait())
    try:
        await asyncio.wait(
            {opening, waiter}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        waiter.cancel()
    assert opened.is_set() or opening.done(), f"the first connection did not open in {timeout_s} s"


async def drop_and_resume(
    p: Pipeline,
    client: httpx.AsyncClient,
    cid: str,
    token: str,
    prompts: list[str],
    first: First,
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
    TRACE.clear()  # a repeat's assertion shows this drill's connections, not an earlier one's
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
        opened = asyncio.Event()
        opening = asyncio.create_task(first(opened))
        await until_open(opening, opened)
        await post(0)
        conn0 = await opening
        _trace("first", conn0)
        seen.extend(conn0)
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
            last = seen[-1]["id"]
            conn = await resume(last, rnd.randint(1, 4), resumes)
            _trace(last, conn)
            seen.extend(conn)

    await asyncio.wait_for(run(), timeout_s)
    return seen, await stored_answers(client, p, cid, token), resumes


def assert_reassembled(seen: list[Event], answers: list[Any], prompts: list[str]) -> None:
    """No event twice; every prompt and answer once, in order; tokens concatenate to answers."""
    assert_no_repeat(seen)
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


def assert_no_repeat(events: list[Event]) -> None:
    """No event id twice: a run's status included (one id, one event)."""
    ids = Counter(e["id"] for e in events)
    twice = [i for i, n in ids.items() if n > 1]
    assert twice == [], f"arrived twice: {twice}\n" + "\n".join(where(i) for i in twice)


def assert_no_gap(events: list[Event]) -> None:
    """A client that knew of an earlier attempt of a run is told of the newer one before its
    first token (so it drops the partial text). A finished run replayed from its start shows
    only its answer's attempt, with no status: there is nothing to drop."""
    announced: set[tuple[str, int]] = set()
    earliest: dict[str, int] = {}
    for e in events:
        d = e.get("data", {})
        if e["event"] not in ("run.status", "token"):
            continue
        earliest.setdefault(d["run_id"], d["attempt"])
        if e["event"] == "run.status":
            announced.add((d["run_id"], d["attempt"]))
        elif earliest[d["run_id"]] < d["attempt"]:
            assert (d["run_id"], d["attempt"]) in announced, f"no run.status before {e['id']}"


EXECUTOR_MODEL = "claude-sonnet-4-6"


def drill_seed(default: int) -> int:
    """The drill's seed: ``RESUME_SEED`` when set (to replay a failure, or to try new reconnect
    points: ``RESUME_SEED=$RANDOM``), else the test's own."""
    return int(os.environ.get("RESUME_SEED", default))


Plan = list[tuple[str, str]]  # (prompt, "clean" | "retry" | "cancel")


def faulty_plan(n: int, topic: str) -> Plan:
    kinds = ("retry", "cancel", "clean")
    return [(f"[{i:02d}] Tell me about {topic}", kinds[i % 3]) for i in range(n)]


async def drop_and_resume_faulty(
    p: Pipeline,
    client: httpx.AsyncClient,
    cid: str,
    token: str,
    plan: Plan,
    first: First,
    resume: Resume,
    *,
    seed: int,
    timeout_s: float,
    unknown_every: int = 4,
) -> tuple[list[Event], list[list[Event]], list[Any]]:
    """The drop-and-resume drill through retried and cancelled runs, not only clean ones.

    A ``retry`` prompt's first executor call is answered 529 (policy retries it after its
    backoff); a ``cancel`` prompt is cancelled once the client has seen one of its tokens. The
    client reconnects after 1 to 4 events, from the last event it saw, and every
    ``unknown_every``-th time with an id the gateway never sent (it then gets the whole
    conversation again). Returns the events of the known-position chain (each connection opened
    with an unknown id contributes only what the chain had not seen), those connections' own
    events, and the runs' stored state.
    """
    rnd = random.Random(seed)
    auth = {"Authorization": f"Bearer {token}"}
    TRACE.clear()
    seen: list[Event] = []
    fulls: list[list[Event]] = []
    runs: list[str] = []
    cancels: list[asyncio.Task[None]] = []
    resumes = 0

    streaming: dict[str, asyncio.Event] = {}  # set once the client saw a token of the run

    def add(events: list[Event]) -> None:
        seen.extend(events)
        for e in events:
            if e["event"] == "token" and e["data"]["run_id"] in streaming:
                streaming[e["data"]["run_id"]].set()

    async def cancel_once_streaming(run_id: str) -> None:
        await streaming[run_id].wait()
        r = await client.post(
            f"{p.gateway}/api/conversations/{cid}/runs/{run_id}/cancel", headers=auth
        )
        assert r.status_code == 202, r.text

    async def post(i: int) -> None:
        prompt, kind = plan[i]
        if kind == "retry":
            p.model.add_faults(
                [{"kind": "529", "count": 1, "match": prompt[:4], "model": EXECUTOR_MODEL}]
            )
        r = await client.post(
            f"{p.gateway}/api/chat",
            json={"conversation_id": cid, "content": prompt},
            headers={**auth, "Idempotency-Key": f"{cid}-{i}"},
        )
        assert r.status_code == 202, r.text
        runs.append(f"run-{r.json()['message']['id']}")
        if kind == "cancel":
            streaming[runs[-1]] = asyncio.Event()
            cancels.append(asyncio.create_task(cancel_once_streaming(runs[-1])))

    def ended(run_id: str) -> bool:
        return any(e.get("data", {}).get("run_id") == run_id and ends_run(e) for e in seen)

    async def run() -> None:
        nonlocal resumes
        opened = asyncio.Event()
        opening = asyncio.create_task(first(opened))
        await until_open(opening, opened)
        await post(0)
        conn0 = await opening
        _trace("first", conn0)
        add(conn0)
        while True:
            if all(ended(r) for r in runs):
                if len(runs) == len(plan):
                    return
                await post(len(runs))
            resumes += 1
            n = rnd.randint(1, 4)
            if resumes % unknown_every == 0:
                known = {e["id"] for e in seen}
                conn = await resume(f"unknown-{resumes}", len(known) + n, resumes)
                fulls.append(conn)
                _trace(f"unknown-{resumes}", conn)
                add([e for e in conn if e["id"] not in known])
            else:
                last = seen[-1]["id"]
                conn = await resume(last, n, resumes)
                _trace(last, conn)
                add(conn)

    try:
        await asyncio.wait_for(run(), timeout_s)
    finally:
        for task in cancels:
            task.cancel()
    state = await client.get(f"{p.gateway}/api/conversations/{cid}/state", headers=auth)
    return seen, fulls, state.json()["runs"]


# The drill's connections, in order: (the position each resumed from, the ids it delivered).
# A repeat's assertion shows the connections that carried the repeated id, and what came just
# before it in each: enough to tell a replay's repeat from a live one.
TRACE: list[tuple[str, list[str]]] = []


def _trace(last: str, conn: list[Event]) -> None:
    TRACE.append((last, [e["id"] for e in conn]))


def where(event_id: str) -> str:
    """The traced connections that delivered ``event_id``, each with the ids just before it."""
    lines = []
    for last, ids in TRACE:
        for i, x in enumerate(ids):
            if x == event_id:
                lines.append(f"from {last}: ... {ids[max(i - 3, 0) : i + 2]}")
    return "\n".join(lines)


def assert_faulty_reassembled(
    seen: list[Event], fulls: list[list[Event]], runs: list[Any], answers: list[Any], plan: Plan
) -> None:
    """No repeat and no gap, across reconnects and within each full replay; every run's end."""
    assert_no_repeat(seen)
    assert_no_gap(seen)
    for conn in fulls:
        assert_no_repeat(conn)
        assert_no_gap(conn)
    assert [r["status"] for r in runs] != [] and len(runs) == len(plan)
    by_run = {a["run_id"]: a for a in answers}
    statuses = [(e["data"]["run_id"], e["data"]) for e in seen if e["event"] == "run.status"]
    for (_, kind), run in zip(plan, runs, strict=True):
        rid = run["run_id"]
        if kind == "retry":
            assert (run["status"], run["attempts"]) == ("completed", 2), run
            # The retried attempt announced once (never twice, never missing).
            twos = [d for r, d in statuses if r == rid and d["attempt"] == 2]
            assert [d["status"] for d in twos] == ["running"], twos
        if run["status"] == "cancelled":
            ends = [d for r, d in statuses if r == rid and d["status"] == "cancelled"]
            assert len(ends) == 1, ends
            assert rid not in by_run
            continue
        answer = by_run[rid]
        tokens = answer_tokens(seen, rid)
        assert [t["seq"] for t in tokens] == list(range(1, len(tokens) + 1))
        assert "".join(t["text"] for t in tokens) == answer["content"]
    assert sum(r["status"] == "cancelled" for r in runs) >= 1  # the drill did cancel some
