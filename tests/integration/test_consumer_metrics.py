"""Each service reports its consumers' backlog (pending, ack-pending) read from JetStream."""

from __future__ import annotations

import asyncio
import uuid

from nats.aio.msg import Msg

from shared import messages as m
from shared import subjects, wiring
from shared.bus import Consumer
from tests.integration.conftest import Infra
from tests.support import connect_bus, eventually, running, user_event


async def test_pending_and_ack_pending_follow_the_consumer_backlog(infra: Infra) -> None:
    bus = await connect_bus(infra.nats_url, "persister")
    release = asyncio.Event()

    async def stuck(_e: m.UserMessageAccepted, _msg: Msg) -> str:
        await release.wait()
        return "inserted"

    consumer = Consumer(
        bus,
        wiring.PERSISTER_IN,
        m.UserMessageAccepted,
        stuck,
        batch=2,
        concurrency=2,
        lag_refresh_s=0.1,
    )
    conversation = str(uuid.uuid4())
    for _ in range(5):
        e = user_event(conversation_id=conversation)
        await bus.publish(subjects.chat_in("p1", conversation), e, msg_id=e.event_id)

    registry = bus.metrics.registry
    labels = {"consumer": wiring.PERSISTER_IN.durable}

    def gauges() -> tuple[float | None, float | None]:
        return (
            registry.get_sample_value("baton_persister_consumer_pending", labels),
            registry.get_sample_value("baton_persister_consumer_ack_pending", labels),
        )

    async def backlog(expected: tuple[float, float]) -> bool:
        return gauges() == expected

    async with running(consumer):
        # Two are in the handlers (delivered, unacked); three wait in the stream.
        await eventually(lambda: backlog((3.0, 2.0)))
        release.set()
        await eventually(lambda: backlog((0.0, 0.0)))
    await bus.close()
