"""Publishing with an id: the PubAck read by the bus, duplicates and the broker's refusals."""

from __future__ import annotations

import asyncio
from typing import Any

import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS

from shared import subjects
from tests.integration.conftest import Infra
from tests.support import connect_bus, eventually, user_event


async def test_a_publish_returns_its_stream_and_sequence_and_a_repeat_is_a_duplicate(
    infra: Infra,
) -> None:
    bus = await connect_bus(infra.nats_url)
    try:
        e = user_event()
        subject = subjects.chat_in(e.project_id, e.conversation_id)
        first = await bus.publish(subject, e, msg_id=e.message_id)
        again = await bus.publish(subject, e, msg_id=e.message_id)
        other = user_event(conversation_id=e.conversation_id)
        second = await bus.publish(subject, other, msg_id=other.message_id)
    finally:
        await bus.close()
    assert (first.stream, bool(first.duplicate)) == (subjects.STREAM_CHAT_IN, False)
    assert (again.seq, again.duplicate) == (first.seq, True)
    assert second.seq == first.seq + 1 and not second.duplicate


async def test_a_subject_no_stream_takes_is_refused(infra: Infra) -> None:
    bus = await connect_bus(infra.nats_url)
    try:
        with pytest.raises(nats.js.errors.NoStreamResponseError):
            await bus.publish("nowhere.at.all", user_event(), msg_id="m-1", timeout=2)
    finally:
        await bus.close()


async def test_a_refusal_by_the_stream_raises_the_brokers_error(infra: Infra) -> None:
    bus = await connect_bus(infra.nats_url)
    create_only = {"Nats-Expected-Last-Subject-Sequence": "0"}
    e, later = user_event(), user_event()
    subject = subjects.chat_in(e.project_id, e.conversation_id)
    try:
        await bus.publish(subject, e, msg_id=e.message_id, headers=create_only)
        with pytest.raises(nats.js.errors.APIError) as err:
            await bus.publish(subject, later, msg_id=later.message_id, headers=create_only)
    finally:
        await bus.close()
    assert err.value.err_code == 10071, err.value


async def test_a_publish_nobody_answers_times_out_and_leaves_nothing_waiting(infra: Infra) -> None:
    bus = await connect_bus(infra.nats_url)
    listener = await connect_bus(infra.nats_url)
    heard: list[str] = []

    async def silent(msg: Any) -> None:
        heard.append(msg.reply)  # a subscriber that never replies: not "no responders"

    await listener.nc.subscribe("silent.subject", cb=silent)
    await _server_has_subscriptions(listener.nc)
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(nats.errors.TimeoutError):
            await bus.publish("silent.subject", user_event(), msg_id="m-1", timeout=0.5)
        waited = asyncio.get_running_loop().time() - started
        # A late reply to the request that gave up is ignored.
        await _heard(heard)
        await listener.nc.publish(heard[0], b'{"stream":"X","seq":1}')
        await listener.nc.flush()
        await asyncio.sleep(0.1)
    finally:
        await listener.close()
        await bus.close()
    assert 0.5 <= waited < 5 and bus.acks.waiting == {}


async def _heard(heard: list[str]) -> None:
    """Wait for the listener's callback to have run (on a busy machine it may come after the
    request's own short timeout)."""

    async def any_heard() -> bool:
        return bool(heard)

    await eventually(any_heard)


async def _server_has_subscriptions(nc: NATS) -> None:
    """Return once the server holds every subscription made so far on ``nc``.

    One ``flush()`` is not enough with nats-py 2.16: it writes its PING to the socket at once,
    while the SUB still waits in the pending buffer for the flusher task, so the PONG can come
    back before the server saw the SUB. Another connection's publish then meets no subscriber
    (the "no responders" of 2026-12-01 on a busy machine). By the first PONG the flusher has
    written the SUB, so the second PING follows it on the wire.
    """
    await nc.flush()
    await nc.flush()


async def test_a_publish_still_waiting_when_the_bus_closes_fails_instead_of_hanging(
    infra: Infra,
) -> None:
    bus = await connect_bus(infra.nats_url)
    listener = await connect_bus(infra.nats_url)
    arrived = asyncio.Event()

    async def silent(msg: Any) -> None:
        arrived.set()  # the request is out, and waits for a reply that never comes

    await listener.nc.subscribe("silent.subject", cb=silent)
    # Not one flush(): with one, CI's run of a877e68 met "no responders" and the request
    # never arrived (see _server_has_subscriptions).
    await _server_has_subscriptions(listener.nc)
    heard = asyncio.create_task(arrived.wait())
    try:
        waiting = asyncio.create_task(
            bus.publish("silent.subject", user_event(), msg_id="m-2", timeout=60)
        )
        await asyncio.wait({waiting, heard}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        assert arrived.is_set(), waiting.exception() if waiting.done() else "no request in 30 s"
        await bus.close()
        with pytest.raises(nats.errors.ConnectionClosedError):
            await asyncio.wait_for(waiting, 10)
    finally:
        heard.cancel()
        await listener.close()


async def test_a_publish_started_while_the_bus_closes_is_refused_at_once(infra: Infra) -> None:
    # Between the PubAck subscription's close and the connection's drain, nothing would reply
    # and no sweep would time the request out: it must fail at once, not wait for ever.
    bus = await connect_bus(infra.nats_url)
    try:
        await bus.acks.close()
        with pytest.raises(nats.errors.ConnectionClosedError):
            await asyncio.wait_for(bus.acks.request("silent.subject", b"{}", {}, 60), 2)
    finally:
        await bus.close()
