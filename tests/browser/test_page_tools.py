"""The chat page's tool calls in a real headless Chromium: the shipped MCP server, one "ask" tool
(``create_task``), the offline model asking for it; Approve / Deny on the page (issue 18)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from baton.embedded import PostgresServer, create_database
from baton.mcp_server import MCPServerProcess
from tests.browser.conftest import Page, fresh
from tests.browser.test_page import answered, conversation_of, send
from tests.conftest import ExternalPostgres, _drop_database
from tests.e2e.conftest import Pipeline
from tests.e2e.test_tools_journey import tool_stack

pytestmark = [pytest.mark.browser, pytest.mark.e2e]


@pytest.fixture(scope="module")
def _tool_stack(
    postgres_server: PostgresServer | ExternalPostgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Pipeline, MCPServerProcess]]:
    """The five services with the demo MCP server in policy, once for the module."""
    admin_dsn = postgres_server.dsn()
    name = f"baton_test_{uuid.uuid4().hex}"
    database_url = asyncio.run(create_database(admin_dsn, name))
    try:
        with tool_stack(database_url, tmp_path_factory.mktemp("browser-tools"), False) as s:
            yield s
    finally:
        asyncio.run(_drop_database(admin_dsn, name))


@pytest.fixture
def pipeline(_tool_stack: tuple[Pipeline, MCPServerProcess]) -> Pipeline:
    return fresh(_tool_stack[0])


@pytest.fixture
def mcp(_tool_stack: tuple[Pipeline, MCPServerProcess]) -> MCPServerProcess:
    return _tool_stack[1]


def ran(mcp: MCPServerProcess, title: str) -> list[dict[str, Any]]:
    """The MCP server's own ledger: the executions of create_task with this title."""
    return [e for e in mcp.executions() if e["result"]["title"] == title]


def card(page: Page) -> dict[str, Any] | None:
    """The tool call on screen, once it shows its Approve / Deny buttons."""
    found: dict[str, Any] | None = page.js(
        """const li = document.querySelector('#messages li.tool[data-state=pending]');
           if (!li) return null;
           return {call: li.dataset.call, digest: li.dataset.digest, source: li.dataset.from,
                   heading: li.querySelector('.text').textContent,
                   args: li.querySelector('.args').textContent,
                   buttons: [...li.querySelectorAll('.decide button')].map(b => ({
                     text: b.textContent, label: b.getAttribute('aria-label'),
                     disabled: b.disabled}))}"""
    )
    return found


def result(page: Page) -> dict[str, str] | None:
    found: dict[str, str] | None = page.js(
        """const li = document.querySelector('#messages li.tool[data-state=answered]');
           return li && {outcome: li.dataset.outcome,
                         heading: li.querySelector('.text').textContent,
                         content: li.querySelector('.result').textContent}"""
    )
    return found


def pending(p: Pipeline, token: str, cid: str) -> list[dict[str, Any]]:
    r = httpx.get(
        f"{p.gateway}/api/conversations/{cid}/state",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    r.raise_for_status()
    return [c for run in r.json()["runs"] for c in run["pending_tool_calls"]]


def count_approvals(page: Page) -> None:
    """Count the page's POSTs to the approvals route (window.__approvals)."""
    page.js(
        """window.__approvals = 0; const f = window.fetch;
           window.fetch = (u, o) => { if (/tool-approvals$/.test(u)) window.__approvals++;
                                      return f(u, o); };"""
    )


def test_approve_runs_the_tool_once_and_the_answer_appears(
    pipeline: Pipeline, page: Page, mcp: MCPServerProcess
) -> None:
    from selenium.webdriver.common.by import By

    token = pipeline.token("acme", "tina")
    page.open(token)
    page.wait("sign-in", lambda: page.text("who") == "Signed in.")
    send(page, "Please remind me to call John.")
    cid = conversation_of(page)
    shown = page.wait("the pending tool call", lambda: card(page))
    assert shown["heading"] == "create_task on demo"
    assert json.loads(shown["args"]) == {"title": "call John"}
    assert "\n" in shown["args"]  # indented JSON, readable
    assert [(b["text"], b["label"]) for b in shown["buttons"]] == [
        ("Approve", "Approve tool call create_task on demo"),
        ("Deny", "Deny tool call create_task on demo"),
    ]
    page.wait("the status", lambda: "approval" in page.text("status"))
    [waiting] = pending(pipeline, token, cid)
    assert (shown["call"], shown["digest"]) == (waiting["tool_call_id"], waiting["input_digest"])
    assert ran(mcp, "call John") == []
    page.screenshot("pending")

    # A reload while the call waits shows it again (from /state), with the same digest.
    page.driver.refresh()
    again = page.wait("the pending tool call after a reload", lambda: card(page))
    assert (again["call"], again["digest"]) == (shown["call"], shown["digest"])
    assert (shown["source"], again["source"]) == ("tool.requested", "state")
    assert page.js("return document.querySelectorAll('#messages li.tool').length") == 1

    count_approvals(page)
    page.driver.find_element(By.CSS_SELECTOR, "li.tool button.approve").click()
    got = page.wait("the tool result", lambda: result(page))
    assert got["outcome"] == "ok"
    task = json.loads(got["content"])
    assert task["title"] == "call John"
    final = page.wait("the answer", lambda: answered(page))
    assert task["task_id"] in final["text"]
    assert len(ran(mcp, "call John")) == 1
    assert page.js("return window.__approvals") == 1
    assert page.js("return document.getElementById('error').hidden") is True
    assert pending(pipeline, token, cid) == []


def test_deny_by_keyboard_runs_nothing_and_the_model_is_told(
    pipeline: Pipeline, page: Page, mcp: MCPServerProcess
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    token = pipeline.token("acme", "uma")
    page.open(token)
    page.wait("sign-in", lambda: page.text("who") == "Signed in.")
    send(page, "Please remind me to water the plants.")
    page.wait("the pending tool call", lambda: card(page))
    deny = page.driver.find_element(By.CSS_SELECTOR, "li.tool button.deny")
    box = page.driver.find_element(By.ID, "content")
    assert page.driver.switch_to.active_element == box  # the card takes no focus by itself
    box.send_keys(Keys.SHIFT, Keys.TAB)  # from the message box back to the card's buttons
    assert page.driver.switch_to.active_element == deny
    deny.send_keys(Keys.ENTER)  # a real button: Enter works, no mouse needed
    got = page.wait("the refusal's result", lambda: result(page))
    assert got["outcome"] == "denied"
    assert got["heading"] == "create_task on demo"  # the result keeps what was asked
    final = page.wait("the answer", lambda: answered(page))
    assert got["content"] in final["text"]  # the model read that the user said no
    assert ran(mcp, "water the plants") == []
    page.screenshot("denied")


def test_a_double_click_on_approve_makes_one_decision(
    pipeline: Pipeline, page: Page, mcp: MCPServerProcess
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    token = pipeline.token("acme", "vera")
    page.open(token)
    page.wait("sign-in", lambda: page.text("who") == "Signed in.")
    send(page, "Please remind me to buy milk.")
    page.wait("the pending tool call", lambda: card(page))
    count_approvals(page)
    approve = page.driver.find_element(By.CSS_SELECTOR, "li.tool button.approve")
    ActionChains(page.driver).double_click(approve).perform()
    page.wait("the tool result", lambda: result(page))
    page.wait("the answer", lambda: answered(page))
    assert page.js("return window.__approvals") == 1
    assert len(ran(mcp, "buy milk")) == 1
    assert page.js("return document.getElementById('error').hidden") is True


def test_a_refused_decision_says_why_and_a_reload_asks_again(
    pipeline: Pipeline, page: Page, mcp: MCPServerProcess
) -> None:
    """A 409 (here: a digest other than the request's, as a stale page would send) is shown,
    the card stops offering buttons, nothing runs, and a reload shows the call from /state."""
    from selenium.webdriver.common.by import By

    token = pipeline.token("acme", "wes")
    page.open(token)
    page.wait("sign-in", lambda: page.text("who") == "Signed in.")
    send(page, "Please remind me to feed the cat.")
    cid = conversation_of(page)
    shown = page.wait("the pending tool call", lambda: card(page))
    page.js("document.querySelector('li.tool').dataset.digest = 'f'.repeat(64)")
    page.driver.find_element(By.CSS_SELECTOR, "li.tool button.approve").click()
    error = page.wait("the refusal", lambda: page.text("error") or None)
    assert error.startswith("Not approved:") and "other arguments" in error
    outcome = page.js("return document.querySelector('li.tool .outcome').textContent")
    assert outcome.startswith("Not decided:") and "Reload" in outcome
    assert page.js("return document.querySelectorAll('li.tool .decide button').length") == 0
    page.screenshot("refused")
    [waiting] = pending(pipeline, token, cid)  # nothing was decided
    assert waiting["input_digest"] == shown["digest"]
    assert ran(mcp, "feed the cat") == []

    page.driver.refresh()
    again = page.wait("the pending tool call after a reload", lambda: card(page))
    assert (again["digest"], again["source"]) == (shown["digest"], "state")
    page.driver.find_element(By.CSS_SELECTOR, "li.tool button.deny").click()
    assert page.wait("the refusal's result", lambda: result(page))["outcome"] == "denied"
    assert ran(mcp, "feed the cat") == []
