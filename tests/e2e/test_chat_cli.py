"""`baton chat` as a person uses it: the answer streams to the terminal and is the stored one."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from tests.e2e.conftest import Pipeline

pytestmark = pytest.mark.e2e


def _chat(p: Pipeline, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    token = p.token("acme", "carol")
    return subprocess.run(
        [sys.executable, "-m", "baton", "chat", "--url", p.gateway, "--token", token, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_baton_chat_prints_the_streamed_answer_and_continues_a_conversation(
    pipeline: Pipeline,
) -> None:
    pipeline.model.update_settings(tokens_per_second=60)
    first = _chat(pipeline, "What", "is", "a", "stream?")
    assert first.returncode == 0, first.stderr
    cid = first.stderr.split("conversation ", 1)[1].split()[0]
    # Continue it from stdin, one message per line.
    more = _chat(pipeline, "--conversation", cid, stdin="And a consumer?\nThanks!\n")
    assert more.returncode == 0, more.stderr
    auth = {"Authorization": f"Bearer {pipeline.token('acme', 'carol')}"}
    msgs = httpx.get(f"{pipeline.gateway}/api/conversations/{cid}/messages", headers=auth).json()
    answers = [m["content"] for m in msgs["messages"] if m["role"] == "assistant"]
    assert [m["content"] for m in msgs["messages"] if m["role"] == "user"] == [
        "What is a stream?",
        "And a consumer?",
        "Thanks!",
    ]
    # What the terminal showed is exactly what was stored, answer by answer.
    assert first.stdout == answers[0] + "\n"
    assert more.stdout == answers[1] + "\n" + answers[2] + "\n"


def test_baton_chat_without_a_gateway_says_what_to_do(tmp_path: object) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "baton", "chat", "--data-dir", "/nonexistent", "hi"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 2
    assert "baton up" in r.stderr
