"""Publishing with an id: the PubAck read by the bus, duplicates and the broker's refusals."""

from __future__ import annotations

import nats.js.errors
import pytest

from shared import subjects
from tests.integration.conftest import Infra
from tests.support import connect_bus, user_event


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
