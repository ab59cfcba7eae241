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


# ---- stream tokens ---------------------------------------------------------------------------


def _conversation(gw: RunningGateway, user: str = "u1") -> str:
    r = httpx.post(f"{gw.url}/api/chat", json={"content": "hi"}, headers=gw.auth(user=user))
    assert r.status_code == 202
    cid: str = r.json()["message"]["conversation_id"]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # owned once the persister… or CHAT_IN says so
        if (
            httpx.get(
                f"{gw.url}/api/conversations/{cid}/state", headers=gw.auth(user=user)
            ).status_code
            == 200
        ):
            return cid
        time.sleep(0.05)
    raise AssertionError("conversation never became readable")


def _stream_token(gw: RunningGateway, cid: str, user: str = "u1") -> httpx.Response:
    return httpx.post(f"{gw.url}/api/conversations/{cid}/stream-token", headers=gw.auth(user=user))


def _open_events(gw: RunningGateway, cid: str, token: str) -> int:
    with httpx.stream(
        "GET", f"{gw.url}/api/conversations/{cid}/events", params={"access_token": token}, timeout=5
    ) as r:
        return r.status_code


def test_a_stream_token_opens_its_conversations_events_and_ws(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    from websockets.sync.client import connect

    gw = start_gateway()
    cid = _conversation(gw)
    r = _stream_token(gw, cid)
    assert r.status_code == 201
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["conversation_id"] == cid and 0 < body["expires_in"] <= 300
    assert _open_events(gw, cid, body["token"]) == 200
    ws_url = (
        gw.url.replace("http", "ws") + f"/api/conversations/{cid}/ws?access_token={body['token']}"
    )
    with connect(ws_url) as socket:
        frame = json.loads(socket.recv(timeout=5))
        assert frame["event"] == "ready"  # authenticated and watching
    # Never in a log line.
    assert body["token"] not in gw.log()


def test_a_stream_token_is_refused_everywhere_else(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway()
    cid, other = _conversation(gw), _conversation(gw)
    token = _stream_token(gw, cid).json()["token"]
    assert _open_events(gw, other, token) == 401  # another conversation of the same user
    bearer = {"Authorization": f"Bearer {token}"}
    for method, path in [
        ("GET", f"/api/conversations/{cid}/messages"),
        ("GET", f"/api/conversations/{cid}/state"),
        ("GET", "/api/usage"),
        ("POST", f"/api/conversations/{cid}/stream-token"),
    ]:
        assert httpx.request(method, gw.url + path, headers=bearer).status_code == 401, path
        as_query = httpx.request(method, gw.url + path, params={"access_token": token})
        assert as_query.status_code == 401, path
    with httpx.stream("GET", f"{gw.url}/api/conversations/{cid}/events", headers=bearer) as r:
        assert r.status_code == 401  # a stream token is no bearer token, even on its own route
    chat = httpx.post(f"{gw.url}/api/chat", json={"content": "x"}, headers=bearer)
    assert chat.status_code == 401


def test_a_bearer_token_is_never_accepted_in_the_query_string(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway()
    cid = _conversation(gw)
    bearer = gw.auth()["Authorization"][7:]
    assert _open_events(gw, cid, bearer) == 401
    r = httpx.get(f"{gw.url}/api/usage", params={"access_token": bearer})
    assert r.status_code == 401


def test_a_stream_token_of_someone_elses_conversation_is_not_given(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway()
    cid = _conversation(gw, user="alice")
    assert _stream_token(gw, cid, user="mallory").status_code == 404
    assert _stream_token(gw, str(uuid.uuid4()), user="mallory").status_code == 404


def test_a_stream_token_expires(start_gateway: Callable[..., RunningGateway]) -> None:
    gw = start_gateway(stream_token_ttl_s="1")
    cid = _conversation(gw)
    token = _stream_token(gw, cid).json()["token"]
    deadline = time.monotonic() + 10
    while _open_events(gw, cid, token) == 200:  # exp has a one-second grain
        assert time.monotonic() < deadline, "the stream token never expired"
        time.sleep(0.2)
    assert _open_events(gw, cid, token) == 401


# ---- version ---------------------------------------------------------------------------------


def test_version_names_the_build_and_metrics_export_it(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway()
    body = httpx.get(f"{gw.url}/version").json()
    assert set(body) == {"version", "commit", "build_time", "uptime_s"}
    assert body["version"] and body["uptime_s"] >= 0
    metrics_port = gw.child.env["BATON_METRICS_PORT"]
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    assert f'baton_build_info{{commit="{body["commit"]}",version="{body["version"]}"}} 1.0' in text
