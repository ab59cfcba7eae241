"""A message whose every allowed delivery died with its process is dead-lettered, not dropped.

Before, the server's bound was each consumer's ``max_deliver``: a message whose last allowed delivery
was held by a process that died (no ack, nak or dead letter from it) was never delivered
again, and never reached the dead-letter stream either: gone without a trace. From the
broker's side a process death is a delivery held, unanswered, until ``ack_wait`` passes; the
tests hold deliveries that way, with a bare pull on the consumer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

import msgspec
import pytest
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig

from baton.provision import SERVER_DELIVERIES_ABOVE, consumer_config
from shared import bus as bus_module
from shared import messages as m
from shared import subjects
from shared.bus import Consumer, Pull
from tests.integration.conftest import Infra
from tests.support import connect_bus, read_subject, running, user_event


def _spec(max_deliver: int) -> subjects.ConsumerSpec:
    return subjects.ConsumerSpec(
        subjects.STREAM_CHAT_IN,
        f"test-exhausted-{uuid.uuid4().hex[:8]}",
        subjects.chat_in("pexh", str(uuid.uuid4())),
        ack_wait_s=1.0,
        max_deliver=max_deliver,
    )


@pytest.mark.parametrize("hook", ["none", "bills", "fails", "hangs"])
async def test_a_message_whose_every_delivery_died_is_dead_lettered_unhandled(
    infra: Infra, hook: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bus_module, "EXHAUSTED_HOOK_S", 0.5)  # a hung hook is cut off
    bus = await connect_bus(infra.nats_url)
    spec = _spec(max_deliver=2)
    await bus.js.add_consumer(spec.stream, consumer_config(spec))
    e = user_event(project="pexh")
    await bus.publish(spec.filter_subject, e, msg_id=e.message_id)
    # Two deliveries taken and never answered: two processes that died holding the message.
    held: list[Msg] = []
    pull = Pull(bus.nc, spec.stream, spec.durable, held.append, expires_s=30.0)
    await pull.open()
    try:
        for n in (1, 2):
            # Each request waits for the delivery: the first at once, the second once the
            # first's ack_wait has passed.
            await asyncio.wait_for(pull.request(1), 30)
            assert held[-1].metadata.num_delivered == n
    finally:
        await pull.close()
    handled: list[m.UserMessageAccepted] = []

    async def handle(event: m.UserMessageAccepted, _msg: Msg) -> str:
        handled.append(event)
        return "handled"

    exhausted: list[tuple[m.UserMessageAccepted, int]] = []

    async def on_exhausted(event: m.UserMessageAccepted, msg: Msg) -> None:
        # What the agent bills there (the calls its dead deliveries made); a failure to bill
        # is logged and never holds the dead letter back.
        exhausted.append((event, msg.metadata.num_delivered))
        if hook == "fails":
            raise TimeoutError("the bill could not be published")
        if hook == "hangs":
            await asyncio.Event().wait()

    consumer = Consumer(
        bus,
        spec,
        m.UserMessageAccepted,
        handle,
        on_exhausted=None if hook == "none" else on_exhausted,
    )
    async with running(consumer):
        [raw] = await read_subject(
            bus, subjects.STREAM_DLQ, subjects.dead_letter(spec.stream, spec.durable), 1, 30
        )
    letter = msgspec.json.decode(raw.data, type=m.DeadLetter)
    assert handled == []
    assert exhausted == ([] if hook == "none" else [(e, 3)])
    assert letter.deliveries == 3 and letter.stream_seq == held[0].metadata.sequence.stream
    assert letter.reason.startswith("delivered 3 times without an outcome"), letter.reason
    # The consumer's bound, not the server's, ended it: the server would have delivered more.
    info = await bus.js.consumer_info(spec.stream, spec.durable)
    assert info.config.max_deliver == 2 + SERVER_DELIVERIES_ABOVE
    assert msgspec.json.decode(letter.payload, type=m.UserMessageAccepted) == e
    await bus.js.delete_consumer(spec.stream, spec.durable)
    await bus.close()


async def test_provisioning_raises_the_servers_bound_of_an_existing_consumer(
    infra: Infra,
) -> None:
    # A consumer provisioned by the code before (the bound at the server) is updated in place.
    bus = await connect_bus(infra.nats_url)
    spec = _spec(max_deliver=20)
    before = dataclasses.replace(consumer_config(spec), max_deliver=spec.max_deliver)
    assert isinstance(before, ConsumerConfig)
    await bus.js.add_consumer(spec.stream, before)
    assert (await bus.js.consumer_info(spec.stream, spec.durable)).config.max_deliver == 20
    await bus.js.add_consumer(spec.stream, consumer_config(spec))
    info = await bus.js.consumer_info(spec.stream, spec.durable)
    assert info.config.max_deliver == 20 + SERVER_DELIVERIES_ABOVE
    await bus.js.delete_consumer(spec.stream, spec.durable)
    await bus.close()
