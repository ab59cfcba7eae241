"""The HTTP edge's limits on a real gateway process: head size and count, read timeouts, connections.

Each test talks raw TCP to ``python -m services.gateway`` (the uvicorn configuration the gateway
really runs), on real NATS and Postgres. Clients bind to different loopback addresses
(127.0.0.N) when a test needs several "client addresses".
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import Callable

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from tests.integration.gateway_process import MIB, RunningGateway, backing, start_gateway

__all__ = ["backing", "start_gateway"]  # fixtures, used by name


def connect(gw: RunningGateway, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", gw.port))
    return sock


def answer(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (or ``timeout``)."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(ConnectionResetError, TimeoutError, BrokenPipeError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response.split(b" ", 2)[1])


def send_until_closed(sock: socket.socket, head: bytes, filler: bytes, total: int) -> int:
    """Send ``head`` then ``filler`` up to ``total`` bytes or until the server stops taking them."""
    sent = 0
    sock.settimeout(10)
    try:
        sock.sendall(head)
        while sent < total:
            sock.sendall(filler)
            sent += len(filler)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass
    return sent


def test_a_head_over_the_byte_limit_gets_431(start_gateway: Callable[..., RunningGateway]) -> None:
    gw = start_gateway()
    sock = connect(gw)
    big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * MIB + b"\r\n\r\n"
    send_until_closed(sock, big, b"", 0)
    assert status_of(answer(sock, 30)) == 431
    sock.close()
    assert httpx.get(f"{gw.url}/healthz").status_code == 200


def test_more_headers_than_the_count_limit_get_431(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway()
    sock = connect(gw)
    many = b"".join(b"a%d: b\r\n" % i for i in range(101))  # 101 headers, about 800 bytes
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert status_of(answer(sock, 30)) == 431
    sock.close()
    # 95 headers (90 and the five httpx sends) are fine.
    headers = {f"a{i}": "b" for i in range(90)}
    assert httpx.get(f"{gw.url}/healthz", headers=headers).status_code == 200


def test_a_hundred_thousand_headers_get_431(start_gateway: Callable[..., RunningGateway]) -> None:
    gw = start_gateway()
    sock = connect(gw)
    many = b"".join(b"a%d: b\r\n" % i for i in range(100_000))
    send_until_closed(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n", b"", 0)
    assert status_of(answer(sock, 30)) == 431
    sock.close()


def test_unfinished_heads_cost_no_memory_once_refused(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway()
    with httpx.Client(base_url=gw.url) as http:
        for _ in range(50):  # warm up: the first requests allocate what every request reuses
            http.get("/healthz")
    before = gw.rss_bytes()
    socks = [connect(gw) for _ in range(10)]
    for sock in socks:
        # 20 MB of one header that never ends, as the attack did.
        send_until_closed(sock, b"GET /healthz HTTP/1.1\r\nX-A: ", b"a" * 65536, 20 * MIB)
    peak = gw.rss_bytes()
    for sock in socks:
        sock.close()
    assert httpx.get(f"{gw.url}/healthz").status_code == 200
    after = gw.rss_bytes()
    print(f"VmRSS before {before / MIB:.1f} MiB, peak {peak / MIB:.1f}, after {after / MIB:.1f}")
    assert peak - before < 16 * MIB
    assert after - before < 16 * MIB


def test_a_head_not_finished_in_time_gets_408(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway(header_timeout_s="1")
    sock = connect(gw)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    assert status_of(answer(sock, 30)) == 408
    sock.close()


def test_a_second_head_on_a_kept_alive_connection_is_timed_too(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway(header_timeout_s="1")
    sock = connect(gw)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    sock.settimeout(5)
    first = sock.recv(65536)
    assert status_of(first) == 200
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and nothing more
    assert status_of(answer(sock, 30)) == 408
    sock.close()


def test_a_connection_that_sends_nothing_is_closed(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway(header_timeout_s="1")
    sock = connect(gw)
    data = answer(sock, 30)
    assert data == b"" or status_of(data) == 408
    sock.close()


def test_a_body_not_finished_in_time_gets_408(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway(body_timeout_s="1")
    sock = connect(gw)
    sock.sendall(
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n" + b'{"content": "'
    )
    assert status_of(answer(sock, 30)) == 408
    sock.close()


def test_connections_per_client_address_are_limited(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway(max_connections_per_client="5")
    held = [connect(gw, "127.0.0.2") for _ in range(5)]
    extra = connect(gw, "127.0.0.2")
    assert status_of(answer(extra, 5)) == 429
    extra.close()
    # Another address is not affected, and a freed slot is usable again.
    assert httpx.get(f"{gw.url}/healthz").status_code == 200
    held.pop().close()
    deadline = time.monotonic() + 10
    while True:
        again = connect(gw, "127.0.0.2")
        again.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status = status_of(answer(again, 5))
        again.close()
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # the server may not have seen the close yet
    assert status == 200
    for sock in held:
        sock.close()


def test_connections_in_total_are_limited(start_gateway: Callable[..., RunningGateway]) -> None:
    gw = start_gateway(max_connections="6", max_connections_per_client="3")
    held = [connect(gw, f"127.0.0.{n}") for n in (3, 3, 3, 4, 4, 4)]
    extra = connect(gw, "127.0.0.5")
    assert status_of(answer(extra, 5)) == 503
    extra.close()
    for sock in held:
        sock.close()


def test_slow_clients_are_cut_while_others_are_served(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway(header_timeout_s="2")
    slow = [connect(gw, f"127.0.1.{n % 50 + 1}") for n in range(250)]
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "
    for sock in slow:
        sock.sendall(head)
    open_socks = set(slow)
    served = 0
    started = time.monotonic()
    # Generous bounds: a busy CI machine may be slow to serve, but never may it keep them all.
    with httpx.Client(base_url=gw.url, timeout=30) as http:
        # A byte every 0.2 s on every slow connection, as slowloris does, and a normal client.
        while open_socks and time.monotonic() - started < 60:
            assert http.get("/healthz").status_code == 200
            served += 1
            for sock in list(open_socks):
                try:
                    sock.sendall(b"a")
                except OSError:
                    open_socks.discard(sock)
            time.sleep(0.2)
    cut_after = time.monotonic() - started
    for sock in slow:
        sock.close()
    assert not open_socks, f"{len(open_socks)} of 250 slow connections still open after 60 s"
    # Each got a byte every 0.2 s: only the head timeout (2 s) can have cut them.
    assert cut_after < 60
    assert served > 5


def test_a_websocket_holds_its_slot_until_it_closes(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway(max_connections_per_client="2", ws_auth_timeout_s="30")

    async def scenario() -> None:
        url = f"ws://127.0.0.1:{gw.port}/api/conversations/{uuid.uuid4()}/ws"
        first = await ws_connect(url)
        second = await ws_connect(url)
        with pytest.raises(InvalidStatus) as refused:
            await ws_connect(url)
        assert refused.value.response.status_code == 429
        await first.close()
        await second.close()
        deadline = time.monotonic() + 10
        while True:  # the server frees a slot once it has seen the close
            try:
                third = await ws_connect(url)
                break
            except InvalidStatus:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        await third.close()

    asyncio.run(scenario())
