"""Project API keys end to end: `baton apikey` → NATS → the persister → Postgres → gateways.

Real processes only: the CLI (``python -m baton apikey``), a persister, two gateways, on this
module's NATS and Postgres.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from baton.embedded import free_port
from baton.supervisor import Child, service_env
from tests.integration.gateway_process import (
    SECRET,
    RunningGateway,
    backing,
    start_gateway,
)
from tests.integration.test_gateway_rate_headers import _put

__all__ = ["backing", "start_gateway"]  # fixtures, used by name


@pytest.fixture
def persister(backing: tuple[str, str], tmp_path: Path) -> Iterator[Child]:
    child = Child(
        "persister",
        [sys.executable, "-m", "services.persister"],
        service_env(
            "persister",
            nats_url=backing[0],
            database_url=backing[1],
            metrics_port=free_port(),
            jwt_secret=SECRET,
        ),
        tmp_path / "persister.log",
    )
    child.start()
    try:
        yield child
    finally:
        child.signal(signal.SIGTERM)
        if not child.wait(15):
            child.signal(signal.SIGKILL)
            child.wait(5)


def apikey(backing: tuple[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "baton", "apikey", *args, "--wait", "20"],
        env={
            **service_env(
                "cli", nats_url=backing[0], database_url=backing[1], metrics_port=0, jwt_secret=""
            )
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


def make_key(backing: tuple[str, str], project: str, name: str = "ci") -> tuple[str, str]:
    """A new key of ``project`` and its id, via the CLI."""
    made = apikey(backing, "create", "--project", project, "--name", name)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    key_id = made.stderr.split()[1]
    return key, key_id


def as_service(key: str, user: str = "u1") -> dict[str, str]:
    return {"X-API-Key": key, "X-Acting-User": user}


def _rows(database_url: str) -> list[dict[str, Any]]:
    async def fetch() -> list[dict[str, Any]]:
        con = await asyncpg.connect(database_url)
        try:
            return [dict(r) for r in await con.fetch("SELECT * FROM api_keys")]
        finally:
            await con.close()

    return asyncio.run(fetch())


def _until(check: Callable[[], bool], timeout: float = 15.0) -> float:
    """Seconds until ``check()`` held (polled, never a fixed sleep)."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, "condition not reached"
        time.sleep(0.05)
    return time.monotonic() - started


def test_a_key_works_on_every_gateway_and_its_revocation_reaches_all_within_seconds(
    start_gateway: Callable[..., RunningGateway],
    backing: tuple[str, str],
    persister: Child,
) -> None:
    gateways = [start_gateway(api_key_cache_s="1"), start_gateway(api_key_cache_s="1")]
    key, key_id = make_key(backing, "acme", "nightly-sync")
    assert key.startswith("bk_") and len(key) > 40
    # Only the hash is stored: no column holds the key.
    (row,) = [r for r in _rows(backing[1]) if str(r["id"]) == key_id]
    assert row["key_hash"] == hashlib.sha256(key.encode()).hexdigest()
    assert key not in repr(row)
    assert row["project_id"] == "acme" and row["name"] == "nightly-sync"
    for gw in gateways:
        r = httpx.get(f"{gw.url}/api/usage", headers=as_service(key))
        assert r.status_code == 200, r.text
        assert r.json()["project_id"] == "acme"
    listed = apikey(backing, "list", "--project", "acme")
    assert listed.returncode == 0, listed.stderr
    assert key_id in listed.stdout and "nightly-sync" in listed.stdout
    assert key not in listed.stdout and "active" in listed.stdout

    revoked = apikey(backing, "revoke", "--project", "acme", key_id)
    assert revoked.returncode == 0, revoked.stderr
    started = time.monotonic()
    for gw in gateways:
        _until(
            lambda gw=gw: (
                httpx.get(f"{gw.url}/api/usage", headers=as_service(key)).status_code == 401
            )
        )
    assert time.monotonic() - started < 5  # the cache TTL (1 s) bounds it, plus the poll
    r = httpx.get(f"{gateways[0].url}/api/usage", headers=as_service(key))
    assert r.json()["error"]["message"] == "unknown or revoked API key"
    assert "revoked" in apikey(backing, "list", "--project", "acme").stdout


def test_a_key_acts_for_its_project_only_and_as_the_user_it_names(
    start_gateway: Callable[..., RunningGateway],
    backing: tuple[str, str],
    persister: Child,
) -> None:
    gw = start_gateway()
    acme, _ = make_key(backing, "acme")
    globex, _ = make_key(backing, "globex")
    # The server sends a message on behalf of its user u7: the conversation is u7's.
    sent = httpx.post(
        f"{gw.url}/api/chat",
        json={"content": "hello from the backend"},
        headers={**as_service(acme, "u7"), "Idempotency-Key": f"k-{uuid.uuid4()}"},
    )
    assert sent.status_code == 202, sent.text
    cid = sent.json()["message"]["conversation_id"]
    messages = f"{gw.url}/api/conversations/{cid}/messages"
    _until(lambda: httpx.get(messages, headers=as_service(acme, "u7")).status_code == 200)
    # The same user with a bearer token sees it too; so does the key acting as that user.
    assert httpx.get(messages, headers=gw.auth("acme", "u7")).status_code == 200
    # Another acting user, another project's key, a bearer of another project: not found.
    assert httpx.get(messages, headers=as_service(acme, "u8")).status_code == 404
    assert httpx.get(messages, headers=as_service(globex, "u7")).status_code == 404
    assert httpx.get(messages, headers=gw.auth("globex", "u7")).status_code == 404
    # A conversation that does not exist (yet) is not found either, never a 500.
    missing = f"{gw.url}/api/conversations/{uuid.uuid4()}/messages"
    assert httpx.get(missing, headers=as_service(acme, "u7")).status_code == 404
    r = httpx.get(f"{gw.url}/api/usage", headers=as_service(globex))
    assert r.json()["project_id"] == "globex"
    # Push streams take the key too: a WebSocket by its headers, and a stream token minted
    # with the key opens the SSE stream of the acting user's conversation only.
    assert asyncio.run(_ws_first_frame(gw, cid, as_service(acme, "u7"))) == "ready"
    assert asyncio.run(_ws_first_frame(gw, cid, as_service(acme, "u8"))) == "close 4404"
    both = {**as_service(acme, "u7"), **gw.auth("acme", "u7")}
    assert asyncio.run(_ws_first_frame(gw, cid, both)) == "close 4401"
    minted = httpx.post(
        f"{gw.url}/api/conversations/{cid}/stream-token", headers=as_service(acme, "u7")
    )
    assert minted.status_code == 201, minted.text
    refused = httpx.post(
        f"{gw.url}/api/conversations/{cid}/stream-token", headers=as_service(globex, "u7")
    )
    assert refused.status_code == 404


async def _ws_first_frame(gw: RunningGateway, cid: str, headers: dict[str, str]) -> str:
    """The first frame's event of a WebSocket opened with ``headers``, or how it closed."""
    url = f"ws://127.0.0.1:{gw.port}/api/conversations/{cid}/ws"
    try:
        async with connect(url, additional_headers=headers, open_timeout=5) as ws:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
            if frame["event"] != "error":
                return str(frame["event"])
            await asyncio.wait_for(ws.recv(), 5)  # a refusal's error frame, then the close
            raise AssertionError("still open after an error frame")
    except ConnectionClosed as closed:
        assert closed.rcvd is not None
        return f"close {closed.rcvd.code}"


BAD_HEADERS = [
    ({"X-API-Key": "bk_not-a-key", "X-Acting-User": "u1"}, "unknown or revoked API key"),
    ({"X-API-Key": "KEY"}, "X-Acting-User"),
    ({"X-API-Key": "KEY", "X-Acting-User": "a b"}, "must match"),
    ({"X-API-Key": "KEY", "X-Acting-User": "x" * 65}, "must match"),
    ({"X-API-Key": "KEY", "X-Acting-User": "u1", "Authorization": "BEARER"}, "not both"),
    ({"X-Acting-User": "u1", "Authorization": "BEARER"}, "X-API-Key only"),
    ({"X-API-Key": "", "X-Acting-User": "u1"}, "invalid API key"),
    ({"X-API-Key": "k" * 4000, "X-Acting-User": "u1"}, "invalid API key"),
]


def test_bad_key_headers_are_a_clear_401_on_every_kind_of_route(
    start_gateway: Callable[..., RunningGateway],
    backing: tuple[str, str],
    persister: Child,
) -> None:
    gw = start_gateway()
    key, _ = make_key(backing, "acme")
    given = {"KEY": key, "BEARER": gw.auth()["Authorization"]}
    for headers, message in BAD_HEADERS:
        filled = {k: given.get(v, v) for k, v in headers.items()}
        # The fast path (POST /api/chat) and the framework's routes alike.
        for r in (
            httpx.get(f"{gw.url}/api/usage", headers=filled),
            httpx.post(f"{gw.url}/api/chat", json={"content": "hi"}, headers=filled),
        ):
            assert r.status_code == 401, (headers, r.text)
            assert message in r.json()["error"]["message"], (headers, r.text)


def test_the_cli_refuses_bad_input_and_another_projects_key(
    backing: tuple[str, str], persister: Child
) -> None:
    assert apikey(backing, "create", "--project", "a.b").returncode == 1
    assert apikey(backing, "create", "--project", "acme", "--name", "x\x1b[2J").returncode == 1
    _, key_id = make_key(backing, "acme")
    other = apikey(backing, "revoke", "--project", "globex", key_id)
    assert other.returncode == 1 and "has no key" in other.stderr
    assert apikey(backing, "revoke", "--project", "acme", "nope").returncode == 1
    assert apikey(backing, "revoke", "--project", "acme", str(uuid.uuid4())).returncode == 1


def test_rate_limits_count_per_acting_user(
    start_gateway: Callable[..., RunningGateway],
    backing: tuple[str, str],
    persister: Child,
) -> None:
    gw = start_gateway(rate_cache_s="0")
    key, _ = make_key(backing, "acme")
    now = time.time()
    if 60 - now % 60 < 5:  # the window must not end between the write and the requests
        time.sleep(61 - now % 60)
        now = time.time()
    # u1 of acme is at its limit (as policy writes the window); u2 of acme is not.
    asyncio.run(_put(backing[0], now, "acme", "u1", 3, 3))
    full = httpx.post(f"{gw.url}/api/chat", json={"content": "hi"}, headers=as_service(key, "u1"))
    assert full.status_code == 429, full.text
    assert full.json()["error"]["limit"] == 3
    # The same user by token is the same count; another acting user has room.
    assert (
        httpx.post(f"{gw.url}/api/chat", json={"content": "hi"}, headers=gw.auth("acme", "u1"))
    ).status_code == 429
    other = httpx.post(f"{gw.url}/api/chat", json={"content": "hi"}, headers=as_service(key, "u2"))
    assert other.status_code == 202, other.text
