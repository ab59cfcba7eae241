"""Policy's tool phase end to end: real policy, executor, persister, MCP server, NATS, Postgres
and the offline model (the agent's decision and the user's approval are published by the test,
as the agent and the gateway would)."""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
import pytest

from baton.mcp_server import MCPServerProcess
from baton.offline_model import OfflineModelProcess
from services.executor.adapters import Model
from services.executor.config import Settings as ExecutorSettings
from services.executor.handlers import Handlers as ExecutorHandlers
from services.executor.tools import McpTools, ToolRunner
from services.persister.adapters import Store
from services.persister.handlers import Handlers as PersisterHandlers
from services.policy import policyfile
from services.policy.adapters import Aborts, Conversations, Limiter, Runs, ToolQuota
from services.policy.config import Settings as PolicySettings
from services.policy.core import RunState
from services.policy.handlers import Handlers as PolicyHandlers
from services.policy.main import rules_from
from shared import messages as m
from shared import model, runs, subjects, wiring
from shared.bus import Bus, Consumer
from shared.db import create_pool
from shared.history import History
from tests.integration.conftest import Infra
from tests.support import (
    agent_decision,
    connect_bus,
    decode_all,
    eventually,
    read_subject,
    running,
    service_metrics,
    user_event,
)

POLICY = """
[defaults]
double_texting = "{double_texting}"

[defaults.tools]
max_rounds = 3
approval_timeout_s = {approval_timeout_s}

[defaults.tools.servers.demo]
url = "{url}"

[defaults.tools.servers.demo.tools.current_time]
approval = "auto"
idempotent = true

[defaults.tools.servers.demo.tools.calculator]
approval = "auto"
idempotent = true

[defaults.tools.servers.demo.tools.create_task]
approval = "ask"
per_user_daily = {per_user_daily}

[defaults.tools.servers.demo.tools.wait]
approval = "auto"
timeout_s = 1
"""


@pytest.fixture(scope="module")
def mcp_server() -> Iterator[MCPServerProcess]:
    with MCPServerProcess() as server:
        yield server


@dataclass
class Stack:
    bus: Bus
    pool: asyncpg.Pool
    runs: Runs
    conversations: Conversations
    policy: PolicyHandlers
    consumers: list[Consumer[Any]]
    mcp: MCPServerProcess
    # Each test's own user: the daily limits are counted per user in a bucket tests share.
    user: str = ""

    async def run(self, run_id: str) -> RunState:
        return (await self.runs.get(run_id))[0]

    async def ask(
        self, content: str, after: m.UserMessageAccepted | None = None
    ) -> m.UserMessageAccepted:
        """A user message stored (``after``: in that message's conversation), and the agent's
        decision on it published."""
        conversation = after.conversation_id if after is not None else None
        e = user_event(content, user=self.user, conversation_id=conversation)
        placed = await Store(self.pool).insert_user_message(e)
        d = agent_decision(message=e, position=placed.position)
        subject = subjects.agent_decision(e.project_id, e.conversation_id)
        await self.bus.publish(subject, d, msg_id=d.event_id)
        return e

    async def status(self, run_id: str, *wanted: str) -> RunState:
        async def reached() -> RunState | None:
            found = await self.runs.find(run_id)
            return found if found is not None and found.status in wanted else None

        return await eventually(reached, timeout=60)

    async def requested(
        self, e: m.UserMessageAccepted, n: int = 1
    ) -> list[m.ToolApprovalRequested]:
        got = decode_all(
            await read_subject(
                self.bus,
                subjects.STREAM_TOOLS,
                subjects.tool_requested(e.project_id, e.conversation_id),
                n,
            ),
            m.ToolApprovalRequested,
        )
        return got

    async def decide(
        self, r: m.ToolApprovalRequested, approve: bool, msg_id: str = "", digest: str = ""
    ) -> None:
        """What the gateway publishes for the user's answer."""
        d = m.ToolApprovalDecided(
            event_id=f"approval:{m.call_key(r.run_id, r.call.id)}",
            message_id=r.message_id,
            conversation_id=r.conversation_id,
            project_id=r.project_id,
            run_id=r.run_id,
            user_id=r.user_id,
            call_id=r.call.id,
            approve=approve,
            input_digest=digest or r.call.input_digest,
            reason="" if approve else "not today",
            decided_at=datetime.now(UTC),
        )
        subject = subjects.tool_approval(r.project_id, r.conversation_id)
        await self.bus.publish(subject, d, msg_id=msg_id or d.event_id)

    async def queued(self, conversation_id: str, run_id: str) -> None:
        """Until the run waits in line for the conversation's slot."""

        async def waits() -> bool:
            conv, _ = await self.conversations.get(conversation_id)
            return run_id in conv.pending.values()

        await eventually(waits)

    async def freed(self, conversation_id: str) -> None:
        """Until no run holds the conversation's slot (I6)."""

        async def free() -> bool:
            conv, _ = await self.conversations.get(conversation_id)
            return conv.active is None

        await eventually(free)

    async def answer(self, e: m.UserMessageAccepted) -> asyncpg.Record:
        """The run's reply, once stored."""

        async def stored() -> asyncpg.Record | None:
            async with self.pool.acquire() as con:
                row: asyncpg.Record | None = await con.fetchrow(
                    "SELECT content, kind FROM messages WHERE reply_to = $1",
                    uuid.UUID(e.message_id),
                )
            return row

        return await eventually(stored)

    async def results(self, e: m.UserMessageAccepted) -> list[asyncpg.Record]:
        async with self.pool.acquire() as con:
            return await con.fetch(
                "SELECT name, outcome, is_error, content FROM tool_results WHERE run_id = $1 "
                "ORDER BY round, created_at",
                runs.run_id(e.message_id),
            )


async def _stack(
    infra: Infra,
    offline_model: OfflineModelProcess,
    mcp_server: MCPServerProcess,
    approval_timeout_s: float = 600,
    per_user_daily: int = 10,
    double_texting: str = "enqueue",
) -> AsyncIterator[Stack]:
    text = POLICY.format(
        url=mcp_server.url,
        approval_timeout_s=approval_timeout_s,
        per_user_daily=per_user_daily,
        double_texting=double_texting,
    )
    book = policyfile.parse(text.encode(), "test policy")
    bus = await connect_bus(infra.nats_url, "tools")
    pool = await create_pool(infra.database_url)
    client = model.client(offline_model.url, "test-key", 30.0)
    kv = await bus.js.key_value(subjects.BUCKET_RUNS)
    limits = await bus.js.key_value(subjects.BUCKET_LIMITS)
    aborts = await bus.js.key_value(subjects.BUCKET_ABORTS)
    policy = PolicyHandlers(
        bus,
        Runs(kv),
        Conversations(kv),
        rules_from(PolicySettings()),
        service_metrics("policy"),
        Aborts(aborts),
        limiter=Limiter(limits),
        book=book,
        quota=ToolQuota(limits),
    )
    runner = ToolRunner(bus, McpTools({"demo": mcp_server.url}), service_metrics("executor"))
    executor = ExecutorHandlers(
        bus,
        History(pool),
        Model(client),
        ExecutorSettings(),
        service_metrics("executor"),
        aborts,
        runner,
    )
    persister = PersisterHandlers(bus, Store(pool), service_metrics("persister"))
    consumers = [
        *wiring.consumers(bus, "policy", policy),
        *wiring.consumers(bus, "executor", executor),
        *wiring.consumers(bus, "persister", persister),
    ]
    stack = Stack(
        bus, pool, Runs(kv), Conversations(kv), policy, consumers, mcp_server, str(uuid.uuid4())
    )
    async with running(*consumers):
        yield stack
    await bus.close()
    await pool.close()
    await client.close()


@pytest.fixture
async def stack(
    infra: Infra, offline_model: OfflineModelProcess, mcp_server: MCPServerProcess
) -> AsyncIterator[Stack]:
    async for s in _stack(infra, offline_model, mcp_server):
        yield s


def _metric(h: PolicyHandlers, name: str, labels: dict[str, str] | None = None) -> float:
    for metric in (h.tool_calls, h.approvals_pending, h.approval_wait):
        for family in metric.collect():
            for sample in family.samples:
                if sample.name == name and (labels is None or sample.labels == labels):
                    return float(sample.value)
    return 0.0


async def test_an_auto_tool_runs_and_the_answer_uses_its_result(
    stack: Stack, offline_model: OfflineModelProcess
) -> None:
    before = len(stack.mcp.executions())
    e = await stack.ask("What is 6 * 7?")
    run = await stack.status(runs.run_id(e.message_id), "completed")
    answer = await stack.answer(e)
    assert answer["kind"] == "answer" and "42" in answer["content"]
    [r] = await stack.results(e)
    assert (r["name"], r["outcome"], r["is_error"]) == ("calculator", "ok", False)
    assert (run.round, run.calls) == (1, ())
    assert len(stack.mcp.executions()) == before  # read-only: nothing recorded on its side
    # The model was offered exactly the granted tools, described as their server describes them.
    offered = offline_model.requests()[-1]["body"]["tools"]
    assert [t["name"] for t in offered] == ["current_time", "calculator", "create_task", "wait"]
    assert all(t["description"] for t in offered)
    assert (
        _metric(
            stack.policy,
            "baton_policy_tool_calls_total",
            {"tool": "calculator", "outcome": "auto"},
        )
        == 1
    )
    # Every model call billed once: the tool_use turn and the answer.
    async with stack.pool.acquire() as con:
        outcomes = await con.fetch(
            "SELECT outcome FROM usage WHERE run_id = $1 ORDER BY created_at", run.run_id
        )
    assert [o["outcome"] for o in outcomes] == ["tool_use", "completed"]


async def test_an_ask_tool_waits_for_approval_and_runs_exactly_once(stack: Stack) -> None:
    before = len(stack.mcp.executions())
    e = await stack.ask("Please remind me to call John tomorrow.")
    run_id = runs.run_id(e.message_id)
    waiting = await stack.status(run_id, "requires_action")
    [request] = await stack.requested(e)
    assert request.call.name == "create_task" and request.call.input == {
        "title": "call John tomorrow"
    }
    assert [c.call.id for c in waiting.calls] == [request.call.id]
    assert _metric(stack.policy, "baton_policy_tool_approvals_pending") == 1
    assert len(stack.mcp.executions()) == before  # nothing runs before the user says so
    # An answer for other arguments authorizes nothing; the call keeps waiting.
    await stack.decide(request, True, msg_id="forged", digest="0" * 64)
    await stack.decide(request, True)
    await stack.status(run_id, "running", "completed")
    # A second answer, the other way (a different message id, so JetStream keeps it): ignored.
    await stack.decide(request, False, msg_id="second-answer")
    await stack.status(run_id, "completed")
    executions = stack.mcp.executions()[before:]
    assert len(executions) == 1  # counted on the tool's side
    assert executions[0]["result"]["title"] == "call John tomorrow"  # the approved arguments
    answer = await stack.answer(e)
    assert executions[0]["result"]["task_id"] in answer["content"]
    [r] = await stack.results(e)
    assert (r["outcome"], r["is_error"]) == ("ok", False)
    assert _metric(stack.policy, "baton_policy_tool_approvals_pending") == 0
    assert (
        _metric(
            stack.policy,
            "baton_policy_tool_calls_total",
            {"tool": "create_task", "outcome": "approved"},
        )
        == 1
    )


async def test_a_denied_call_never_runs(stack: Stack) -> None:
    before = len(stack.mcp.executions())
    e = await stack.ask("Remind me to water the plants.")
    run_id = runs.run_id(e.message_id)
    await stack.status(run_id, "requires_action")
    [request] = await stack.requested(e)
    await stack.decide(request, False)
    await stack.status(run_id, "completed")
    assert len(stack.mcp.executions()) == before
    [r] = await stack.results(e)
    assert (r["outcome"], r["is_error"]) == ("denied", True)
    assert "not approve" in r["content"] and "not today" in r["content"]
    assert "not approve" in (await stack.answer(e))["content"]  # the model was told


async def test_an_approval_not_given_in_time_ends_the_run_and_frees_the_conversation(
    infra: Infra, offline_model: OfflineModelProcess, mcp_server: MCPServerProcess
) -> None:
    async for stack in _stack(infra, offline_model, mcp_server, approval_timeout_s=1):
        before = len(mcp_server.executions())
        e = await stack.ask("Remind me to call the bank.")
        run_id = runs.run_id(e.message_id)
        await stack.status(run_id, "requires_action")
        ended = await stack.status(run_id, "failed")
        assert "approval" in ended.reason
        answer = await stack.answer(e)
        assert answer["kind"] == "failure" and "not approved in time" in answer["content"]
        # The waiting call has its one stored result: expired, never run.
        [result] = await eventually(functools.partial(_results_of, stack, e))
        assert (result["name"], result["outcome"], result["is_error"]) == (
            "create_task",
            "expired",
            True,
        )
        assert "did not answer within 1 s" in result["content"]
        await stack.freed(e.conversation_id)
        # A late approval changes nothing.
        [request] = await stack.requested(e)
        await stack.decide(request, True)
        # The conversation takes the next message.
        nxt = await stack.ask("What is 2 + 3?")
        await stack.status(runs.run_id(nxt.message_id), "completed")
        assert len(mcp_server.executions()) == before
        # The next message's history carries the expired call's result, as an error.
        history = await History(stack.pool).upto(e.conversation_id, nxt.message_id, 20, tools=True)
        blocks = [
            b for t in history for b in t.blocks if b.get("type") == "tool_result"
        ]  # fmt: skip
        assert [(b["is_error"], "did not answer within" in b["content"]) for b in blocks] == [
            (True, True)
        ]
        assert (await stack.run(run_id)).status == "failed"


async def test_a_cancel_while_waiting_for_approval_ends_the_run(stack: Stack) -> None:
    e = await stack.ask("Remind me to buy milk.")
    run_id = runs.run_id(e.message_id)
    await stack.status(run_id, "requires_action")
    cancel = m.CancelRequested(
        event_id=f"cancel:{e.message_id}",
        message_id=e.message_id,
        conversation_id=e.conversation_id,
        project_id=e.project_id,
        run_id=run_id,
        user_id=e.user_id,
        requested_at=datetime.now(UTC),
    )
    await stack.bus.publish(
        subjects.chat_cancel(e.project_id, e.conversation_id), cancel, msg_id=cancel.event_id
    )
    await stack.status(run_id, "cancelled")
    await stack.freed(e.conversation_id)
    assert _metric(stack.policy, "baton_policy_tool_approvals_pending") == 0


@pytest.mark.parametrize(
    ("fault", "name", "outcome", "says"),
    [
        # The model calls a tool it was never offered.
        ({"tool_name": "format_disk", "tool_input": {"disk": "/"}}, "format_disk", "invalid",
         "not available"),
        # The model's input is not a JSON object.
        ({"tool_name": "calculator", "tool_input": "6*7"}, "calculator", "invalid",
         "must be a JSON object"),
        # The tool errors (the calculator refuses anything but arithmetic).
        ({"tool_name": "calculator", "tool_input": {"expression": "__import__('os')"}},
         "calculator", "error", ""),
        # The tool hangs past its timeout_s (1 s).
        ({"tool_name": "wait", "tool_input": {"seconds": 5}}, "wait", "timeout", "may have run"),
    ],
    ids=["unknown_tool", "malformed_input", "tool_error", "tool_hangs"],
)  # fmt: skip
async def test_a_call_that_cannot_succeed_still_gets_an_answer(
    stack: Stack,
    offline_model: OfflineModelProcess,
    fault: dict[str, Any],
    name: str,
    outcome: str,
    says: str,
) -> None:
    offline_model.set_faults([{"kind": "tool_input", "match": "zebra", **fault}])
    e = await stack.ask("Tell me about the zebra.")
    await stack.status(runs.run_id(e.message_id), "completed")
    [r] = await stack.results(e)
    assert (r["name"], r["outcome"], r["is_error"]) == (name, outcome, True)
    assert says in r["content"]
    answer = await stack.answer(e)
    assert answer["kind"] == "answer" and answer["content"].startswith("Done. The tool said:")


async def test_the_daily_limit_counts_each_call_once(
    infra: Infra, offline_model: OfflineModelProcess, mcp_server: MCPServerProcess
) -> None:
    async for stack in _stack(infra, offline_model, mcp_server, per_user_daily=1):
        before = len(mcp_server.executions())
        outcomes = []
        for what in ("call Ann", "call Bob"):
            e = await stack.ask(f"Remind me to {what}.")
            run_id = runs.run_id(e.message_id)
            await stack.status(run_id, "requires_action")
            [request] = await stack.requested(e)
            await stack.decide(request, True)
            await stack.status(run_id, "running", "completed")
            await stack.decide(request, True, msg_id=f"again-{what}")  # a repeat takes no slot
            await stack.status(run_id, "completed")
            outcomes += [r["outcome"] for r in await stack.results(e)]
        assert outcomes == ["ok", "over_limit"]
        assert len(mcp_server.executions()) == before + 1


async def test_an_approval_from_another_user_decides_nothing(stack: Stack) -> None:
    before = len(stack.mcp.executions())
    e = await stack.ask("Remind me to lock the door.")
    run_id = runs.run_id(e.message_id)
    await stack.status(run_id, "requires_action")
    [request] = await stack.requested(e)
    forged = msgspec.structs.replace(request, user_id="mallory")
    await stack.decide(forged, True, msg_id="mallory")
    # Refused (dead-lettered, never a decision): the run still waits, nothing ran.
    await read_subject(stack.bus, subjects.STREAM_DLQ, "dlq.>", 1)
    assert (await stack.run(run_id)).status == "requires_action"
    assert len(stack.mcp.executions()) == before
    await stack.decide(request, True)
    await stack.status(run_id, "completed")
    assert len(stack.mcp.executions()) == before + 1


@pytest.mark.parametrize("strategy", ["enqueue", "interrupt"])
async def test_a_new_message_while_a_run_waits_follows_the_double_texting_strategy(
    infra: Infra, offline_model: OfflineModelProcess, mcp_server: MCPServerProcess, strategy: str
) -> None:
    async for stack in _stack(infra, offline_model, mcp_server, double_texting=strategy):
        before = len(mcp_server.executions())
        first = await stack.ask("Remind me to pay rent.")
        first_run = runs.run_id(first.message_id)
        await stack.status(first_run, "requires_action")
        second = await stack.ask("What is 5 + 5?", after=first)
        second_run = runs.run_id(second.message_id)
        if strategy == "enqueue":
            # It waits its turn behind the run that waits for the user.
            await stack.queued(first.conversation_id, second_run)
            [request] = await stack.requested(first)
            await stack.decide(request, True)
            await stack.status(first_run, "completed")
            await stack.status(second_run, "completed")
            assert len(mcp_server.executions()) == before + 1
        else:
            # The newer message interrupts the waiting run, which never runs its call.
            await stack.status(first_run, "cancelled")
            await stack.status(second_run, "completed")
            assert "10" in (await stack.answer(second))["content"]
            assert len(mcp_server.executions()) == before


async def test_the_executor_completes_granted_tools_from_the_servers_own_list(
    mcp_server: MCPServerProcess,
) -> None:
    tools = McpTools({"demo": mcp_server.url, "gone": "http://127.0.0.1:9/mcp"})
    bare = m.ToolSpec(name="create_task", server="demo")
    own = m.ToolSpec(name="calculator", description="Ours.", server="demo")
    elsewhere = m.ToolSpec(name="create_task", server="gone")
    completed, kept, unreachable = await tools.complete((bare, own, elsewhere))
    assert completed.description and "title" in completed.input_schema["properties"]
    assert kept == own  # the policy file's own words are sent as written
    assert unreachable == elsewhere  # a server that cannot be asked: as granted
    # Nothing is added: only what was granted goes out.
    assert [t.name for t in await tools.complete((bare,))] == ["create_task"]


async def _results_of(stack: Stack, e: m.UserMessageAccepted) -> list[asyncpg.Record] | None:
    """The run's stored tool results, None while there are none (for ``eventually``)."""
    return (await stack.results(e)) or None
