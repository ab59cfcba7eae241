"""Consumers' pull requests: each message is handed over as it arrives, not when a batch fills."""

from __future__ import annotations

import asyncio

from nats.aio.msg import Msg

from shared import subjects, wiring
from shared.bus import Bus, Pull
from tests.integration.conftest import Infra
from tests.support import connect_bus, user_event


async def _publish(bus: Bus, n: int) -> None:
    for _ in range(n):
        e = user_event()
        await bus.publish(subjects.chat_in(e.project_id, e.conversation_id), e, msg_id=e.message_id)


async def test_a_lone_message_is_handed_over_while_the_batch_is_still_open(infra: Infra) -> None:
    bus = await connect_bus(infra.nats_url)
    got: list[Msg] = []
    arrived = asyncio.Event()

    def hand_over(msg: Msg) -> None:
        got.append(msg)
        arrived.set()

    spec = wiring.PERSISTER_IN
    pull = Pull(bus.nc, spec.stream, spec.durable, hand_over, expires_s=30.0)
    await pull.open()
    try:
        request = asyncio.create_task(pull.request(32))
        await _publish(bus, 1)
        await asyncio.wait_for(arrived.wait(), 10)
        # Handed over while the request still waits for 31 more: nothing sat in a batch.
        assert not request.done()
        await got[0].ack()
        request.cancel()
    finally:
        await pull.close()
        await bus.close()


async def test_a_request_ends_as_soon_as_its_slots_are_filled(infra: Infra) -> None:
    bus = await connect_bus(infra.nats_url)
    got: list[Msg] = []
    spec = wiring.PERSISTER_IN
    pull = Pull(bus.nc, spec.stream, spec.durable, got.append, expires_s=30.0)
    await pull.open()
    try:
        await _publish(bus, 5)
        # Well before the 30 s expiry: three slots asked for, three messages, done.
        await asyncio.wait_for(pull.request(3), 10)
        assert len(got) == 3
        await asyncio.wait_for(pull.request(2), 10)
        assert len(got) == 5
        assert len({m.metadata.sequence.stream for m in got}) == 5
        for msg in got:
            await msg.ack()
    finally:
        await pull.close()
        await bus.close()


async def test_an_empty_stream_ends_the_request_at_its_expiry(infra: Infra) -> None:
    bus = await connect_bus(infra.nats_url)
    got: list[Msg] = []
    spec = wiring.PERSISTER_IN
    pull = Pull(bus.nc, spec.stream, spec.durable, got.append, expires_s=0.5)
    await pull.open()
    try:
        await asyncio.wait_for(pull.request(8), 10)
        assert got == []
    finally:
        await pull.close()
        await bus.close()
