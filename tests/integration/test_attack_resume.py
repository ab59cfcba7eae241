"""Attacks on the resume position a client sends (``Last-Event-ID``, ``?last_event_id=``, the
WebSocket's auth frame): an id this gateway never sent replays everything, never a 500.

A real gateway in process, on a real NATS and Postgres; the conversation is stored as the
persister stores it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from urllib.parse import quote

import httpx
import pytest
import pytest_asyncio
from websockets.asyncio.client import connect

from tests.integration.conftest import Infra
from tests.integration.test_gateway_tools import a_run, http
from tests.integration.test_gateway_ws import Gateway, _serve, auth

# Digits to str.isdigit() that int() does not take (superscripts, circled): the position
# parser must not trust isdigit() alone.
NOT_INTS = ["tok:a:\u00b2:1", "tok:a:1:\u00b2", "run:a:\u00b2:running", "tok:a:\u2460:1"]


@pytest_asyncio.fixture
async def gateway(infra: Infra) -> AsyncIterator[Gateway]:
    async for g in _serve(infra):
        yield g


@pytest.mark.parametrize("last_id", NOT_INTS)
async def test_an_event_id_with_non_ascii_digits_resumes_from_the_start_over_sse(
    gateway: Gateway, last_id: str
) -> None:
    run = await a_run(gateway)
    path = f"/api/conversations/{run.cid}/events?last_event_id={quote(last_id)}"
    async with (
        httpx.AsyncClient(base_url=http(gateway), timeout=10) as client,
        client.stream("GET", path, headers=auth()) as r,
    ):
        assert r.status_code == 200, await r.aread()
        lines = r.aiter_lines()
        assert await anext(lines) == ": connected"


async def test_a_latin1_last_event_id_header_is_no_500(gateway: Gateway) -> None:
    run = await a_run(gateway)
    # Header bytes are read as latin-1: 0xB2 is "²".
    headers = [
        (b"authorization", auth()["Authorization"].encode()),
        (b"last-event-id", b"tok:a:\xb2:1"),
    ]
    path = f"/api/conversations/{run.cid}/events"
    async with (
        httpx.AsyncClient(base_url=http(gateway), timeout=10) as client,
        client.stream("GET", path, headers=headers) as r,
    ):
        assert r.status_code == 200, await r.aread()


async def test_a_websocket_auth_frame_with_such_an_event_id_gets_ready(gateway: Gateway) -> None:
    run = await a_run(gateway)
    token = auth()["Authorization"].removeprefix("Bearer ")
    async with connect(gateway.ws(run.cid), open_timeout=5) as ws:
        await ws.send(json.dumps({"type": "auth", "token": token, "last_event_id": NOT_INTS[0]}))
        frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert frame["event"] == "ready", frame
