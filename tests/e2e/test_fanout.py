"""Fan-out: one gateway process streams one run to 1,000 SSE clients, every token to each.

The load generator is raw asyncio sockets (an HTTP/1.1 request, a chunked body, SSE frames), so
the test process stays cheap on a 2-core machine. What it proves: every client gets every token
in order and the stored answer; the gateway holds a few NATS subscriptions (one per subject
family, not one per client, read from nats-server's own /connz); its memory grows by a bounded
amount per client; nobody is cut off as slow.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from baton.embedded import NatsServer
from shared.wiring import WIRING
from tests.e2e.conftest import SETTLE_S, Pipeline, _running

pytestmark = [pytest.mark.e2e, pytest.mark.load]

CLIENTS = int(os.environ.get("FANOUT_CLIENTS", "1000"))
# The gateway's core subscriptions: the push families and the deletion tombstones.
GATEWAY_LISTENS = WIRING["gateway"].listens


class MonitoredPipeline(Pipeline, kw_only=True):
    nats: NatsServer


@pytest.fixture
def monitored(database_url: str, tmp_path: Path) -> Iterator[MonitoredPipeline]:
    """The five services on a NATS whose monitoring endpoint is on (for /connz?subs=1)."""
    nats = NatsServer(tmp_path / "nats", monitor_port=0)
    nats.start()
    try:
        # Every client comes from 127.0.0.1: one address may hold them all here.
        extra = {"GATEWAY_MAX_CONNECTIONS_PER_CLIENT": str(CLIENTS + 50)}
        with _running(nats.url, database_url, tmp_path / "logs", extra) as p:
            fields = {f: getattr(p, f) for f in Pipeline.__struct_fields__}
            yield MonitoredPipeline(**fields, nats=nats)
    finally:
        nats.stop()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def gateway_metric(p: Pipeline, name: str) -> float:
    port = p.child("gateway").env["BATON_METRICS_PORT"]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def gateway_subscriptions(monitor_url: str) -> list[str]:
    connz = httpx.get(f"{monitor_url}/connz", params={"subs": 1}, timeout=5).json()
    [gw] = [c for c in connz["connections"] if c.get("name") == "baton-gateway"]
    subs: list[str] = gw.get("subscriptions_list", [])
    return subs


class SseClient:
    """One SSE connection on a raw socket: the request, a chunked body, events as dicts."""

    def __init__(self, host: str, port: int, path: str, token: str) -> None:
        self.host, self.port, self.path, self.token = host, port, path, token
        self.events: list[dict[str, Any]] = []
        self.connected = asyncio.Event()
        self.writer: asyncio.StreamWriter | None = None

    async def run(self, done: str = "message.completed") -> None:
        reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(
            (
                f"GET {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Authorization: Bearer {self.token}\r\nAccept: text/event-stream\r\n\r\n"
            ).encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert b"transfer-encoding: chunked" in head.lower(), head
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            if size == 0:
                return
            body += (await reader.readexactly(size + 2))[:-2]
            *frames, body = body.split(b"\r\n\r\n")  # Litestar ends lines with CRLF
            for frame in frames:
                event = self._parse(frame.decode())
                if event is None:
                    continue
                self.events.append(event)
                if event["event"] == done:
                    return

    def _parse(self, frame: str) -> dict[str, Any] | None:
        event: dict[str, Any] = {}
        for line in frame.split("\r\n"):
            if line.startswith(":"):
                self.connected.set()  # the "connected" comment: the stream is in the hub
                continue
            field, _, value = line.partition(": ")
            if field == "data":
                event["data"] = json.loads(value)
            elif field in ("event", "id"):
                event[field] = value
        return event if "event" in event else None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def test_one_gateway_streams_every_token_to_a_thousand_sse_clients(
    monitored: MonitoredPipeline,
) -> None:
    p = monitored
    assert p.nats.monitor_url is not None
    p.model.update_settings(tokens_per_second=200, words_per_reply=150)
    token = p.token("acme", "fan")
    cid = str(uuid.uuid4())
    host, port = p.gateway.removeprefix("http://").split(":")
    gateway_pid = p.child("gateway").pid
    assert gateway_pid is not None
    before = rss_kib(gateway_pid)

    clients = [
        SseClient(host, int(port), f"/api/conversations/{cid}/events", token)
        for _ in range(CLIENTS)
    ]
    started = time.monotonic()
    tasks: list[asyncio.Task[None]] = []
    for i in range(0, CLIENTS, 100):  # in waves, so the accept backlog never overflows
        batch = clients[i : i + 100]
        tasks += [asyncio.create_task(c.run()) for c in batch]
        await asyncio.wait_for(asyncio.gather(*(c.connected.wait() for c in batch)), 60)
    connect_s = time.monotonic() - started
    assert gateway_metric(p, "baton_gateway_stream_clients") == CLIENTS
    assert gateway_metric(p, "baton_gateway_push_subscriptions") == len(GATEWAY_LISTENS)
    idle = rss_kib(gateway_pid)
    subs = gateway_subscriptions(p.nats.monitor_url)

    async with httpx.AsyncClient(timeout=10) as http:
        auth = {"Authorization": f"Bearer {token}"}
        posted = time.monotonic()
        r = await http.post(
            f"{p.gateway}/api/chat",
            json={"conversation_id": cid, "content": "Say something to everyone"},
            headers=auth,
        )
        assert r.status_code == 202, r.text
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        streamed_s = time.monotonic() - posted
        peak = rss_kib(gateway_pid)
        msgs = await http.get(f"{p.gateway}/api/conversations/{cid}/messages", headers=auth)
        [answer] = [x for x in msgs.json()["messages"] if x["role"] == "assistant"]
    drops = gateway_metric(p, "baton_gateway_slow_client_drops_total")
    for c in clients:
        c.close()

    # Every client: every token once, in order, and they make the stored answer.
    expected: list[int] | None = None
    for c in clients:
        tokens = [e["data"] for e in c.events if e["event"] == "token"]
        seqs = [t["seq"] for t in tokens]
        assert seqs == list(range(1, len(seqs) + 1))
        assert "".join(t["text"] for t in tokens) == answer["content"]
        assert c.events[-1]["data"]["content"] == answer["content"]
        expected = expected or seqs
        assert seqs == expected
    assert expected is not None and len(expected) > 10
    # One subscription per push family and the tombstones (plus the inbox), not one per client.
    assert len(subs) <= len(GATEWAY_LISTENS) + 3, subs
    assert drops == 0
    growth_per_client = (peak - before) / CLIENTS
    print(
        f"\nfan-out: {CLIENTS} SSE clients, {len(expected)} token events each; connect "
        f"{connect_s:.1f} s, stream {streamed_s:.1f} s; gateway RSS {before // 1024} MiB → "
        f"{idle // 1024} MiB idle → {peak // 1024} MiB peak "
        f"({growth_per_client:.0f} KiB per client); NATS subscriptions {len(subs)}: {subs}"
    )
    # Bounded memory: a client costs its connection and a queue of references to shared events.
    assert growth_per_client < 200, f"{growth_per_client:.0f} KiB per client"
    deadline = time.monotonic() + SETTLE_S
    while gateway_metric(p, "baton_gateway_stream_clients") != 0:
        assert time.monotonic() < deadline, "streams did not end after the clients left"
        await asyncio.sleep(0.2)
