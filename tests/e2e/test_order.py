"""Per-conversation order (I6): messages sent together are answered one at a time, in order."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from tests.e2e.conftest import SETTLE_S, Pipeline

pytestmark = pytest.mark.e2e


def test_quick_messages_in_one_conversation_never_run_at_once_and_each_sees_earlier_answers(
    pipeline: Pipeline,
) -> None:
    auth = {"Authorization": f"Bearer {pipeline.token('acme', 'alice')}"}
    cid = str(uuid.uuid4())
    sent = []
    for i in range(3):
        r = httpx.post(
            f"{pipeline.gateway}/api/chat",
            json={"conversation_id": cid, "content": f"Question number {i + 1}, please?"},
            headers={**auth, "Idempotency-Key": f"{cid}-{i}"},
        )
        assert r.status_code == 202
        sent.append(r.json()["message"]["id"])
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        r = httpx.get(f"{pipeline.gateway}/api/conversations/{cid}/state", headers=auth)
        runs = r.json()["runs"] if r.status_code == 200 else []
        if len(runs) == 3 and all(x["status"] == "completed" and x["verdict"] for x in runs):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"not all answered\n{pipeline.log_tail()}")
    # One conversation, one run at a time: the answer model never had two of its calls open.
    assert pipeline.model.stats()["max_in_flight"]["claude-sonnet-4-6"] == 1
    msgs = httpx.get(f"{pipeline.gateway}/api/conversations/{cid}/messages", headers=auth).json()
    answers = [x for x in msgs["messages"] if x["role"] == "assistant"]
    # Answered in the order they were sent, though the agent classified them concurrently.
    assert [a["run_id"] for a in answers] == [f"run-{mid}" for mid in sent]
    assert [a["created_at"] for a in answers] == sorted(a["created_at"] for a in answers)
    # Each run started after the previous answer existed: its prompt carried that answer.
    by_run = {x["run_id"]: x["usage"]["input_tokens"] for x in runs}
    inputs = [by_run[f"run-{mid}"] for mid in sent]
    assert inputs[1] >= inputs[0] + 20 and inputs[2] >= inputs[1] + 20, inputs
