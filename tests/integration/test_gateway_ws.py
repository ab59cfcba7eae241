"""The gateway's WebSocket stream on a real uvicorn, NATS and Postgres: events, resume, refusals."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import jwt
import msgspec
import pytest
import pytest_asyncio
import uvicorn
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from baton.devtoken import make_token
from baton.embedded import free_port
from services.gateway.adapters import Hub, Publisher, ReadModel, TokenLog, VerdictLog
from services.gateway.config import Settings
from services.gateway.handlers import Api
from services.gateway.main import asgi
from services.persister.adapters import Store
from shared import messages as m
from shared import runs as vocab
from shared import subjects
from shared.bus import Bus
from shared.db import create_pool
from shared.metrics import ServiceMetrics
from tests.integration.conftest import Infra
from tests.support import connect_bus, eventually, run_verdict, service_metrics, user_event

SECRET = "test-secret-" + "x" * 32


class Gateway(msgspec.Struct):
    url: str
    bus: Bus
    pool: Any
    hub: Hub
    metrics: ServiceMetrics

    def ws(self, cid: str) -> str:
        return f"{self.url}/api/conversations/{cid}/ws"

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(f"baton_gateway_{name}", labels)
        return value or 0.0


def auth(project: str = "p1", user: str = "u1") -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token(SECRET, project, user)}"}


async def _serve(infra: Infra, **overrides: Any) -> AsyncIterator[Gateway]:
    settings = Settings(
        jwt_secret=SECRET,  # type: ignore[arg-type]
        **{"ws_auth_timeout_s": 1.0, "ws_heartbeat_s": 30.0, **overrides},
    )
    bus = await connect_bus(infra.nats_url, "gateway")
    pool = await create_pool(infra.database_url)
    reads = ReadModel(pool)
    metrics = service_metrics("gateway")
    hub = Hub(bus, settings.sse_queue_size, bus.log, metrics)
    await hub.start()
    # The server holds the hub's subscriptions before a test publishes from another connection
    # (one flush is not enough with nats-py: see test_bus_publish._server_has_subscriptions).
    await bus.nc.flush()
    await bus.nc.flush()
    api = Api(settings, Publisher(bus, 2.0), reads, hub, metrics, TokenLog(bus, 2.0))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            asgi(api, bus, reads, settings, metrics),
            host="127.0.0.1",
            port=port,
            lifespan="off",
            log_level="warning",
            ws_max_size=settings.ws_max_frame_bytes,
        )
    )
    task = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started:
            break
        await asyncio.sleep(0.02)
    try:
        yield Gateway(f"ws://127.0.0.1:{port}", bus, pool, hub, metrics)
    finally:
        await hub.stop()
        server.should_exit = True
        await task
        await bus.close()
        await pool.close()


@pytest_asyncio.fixture
async def gateway(infra: Infra) -> AsyncIterator[Gateway]:
    async for g in _serve(infra):
        yield g


EXPECTED_S = 30.0  # the longest wait for a frame the test knows will come


async def frames(
    ws: ClientConnection, until: str = "", idle_s: float = 2.0, count: int = 0
) -> list[dict[str, Any]]:
    """Frames until one of event ``until`` arrives, the server closes, or ``idle_s`` passes
    with none.

    Frames the test knows will come are waited for with a generous bound (``EXPECTED_S``): the
    ``until`` frame and those before it, and the first ``count`` frames. After those, ``idle_s``
    ends the read, so an extra frame (a duplicate) is still seen. A busy machine can take more
    than a second to build a resume's replay; only the short idle wait is the test's own.
    """
    out: list[dict[str, Any]] = []
    with contextlib.suppress(TimeoutError, ConnectionClosed):
        while True:
            expecting = bool(until) or len(out) < count
            frame = json.loads(
                await asyncio.wait_for(ws.recv(), max(idle_s, EXPECTED_S) if expecting else idle_s)
            )
            out.append(frame)
            if frame["event"] == until:
                break
    return out


async def closed(ws: ClientConnection, timeout: float = 10) -> tuple[int | None, str, list[Any]]:
    """Read until the server closes; the close code, its reason and the frames before it."""
    seen: list[Any] = []
    with contextlib.suppress(ConnectionClosed):
        while True:
            seen.append(json.loads(await asyncio.wait_for(ws.recv(), timeout)))
    return ws.close_code, ws.close_reason or "", seen


async def publish_tokens(bus: Bus, e: m.UserMessageAccepted, n: int, text: str = "w") -> None:
    """Token deltas of the run of ``e`` into CHAT_STREAM (the hub hears them too)."""
    for seq in range(1, n + 1):
        delta = m.TokenDelta(
            conversation_id=e.conversation_id,
            run_id=f"run-{e.message_id}",
            attempt=1,
            seq=seq,
            text=f"{text}{seq} ",
        )
        await bus.publish(
            subjects.token_stream(e.project_id, e.conversation_id), delta, msg_id=str(uuid.uuid4())
        )


async def stored(g: Gateway) -> m.UserMessageAccepted:
    e = user_event(project="p1", user="u1")
    await Store(g.pool).insert_user_message(e)
    return e


async def test_live_events_arrive_as_json_frames_with_sse_ids(gateway: Gateway) -> None:
    e = await stored(gateway)
    async with connect(gateway.ws(e.conversation_id), additional_headers=auth()) as ws:
        [ready] = await frames(ws, until="ready")
        assert ready == {
            "id": None,
            "event": "ready",
            "data": {"conversation_id": e.conversation_id, "replayed": 0},
        }
        assert gateway.metric("stream_clients", transport="websocket") == 1
        await publish_tokens(gateway.bus, e, 5)
        got = await frames(ws, idle_s=1, count=5)
    run = f"run-{e.message_id}"
    assert [f["id"] for f in got] == [f"tok:{run}:1:{i}" for i in range(1, 6)]
    assert {f["event"] for f in got} == {"token"}
    assert "".join(f["data"]["text"] for f in got) == "w1 w2 w3 w4 w5 "
    assert got[0]["data"] == {"run_id": run, "attempt": 1, "seq": 1, "text": "w1 "}


async def test_a_browser_authenticates_and_resumes_with_its_first_frame(gateway: Gateway) -> None:
    e = await stored(gateway)
    await publish_tokens(gateway.bus, e, 6)
    run = f"run-{e.message_id}"
    token = make_token(SECRET, "p1", "u1")
    async with connect(gateway.ws(e.conversation_id)) as ws:
        await ws.send(
            json.dumps({"type": "auth", "token": token, "last_event_id": f"tok:{run}:1:2"})
        )
        got = await frames(ws, idle_s=1, count=1 + 4)
    assert got[0]["event"] == "ready" and got[0]["data"]["replayed"] == 4
    assert [f["id"] for f in got[1:]] == [f"tok:{run}:1:{i}" for i in (3, 4, 5, 6)]
    # The query parameter names the resume position too; from the user message: every token.
    url = f"{gateway.ws(e.conversation_id)}?last_event_id=msg:{e.message_id}"
    async with connect(url, additional_headers=auth()) as ws:
        got = await frames(ws, idle_s=1, count=1 + 6)
    assert [f["id"] for f in got[1:]] == [f"tok:{run}:1:{i}" for i in range(1, 7)]
    # An id that names nothing here replays the whole conversation, starting with the message.
    url = f"{gateway.ws(e.conversation_id)}?last_event_id=garbage"
    async with connect(url, additional_headers=auth()) as ws:
        got = await frames(ws, idle_s=1, count=2 + 6)
    assert got[1]["event"] == "message.created" and got[1]["id"] == f"msg:{e.message_id}"
    assert len(got) == 2 + 6


async def test_resume_and_live_events_overlap_without_a_gap_or_a_duplicate(
    gateway: Gateway,
) -> None:
    e = await stored(gateway)
    await publish_tokens(gateway.bus, e, 3)
    run = f"run-{e.message_id}"

    async def more() -> None:
        for seq in range(4, 40):
            delta = m.TokenDelta(
                conversation_id=e.conversation_id, run_id=run, attempt=1, seq=seq, text="x"
            )
            await gateway.bus.publish(
                subjects.token_stream("p1", e.conversation_id), delta, msg_id=str(uuid.uuid4())
            )

    writer = asyncio.create_task(more())
    url = f"{gateway.ws(e.conversation_id)}?last_event_id=tok:{run}:1:1"
    async with connect(url, additional_headers=auth()) as ws:
        await writer
        got = await frames(ws, idle_s=1, count=1 + 38)
    assert [f["data"]["seq"] for f in got[1:]] == list(range(2, 40))


async def test_a_client_past_a_cancel_the_database_has_not_stored_gets_no_late_token(
    gateway: Gateway,
) -> None:
    # Two messages, each run stored as running. Policy has cancelled the first (its verdict is
    # in POLICY; the persister has not stored it yet) and the client, pushed that cancel and
    # the second message live, reconnects from the second message. The first run's executor
    # still streams until the abort reaches it: its late token must not go out, or the
    # client's last event would be a token after the cancel, and its next resume would send
    # the cancel and all that followed it again.
    first = await stored(gateway)
    second = user_event(project="p1", user="u1", conversation_id=first.conversation_id)
    store = Store(gateway.pool)
    await store.insert_user_message(second)
    for e in (first, second):
        await store.upsert_run(run_verdict(e, "running"))
    await publish_tokens(gateway.bus, first, 1)
    cancel = run_verdict(first, "cancelled", verdict="stop")
    await gateway.bus.publish(
        subjects.policy_verdict("p1", first.conversation_id), cancel, msg_id=cancel.event_id
    )
    r1, r2 = vocab.run_id(first.message_id), vocab.run_id(second.message_id)
    url = f"{gateway.ws(first.conversation_id)}?last_event_id=msg:{second.message_id}"
    async with connect(url, additional_headers=auth()) as ws:
        [ready] = await frames(ws, until="ready", idle_s=30)
        late = m.TokenDelta(
            conversation_id=first.conversation_id, run_id=r1, attempt=1, seq=2, text="late"
        )
        fresh = m.TokenDelta(
            conversation_id=first.conversation_id, run_id=r2, attempt=1, seq=1, text="x"
        )
        for delta in (late, fresh):
            await gateway.bus.publish(
                subjects.token_stream("p1", first.conversation_id), delta, msg_id=str(uuid.uuid4())
            )
        # Both on one subject, the late one first: had it gone out, it would come first.
        got = await frames(ws, until="token", idle_s=30)
    assert [f["id"] for f in got if f["event"] == "token"] == [f"tok:{r2}:1:1"]
    # From the first run's first token the replay has the run's stored tokens, then the
    # cancel, read from POLICY, once, then the second message.
    url = f"{gateway.ws(first.conversation_id)}?last_event_id=tok:{r1}:1:1"
    async with connect(url, additional_headers=auth()) as ws:
        [ready] = await frames(ws, until="ready", idle_s=30)
        replayed = [json.loads(await ws.recv()) for _ in range(ready["data"]["replayed"])]
    ids = [f["id"] for f in replayed]
    assert ids[:3] == [f"tok:{r1}:1:2", f"run:{r1}:1:cancelled", f"msg:{second.message_id}"], ids
    assert ids.count(f"run:{r1}:1:cancelled") == 1


async def test_a_verdict_read_past_its_limit_folds_nothing(gateway: Gateway) -> None:
    # The read stops at the oldest verdicts, and the newest are the ones a replay needs: one
    # that reached the limit is not used (the runs are shown as stored).
    e = await stored(gateway)
    for status in ("queued", "running", "cancelled"):
        v = run_verdict(e, status, 0 if status == "queued" else 1)
        await gateway.bus.publish(
            subjects.policy_verdict("p1", e.conversation_id), v, msg_id=v.event_id
        )
    since = e.created_at
    got = await VerdictLog(gateway.bus, limit=4).since("p1", e.conversation_id, since)
    assert got is not None and [v.status for v in got] == ["queued", "running", "cancelled"]
    assert await VerdictLog(gateway.bus, limit=3).since("p1", e.conversation_id, since) is None
    # Another conversation's verdicts are not read.
    assert await VerdictLog(gateway.bus).since("p1", str(uuid.uuid4()), since) == []


BAD_TOKENS = {
    "garbage": "Bearer not-a-jwt",
    "basic": "Basic abc",
    "wrong-secret": "Bearer "
    + jwt.encode({"sub": "u", "project": "p", "exp": 9999999999}, "wrong-secret"),
    "expired": "Bearer " + jwt.encode({"sub": "u", "project": "p", "exp": 1}, SECRET),
}


@pytest.mark.parametrize("header", list(BAD_TOKENS.values()), ids=list(BAD_TOKENS))
async def test_a_bad_token_gets_an_error_frame_and_close_4401(
    gateway: Gateway, header: str
) -> None:
    e = await stored(gateway)
    async with connect(
        gateway.ws(e.conversation_id), additional_headers={"Authorization": header}
    ) as ws:
        code, reason, seen = await closed(ws)
    assert (code, reason) == (4401, "unauthenticated")
    assert [f["event"] for f in seen] == ["error"]
    assert seen[0]["data"]["code"] == "unauthenticated" and seen[0]["data"]["status"] == 401


@pytest.mark.parametrize(
    ("first", "code"),
    [
        (None, 4401),  # nothing within the auth timeout
        ({"type": "auth", "token": "not-a-jwt"}, 4401),
        ({"type": "auth"}, 4401),
        ({"type": "ping"}, 4401),
        ({"type": "auth", "token": 5}, 4400),
        ({"type": "auth", "token": "t", "admin": True}, 4400),
        ("{not json", 4400),
        ("[1, 2]", 4400),
        (b"\x00\x01binary", 1003),
        ("x" * 5000, 1009),
    ],
    ids=[
        "silent",
        "bad-token",
        "no-token",
        "ping-first",
        "token-wrong-type",
        "unknown-field",
        "not-json",
        "array",
        "binary",
        "oversized",
    ],
)
async def test_a_client_without_header_must_send_a_valid_auth_frame_first(
    gateway: Gateway, first: Any, code: int
) -> None:
    e = await stored(gateway)
    async with connect(gateway.ws(e.conversation_id)) as ws:
        if first is not None:
            await ws.send(first if isinstance(first, (str, bytes)) else json.dumps(first))
        got, _, seen = await closed(ws)
    assert got == code
    assert all(f["event"] == "error" for f in seen)
    assert gateway.metric("stream_clients", transport="websocket") == 0
    assert not gateway.hub.clients


async def test_someone_elses_conversation_is_4404_and_a_bad_id_is_4400(gateway: Gateway) -> None:
    e = await stored(gateway)
    for other in (auth(user="u2"), auth(project="p2")):
        async with connect(gateway.ws(e.conversation_id), additional_headers=other) as ws:
            code, reason, seen = await closed(ws)
        assert (code, reason) == (4404, "not_found")
        assert seen[0]["data"]["message"] == "conversation not found"
    async with connect(gateway.ws("not-a-uuid"), additional_headers=auth()) as ws:
        code, reason, _ = await closed(ws)
    assert (code, reason) == (4400, "invalid_id")
    assert not gateway.hub.clients


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", 4400),
        ('{"type": "subscribe", "conversation_id": "*"}', 4400),
        ('{"type": "auth", "token": "again"}', 4400),
        ("null", 4400),
        (b"binary", 1003),
        ('{"type": "ping", "pad": "' + "x" * 5000 + '"}', 1009),
    ],
    ids=["not-json", "unknown-type", "second-auth", "null", "binary", "oversized"],
)
async def test_garbage_after_the_start_closes_the_stream_with_a_clear_code(
    gateway: Gateway, frame: str | bytes, code: int
) -> None:
    e = await stored(gateway)
    async with connect(gateway.ws(e.conversation_id), additional_headers=auth()) as ws:
        await frames(ws, until="ready")
        await ws.send(json.dumps({"type": "ping"}))
        assert (await frames(ws, until="pong"))[-1] == {"id": None, "event": "pong", "data": {}}
        await ws.send(frame)
        got, _, seen = await closed(ws)
    assert got == code
    assert all(f["event"] == "error" for f in seen)
    assert gateway.metric("stream_clients", transport="websocket") == 0
    assert not gateway.hub.clients


async def test_duplicate_connections_each_get_every_event(gateway: Gateway) -> None:
    e = await stored(gateway)
    url = gateway.ws(e.conversation_id)
    async with (
        connect(url, additional_headers=auth()) as a,
        connect(url, additional_headers=auth()) as b,
    ):
        await frames(a, until="ready")
        await frames(b, until="ready")
        assert gateway.metric("stream_clients", transport="websocket") == 2
        await publish_tokens(gateway.bus, e, 4)
        got_a, got_b = await asyncio.gather(
            frames(a, idle_s=1, count=4), frames(b, idle_s=1, count=4)
        )
        assert [f["id"] for f in got_a] == [f["id"] for f in got_b]
        assert len(got_a) == 4
        await a.close()
        await publish_tokens(gateway.bus, e, 2, text="again")
        # The one left open still streams; the closed one left the hub.
        again = await frames(b, idle_s=1, count=2)
        assert [f["data"]["text"] for f in again] == ["again1 ", "again2 "]

        async def one_left() -> bool:
            return gateway.metric("stream_clients", transport="websocket") == 1

        await eventually(one_left)
        assert len(gateway.hub.clients[f"p1.{e.conversation_id}"]) == 1


async def test_an_idle_stream_gets_heartbeats(infra: Infra) -> None:
    async for g in _serve(infra, ws_heartbeat_s=0.2):
        e = await stored(g)
        async with connect(g.ws(e.conversation_id), additional_headers=auth()) as ws:
            got = [json.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(4)]
        assert got[0]["event"] == "ready"
        assert got[1:] == [{"id": None, "event": "heartbeat", "data": {}}] * 3


async def raw_ws(port: int, path: str, headers: dict[str, str]) -> socket.socket:
    """A WebSocket handshake on a plain socket with a tiny receive buffer, which reads nothing."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += await asyncio.to_thread(sock.recv, 1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each unmasked server frame in ``data``."""
    out, i = [], 0
    while i + 2 <= len(data):
        opcode, n, i = data[i] & 0x0F, data[i + 1] & 0x7F, i + 2
        if n == 126:
            n, i = int.from_bytes(data[i : i + 2], "big"), i + 2
        elif n == 127:
            n, i = int.from_bytes(data[i : i + 8], "big"), i + 8
        out.append((opcode, data[i : i + n]))
        i += n
    return out


async def test_a_client_that_stops_reading_is_cut_off_with_4429(infra: Infra) -> None:
    async for g in _serve(infra, sse_queue_size=8, ws_send_timeout_s=2.0):
        e = await stored(g)
        port = int(g.url.rsplit(":", 1)[1])
        sock = await raw_ws(port, f"/api/conversations/{e.conversation_id}/ws", auth())
        try:
            await publish_tokens(g.bus, e, 400, text="y" * 30_000)
            for _ in range(300):
                if g.metric("slow_client_drops_total") == 1 and not g.hub.clients:
                    break
                await asyncio.sleep(0.05)
            assert g.metric("slow_client_drops_total") == 1
            assert not g.hub.clients
            # Reading at last: what it was sent, in order, then the close frame.
            data = b""
            while chunk := await asyncio.to_thread(sock.recv, 1 << 20):
                data += chunk
        finally:
            sock.close()
        got = server_frames(data)
        texts = [json.loads(p) for op, p in got if op == 1]
        assert texts[0]["event"] == "ready"
        seqs = [f["data"]["seq"] for f in texts[1:]]
        assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) < 400
        assert g.metric("websocket_connections_total", end="4429") == 1
        # The close frame goes out only if the client's buffers had room by then (it was not
        # reading); the connection ends either way.
        opcode, payload = got[-1]
        if opcode == 8:
            assert int.from_bytes(payload[:2], "big") == 4429
            assert payload[2:] == b"slow_client: reconnect with last_event_id"


async def test_an_sse_client_that_stops_reading_is_let_go(infra: Infra) -> None:
    async for g in _serve(infra, sse_queue_size=8, sse_send_timeout_s=2.0):
        e = await stored(g)
        port = int(g.url.rsplit(":", 1)[1])
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        header = auth()["Authorization"]
        path = f"/api/conversations/{e.conversation_id}/events"
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {header}\r\n\r\n".encode())
        try:
            for _ in range(100):
                if g.metric("stream_clients", transport="sse") == 1:
                    break
                await asyncio.sleep(0.05)
            await publish_tokens(g.bus, e, 400, text="y" * 30_000)
            # Out of the hub, its stream task gone: nothing of it is left in the gateway.
            for _ in range(300):
                if g.metric("stream_clients", transport="sse") == 0 and not g.hub.clients:
                    break
                await asyncio.sleep(0.05)
            assert g.metric("stream_clients", transport="sse") == 0
            assert not g.hub.clients
            assert g.metric("slow_client_drops_total") == 1
        finally:
            sock.close()


async def test_a_gateway_shutting_down_closes_streams_with_1001(gateway: Gateway) -> None:
    e = await stored(gateway)
    async with connect(gateway.ws(e.conversation_id), additional_headers=auth()) as ws:
        await frames(ws, until="ready")
        await gateway.hub.stop()
        code, _, _ = await closed(ws)
    assert code == 1001


async def test_a_resume_the_database_cannot_serve_is_4503_and_a_live_stream_still_opens(
    gateway: Gateway,
) -> None:
    e = await stored(gateway)
    # Accepted through the gateway, so CHAT_IN still tells whose it is while Postgres is away.
    await gateway.bus.publish(
        subjects.chat_in(e.project_id, e.conversation_id), e, msg_id=e.message_id
    )
    await gateway.pool.close()  # the read model is gone
    url = f"{gateway.ws(e.conversation_id)}?last_event_id=msg:{e.message_id}"
    async with connect(url, additional_headers=auth()) as ws:
        code, reason, seen = await closed(ws)
    assert (code, reason) == (4503, "database_unavailable")
    assert seen[0]["data"]["status"] == 503
    assert not gateway.hub.clients
    # Without a position to resume from, nothing needs reading: the live stream opens.
    async with connect(gateway.ws(e.conversation_id), additional_headers=auth()) as ws:
        assert (await frames(ws, until="ready"))[-1]["event"] == "ready"
