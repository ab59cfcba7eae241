"""Hostile bytes on a real gateway process: invalid UTF-8 anywhere, keys outside visible ASCII.

The gateway runs at log level ``debug`` here, so "never logged" covers every level.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

from tests.integration.gateway_process import RunningGateway, backing, start_gateway

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
