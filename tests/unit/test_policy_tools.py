"""The tools section of the policy file: MCP servers, offered tools, approval modes, limits."""

from __future__ import annotations

import pytest

from services.policy.policyfile import PolicyFileError, parse

GOOD = b"""
[defaults.tools]
max_rounds = 4
approval_timeout_s = 120

[defaults.tools.servers.demo]
url = "http://127.0.0.1:8765/mcp"

[defaults.tools.servers.demo.tools.create_task]
approval = "ask"
per_user_daily = 10
timeout_s = 15

[defaults.tools.servers.demo.tools.current_time]
approval = "auto"
idempotent = true

[defaults.tools.servers.demo.tools.calculator]
approval = "deny"

[projects.acme.tools]
max_rounds = 2

[projects.acme.tools.servers.local]
command = ["python", "-m", "some_mcp_server"]
env = { MODE = "test" }

[projects.acme.tools.servers.local.tools.search_flights]
approval = "auto"
per_user_daily = 10
description = "Search flights."
input_schema = { type = "object", properties = { to = { type = "string" } } }
"""


def test_tools_are_read_per_project_with_their_rules() -> None:
    book = parse(GOOD)
    other = book.tools_for("someone-else")
    assert (other.max_rounds, other.approval_timeout_s) == (4, 120.0)
    assert other.servers["demo"].url == "http://127.0.0.1:8765/mcp"
    rule = other.tools["create_task"].rule
    assert (rule.approval, rule.idempotent, rule.per_user_daily, rule.timeout_s) == (
        "ask",
        False,
        10,
        15.0,
    )
    assert other.tools["current_time"].rule.idempotent is True
    assert other.tools["create_task"].server == "demo"


def test_deny_tools_are_never_offered() -> None:
    offered = [t.name for t in parse(GOOD).tools_for("x").offered()]
    assert offered == ["create_task", "current_time"]


def test_a_project_merges_onto_the_defaults_servers_by_name() -> None:
    acme = parse(GOOD).tools_for("acme")
    assert acme.max_rounds == 2 and acme.approval_timeout_s == 120.0
    assert set(acme.servers) == {"demo", "local"}
    assert acme.servers["local"].command == ["python", "-m", "some_mcp_server"]
    flights = acme.tools["search_flights"].rule
    assert flights.description == "Search flights." and flights.input_schema is not None


def test_no_tools_section_means_no_tools() -> None:
    book = parse(b"")
    assert book.tools_for("any").tools == {} and book.tools_for("any").offered() == []
    assert book.tools_for("any").max_rounds == 5


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            b'[defaults.tools.servers.demo]\nurl = "http://a/mcp"\n'
            b'[defaults.tools.servers.demo.tools.create_task]\napproval = "maybe"\n',
            "key 'defaults.tools.servers.demo.tools.create_task.approval' (line 4)",
        ),
        (
            b'[defaults.tools.servers.demo]\nurl = "http://a/mcp"\ncommand = ["x"]\n',
            "tools.servers.demo: give exactly one of url (streamable HTTP) or command (stdio)",
        ),
        (
            b"[defaults.tools.servers.demo]\n",
            "tools.servers.demo: give exactly one of url",
        ),
        (
            b'[defaults.tools.servers.demo]\nurl = "ftp://a"\n',
            "key 'defaults.tools.servers.demo.url' (line 2)",
        ),
        (
            b'[defaults.tools.servers.demo]\nurl = "http://a"\nenv = { A = "1" }\n',
            "tools.servers.demo.env: only a stdio command has an environment",
        ),
        (b"[defaults.tools]\nmax_rounds = 101\n", "key 'defaults.tools.max_rounds' (line 2)"),
        (b"[defaults.tools]\napproval_timeout_s = 0\n", "defaults.tools.approval_timeout_s"),
        (
            b'[defaults.tools.servers.demo]\nurl = "http://a"\n'
            b"[defaults.tools.servers.demo.tools.t]\ntimeout_s = -1\n",
            "defaults.tools.servers.demo.tools.t.timeout_s",
        ),
        (
            b'[defaults.tools.servers.demo]\nurl = "http://a"\n'
            b"[defaults.tools.servers.demo.tools.t]\nper_user_daily = -1\n",
            "defaults.tools.servers.demo.tools.t.per_user_daily",
        ),
        (
            b'[defaults.tools.servers.demo]\nurl = "http://a"\n'
            b"[defaults.tools.servers.demo.tools.t]\nmystery = 1\n",
            "defaults.tools.servers.demo.tools.t.mystery",
        ),
        (
            b'[defaults.tools.servers.a]\nurl = "http://a"\n[defaults.tools.servers.a.tools.t]\n'
            b'[defaults.tools.servers.b]\nurl = "http://b"\n[defaults.tools.servers.b.tools.t]\n',
            "tools.servers.b.tools.t: tool 't' is also offered by server 'a'",
        ),
        (
            b'[defaults.tools.servers.a]\nurl = "http://a"\n[defaults.tools.servers.a.tools.t]\n'
            b'input_schema = { type = "string" }\n',
            'must be a JSON Schema with type "object"',
        ),
        (
            b'[projects.acme.tools.servers.x]\nurl = "http://a"\n'
            b'[projects.acme.tools.servers.x.tools.t]\napproval = "never"\n',
            "[projects.acme] key 'projects.acme.tools.servers.x.tools.t.approval'",
        ),
    ],
)
def test_bad_tool_settings_are_refused_with_the_key_that_is_wrong(text: bytes, error: str) -> None:
    with pytest.raises(PolicyFileError) as caught:
        parse(text, "policy.toml")
    assert error in str(caught.value)
    assert str(caught.value).startswith("policy.toml: ")


def test_the_commented_tools_example_in_policy_example_toml_is_valid() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "policy.example.toml").read_text()
    start = text.index("# [defaults.tools]")
    body = "\n".join(
        line[2:] if line.startswith("# ") else "" if line == "#" else line
        for line in text[start:].splitlines()
    )
    offered = parse(body.encode()).tools_for("demo").offered()
    assert [t.name for t in offered] == ["current_time", "calculator", "create_task"]
