"""Publishing without a round trip each: order kept, acks settled together, none left waiting."""

from __future__ import annotations

from shared import messages as m
from shared import subjects
from tests.integration.conftest import Infra
from tests.support import connect_bus


def _delta(seq: int) -> m.TokenDelta:
    return m.TokenDelta(conversation_id="c1", run_id="run-1", attempt=1, seq=seq, text=f"w{seq} ")


async def test_publishes_not_awaited_one_by_one_land_in_call_order(infra: Infra) -> None:
    bus = await connect_bus(infra.nats_url)
    try:
        subject = subjects.token_stream("p1", "c1")
        acks = [
            await bus.publish_async(subject, _delta(seq), msg_id=f"delta:call-1:{seq}")
            for seq in range(1, 51)
        ]
        # Nothing was awaited yet: the acks come back together.
        assert await bus.settle(acks, timeout=10.0) == []
        assert [a.result().seq for a in acks] == sorted(a.result().seq for a in acks)
        assert len({a.result().seq for a in acks}) == 50
        # The same ids again are duplicates: the stream keeps one copy each.
        again = [
            await bus.publish_async(subject, _delta(seq), msg_id=f"delta:call-1:{seq}")
            for seq in range(1, 51)
        ]
        assert await bus.settle(again, timeout=10.0) == []
        assert all(a.result().duplicate for a in again)
        assert bus.js.publish_async_pending() == 0
    finally:
        await bus.close()


async def test_publishes_the_broker_never_acks_are_given_up_and_free_their_slots(
    infra: Infra,
) -> None:
    bus = await connect_bus(infra.nats_url)
    try:
        # A subject no stream listens on: a plain message with nobody to answer it.
        acks = [
            await bus.publish_async("nowhere.at.all", _delta(seq), msg_id=f"lost:{seq}")
            for seq in range(1, 4)
        ]
        errors = await bus.settle(acks, timeout=2.0)
        assert len(errors) == 3
        assert all(a.done() for a in acks)
        assert bus.js.publish_async_pending() == 0
    finally:
        await bus.close()


async def test_a_refused_publish_fails_its_own_future_only(infra: Infra) -> None:
    bus = await connect_bus(infra.nats_url)
    try:
        await bus.js.delete_stream(subjects.STREAM_TOKENS)
        refused = await bus.publish_async(
            subjects.token_stream("p1", "c1"), _delta(1), msg_id="delta:x:1"
        )
        kept = await bus.publish_async(subjects.exec_result("p1", "c1"), _delta(2), msg_id="kept")
        errors = await bus.settle([refused, kept], timeout=5.0)
        assert len(errors) == 1
        assert refused.exception() is not None
        assert kept.exception() is None
    finally:
        await bus.close()
