"""baton's demo MCP server through the official mcp client over streamable HTTP: its tools, the
executions it records, and the idempotency key it honours (also across a restart)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mcp import Client

from baton.mcp_server import MCPServerProcess

REPO = str(Path(__file__).resolve().parents[2])  # the stdio child imports this checkout


@pytest.fixture
def server() -> Iterator[MCPServerProcess]:
    with MCPServerProcess() as s:
        yield s


async def test_it_lists_a_read_only_and_a_side_effecting_tool(server: MCPServerProcess) -> None:
    assert server.url.startswith("http://127.0.0.1:") and server.url.endswith("/mcp")
    async with Client(server.url) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert {"current_time", "calculator", "create_task"} <= set(tools)
    assert tools["create_task"].input_schema["required"] == ["title"]


async def test_read_only_tools_answer_and_record_nothing(server: MCPServerProcess) -> None:
    async with Client(server.url) as client:
        now = await client.call_tool("current_time", {"timezone": "Europe/Berlin"})
        sum_ = await client.call_tool("calculator", {"expression": "(2 + 3) * 4"})
        bad = await client.call_tool("calculator", {"expression": "__import__('os')"})
    assert not now.is_error and "+01:00" in now.content[0].text  # type: ignore[union-attr]
    assert sum_.content[0].text == "20"  # type: ignore[union-attr]
    assert bad.is_error
    assert server.executions() == []


async def test_create_task_records_every_execution(server: MCPServerProcess) -> None:
    async with Client(server.url) as client:
        for _ in range(2):
            r = await client.call_tool("create_task", {"title": "call John"})
            assert not r.is_error
    runs = server.executions()
    assert [e["result"]["title"] for e in runs] == ["call John", "call John"]
    assert runs[0]["result"]["task_id"] != runs[1]["result"]["task_id"]  # two executions


async def test_the_same_idempotency_key_gives_the_same_result_and_no_second_execution(
    server: MCPServerProcess,
) -> None:
    meta = {"idempotency_key": "toolu_abc"}
    async with Client(server.url) as client:
        first = await client.call_tool("create_task", {"title": "pay rent"}, meta=meta)  # type: ignore[arg-type]
        again = await client.call_tool("create_task", {"title": "pay rent"}, meta=meta)  # type: ignore[arg-type]
    assert first.structured_content == again.structured_content
    assert len(server.executions()) == 1
    server.stop()
    server.start()  # the ledger is the memory of keys: a restart keeps it
    async with Client(server.url) as client:
        after = await client.call_tool("create_task", {"title": "pay rent"}, meta=meta)  # type: ignore[arg-type]
    assert after.structured_content == first.structured_content
    assert len(server.executions()) == 1


async def test_baton_mcp_command_serves_on_the_port_it_is_given(tmp_path: object) -> None:
    import asyncio
    import sys

    from baton.embedded import free_port

    port = free_port()
    ledger = Path(str(tmp_path)) / "ledger.jsonl"
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "baton"), "mcp", "--port", str(port), "--ledger", str(ledger),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert f"http://127.0.0.1:{port}/mcp" in line.decode()
        async with Client(f"http://127.0.0.1:{port}/mcp") as client:
            await client.call_tool("create_task", {"title": "from the CLI"})
        assert "from the CLI" in ledger.read_text()
    finally:
        proc.terminate()
        await proc.wait()


async def test_a_stdio_server_is_called_through_the_executors_client(tmp_path: object) -> None:
    import sys

    from baton.mcp_server import read_ledger
    from services.executor.tools import McpTools

    ledger = Path(str(tmp_path)) / "ledger.jsonl"
    command = [sys.executable, "-m", "baton.mcp_server", "--stdio", "--ledger", str(ledger)]
    tools = McpTools({"local": command}, {"local": {"PYTHONPATH": REPO}})
    is_error, text = await tools.call("local", "create_task", {"title": "over stdio"}, "k-1", 30)
    again = await tools.call("local", "create_task", {"title": "over stdio"}, "k-1", 30)
    assert not is_error and "over stdio" in text
    assert again == (False, text)  # a new process, the same key: the ledger answers
    assert [e["idempotency_key"] for e in read_ledger(ledger)] == ["k-1"]


async def test_a_slow_server_start_does_not_eat_the_tools_timeout(tmp_path: object) -> None:
    """``timeout_s`` bounds the tool's answer, not the server's start: a stdio server that
    takes two seconds to come up still answers a 1 s tool in time (it was "unreachable"
    before, when the start counted against the tool's budget), and a tool that hangs past its
    timeout_s is a timeout however slowly the server started."""
    import sys

    from services.executor.tools import McpTools

    ledger = Path(str(tmp_path)) / "ledger.jsonl"
    serve = f"{sys.executable} -m baton.mcp_server --stdio --ledger {ledger}"
    tools = McpTools(
        {"slow": ["/bin/sh", "-c", f"sleep 2; exec {serve}"]}, {"slow": {"PYTHONPATH": REPO}}
    )
    is_error, text = await tools.call("slow", "current_time", {"timezone": "UTC"}, "", 1.0)
    assert not is_error and text
    with pytest.raises(TimeoutError):
        await tools.call("slow", "wait", {"seconds": 5}, "", 1.0)
