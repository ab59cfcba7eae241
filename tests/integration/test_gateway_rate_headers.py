"""A real gateway's rate answers: 429 says limit, remaining, reset, retry_after; 202 says room.

The windows are written into the limits bucket the way policy writes them; the gateway reads
them (``RateGate``) and answers with Retry-After and the IETF RateLimit-Policy / RateLimit
fields (draft-ietf-httpapi-ratelimit-headers-10).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable

import httpx

from shared import ratelimit, subjects
from tests.integration.gateway_process import RunningGateway, backing, start_gateway
from tests.support import connect_bus

__all__ = ["backing", "start_gateway"]  # fixtures, used by name


def _window(now: float, limit: int, count: int) -> bytes:
    start = ratelimit.window_start(now, 60)
    ids = ",".join(f'"m{i}"' for i in range(count))
    return f'{{"start":{start},"length":60,"limit":{limit},"ids":[{ids}]}}'.encode()


async def _put(nats_url: str, now: float, project: str, user: str, limit: int, n: int) -> None:
    bus = await connect_bus(nats_url)
    try:
        kv = await bus.js.key_value(subjects.BUCKET_LIMITS)
        await kv.put(ratelimit.key("m", now, project, user), _window(now, limit, n))
    finally:
        await bus.close()


def test_429_and_202_say_the_limit_the_room_and_when_it_resets(
    backing: tuple[str, str], start_gateway: Callable[..., RunningGateway]
) -> None:
    gw = start_gateway(rate_cache_s="0")
    now = time.time()
    if 60 - now % 60 < 5:  # the windows must not end between the writes and the requests
        time.sleep(61 - now % 60)
        now = time.time()
    asyncio.run(_put(backing[0], now, "p1", "full", 3, 3))
    asyncio.run(_put(backing[0], now, "p1", "room", 5, 2))

    r = httpx.post(f"{gw.url}/api/chat", json={"content": "hi"}, headers=gw.auth("p1", "full"))
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert error["code"] == "rate_limited"
    assert error["limit"] == 3 and error["remaining"] == 0 and error["window"] == "minute"
    assert 1 <= error["reset"] <= 60 and error["retry_after"] == error["reset"]
    assert r.headers["Retry-After"] == str(error["retry_after"])
    assert r.headers["RateLimit-Policy"] == '"minute";q=3;w=60'
    assert re.fullmatch(r'"minute";r=0;t=(\d+)', r.headers["RateLimit"])
    assert r.headers["RateLimit"] == f'"minute";r=0;t={error["reset"]}'

    r = httpx.post(f"{gw.url}/api/chat", json={"content": "hi"}, headers=gw.auth("p1", "room"))
    assert r.status_code == 202, r.text
    assert r.headers["RateLimit-Policy"] == '"minute";q=5;w=60'
    # Two counted, this one accepted: two left.
    m = re.fullmatch(r'"minute";r=2;t=(\d+)', r.headers["RateLimit"])
    assert m and 1 <= int(m.group(1)) <= 60

    # A user with no window yet: nothing known, nothing claimed.
    r = httpx.post(f"{gw.url}/api/chat", json={"content": "hi"}, headers=gw.auth("p1", "new"))
    assert r.status_code == 202, r.text
    assert "RateLimit" not in r.headers and "RateLimit-Policy" not in r.headers
