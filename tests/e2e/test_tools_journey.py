"""A typical journey with tools, as a client lives it over HTTP: five services as processes, the
shipped MCP server, real NATS and Postgres, the offline model (no key).

One "auto" tool (``current_time``) answers without asking; one "ask" tool (``create_task``)
puts the run in ``requires_action``, shows ``tool.requested`` on SSE, is approved through
``POST …/tool-approvals``, runs once on the MCP server's side, and the answer uses its result.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from baton import permissions
from baton.embedded import NatsServer
from baton.mcp_server import MCPServerProcess
from tests.e2e.conftest import Pipeline, _running

pytestmark = pytest.mark.e2e

POLICY = """
[defaults.tools]
max_rounds = 3
approval_timeout_s = 300

[defaults.tools.servers.demo]
url = "{url}"

[defaults.tools.servers.demo.tools.current_time]
approval = "auto"
idempotent = true

[defaults.tools.servers.demo.tools.create_task]
approval = "ask"
idempotent = false
per_user_daily = 10
"""


@contextlib.contextmanager
def tool_stack(
    database_url: str, base: Path, secure: bool
) -> Iterator[tuple[Pipeline, MCPServerProcess]]:
    """The five services with the demo MCP server in the policy file and the executor's
    allow-list; ``secure``: each service as its own NATS user and database role."""
    passwords = permissions.new_passwords() if secure else None
    config = permissions.authorization(passwords) if passwords else None
    nats = NatsServer(base / "nats", config_text=config)
    with MCPServerProcess() as mcp:
        policy = base / "policy.toml"
        policy.write_text(POLICY.format(url=mcp.url))
        extra = {
            "BATON_POLICY_FILE": str(policy),
            "EXECUTOR_MCP_SERVERS": json.dumps({"demo": mcp.url}),
        }
        nats.start()
        try:
            with _running(
                nats.url, database_url, base / "logs", extra=extra, passwords=passwords
            ) as p:
                yield p, mcp
        finally:
            nats.stop()


@pytest.fixture(params=["plain", "least-privilege"])
def journey(
    request: pytest.FixtureRequest, database_url: str, tmp_path: Path
) -> Iterator[tuple[Pipeline, MCPServerProcess]]:
    with tool_stack(database_url, tmp_path, secure=request.param == "least-privilege") as s:
        yield s


@pytest.fixture
def tools(database_url: str, tmp_path: Path) -> Iterator[tuple[Pipeline, MCPServerProcess]]:
    with tool_stack(database_url, tmp_path, secure=False) as s:
        yield s


class Events:
    """A conversation's SSE stream read in a thread: every (event, id, data) in order."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.url, self.headers = url, headers
        self.got: list[tuple[str, str, dict[str, Any]]] = []
        self.open = threading.Event()
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.open.wait(15)

    def _run(self) -> None:
        with (
            httpx.Client(timeout=None) as client,
            client.stream("GET", self.url, headers=self.headers) as resp,
        ):
            self.open.set()
            event, ident, data = "", "", ""
            for line in resp.iter_lines():
                if self.stop:
                    return
                if not line:
                    if event:
                        self.got.append((event, ident, json.loads(data)))
                    event, ident, data = "", "", ""
                    continue
                field, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if field == "event":
                    event = value
                elif field == "id":
                    ident = value
                elif field == "data":
                    data += value

    def wait_for(self, event: str, run_id: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e, _, data in list(self.got):
                if e == event and data.get("run_id") == run_id:
                    return data
            time.sleep(0.05)
        raise AssertionError(f"no {event} for {run_id}; got {[e for e, _, _ in self.got]}")


def test_one_auto_and_one_ask_tool_the_user_approves_over_http(
    journey: tuple[Pipeline, MCPServerProcess],
) -> None:
    p, mcp = journey
    auth = {"Authorization": f"Bearer {p.token('acme', 'dana')}"}
    api = httpx.Client(base_url=p.gateway, headers=auth, timeout=10)
    first = api.post("/api/chat", json={"content": "What time is it in Berlin?"})
    assert first.status_code == 202, first.text
    cid = first.json()["message"]["conversation_id"]
    events = Events(f"{p.gateway}/api/conversations/{cid}/events?last_event_id=x", auth)
    try:
        # The auto tool: no question, a result, an answer that uses it.
        auto_run = f"run-{first.json()['message']['id']}"
        auto_result = events.wait_for("tool.result", auto_run)
        assert (auto_result["tool"], auto_result["outcome"]) == ("current_time", "ok")
        answer = events.wait_for("message.completed", auto_run)
        assert auto_result["content"] in answer["content"]
        assert not [
            e for e, _, d in events.got if e == "tool.requested" and d["run_id"] == auto_run
        ]

        # The ask tool: requires_action, tool.requested, the approval, one execution.
        second = api.post(
            "/api/chat", json={"content": "Please remind me to call John.", "conversation_id": cid}
        )
        assert second.status_code == 202
        run_id = f"run-{second.json()['message']['id']}"
        requested = events.wait_for("tool.requested", run_id)
        assert requested["tool"] == "create_task" and requested["server"] == "demo"
        assert requested["arguments"]["title"] == "call John"
        status = next(
            d
            for e, _, d in _until(events, "run.status", run_id, "requires_action")
            if e == "run.status"
        )
        assert status["status"] == "requires_action"
        state = api.get(f"/api/conversations/{cid}/state").json()
        [run] = [r for r in state["runs"] if r["run_id"] == run_id]
        assert [c["tool_call_id"] for c in run["pending_tool_calls"]] == [requested["tool_call_id"]]
        assert mcp.executions() == []  # nothing ran before the approval

        decision = {
            "tool_call_id": requested["tool_call_id"],
            "approve": True,
            "input_digest": requested["input_digest"],
        }
        path = f"/api/conversations/{cid}/runs/{run_id}/tool-approvals"
        ok = api.post(path, json={"decisions": [decision]})
        assert ok.status_code == 202, ok.text
        # A repeat is a duplicate; another answer never replaces the first.
        again = api.post(path, json={"decisions": [decision]})
        assert again.status_code == 202 and again.json()["decisions"][0]["duplicate"] is True
        other = api.post(path, json={"decisions": [{**decision, "approve": False}]})
        assert other.status_code == 409

        result = events.wait_for("tool.result", run_id)
        assert (result["tool"], result["outcome"], result["is_error"]) == (
            "create_task",
            "ok",
            False,
        )
        final = events.wait_for("message.completed", run_id)
        task = json.loads(result["content"])
        assert task["title"] == "call John" and task["task_id"] in final["content"]
        executions = mcp.executions()
        assert len(executions) == 1, executions
        assert task["task_id"] in json.dumps(executions[0])
        state = api.get(f"/api/conversations/{cid}/state").json()
        [run] = [r for r in state["runs"] if r["run_id"] == run_id]
        assert run["status"] == "completed" and run["pending_tool_calls"] == []
    finally:
        events.stop = True
        api.close()


def _until(
    events: Events, event: str, run_id: str, status: str, timeout: float = 30
) -> list[tuple[str, str, dict[str, Any]]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hits = [
            x
            for x in list(events.got)
            if x[0] == event and x[2].get("run_id") == run_id and x[2].get("status") == status
        ]
        if hits:
            return hits
        time.sleep(0.05)
    raise AssertionError(f"no {event} {status} for {run_id}")


def _chat(p: Pipeline, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    token = p.token("acme", "erin")
    return subprocess.run(
        [sys.executable, "-m", "baton", "chat", "--url", p.gateway, "--token", token, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=90,
    )


def test_baton_chat_asks_y_n_and_yes_approves_without_asking(
    tools: tuple[Pipeline, MCPServerProcess],
) -> None:
    p, mcp = tools
    denied = _chat(p, "Please", "remind", "me", "to", "water", "plants.", stdin="n\n")
    assert denied.returncode == 0, denied.stderr
    assert "[tool call] create_task (demo)" in denied.stderr
    assert "approve? [y/N]" in denied.stderr
    assert mcp.executions() == []
    asked = _chat(p, "Please", "remind", "me", "to", "call", "Mary.", stdin="y\n")
    assert asked.returncode == 0, asked.stderr
    assert "approve? [y/N]" in asked.stderr and "[tool create_task: ok]" in asked.stderr
    assert [e["result"]["title"] for e in mcp.executions()] == ["call Mary"]
    yes = _chat(p, "--yes", "Please", "remind", "me", "to", "call", "Bob.")
    assert yes.returncode == 0, yes.stderr
    assert "approve? [y/N]" not in yes.stderr and "[approved: --yes]" in yes.stderr
    titles = [e["result"]["title"] for e in mcp.executions()]
    assert titles == ["call Mary", "call Bob"]
    assert "Done. The tool said:" in yes.stdout
