"""Platform features on a real gateway process: CORS, request ids, stream tokens, /version.

Each test talks HTTP to ``python -m services.gateway`` on real NATS and Postgres.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from baton.embedded import free_port
from baton.supervisor import Child, service_env
from tests.integration.gateway_process import SECRET, RunningGateway, backing, start_gateway

__all__ = ["backing", "start_gateway"]  # fixtures, used by name

APP = "https://app.example.test"


def _lines(gw: RunningGateway) -> list[dict[str, object]]:
    out = []
    for raw in gw.log().splitlines():
        try:
            out.append(json.loads(raw))
        except ValueError:
            continue
    return out


def _wait_for_line(
    gw: RunningGateway, match: Callable[[dict[str, object]], bool]
) -> dict[str, object]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in _lines(gw):
            if match(line):
                return line
        time.sleep(0.05)
    raise AssertionError(f"no matching log line\n{gw.log()}")


# ---- CORS ------------------------------------------------------------------------------------


def test_a_preflight_from_an_allowed_origin_is_answered_with_what_it_may_send(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway(cors_origins=APP)
    r = httpx.options(
        f"{gw.url}/api/chat",
        headers={
            "Origin": APP,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
        },
    )
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == APP
    assert "POST" in r.headers["access-control-allow-methods"]
    allowed = r.headers["access-control-allow-headers"]
    assert {"authorization", "content-type", "idempotency-key"} <= set(allowed.split(", "))
    assert r.headers["vary"] == "Origin"
    assert int(r.headers["access-control-max-age"]) > 0


def test_an_allowed_origin_may_read_responses_and_their_exposed_headers(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway(cors_origins=f"http://localhost:1,{APP}")
    headers = {**gw.auth(), "Origin": APP, "Idempotency-Key": f"k-{uuid.uuid4()}"}
    # The fast path (POST /api/chat) and the framework's routes alike.
    chat = httpx.post(f"{gw.url}/api/chat", json={"content": "hi"}, headers=headers)
    usage = httpx.get(f"{gw.url}/api/usage", headers=headers)
    missing = httpx.get(f"{gw.url}/api/conversations/x/messages", headers=headers)
    for r in (chat, usage, missing):
        assert r.headers["access-control-allow-origin"] == APP, r
        exposed = set(r.headers["access-control-expose-headers"].split(", "))
        assert {"Idempotent-Replayed", "Retry-After", "RateLimit", "X-Request-ID"} <= exposed
        assert "Origin" in r.headers["vary"]
    assert chat.status_code == 202


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.test",
        "https://app.example.test.evil.test",  # no suffix matching
        "http://app.example.test",  # scheme counts
        "null",
    ],
)
def test_another_origin_is_refused_a_preflight_and_gets_no_cors_headers(
    start_gateway: Callable[..., RunningGateway], origin: str
) -> None:
    gw = start_gateway(cors_origins=APP)
    r = httpx.options(
        f"{gw.url}/api/chat",
        headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
    )
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "cors_refused"
    assert "access-control-allow-origin" not in r.headers
    plain = httpx.get(f"{gw.url}/api/usage", headers={**gw.auth(), "Origin": origin})
    assert "access-control-allow-origin" not in plain.headers
    assert plain.headers["vary"] == "Origin"


def test_a_preflight_for_a_method_or_header_not_allowed_is_refused(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway(cors_origins=APP)
    put = httpx.options(
        f"{gw.url}/api/chat", headers={"Origin": APP, "Access-Control-Request-Method": "PUT"}
    )
    odd = httpx.options(
        f"{gw.url}/api/chat",
        headers={
            "Origin": APP,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-secret-thing",
        },
    )
    assert (put.status_code, odd.status_code) == (403, 403)


def test_by_default_no_origin_is_allowed(start_gateway: Callable[..., RunningGateway]) -> None:
    gw = start_gateway()
    r = httpx.options(
        f"{gw.url}/api/chat", headers={"Origin": APP, "Access-Control-Request-Method": "POST"}
    )
    assert r.status_code == 403
    assert "access-control-allow-origin" not in r.headers


@pytest.mark.parametrize("origins", ["*", "https://*.example.test", "https://app.example.test/"])
def test_a_wildcard_or_malformed_origin_stops_the_gateway_from_starting(
    backing: tuple[str, str], tmp_path: Path, origins: str
) -> None:
    child = Child(
        "gateway",
        [sys.executable, "-m", "services.gateway"],
        service_env(
            "gateway",
            nats_url=backing[0],
            database_url=backing[1],
            metrics_port=free_port(),
            jwt_secret=SECRET,
            http_port=free_port(),
            extra={"GATEWAY_CORS_ORIGINS": origins},
        ),
        tmp_path / "gateway.log",
    )
    child.start()
    try:
        assert child.wait(20), "the gateway kept running with a wildcard origin"
        assert child.exit_code() != 0
        assert "GATEWAY_CORS_ORIGINS" in child.log_path.read_text()
    finally:
        if child.exit_code() is None:
            child.signal(9)
            child.wait(5)


# ---- request ids -----------------------------------------------------------------------------


def test_a_clients_request_id_is_echoed_and_named_in_errors_and_the_log(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway()
    rid = f"req-{uuid.uuid4()}"
    fast = httpx.post(
        f"{gw.url}/api/chat", content=b"{", headers={**gw.auth(), "X-Request-ID": rid}
    )
    slow = httpx.get(
        f"{gw.url}/api/conversations/nope/messages",
        headers={**gw.auth(), "X-Request-ID": rid + "b"},
    )
    unauth = httpx.get(f"{gw.url}/api/usage", headers={"X-Request-ID": rid + "c"})
    for r, want in ((fast, rid), (slow, rid + "b"), (unauth, rid + "c")):
        assert r.status_code >= 400
        assert r.headers["x-request-id"] == want
        assert r.json()["error"]["request_id"] == want
    for want in (rid, rid + "b", rid + "c"):
        _wait_for_line(
            gw, lambda line, w=want: line.get("event") == "handled" and line.get("request_id") == w
        )


@pytest.mark.parametrize("given", ["x" * 129, "a b", "line\\nbreak", "<script>", ""])
def test_an_unusable_request_id_is_replaced_by_a_new_one(
    start_gateway: Callable[..., RunningGateway], given: str
) -> None:
    gw = start_gateway()
    r = httpx.get(f"{gw.url}/healthz", headers={"X-Request-ID": given})
    rid = r.headers["x-request-id"]
    assert rid != given and len(rid) == 32 and rid.isalnum()


def test_every_response_has_a_request_id_even_without_one_given(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway()
    a = httpx.get(f"{gw.url}/healthz")
    b = httpx.post(f"{gw.url}/api/chat", json={"content": "hi"}, headers=gw.auth())
    assert b.status_code == 202
    assert a.headers["x-request-id"] != b.headers["x-request-id"]
