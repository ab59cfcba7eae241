"""The chaos suite with tools: messages that make the model call an ``auto`` idempotent tool
(``current_time``) and an ``ask`` side-effecting one (``create_task``, on the shipped MCP
server), a client that approves most calls and denies some through ``POST …/tool-approvals``,
and meanwhile SIGKILLs of the executor, policy and persister (twice each, some right after an
approval went out, while it travels and its tool runs) and a NATS restart.

Counted on the MCP server's side (its ledger), it checks I8: every approved ``create_task`` ran
at most once, and exactly once unless its stored result is ``unknown`` (a kill cut it); no call
ran unapproved, or with arguments other than those the client was shown and approved (the
digest in ``/state`` against the stored ``tool_use`` and the ledger); a denied call never ran;
every call of a stored turn has one stored result; and, as the chaos suite does, I1-I4 with
usage per model call exactly once (the model's ledger against the usage rows).

Size: ``CHAOS_TOOLS_MESSAGES`` (default 80), ``CHAOS_TOOLS_CONVERSATIONS`` (default 10),
``CHAOS_SEED``; ``CHAOS_TOOLS_SLOW_S`` (default 1.0): how long a third of the ``create_task``
calls wait after their side effect before they answer (a kill then leaves them ``unknown``).

Five runs in a row on two busy cores (seeds 101, 202, 303, 404, 505) passed, 49-166 s each
(the test's own time), with 3-6 calls ``unknown`` per run; an executor that reruns a started
non-idempotent call fails it ("'call person 9' ran 2 times").
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest

from baton.devtoken import make_token
from baton.mcp_server import MCPServerProcess
from baton.offline_model import FaultRule, ModelSettings
from shared import messages as m
from tests.e2e.chaos_world import (
    RUN_DEADLINE_S,
    SECRET,
    World,
    chaos_world,
    started_records,
    supervise,
)
from tests.e2e.invariants import EXECUTOR_MODEL, Client, availability, check, settled

pytestmark = [pytest.mark.chaos, pytest.mark.e2e]

MESSAGES = int(os.environ.get("CHAOS_TOOLS_MESSAGES", "80"))
CONVERSATIONS = int(os.environ.get("CHAOS_TOOLS_CONVERSATIONS", "10"))
SEED = int(os.environ.get("CHAOS_SEED", str(int(time.time()))))
SLOW_S = float(os.environ.get("CHAOS_TOOLS_SLOW_S", "1.0"))
KILLED = ("executor", "policy", "persister")

POLICY = """
[defaults]
run_deadline_s = {deadline}

[defaults.tools]
max_rounds = 3
approval_timeout_s = 600

[defaults.tools.servers.demo]
url = "{url}"

[defaults.tools.servers.demo.tools.current_time]
approval = "auto"
idempotent = true

[defaults.tools.servers.demo.tools.create_task]
approval = "ask"
idempotent = false
"""


class Plan(msgspec.Struct):
    """What each message is: its text, and for a ``create_task`` its title and the answer."""

    kind: str  # task, slow (a task that answers late), time, text
    content: str
    title: str = ""
    approve: bool = True


def plan(rng: random.Random) -> list[Plan]:
    out = []
    for n in range(MESSAGES):
        r = rng.random()
        title = f"call person {n}"
        if r < 0.3:
            out.append(Plan("task", f"Message {n}: please remind me to {title}.", title))
        elif r < 0.5:
            out.append(Plan("slow", f"Message {n}: please remind me to {title} [slow {n}].", title))
        elif r < 0.75:
            out.append(Plan("time", f"Message {n}: what time is it now?"))
        else:
            out.append(Plan("text", f"Message {n}: tell me about topic {rng.randint(1, 999)}?"))
    for p in out:
        p.approve = p.kind not in ("task", "slow") or rng.random() >= 0.25
    return out


def slow_faults(plans: list[Plan]) -> list[FaultRule]:
    """The model calls ``create_task`` of a slow message with ``reply_after_s`` (never expires)."""
    return [
        FaultRule(
            kind="tool_input",
            count=-1,
            match=f"[slow {n}]",
            model=EXECUTOR_MODEL,
            tool_name="create_task",
            tool_input={"title": p.title, "reply_after_s": SLOW_S},
        )
        for n, p in enumerate(plans)
        if p.kind == "slow"
    ]


class Tooled(msgspec.Struct):
    world: World
    mcp: MCPServerProcess
    plans: list[Plan]


@pytest.fixture
def tooled(tmp_path: Path) -> Iterator[Tooled]:
    plans = plan(random.Random(SEED))
    settings = ModelSettings(
        tokens_per_second=120, words_per_reply=16, style="hostile", faults=slow_faults(plans)
    )
    with MCPServerProcess() as mcp:
        policy = tmp_path / "policy.toml"
        policy.write_text(POLICY.format(url=mcp.url, deadline=RUN_DEADLINE_S))
        extra = {
            "BATON_POLICY_FILE": str(policy),
            "EXECUTOR_MCP_SERVERS": json.dumps({"demo": mcp.url}),
        }
        # Logs are kept by pytest for the last runs, to read after a failure.
        with chaos_world(tmp_path / "logs", settings, extra) as world:
            yield Tooled(world, mcp, plans)


class Shown(msgspec.Struct):
    """A call as ``/state`` showed it to the client, and the client's answer."""

    run_id: str
    tool: str
    arguments: dict[str, Any]
    input_digest: str
    approve: bool
    slow: bool = False
    answers: list[int] = []  # the status of each POST that got an answer


class Approver:
    """Polls each conversation's ``/state`` and answers every pending call once (retrying a POST
    until it gets an answer), as the message's plan says."""

    def __init__(self, http: httpx.AsyncClient, gateway: str, plans: list[Plan]) -> None:
        self.http, self.gateway = http, gateway
        self.by_title = {p.title: p for p in plans if p.title}
        self.shown: dict[str, Shown] = {}
        # Set at each approval that went out (the chaos waits for one): any, or a slow task's.
        self.posted, self.posted_slow = asyncio.Event(), asyncio.Event()
        self.unexpected: list[str] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def run(self, convs: list[tuple[str, str, str]], stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.gather(*(self._poll(*c) for c in convs))
            await asyncio.sleep(0.25)
        await asyncio.gather(*self.tasks)

    async def _poll(self, project: str, user: str, cid: str) -> None:
        headers = {"Authorization": f"Bearer {make_token(SECRET, project, user)}"}
        try:
            r = await self.http.get(
                f"{self.gateway}/api/conversations/{cid}/state", headers=headers
            )
        except httpx.TransportError:
            return
        if r.status_code != 200:
            return  # 404 before its first message is stored, 503 while NATS restarts
        for run in r.json()["runs"]:
            for call in run.get("pending_tool_calls") or []:
                if call["tool_call_id"] in self.shown:
                    continue
                p = self.by_title.get(call["arguments"].get("title", ""))
                if p is None:
                    self.unexpected.append(f"a call no message asked for: {call}")
                    continue
                shown = Shown(
                    run["run_id"],
                    call["tool"],
                    call["arguments"],
                    call["input_digest"],
                    p.approve,
                    slow=p.kind == "slow",
                )
                self.shown[call["tool_call_id"]] = shown
                task = asyncio.create_task(self._answer(cid, headers, call["tool_call_id"], shown))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)

    async def _answer(self, cid: str, headers: dict[str, str], call_id: str, s: Shown) -> None:
        path = f"{self.gateway}/api/conversations/{cid}/runs/{s.run_id}/tool-approvals"
        decision = {"tool_call_id": call_id, "approve": s.approve, "input_digest": s.input_digest}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                r = await self.http.post(path, json={"decisions": [decision]}, headers=headers)
            except httpx.TransportError:
                await asyncio.sleep(0.2)
                continue
            if r.status_code == 503:
                await asyncio.sleep(0.2)
                continue
            s.answers.append(r.status_code)
            for event in (self.posted, self.posted_slow) if s.slow else (self.posted,):
                event.set()
                event.clear()
            # 409 not_waiting: an earlier try of ours got through and the call moved on.
            if r.status_code == 202 or r.json().get("error", {}).get("code") == "not_waiting":
                return
            self.unexpected.append(f"{call_id}: {r.status_code} {r.text}")
            return
        self.unexpected.append(f"{call_id}: no answer to the approval within 120 s")


async def _drive(world: World, plans: list[Plan], convs: list[tuple[str, str, str]]) -> Client:
    async with httpx.AsyncClient(timeout=10) as http:
        client = Client(http, [world.gateway], SECRET)
        pending: set[asyncio.Task[str]] = set()
        for n, p in enumerate(plans):
            project, user, cid = convs[n % len(convs)]
            pending.add(asyncio.create_task(client.submit(project, user, cid, f"k-{n}", p.content)))
            if len(pending) >= 12:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            await asyncio.sleep(0.05)
        await asyncio.gather(*pending)
    return client


async def _chaos(
    world: World, approver: Approver, rng: random.Random, stop: asyncio.Event, log: list[str]
) -> None:
    """Kill executor, policy and persister twice each and restart NATS once. The executor's kills
    land right after a slow task's approval went out (while it runs: after its side effect,
    before its answer), about half of the others right after any approval (while it travels)."""
    actions = [name for name in KILLED for _ in range(2)] + ["nats"]
    rng.shuffle(actions)
    for action in actions:
        slow = action == "executor"
        if slow or rng.random() < 0.5:
            with contextlib.suppress(TimeoutError):
                event = approver.posted_slow if slow else approver.posted
                await asyncio.wait_for(event.wait(), timeout=10)
            await asyncio.sleep(rng.uniform(0.3, 0.9) if slow else rng.uniform(0.0, 0.3))
            how = "after-approval"
        else:
            await asyncio.sleep(rng.uniform(0.5, 2.0))
            how = "random"
        if action == "nats":
            await world.restart_nats()
        else:
            world.kill(action)
        log.append(f"{action}({how})")
        print(f"chaos-tools {time.strftime('%H:%M:%S')} {log[-1]}", flush=True)
    stop.set()


async def test_each_approved_call_runs_once_while_services_are_killed(tooled: Tooled) -> None:
    world, mcp, plans = tooled.world, tooled.mcp, tooled.plans
    rng = random.Random(SEED + 1)
    kinds = collections.Counter(p.kind for p in plans)
    print(f"\nchaos-tools seed={SEED} messages={MESSAGES} conversations={CONVERSATIONS} {kinds}")
    projects = ("acme", "globex")
    convs = [(projects[i % 2], f"user{i % 4}", str(uuid.uuid4())) for i in range(CONVERSATIONS)]
    started = time.monotonic()
    stop, done, checked, chaos_log = asyncio.Event(), asyncio.Event(), asyncio.Event(), []
    supervisor = asyncio.create_task(supervise(world, checked))
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            approver = Approver(http, world.gateway, plans)
            approving = asyncio.create_task(approver.run(convs, done))
            chaos = asyncio.create_task(_chaos(world, approver, rng, stop, chaos_log))
            client = await _drive(world, plans, convs)
            await chaos
            try:
                await settled(world.database_url, len(set(client.accepted.values())))
            finally:
                done.set()
                await approving
        await asyncio.sleep(2)  # anything still in flight would show up as a copy now

        con = await asyncpg.connect(world.database_url)
        try:
            async with started_records(world.nats.url) as recorded:
                summary = await check(con, client, world.model, MESSAGES, recorded=recorded)
            tools = await _check_tools(con, mcp, plans, approver)
        finally:
            await con.close()
    finally:
        checked.set()
        await supervisor
    print(
        f"chaos-tools seed={SEED} actions={','.join(chaos_log)} {tools} {summary} "
        f"{availability(client)} took={time.monotonic() - started:.0f}s"
    )
    assert len(chaos_log) == 2 * len(KILLED) + 1


async def _check_tools(con: Any, mcp: MCPServerProcess, plans: list[Plan], a: Approver) -> str:
    """I8 counted on the MCP server's side; a summary line."""
    assert not a.unexpected, a.unexpected
    ledger = mcp.executions()
    ran: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for e in ledger:
        ran[e["result"]["title"]].append(e)
    turns = await con.fetch("SELECT run_id, round, content FROM tool_turns")
    results = {
        (r["run_id"], r["tool_use_id"]): r for r in await con.fetch("SELECT * FROM tool_results")
    }
    calls = [
        (t["run_id"], block)
        for t in turns
        for block in json.loads(t["content"]) if block.get("type") == "tool_use"
    ]  # fmt: skip
    outcomes: collections.Counter[str] = collections.Counter()
    decided_titles: set[str] = set()
    for run_id, block in calls:
        result = results.get((run_id, block["id"]))
        # Every call of a stored turn has its one final outcome.
        assert result is not None, f"no stored result for {run_id} {block}"
        outcomes[f"{block['name']}:{result['outcome']}"] += 1
        if block["name"] == "current_time":
            # Idempotent and auto: run (again, if a kill cut it), never unknown.
            assert result["outcome"] == "ok", dict(result)
            continue
        assert block["name"] == "create_task", block
        shown = a.shown.get(block["id"])
        # An "ask" call gets a result only after the client's answer (no expiry here).
        assert shown is not None, f"{block['id']} got a result without being shown: {result}"
        assert shown.run_id == run_id
        # What the client was shown is what the model asked, and its digest (I8's binding).
        assert shown.arguments == block["input"], (shown, block)
        assert shown.input_digest == m.input_digest(block["input"]), (shown, block)
        assert result["input_digest"] == shown.input_digest, dict(result)
        title = block["input"]["title"]
        assert title not in decided_titles, f"two decided calls for {title!r}"
        decided_titles.add(title)
        runs_of_it = ran.get(title, [])
        if not shown.approve:
            assert runs_of_it == [], f"a denied call ran: {title} {runs_of_it}"
            assert result["outcome"] == "denied", dict(result)
            continue
        # At most once; and exactly once unless a kill made its outcome unknown.
        assert len(runs_of_it) <= 1, f"{title!r} ran {len(runs_of_it)} times: {runs_of_it}"
        if not runs_of_it:
            assert result["outcome"] == "unknown", (title, dict(result))
        elif result["outcome"] == "ok":
            stored = json.loads(result["content"])
            assert stored == runs_of_it[0]["result"], (stored, runs_of_it[0])
            assert set(block["input"]) <= {"title", "reply_after_s"}
        else:
            assert result["outcome"] == "unknown", (title, dict(result))
    # Nothing ran that was not a decided, approved call.
    approved = {s.arguments["title"] for s in a.shown.values() if s.approve}
    strays = sorted(t for t in ran if t not in approved or t not in decided_titles)
    assert not strays, strays
    asked = sum(1 for p in plans if p.kind in ("task", "slow"))
    assert len(decided_titles) == asked, (len(decided_titles), asked)
    return (
        f"tool_calls={len(calls)} outcomes={dict(sorted(outcomes.items()))} "
        f"executions={len(ledger)} approvals={sum(s.approve for s in a.shown.values())} "
        f"denials={sum(not s.approve for s in a.shown.values())}"
    )
