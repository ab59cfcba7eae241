"""Hostile bytes on a real gateway process: invalid UTF-8 anywhere, keys outside visible ASCII.

The gateway runs at log level ``debug`` here, so "never logged" covers every level.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import jwt
import pytest
import pytest_asyncio
import structlog
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

from baton.devtoken import make_token
from services.gateway.adapters import Hub, Publisher, ReadModel, TokenLog
from services.gateway.config import Settings
from services.gateway.handlers import Api
from services.gateway.main import build_app
from shared.db import create_pool
from tests.integration.conftest import Infra
from tests.integration.gateway_process import SECRET, RunningGateway, backing, start_gateway
from tests.support import connect_bus, service_metrics

__all__ = ["backing", "start_gateway"]  # fixtures, used by name

SECRET_WORD = b"hunter2"


def never_logged(gw: RunningGateway, secret: bytes = SECRET_WORD) -> None:
    # The log is written as the gateway goes; its request line comes after the answer.
    deadline = time.monotonic() + 2
    while b'"event":"handled"' not in gw.child.log_path.read_bytes():
        assert time.monotonic() < deadline, gw.log()
        time.sleep(0.05)
    raw = gw.child.log_path.read_bytes()
    assert secret not in raw, raw.decode(errors="replace")
    assert b"request_failed" not in raw, raw.decode(errors="replace")


def test_invalid_utf8_in_a_chat_body_is_a_400_and_never_logged(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway(log_level="debug")
    r = httpx.post(
        f"{gw.url}/api/chat",
        content=b'{"content":"my password is hunter2 \xff"}',
        headers={**gw.auth(), "Content-Type": "application/json"},
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_json"
    assert b"hunter2" not in r.content
    never_logged(gw)


@pytest.mark.parametrize(
    "path",
    [
        "/api/conversations/{cid}/events?last_event_id=%ff%fehunter2",
        "/api/conversations/{cid}/messages?x=%ffhunter2",
        "/api/conversations/%ff%fehunter2/messages",
        "/api/usage?%ff=hunter2",
    ],
)
def test_invalid_utf8_in_a_url_is_never_a_500_nor_logged(
    start_gateway: Callable[..., RunningGateway], path: str
) -> None:
    gw = start_gateway(log_level="debug")
    url = gw.url + path.format(cid=uuid.uuid4())
    with httpx.Client(timeout=5) as http, http.stream("GET", url, headers=gw.auth()) as r:
        assert r.status_code < 500
    never_logged(gw)


def test_invalid_utf8_in_headers_is_never_a_500_nor_logged(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway(log_level="debug")
    cid = uuid.uuid4()
    headers = {"Last-Event-ID": b"msg:\xff\xfehunter2", "X-Note": b"\xffhunter2"}
    with httpx.Client(timeout=5) as http:
        with http.stream(
            "GET", f"{gw.url}/api/conversations/{cid}/events", headers={**gw.auth(), **headers}
        ) as r:
            assert r.status_code < 500
        r2 = http.post(
            f"{gw.url}/api/chat",
            json={"content": "hi"},
            headers={"Authorization": b"Bearer \xffhunter2"},
        )
        assert r2.status_code == 401
    never_logged(gw)


def test_a_websocket_frame_of_invalid_utf8_closes_the_stream_and_is_never_logged(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway(log_level="debug")

    async def attempt() -> int | None:
        url = f"ws://127.0.0.1:{gw.port}/api/conversations/{uuid.uuid4()}/ws"
        async with ws_connect(url) as socket:
            # A text frame whose payload is not UTF-8 (the client library would refuse to
            # encode one, so the frame goes out as raw bytes with the text opcode).
            frame = Frame(Opcode.TEXT, b'{"type":"auth","token":"hunter2\xff"}')
            socket.protocol.send_frame(frame)
            socket.send_data()
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await asyncio.wait_for(socket.recv(), 5)
            return socket.close_code

    code = asyncio.run(attempt())
    assert code == 1007  # invalid frame payload data
    raw = gw.child.log_path.read_bytes()
    assert SECRET_WORD not in raw, raw.decode(errors="replace")


@pytest.mark.parametrize("key", ["été".encode(), "ключ".encode(), b"caf\xe9", b"with space"])
def test_an_idempotency_key_outside_visible_ascii_is_refused_and_nothing_published(
    start_gateway: Callable[..., RunningGateway], key: bytes
) -> None:
    gw = start_gateway()
    r = httpx.post(
        f"{gw.url}/api/chat",
        json={"content": "hi"},
        headers={**gw.auth(), "Idempotency-Key": key},  # type: ignore[dict-item]
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_idempotency_key"


def test_a_visible_ascii_key_is_stored_as_sent(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway()
    key = "order-42:retry/~!" + uuid.uuid4().hex
    headers = {**gw.auth(), "Idempotency-Key": key}
    first = httpx.post(f"{gw.url}/api/chat", json={"content": "hi"}, headers=headers)
    again = httpx.post(f"{gw.url}/api/chat", json={"content": "hi"}, headers=headers)
    assert first.status_code == again.status_code == 202, first.text
    assert again.json()["message"]["id"] == first.json()["message"]["id"]
    assert again.headers["Idempotent-Replayed"] == "true"


@pytest_asyncio.fixture
async def routes(infra: Infra) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    """``POST /api/chat`` both ways: the fast path, and the Litestar route behind it."""
    settings = Settings(jwt_secret=SECRET)  # type: ignore[arg-type]
    bus = await connect_bus(infra.nats_url, "gateway")
    pool = await create_pool(infra.database_url)
    reads = ReadModel(pool)
    hub = Hub(bus, 64, bus.log)
    await hub.start()
    api = Api(
        settings, Publisher(bus, 2.0), reads, hub, service_metrics("gateway"), TokenLog(bus, 2.0)
    )
    fast = build_app(api, bus, reads, settings)
    apps = {"fast path": fast, "litestar": fast.app}  # without metrics, .app is the Litestar app
    clients = {
        name: httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")
        for name, app in apps.items()
    }
    yield clients
    for client in clients.values():
        await client.aclose()
    await hub.stop()
    await bus.close()
    await pool.close()


AUTH = {"Authorization": f"Bearer {make_token(SECRET, 'p1', 'u1')}"}


@pytest.mark.parametrize("route", ["fast path", "litestar"])
async def test_both_routes_answer_invalid_utf8_with_400_and_log_nothing_of_it(
    routes: dict[str, httpx.AsyncClient], route: str
) -> None:
    with structlog.testing.capture_logs() as logs:
        r = await routes[route].post(
            "/api/chat",
            content=b'{"content":"my password is hunter2 \xff"}',
            headers={**AUTH, "Content-Type": "application/json"},
        )
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_json")
    assert "hunter2" not in repr(logs)


@pytest.mark.parametrize("route", ["fast path", "litestar"])
@pytest.mark.parametrize(
    ("key", "status"),
    [("été".encode(), 400), ("ключ".encode(), 400), (b"a b", 400), (b"order-42:~!", 202)],
)
async def test_both_routes_apply_one_idempotency_key_rule(
    routes: dict[str, httpx.AsyncClient], route: str, key: bytes, status: int
) -> None:
    headers = {**AUTH, "Idempotency-Key": key}
    r = await routes[route].post("/api/chat", json={"content": "hi"}, headers=headers)  # type: ignore[arg-type]
    assert r.status_code == status, r.text


def _token(**claims: object) -> dict[str, str]:
    now = time.time()
    payload = {"sub": "u1", "project": "p1", "iat": now, "exp": now + 600, **claims}
    payload = {k: v for k, v in payload.items() if v is not None}
    return {"Authorization": "Bearer " + jwt.encode(payload, SECRET, algorithm="HS256")}


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({"exp": 10**20}, "token lifetime exceeds the maximum (2592000 s)"),
        ({"iat": None, "exp": 10**20}, "token lifetime exceeds the maximum (2592000 s)"),
        ({"iat": time.time() + 3600}, "token is not valid yet"),
        ({"exp": "never"}, "invalid token"),
    ],
)
def test_tokens_past_the_lifetime_rules_are_401_with_a_stable_message(
    start_gateway: Callable[..., RunningGateway], claims: dict[str, object], message: str
) -> None:
    gw = start_gateway()
    cid = uuid.uuid4()
    with httpx.Client(base_url=gw.url, headers=_token(**claims), timeout=5) as http:
        for r in (
            http.post("/api/chat", json={"content": "hi"}),
            http.get(f"/api/conversations/{cid}/messages"),
        ):
            assert r.status_code == 401, r.text
            assert r.json()["error"]["message"] == message


def test_a_shorter_maximum_lifetime_is_a_setting(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway(jwt_max_lifetime_s="3600")
    short = httpx.post(f"{gw.url}/api/chat", json={"content": "hi"}, headers=_token())
    assert short.status_code == 202, short.text
    day = httpx.post(
        f"{gw.url}/api/chat", json={"content": "hi"}, headers=_token(exp=time.time() + 86400)
    )
    assert day.status_code == 401


def test_baton_token_makes_a_token_the_gateway_accepts_by_default(
    start_gateway: Callable[..., RunningGateway], tmp_path: Path
) -> None:
    gw = start_gateway()
    (tmp_path / "jwt_secret").write_text(SECRET)
    made = subprocess.run(
        [sys.executable, "-m", "baton", "token", "--data-dir", str(tmp_path),
         "--project", "p1", "--user", "u1"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    headers = {"Authorization": f"Bearer {made.stdout.strip()}"}
    r = httpx.post(f"{gw.url}/api/chat", json={"content": "hi"}, headers=headers)
    assert r.status_code == 202, r.text
