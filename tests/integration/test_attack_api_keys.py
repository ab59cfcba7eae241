"""Attacks on project API keys that the route tests do not make: a key revoked while its
streams are open.

Real processes only, as in test_gateway_api_keys: the ``baton apikey`` CLI, a persister, a
gateway, on this module's NATS and Postgres.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from baton.supervisor import Child
from tests.integration.gateway_process import RunningGateway, backing, start_gateway
from tests.integration.test_gateway_api_keys import _until, apikey, as_service, make_key, persister

__all__ = ["backing", "persister", "start_gateway"]  # fixtures, used by name


def _own_conversation(gw: RunningGateway, key: str, user: str) -> str:
    sent = httpx.post(
        f"{gw.url}/api/chat",
        json={"content": "hello from the backend"},
        headers={**as_service(key, user), "Idempotency-Key": f"k-{uuid.uuid4()}"},
    )
    assert sent.status_code == 202, sent.text
    cid = str(sent.json()["message"]["conversation_id"])
    messages = f"{gw.url}/api/conversations/{cid}/messages"
    _until(lambda: httpx.get(messages, headers=as_service(key, user)).status_code == 200)
    return cid


async def _ws_until_closed(
    gw: RunningGateway, cid: str, key: str, revoke: Callable[[], None]
) -> tuple[int | None, list[str]]:
    """Open the WebSocket with the key, revoke the key, then what ends the stream (or None)."""
    url = f"ws://127.0.0.1:{gw.port}/api/conversations/{cid}/ws"
    frames: list[str] = []
    async with connect(url, additional_headers=as_service(key, "u7"), open_timeout=5) as ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["event"] == "ready"
        await asyncio.to_thread(revoke)
        ends = time.monotonic() + 10
        try:
            while time.monotonic() < ends:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                frames.append(frame["event"])
                if frame["event"] == "error":
                    frames.append(frame["data"]["message"])
        except ConnectionClosed as closed:
            assert closed.rcvd is not None
            return closed.rcvd.code, frames
    return None, frames


def test_a_revoked_key_ends_its_open_websocket_and_sse_streams(
    start_gateway: Callable[..., RunningGateway],
    backing: tuple[str, str],
    persister: Child,
) -> None:
    # Heartbeats every 0.5 s: an idle stream notices the revocation without waiting for events.
    gw = start_gateway(api_key_cache_s="1", ws_heartbeat_s="0.5", sse_heartbeat_s="0.5")
    key, key_id = make_key(backing, "acme")
    cid = _own_conversation(gw, key, "u7")

    def revoke() -> None:
        revoked = apikey(backing, "revoke", "--project", "acme", key_id)
        assert revoked.returncode == 0, revoked.stderr

    # SSE first (the key still works), read to its first comment, then the WebSocket revokes.
    with (
        httpx.Client(timeout=httpx.Timeout(15.0)) as client,
        client.stream(
            "GET", f"{gw.url}/api/conversations/{cid}/events", headers=as_service(key, "u7")
        ) as sse,
    ):
        assert sse.status_code == 200
        lines = sse.iter_lines()
        assert next(lines) == ": connected"
        code, frames = asyncio.run(_ws_until_closed(gw, cid, key, revoke))
        # The WebSocket: an error frame naming the reason, then close 4401.
        assert code == 4401, frames
        assert "unknown or revoked API key" in frames
        # The SSE stream ends too (it does not heartbeat on forever).
        started = time.monotonic()
        rest = list(lines)
        assert time.monotonic() - started < 10, rest
    # A new stream with the key is refused, as every request is.
    r = httpx.get(f"{gw.url}/api/conversations/{cid}/events", headers=as_service(key, "u7"))
    assert r.status_code == 401


async def _ws_token_until_closed(
    gw: RunningGateway, cid: str, token: str, revoke: Callable[[], None]
) -> tuple[int | None, list[str]]:
    """As _ws_until_closed, for a WebSocket opened with a stream token (no key header)."""
    url = f"ws://127.0.0.1:{gw.port}/api/conversations/{cid}/ws?access_token={token}"
    frames: list[str] = []
    async with connect(url, open_timeout=5) as ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["event"] == "ready"
        await asyncio.to_thread(revoke)
        ends = time.monotonic() + 10
        try:
            while time.monotonic() < ends:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                frames.append(frame["event"])
        except ConnectionClosed as closed:
            assert closed.rcvd is not None
            return closed.rcvd.code, frames
    return None, frames


def test_a_stream_token_minted_with_a_revoked_key_opens_nothing_and_its_streams_end(
    start_gateway: Callable[..., RunningGateway],
    backing: tuple[str, str],
    persister: Child,
) -> None:
    gw = start_gateway(api_key_cache_s="1", ws_heartbeat_s="0.5", sse_heartbeat_s="0.5")
    key, key_id = make_key(backing, "acme")
    cid = _own_conversation(gw, key, "u7")
    minted = httpx.post(
        f"{gw.url}/api/conversations/{cid}/stream-token", headers=as_service(key, "u7")
    )
    assert minted.status_code == 201, minted.text
    token = minted.json()["token"]

    def revoke() -> None:
        revoked = apikey(backing, "revoke", "--project", "acme", key_id)
        assert revoked.returncode == 0, revoked.stderr

    events = f"{gw.url}/api/conversations/{cid}/events?access_token={token}"
    with (
        httpx.Client(timeout=httpx.Timeout(15.0)) as client,
        client.stream("GET", events) as sse,
    ):
        assert sse.status_code == 200
        lines = sse.iter_lines()
        assert next(lines) == ": connected"
        code, frames = asyncio.run(_ws_token_until_closed(gw, cid, token, revoke))
        assert code == 4401, frames
        started = time.monotonic()
        rest = list(lines)
        assert time.monotonic() - started < 10, rest
    # The token has minutes left, but its key is revoked: no new stream either.
    r = httpx.get(events)
    assert r.status_code == 401, r.text
