"""A tool round through the real executor, persister, MCP server, NATS, Postgres and offline
model (policy's part played by the test: it publishes the tasks policy will publish)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import nats
import pytest

from baton.mcp_server import MCPServerProcess
from baton.offline_model import OfflineModelProcess
from baton.provision import consumer_config, stream_config
from services.executor.adapters import Model
from services.executor.config import Settings
from services.executor.handlers import Handlers as ExecutorHandlers
from services.executor.tools import McpTools, ToolRunner
from services.persister.adapters import Store
from services.persister.conversations import ConversationStore
from services.persister.handlers import Handlers as PersisterHandlers
from shared import messages as m
from shared import model, subjects, wiring
from shared.bus import Bus, Consumer
from shared.db import create_pool
from shared.history import History
from tests.integration.conftest import Infra
from tests.support import (
    connect_bus,
    decode_all,
    eventually,
    lock_waiters_at_least,
    read_subject,
    run_verdict,
    running,
    service_metrics,
    user_event,
)

CREATE_TASK = m.ToolSpec(
    name="create_task",
    description="Create a task or reminder for the user.",
    input_schema={
        "type": "object",
        "properties": {"title": {"type": "string"}},
        "required": ["title"],
    },
    server="demo",
)


@pytest.fixture(scope="module")
def mcp_server() -> Iterator[MCPServerProcess]:
    with MCPServerProcess() as server:
        yield server


@dataclass
class Stack:
    bus: Bus
    pool: asyncpg.Pool
    executor: ExecutorHandlers
    persister: PersisterHandlers
    runner: ToolRunner
    consumers: list[Consumer[Any]]


@pytest.fixture
async def stack(
    infra: Infra, offline_model: OfflineModelProcess, mcp_server: MCPServerProcess
) -> AsyncIterator[Stack]:
    nc = await nats.connect(infra.nats_url)
    js = nc.jetstream()
    for spec in subjects.TOOL_STREAMS:
        await js.add_stream(stream_config(spec, 120.0, 1))
    for cspec in subjects.TOOL_CONSUMERS:
        await js.add_consumer(cspec.stream, consumer_config(cspec))
    await nc.close()
    bus = await connect_bus(infra.nats_url, "tools")
    pool = await create_pool(infra.database_url)
    client = model.client(offline_model.url, "test-key", 30.0)
    executor = ExecutorHandlers(
        bus, History(pool), Model(client), Settings(), service_metrics("executor")
    )
    persister = PersisterHandlers(bus, Store(pool), service_metrics("persister"))
    runner = ToolRunner(bus, McpTools({"demo": mcp_server.url}), service_metrics("executor"))
    consumers: list[Consumer[Any]] = [
        Consumer(bus, wiring.EXECUTOR_TASKS, m.ExecTask, executor.task),
        Consumer(bus, subjects.EXECUTOR_TOOLS, m.ToolTask, runner.task),
        Consumer(bus, wiring.PERSISTER_RESULTS, m.ExecResult, persister.result),
        Consumer(bus, subjects.PERSISTER_TOOL_RESULTS, m.ToolResult, persister.tool_result),
    ]
    yield Stack(bus, pool, executor, persister, runner, consumers)
    await bus.close()
    await pool.close()
    await client.close()


def _exec_task(e: m.UserMessageAccepted, round_: int, tools: tuple[m.ToolSpec, ...]) -> m.ExecTask:
    run_id = f"run-{e.message_id}"
    task_id = f"task:{run_id}:1:{round_}"
    return m.ExecTask(
        event_id=task_id,
        message_id=e.message_id,
        conversation_id=e.conversation_id,
        project_id=e.project_id,
        task_id=task_id,
        run_id=run_id,
        attempt=1,
        model="claude-sonnet-4-6",
        executor="chat",
        max_tokens=512,
        prices=m.Prices(input=3.0, output=15.0),
        deadline=datetime.now(UTC) + timedelta(minutes=5),
        tools=tools,
        round=round_,
    )


def _tool_task(turn: m.ToolTurnPersisted) -> m.ToolTask:
    (call,) = turn.tool_calls
    return m.ToolTask(
        event_id=f"tooltask:{m.call_key(turn.run_id, call.id)}",
        message_id=turn.message_id,
        conversation_id=turn.conversation_id,
        project_id=turn.project_id,
        run_id=turn.run_id,
        user_id=turn.user_id,
        round=turn.round,
        call=call,
        server="demo",
    )


async def _publish(bus: Bus, subject: str, event: Any) -> None:
    await bus.publish(subject, event, msg_id=event.event_id)


async def test_a_tool_round_runs_the_tool_once_and_the_answer_uses_its_result(
    stack: Stack, offline_model: OfflineModelProcess, mcp_server: MCPServerProcess
) -> None:
    bus = stack.bus
    e = user_event("Please remind me to call John tomorrow.")
    await Store(stack.pool).insert_user_message(e)
    p, c = e.project_id, e.conversation_id
    executed_before = len(mcp_server.executions())
    async with running(*stack.consumers):
        # Round 0: the model asks for the tool; the persister stores the turn, not an answer.
        await _publish(bus, subjects.exec_task(p, c), _exec_task(e, 0, (CREATE_TASK,)))
        [first] = decode_all(
            await read_subject(bus, subjects.STREAM_RESULTS, "exec.result.>", 1), m.ExecResult
        )
        assert first.stop_reason == "tool_use"
        [call] = first.tool_calls
        assert (call.name, call.input) == ("create_task", {"title": "call John tomorrow"})
        assert call.id.startswith("toolu_") and call.input_digest == m.input_digest(call.input)
        assert first.usage.input_tokens > 0 and first.usage.output_tokens > 0
        [turn] = decode_all(
            await read_subject(bus, subjects.STREAM_PERSISTED, "chat.persisted.tool_turn.>", 1),
            m.ToolTurnPersisted,
        )
        assert turn.tool_calls == first.tool_calls and turn.call_id == first.call_id
        assert turn.user_id == e.user_id and turn.usage == first.usage  # billed once, so far

        # The tool runs (policy would publish this task for an auto or approved call).
        await _publish(bus, subjects.tool_task(p, c), _tool_task(turn))
        [stored] = decode_all(
            await read_subject(bus, subjects.STREAM_PERSISTED, "chat.persisted.tool_result.>", 1),
            m.ToolResultPersisted,
        )
        assert (stored.result.call_id, stored.result.outcome) == (call.id, "ok")

        # Round 1: the model gets the tool_use and tool_result blocks and answers with text.
        await _publish(bus, subjects.exec_task(p, c), _exec_task(e, 1, (CREATE_TASK,)))
        results = decode_all(
            await read_subject(bus, subjects.STREAM_RESULTS, "exec.result.>", 2), m.ExecResult
        )
        final = next(r for r in results if r.round == 1)
        [answer] = decode_all(
            await read_subject(bus, subjects.STREAM_PERSISTED, "chat.persisted.assistant.>", 1),
            m.AssistantMessagePersisted,
        )

    assert final.stop_reason == "end_turn" and not final.tool_calls
    executions = mcp_server.executions()[executed_before:]
    assert len(executions) == 1  # counted on the tool's side
    assert executions[0]["result"]["task_id"] in final.text
    assert answer.content == final.text and answer.kind == "answer"
    assert answer.usage == m.Usage(
        input_tokens=first.usage.input_tokens + final.usage.input_tokens,
        output_tokens=first.usage.output_tokens + final.usage.output_tokens,
        cache_read_tokens=first.usage.cache_read_tokens + final.usage.cache_read_tokens,
        cache_write_tokens=first.usage.cache_write_tokens + final.usage.cache_write_tokens,
    )
    # What the model was sent in round 1: real Anthropic content blocks.
    body = offline_model.requests()[-1]["body"]
    assert [t["name"] for t in body["tools"]] == ["create_task"]
    user, assistant, results_turn = body["messages"]
    assert user == {"role": "user", "content": e.content}
    assert assistant["content"] == [
        {"type": "tool_use", "id": call.id, "name": "create_task", "input": call.input}
    ]
    [block] = results_turn["content"]
    assert (block["type"], block["tool_use_id"], block["is_error"]) == (
        "tool_result",
        call.id,
        False,
    )
    async with stack.pool.acquire() as con:
        outcomes = await con.fetch(
            "SELECT outcome FROM usage WHERE run_id = $1 ORDER BY created_at", first.run_id
        )
    assert [r["outcome"] for r in outcomes] == ["tool_use", "completed"]


async def test_a_second_model_call_for_the_same_round_never_replaces_the_stored_calls(
    stack: Stack,
) -> None:
    e = user_event("remind me to feed the cat")
    store = Store(stack.pool)
    await store.insert_user_message(e)

    def result(call_id: str, tool_use_id: str) -> m.ExecResult:
        call = m.ToolCall(
            id=tool_use_id,
            name="create_task",
            input={"title": "feed the cat"},
            input_digest=m.input_digest({"title": "feed the cat"}),
        )
        return m.ExecResult(
            event_id=f"result:{call_id}",
            message_id=e.message_id,
            conversation_id=e.conversation_id,
            project_id=e.project_id,
            task_id="task:r:1:0",
            call_id=call_id,
            run_id=f"run-{e.message_id}",
            attempt=1,
            model="claude-sonnet-4-6",
            text="",
            usage=m.Usage(input_tokens=10, output_tokens=5),
            prices=m.Prices(input=3.0, output=15.0),
            stop_reason="tool_use",
            tool_calls=(call,),
        )

    first = await store.store_tool_turn(result("task:r:1:0#1", "toolu_first"))
    # A redelivered task called the model again: new usage, new tool_use ids, same round.
    second = await store.store_tool_turn(result("task:r:1:0#2", "toolu_second"))
    assert first.inserted and not second.inserted
    assert [c.id for c in second.tool_calls] == ["toolu_first"]
    assert second.call_id == "task:r:1:0#1"
    assert second.usage == m.Usage(input_tokens=20, output_tokens=10)  # both calls billed once


async def test_a_stored_turn_names_the_tool_use_ids_of_the_runs_earlier_rounds(
    stack: Stack,
) -> None:
    e = user_event("remind me to water the plants")
    store = Store(stack.pool)
    await store.insert_user_message(e)

    def result(round_: int, *ids: str) -> m.ExecResult:
        value = {"title": "water the plants"}
        calls = tuple(
            m.ToolCall(id=i, name="create_task", input=value, input_digest=m.input_digest(value))
            for i in ids
        )
        return m.ExecResult(
            event_id=f"result:task:r:{round_ + 1}#1",
            message_id=e.message_id,
            conversation_id=e.conversation_id,
            project_id=e.project_id,
            task_id=f"task:r:{round_ + 1}",
            call_id=f"task:r:{round_ + 1}#1",
            run_id=f"run-{e.message_id}",
            attempt=round_ + 1,
            model="claude-sonnet-4-6",
            text="",
            usage=m.Usage(input_tokens=10, output_tokens=5),
            prices=m.Prices(input=3.0, output=15.0),
            stop_reason="tool_use",
            tool_calls=calls,
            round=round_,
        )

    first = await store.store_tool_turn(result(0, "toolu_a", "toolu_b"))
    # A broken model repeats an id of round 0 in round 1: policy reads that from the turn.
    second = await store.store_tool_turn(result(1, "toolu_a", "toolu_c"))
    again = await store.store_tool_turn(result(1, "toolu_a", "toolu_c"))  # a redelivery
    assert first.earlier_call_ids == ()
    assert second.earlier_call_ids == again.earlier_call_ids == ("toolu_a", "toolu_b")


async def test_a_text_only_history_is_read_as_before_when_no_tools_are_offered(
    stack: Stack,
) -> None:
    e = user_event("remind me to call John")
    store = Store(stack.pool)
    await store.insert_user_message(e)
    call = m.ToolCall(id="toolu_x", name="create_task", input={}, input_digest=m.input_digest({}))
    r = m.ExecResult(
        event_id="result:c1",
        message_id=e.message_id,
        conversation_id=e.conversation_id,
        project_id=e.project_id,
        task_id="t",
        call_id="c1",
        run_id=f"run-{e.message_id}",
        attempt=1,
        model="claude-sonnet-4-6",
        text="On it.",
        usage=m.Usage(),
        prices=m.Prices(),
        stop_reason="tool_use",
        tool_calls=(call,),
    )
    await store.store_tool_turn(r)
    history = History(stack.pool)
    plain = await history.upto(e.conversation_id, e.message_id, 50)
    assert [(t.role, t.content, t.blocks) for t in plain] == [("user", e.content, ())]
    with_tools = await history.upto(e.conversation_id, e.message_id, 50, tools=True)
    assert [t.role for t in with_tools] == ["user", "assistant", "user"]
    assert with_tools[1].blocks[0] == {"type": "text", "text": "On it."}
    # No result was recorded: the model is told so, as an error, so the history stays valid.
    [missing] = with_tools[2].blocks
    assert (missing["tool_use_id"], missing["is_error"]) == ("toolu_x", True)


def _round_result(e: m.UserMessageAccepted, call_id: str, round_: int, ask: bool) -> m.ExecResult:
    """A model call of round ``round_`` of the run for ``e``: a tool turn, or a text answer."""
    value = {"title": "feed the dog"}
    calls = (
        (
            m.ToolCall(
                id="toolu_dog", name="create_task", input=value, input_digest=m.input_digest(value)
            ),
        )
        if ask
        else ()
    )
    return m.ExecResult(
        event_id=f"result:{call_id}",
        message_id=e.message_id,
        conversation_id=e.conversation_id,
        project_id=e.project_id,
        task_id=call_id.split("#")[0],
        call_id=call_id,
        run_id=f"run-{e.message_id}",
        attempt=1,
        model="claude-sonnet-4-6",
        text="" if ask else "Done: I will not call anything.",
        usage=m.Usage(input_tokens=10, output_tokens=5),
        prices=m.Prices(input=3.0, output=15.0),
        stop_reason="tool_use" if ask else "end_turn",
        tool_calls=calls,
        round=round_,
    )


async def _outcomes(pool: asyncpg.Pool, run_id: str) -> tuple[int, int, list[str]]:
    turns = await pool.fetchval("SELECT count(*) FROM tool_turns WHERE run_id = $1", run_id)
    replies = await pool.fetchval(
        "SELECT count(*) FROM messages WHERE run_id = $1 AND role = 'assistant'", run_id
    )
    billed = await pool.fetch(
        "SELECT call_id FROM usage WHERE run_id = $1 ORDER BY call_id", run_id
    )
    return turns, replies, [r["call_id"] for r in billed]


async def test_an_answer_from_a_second_call_of_a_round_that_asked_for_tools_is_billed_only(
    stack: Stack,
) -> None:
    """Found by the chaos suite under load: a task's ack was lost in a broker restart, its
    redelivery called the model again for round 0 and answered in text. That answer was stored
    as the run's reply: the run ended, and the stored turn's call never ran or got a result.
    Now the round's first outcome stands; the second call is billed and nothing else."""
    e = user_event("remind me to feed the dog")
    await Store(stack.pool).insert_user_message(e)
    run_id = f"run-{e.message_id}"
    task = f"task:{run_id}:1:0"
    assert await stack.persister.result(_round_result(e, f"{task}#1", 0, ask=True), None) == (
        "tool_turn"
    )
    got = await stack.persister.result(_round_result(e, f"{task}#2", 0, ask=False), None)
    assert got == "superseded"
    assert await _outcomes(stack.pool, run_id) == (1, 0, [f"{task}#1", f"{task}#2"])
    status = await stack.pool.fetchval("SELECT status FROM runs WHERE run_id = $1", run_id)
    assert status != "completed"
    # The answer of the next round (after the tool's result) is the run's reply, as before.
    assert (
        await stack.persister.result(_round_result(e, f"task:{run_id}:1:1#1", 1, ask=False), None)
        == "inserted"
    )
    assert (await _outcomes(stack.pool, run_id))[:2] == (1, 1)


async def test_a_tool_turn_that_comes_after_the_runs_reply_is_billed_only(stack: Stack) -> None:
    """The other order: the round's answer is stored first (the run ended), then a second call
    of the same round asks for a tool. No turn is stored that nothing would ever answer."""
    e = user_event("remind me to walk the dog")
    await Store(stack.pool).insert_user_message(e)
    run_id = f"run-{e.message_id}"
    task = f"task:{run_id}:1:0"
    assert await stack.persister.result(_round_result(e, f"{task}#1", 0, ask=False), None) == (
        "inserted"
    )
    got = await stack.persister.result(_round_result(e, f"{task}#2", 0, ask=True), None)
    assert got == "superseded"
    assert await _outcomes(stack.pool, run_id) == (0, 1, [f"{task}#1", f"{task}#2"])
    # A redelivery of the stored answer is a duplicate, as before.
    again = await stack.persister.result(_round_result(e, f"{task}#1", 0, ask=False), None)
    assert again == "duplicate"


@pytest.mark.parametrize("first", ["turn", "answer"])
async def test_a_turn_and_an_answer_of_one_round_stored_at_the_same_instant_leave_one_outcome(
    stack: Stack, infra: Infra, first: str
) -> None:
    """Two model calls of one round (a redelivered task), one asking for a tool and one
    answering, stored at the same instant: each statement's snapshot is taken before the other
    commits. The round's claim (migrations/0012) keeps one outcome, the one that claimed the
    round first; the other call is billed only. Without the claim, with the turn first, both
    were stored, and the run ended with a tool call nobody would run."""
    e = user_event("remind me to water the plants")
    store = Store(stack.pool)
    await store.insert_user_message(e)
    await store.upsert_run(run_verdict(e, "running"))
    run_id = f"run-{e.message_id}"
    task = f"task:{run_id}:1:0"
    calls = {
        "turn": _round_result(e, f"{task}#1", 0, ask=True),
        "answer": _round_result(e, f"{task}#2", 0, ask=False),
    }
    second = "answer" if first == "turn" else "turn"
    hold = await asyncpg.connect(infra.database_url)
    watch = await asyncpg.connect(infra.database_url)
    try:
        # The run's row, held: the first call's write waits for it mid-way (its claim made),
        # and the second's is started while the first's is still open.
        tx = hold.transaction()
        await tx.start()
        await hold.execute("SELECT 1 FROM runs WHERE run_id = $1 FOR UPDATE", run_id)
        one = asyncio.create_task(stack.persister.result(calls[first], None))
        await eventually(lambda: lock_waiters_at_least(watch, 1), timeout=30)
        two = asyncio.create_task(stack.persister.result(calls[second], None))
        await eventually(lambda: lock_waiters_at_least(watch, 2), timeout=30)
        await tx.rollback()
        outcomes = await asyncio.wait_for(asyncio.gather(one, two), 60)
    finally:
        await hold.close()
        await watch.close()
    stored = {"turn": "tool_turn", "answer": "inserted"}[first]
    assert outcomes == [stored, "superseded"]
    kept = (1, 0) if first == "turn" else (0, 1)
    assert await _outcomes(stack.pool, run_id) == (*kept, [f"{task}#1", f"{task}#2"])
    # The claim goes with the conversation's content.
    claims = "SELECT count(*) FROM round_claims WHERE run_id = $1"
    assert await stack.pool.fetchval(claims, run_id) == 1
    await ConversationStore(stack.pool).delete(
        m.ConversationDeleteRequested(
            event_id=subjects.delete_event_id(e.conversation_id),
            message_id="",
            conversation_id=e.conversation_id,
            project_id=e.project_id,
            user_id=e.user_id,
            requested_by=e.user_id,
            requested_at=datetime.now(UTC),
        )
    )
    assert await stack.pool.fetchval(claims, run_id) == 0


async def test_a_third_call_of_a_round_with_a_stored_turn_and_a_racing_answer_do_not_deadlock(
    stack: Stack, infra: Infra
) -> None:
    """The round's turn is stored; a redelivery asks for tools again (its claim locks the
    committed claim's row) while another call of the round answers. The answer must make its
    claim before it locks anything the turn's transaction needs: made last, it held the
    project's totals while waiting for the claim, and the turn's transaction waited for the
    totals (a deadlock, one write failed). Both finish; the answer is billed only."""
    e = user_event("remind me to call mum")
    store = Store(stack.pool)
    await store.insert_user_message(e)
    await store.upsert_run(run_verdict(e, "running"))
    run_id = f"run-{e.message_id}"
    task = f"task:{run_id}:1:0"
    assert await stack.persister.result(_round_result(e, f"{task}#1", 0, ask=True), None) == (
        "tool_turn"
    )
    hold = await asyncpg.connect(infra.database_url)
    watch = await asyncpg.connect(infra.database_url)
    try:
        tx = hold.transaction()
        await tx.start()
        await hold.execute("SELECT 1 FROM runs WHERE run_id = $1 FOR UPDATE", run_id)
        again = asyncio.create_task(
            stack.persister.result(_round_result(e, f"{task}#2", 0, ask=True), None)
        )
        await eventually(lambda: lock_waiters_at_least(watch, 1), timeout=30)
        answer = asyncio.create_task(
            stack.persister.result(_round_result(e, f"{task}#3", 0, ask=False), None)
        )
        await eventually(lambda: lock_waiters_at_least(watch, 2), timeout=30)
        await tx.rollback()
        outcomes = await asyncio.wait_for(asyncio.gather(again, answer), 60)
    finally:
        await hold.close()
        await watch.close()
    assert outcomes[1] == "superseded"
    billed = [f"{task}#1", f"{task}#2", f"{task}#3"]
    assert await _outcomes(stack.pool, run_id) == (1, 0, billed)


async def test_a_redelivered_calls_history_leaves_out_its_own_rounds_stored_turn(
    stack: Stack,
) -> None:
    """The history a round's call is given holds the run's earlier rounds only: a second call
    of round 0 sees what the first saw, not round 0's stored turn with no results."""
    e = user_event("remind me to feed the fish")
    await Store(stack.pool).insert_user_message(e)
    run_id = f"run-{e.message_id}"
    assert (
        await stack.persister.result(_round_result(e, f"task:{run_id}:1:0#1", 0, ask=True), None)
        == "tool_turn"
    )
    history = History(stack.pool)
    args = (e.conversation_id, e.message_id, 20)
    own = await history.upto(*args, tools=True, before=(run_id, 0))
    later = await history.upto(*args, tools=True, before=(run_id, 1))
    everything = await history.upto(*args, tools=True)
    assert [t.role for t in own] == ["user"]
    assert [t.role for t in later] == [t.role for t in everything] == ["user", "assistant", "user"]
