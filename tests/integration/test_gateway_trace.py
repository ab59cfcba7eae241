"""With no exporter the accept path makes no span objects, yet each message starts its own trace."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest
import pytest_asyncio
from opentelemetry import propagate, trace
from structlog.testing import capture_logs

from baton.devtoken import make_token
from services.gateway.adapters import Hub, Publisher, ReadModel, TokenLog
from services.gateway.config import Settings
from services.gateway.handlers import Api
from services.gateway.main import asgi
from shared import subjects, tracing
from shared.db import create_pool
from tests.integration.conftest import Infra
from tests.support import connect_bus, read_subject, service_metrics

SECRET = "test-secret-" + "t" * 32
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-0[01]$")


class Gateway(msgspec.Struct):
    client: Any
    bus: Any


@pytest_asyncio.fixture
async def gateway(infra: Infra) -> AsyncIterator[Gateway]:
    if tracing.recording():
        pytest.skip("this process records spans (OTEL_* export is set)")
    settings = Settings(jwt_secret=SECRET)  # type: ignore[arg-type]
    bus = await connect_bus(infra.nats_url, "gateway")
    pool = await create_pool(infra.database_url)
    reads = ReadModel(pool)
    metrics = service_metrics("gateway")
    hub = Hub(bus, 64, bus.log)
    await hub.start()
    api = Api(settings, Publisher(bus, 2.0), reads, hub, metrics, TokenLog(bus, 2.0))
    transport = httpx.ASGITransport(app=asgi(api, bus, reads, settings, metrics))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        yield Gateway(client, bus)
    await hub.stop()
    await bus.close()
    await pool.close()


def _auth(**extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token(SECRET, 'p1', 'u1')}", **extra}


async def test_each_message_carries_a_new_trace_that_its_log_line_names(
    gateway: Gateway,
) -> None:
    foreign = uuid.uuid4().hex
    sent = [
        {},
        {
            "traceparent": f"00-{foreign}-{uuid.uuid4().hex[:16]}-01"
        },  # linked at most, never continued
        {"traceparent": "00-garbage-zz-01"},
        {"traceparent": f"00-{'0' * 32}-{'0' * 16}-01" + "x" * 4000},
    ]
    with capture_logs() as logs:
        for headers in sent:
            r = await gateway.client.post(
                "/api/chat", json={"content": "hi"}, headers=_auth(**headers)
            )
            assert r.status_code == 202, r.text
    msgs = await read_subject(gateway.bus, subjects.STREAM_CHAT_IN, "chat.in.>", len(sent))
    traces = {}
    for msg in msgs:
        header = (msg.headers or {}).get("traceparent", "")
        match = TRACEPARENT.match(header)
        assert match, header
        assert match.group(1) not in ("0" * 32, foreign)
        # A consumer continues exactly this trace (what every hop's CONSUMER span does).
        remote = trace.get_current_span(propagate.extract({"traceparent": header}))
        assert format(remote.get_span_context().trace_id, "032x") == match.group(1)
        traces[msgspec.json.decode(msg.data)["message_id"]] = match.group(1)
    assert len(set(traces.values())) == len(sent)
    lines = [line for line in logs if line["event"] == "handled"]
    assert {line["message_id"]: line["trace_id"] for line in lines} == traces
