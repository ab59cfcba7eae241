"""One request id, found in the log lines of all five services (issue 17).

The client's ``X-Request-ID`` rides on the accepted message and every event that descends
from it (``Event.request_id``, stamped by the bus), and each consumer binds it to its lines.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx

from tests.e2e.conftest import SERVICES, Pipeline


def _lines_with(pipeline: Pipeline, rid: str) -> dict[str, list[dict[str, Any]]]:
    """Per service, the JSON log lines naming ``rid``."""
    found: dict[str, list[dict[str, Any]]] = {}
    for path in pipeline.logs.glob("*.log"):
        service = path.stem.split("-")[0]
        for raw in path.read_text(errors="replace").splitlines():
            if rid not in raw:
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if line.get("request_id") == rid:
                found.setdefault(service, []).append(line)
    return found


def test_one_request_id_is_in_the_log_lines_of_all_five_services(pipeline: Pipeline) -> None:
    rid = f"req-{uuid.uuid4().hex}"
    auth = {"Authorization": f"Bearer {pipeline.token('p1', 'u1')}"}
    with httpx.Client(base_url=pipeline.gateway, headers=auth, timeout=10) as http:
        r = http.post(
            "/api/chat", json={"content": "Hello, who logs me?"}, headers={"X-Request-ID": rid}
        )
        assert r.status_code == 202, r.text
        assert r.headers["x-request-id"] == rid
        cid = r.json()["message"]["conversation_id"]
        # A second message with another id: its lines must not carry the first one's.
        other = f"req-{uuid.uuid4().hex}"
        r2 = http.post(
            "/api/chat",
            json={"content": "And me?", "conversation_id": cid},
            headers={"X-Request-ID": other},
        )
        assert r2.status_code == 202, r2.text

        deadline = time.monotonic() + 90
        while True:
            found = _lines_with(pipeline, rid)
            if set(found) >= set(SERVICES) and set(_lines_with(pipeline, other)) >= set(SERVICES):
                break
            assert time.monotonic() < deadline, (sorted(found), pipeline.log_tail())
            time.sleep(0.2)

    # Each service's lines for it are about this conversation (and, past the edge, this
    # message's events), never the other message's.
    message_id = r.json()["message"]["id"]
    for service in SERVICES:
        for line in found[service]:
            assert line.get("conversation_id", cid) == cid, (service, line)
        if service != "gateway":
            assert any(line.get("message_id") == message_id for line in found[service]), service
    for line in _lines_with(pipeline, other).get("persister", []):
        assert line.get("message_id") != message_id
