"""Conversations seen by a client of the whole pipeline: read your writes with the persister stopped."""

from __future__ import annotations

import signal
import time
from typing import Any

import httpx

from tests.e2e.conftest import Pipeline


def _until(check: Any, what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_with_the_persister_stopped_an_accepted_message_is_read_back_at_once(
    pipeline: Pipeline,
) -> None:
    auth = {"Authorization": f"Bearer {pipeline.token('p1', 'u1')}"}
    persister = pipeline.child("persister")
    with httpx.Client(base_url=pipeline.gateway, headers=auth, timeout=10) as http:
        persister.signal(signal.SIGSTOP)  # frozen, not exited: the supervisor does not restart it
        try:
            r = http.post("/api/chat", json={"content": "Hello while nothing stores"})
            assert r.status_code == 202, r.text
            sent = r.json()["message"]
            cid = sent["conversation_id"]
            page = http.get(f"/api/conversations/{cid}/messages")
            assert page.status_code == 200, page.text
            assert [(x["id"], x["pending"]) for x in page.json()["messages"]] == [
                (sent["id"], True)
            ]
            state = http.get(f"/api/conversations/{cid}/state").json()
            assert [x["status"] for x in state["runs"]] == ["pending"]
            meta = http.get(f"/api/conversations/{cid}").json()
            assert (meta["message_count"], meta["pending"]) == (1, True)
        finally:
            persister.signal(signal.SIGCONT)

        def answered() -> list[dict[str, Any]] | None:
            msgs: list[dict[str, Any]] = http.get(f"/api/conversations/{cid}/messages").json()[
                "messages"
            ]
            return msgs if [x["role"] for x in msgs] == ["user", "assistant"] else None

        msgs = _until(answered, "the answer once the persister runs again")
        assert msgs[0]["id"] == sent["id"] and msgs[0]["pending"] is False
        listed = http.get("/api/conversations").json()["conversations"]
        assert [(c["id"], c["message_count"]) for c in listed] == [(cid, 2)]
