"""The executor's tool runner against real NATS and baton's real MCP server: each authorized call
runs once, counted on the tool's side, also when a delivery is cut off and redelivered."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.msg import Msg

from baton.mcp_server import MCPServerProcess
from baton.provision import consumer_config, stream_config
from services.executor.tools import McpTools, ToolRunner
from shared import messages as m
from shared import subjects
from shared.bus import Bus, Consumer
from tests.integration.conftest import Infra
from tests.support import connect_bus, eventually, running, service_metrics

ACK_WAIT_S = 1.0  # a cut delivery comes back quickly


@pytest.fixture(scope="module")
def mcp_server() -> Iterator[MCPServerProcess]:
    with MCPServerProcess() as server:
        yield server


@pytest.fixture
async def bus(infra: Infra) -> AsyncIterator[Bus]:
    nc = await nats.connect(infra.nats_url)
    js = nc.jetstream()
    for spec in subjects.TOOL_STREAMS:
        await js.add_stream(stream_config(spec, 120.0, 1))
    for cspec in subjects.TOOL_CONSUMERS:
        await js.add_consumer(cspec.stream, consumer_config(cspec, ACK_WAIT_S))
    await nc.close()
    b = await connect_bus(infra.nats_url, "executor")
    yield b
    await b.close()


def _task(
    tool: str,
    args: Any,
    *,
    idempotent: bool = False,
    timeout_s: float = 10.0,
    run_id: str = "run-1",
    call_id: str = "",
) -> m.ToolTask:
    call = m.ToolCall(
        id=call_id or "toolu_" + uuid.uuid4().hex[:24],
        name=tool,
        input=args,
        input_digest=m.input_digest(args),
    )
    return m.ToolTask(
        event_id=f"tooltask:{m.call_key(run_id, call.id)}",
        message_id=str(uuid.uuid4()),
        conversation_id=str(uuid.uuid4()),
        project_id="p1",
        run_id=run_id,
        user_id="u1",
        round=1,
        call=call,
        server="demo",
        idempotent=idempotent,
        timeout_s=timeout_s,
    )


async def _publish(bus: Bus, t: m.ToolTask, msg_id: str = "") -> None:
    subject = subjects.tool_task(t.project_id, t.conversation_id)
    await bus.publish(subject, t, msg_id=msg_id or t.event_id)


async def _results(
    bus: Bus, call_id: str, at_least: int = 1, run_id: str = "run-1"
) -> list[m.ToolResult]:
    """Every ToolResult of ``call_id`` in ``run_id`` in the stream (waits for ``at_least``)."""

    async def read() -> list[m.ToolResult] | None:
        sub = await bus.js.subscribe("tool.result.>", ordered_consumer=True)
        found: list[m.ToolResult] = []
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=0.3)
                except (TimeoutError, nats.errors.TimeoutError):
                    break
                r = msgspec.json.decode(msg.data, type=m.ToolResult)
                if (r.run_id, r.call_id) == (run_id, call_id):
                    found.append(r)
        finally:
            await sub.unsubscribe()
        return found if len(found) >= at_least else None

    return await eventually(read)


def _runner(bus: Bus, url: str) -> ToolRunner:
    return ToolRunner(bus, McpTools({"demo": url}), service_metrics("executor"))


async def _run_one(bus: Bus, runner: ToolRunner, t: m.ToolTask) -> m.ToolResult:
    await _publish(bus, t)
    consumer = Consumer(bus, subjects.EXECUTOR_TOOLS, m.ToolTask, runner.task)
    async with running(consumer):
        (result,) = await _results(bus, t.call.id)
    return result


async def _fetch(bus: Bus) -> Msg:
    sub = await bus.js.pull_subscribe_bind(
        subjects.EXECUTOR_TOOLS.durable, stream=subjects.EXECUTOR_TOOLS.stream
    )
    while True:
        try:
            (msg,) = await sub.fetch(1, timeout=2)
            return msg
        except (TimeoutError, nats.errors.TimeoutError):
            continue


async def _cut_after_the_side_effect(
    bus: Bus, runner: ToolRunner, server: MCPServerProcess, t: m.ToolTask
) -> None:
    """The first delivery invokes the tool, which executes, and dies before hearing back."""
    before = len(server.executions())
    await _publish(bus, t)
    msg = await _fetch(bus)
    handling = asyncio.create_task(runner.task(t, msg))

    async def executed() -> bool:
        return len(server.executions()) > before

    await eventually(executed)
    handling.cancel()  # like a SIGKILL: no result, no ack; the task is redelivered
    with pytest.raises(asyncio.CancelledError):
        await handling


async def test_an_auto_call_runs_once_and_reports_the_tools_result(
    bus: Bus, mcp_server: MCPServerProcess
) -> None:
    before = len(mcp_server.executions())
    t = _task("create_task", {"title": "call John"})
    result = await _run_one(bus, _runner(bus, mcp_server.url), t)
    assert (result.outcome, result.is_error, result.executions) == ("ok", False, 1)
    assert "call John" in result.content
    assert result.event_id == f"toolresult:run-1:{t.call.id}"
    assert result.input_digest == t.call.input_digest
    runs = mcp_server.executions()[before:]
    assert [e["idempotency_key"] for e in runs] == [""]  # a key only for idempotent tools


async def test_a_redelivered_finished_call_republishes_its_result_without_running(
    bus: Bus, mcp_server: MCPServerProcess
) -> None:
    runner = _runner(bus, mcp_server.url)
    t = _task("create_task", {"title": "water the plants"})
    first = await _run_one(bus, runner, t)
    before = len(mcp_server.executions())
    # The same task again (an ack that was lost, a second publish from a restarted policy).
    await _publish(bus, t, msg_id=f"{t.event_id}:again")
    async with running(Consumer(bus, subjects.EXECUTOR_TOOLS, m.ToolTask, runner.task)):
        await asyncio.sleep(0)  # let it start; the check below waits on the stream
        results = await _results(bus, t.call.id)
    assert results[0] == first
    assert len(mcp_server.executions()) == before


async def test_a_non_idempotent_call_cut_after_it_ran_is_reported_unknown_never_run_again(
    bus: Bus, mcp_server: MCPServerProcess
) -> None:
    runner = _runner(bus, mcp_server.url)
    t = _task("create_task", {"title": "book flights", "reply_after_s": 30})
    before = len(mcp_server.executions())
    await _cut_after_the_side_effect(bus, runner, mcp_server, t)
    async with running(Consumer(bus, subjects.EXECUTOR_TOOLS, m.ToolTask, runner.task)):
        (result,) = await _results(bus, t.call.id)
    assert (result.outcome, result.is_error, result.executions) == ("unknown", True, 0)
    assert "unknown" in result.content and "not run again" in result.content
    assert len(mcp_server.executions()) == before + 1  # counted on the tool's side


async def test_an_idempotent_call_cut_after_it_ran_runs_again_with_its_call_id_as_key(
    bus: Bus, mcp_server: MCPServerProcess
) -> None:
    runner = _runner(bus, mcp_server.url)
    t = _task("create_task", {"title": "pay rent", "reply_after_s": 30}, idempotent=True)
    before = len(mcp_server.executions())
    await _cut_after_the_side_effect(bus, runner, mcp_server, t)
    first = mcp_server.executions()[before]
    assert first["idempotency_key"] == t.call.id  # the call id travels as the key
    async with running(Consumer(bus, subjects.EXECUTOR_TOOLS, m.ToolTask, runner.task)):
        (result,) = await _results(bus, t.call.id)
    assert (result.outcome, result.executions) == ("ok", 1)
    # The server saw the same key and answered with its first execution: nothing ran twice.
    assert first["result"]["task_id"] in result.content
    assert len(mcp_server.executions()) == before + 1


async def test_a_tool_that_hangs_is_cut_at_its_timeout(
    bus: Bus, mcp_server: MCPServerProcess
) -> None:
    t = _task("wait", {"seconds": 60}, timeout_s=0.5)
    result = await _run_one(bus, _runner(bus, mcp_server.url), t)
    assert (result.outcome, result.is_error) == ("timeout", True)
    assert "may have run" in result.content


async def test_a_tool_error_goes_back_as_an_error_result(
    bus: Bus, mcp_server: MCPServerProcess
) -> None:
    t = _task("calculator", {"expression": "1/0"})
    result = await _run_one(bus, _runner(bus, mcp_server.url), t)
    assert (result.outcome, result.is_error) == ("error", True)
    assert "division by zero" in result.content


async def test_arguments_that_do_not_match_their_digest_never_run(
    bus: Bus, mcp_server: MCPServerProcess
) -> None:
    before = len(mcp_server.executions())
    t = _task("create_task", {"title": "approved title"})
    forged = msgspec.structs.replace(
        t, call=msgspec.structs.replace(t.call, input={"title": "something else"})
    )
    result = await _run_one(bus, _runner(bus, mcp_server.url), forged)
    assert (result.outcome, result.executions) == ("invalid", 0)
    assert len(mcp_server.executions()) == before


async def test_an_unreachable_server_is_an_error_that_ran_nothing(
    bus: Bus, mcp_server: MCPServerProcess
) -> None:
    t = _task("create_task", {"title": "nobody listens"}, timeout_s=3)
    result = await _run_one(bus, _runner(bus, "http://127.0.0.1:9/mcp"), t)
    assert (result.outcome, result.executions) == ("error", 0)
    assert "unreachable" in result.content


async def test_a_task_past_its_deadline_is_not_started(
    bus: Bus, mcp_server: MCPServerProcess
) -> None:
    before = len(mcp_server.executions())
    t = _task("create_task", {"title": "too late"})
    late = msgspec.structs.replace(t, deadline=datetime.now(UTC) - timedelta(seconds=1))
    result = await _run_one(bus, _runner(bus, mcp_server.url), late)
    assert (result.outcome, result.executions) == ("timeout", 0)
    assert len(mcp_server.executions()) == before


async def test_a_tool_use_id_repeated_in_another_run_is_another_call(
    bus: Bus, mcp_server: MCPServerProcess
) -> None:
    runner = _runner(bus, mcp_server.url)
    same = "toolu_" + uuid.uuid4().hex[:24]
    before = len(mcp_server.executions())
    one = await _run_one(bus, runner, _task("create_task", {"title": "a"}, call_id=same))
    other = _task("create_task", {"title": "b"}, call_id=same, run_id="run-2")
    await _publish(bus, other)
    async with running(Consumer(bus, subjects.EXECUTOR_TOOLS, m.ToolTask, runner.task)):
        (two,) = await _results(bus, same, run_id="run-2")
    # Never the other run's result, never "unknown" because of it: its own execution.
    assert (one.outcome, two.outcome) == ("ok", "ok")
    assert '"b"' in two.content and two.event_id != one.event_id
    assert [e["result"]["title"] for e in mcp_server.executions()[before:]] == ["a", "b"]
