"""A healthy model call that outlasts ack_wait is kept alive by in-progress acks, never redelivered."""

from __future__ import annotations

import asyncio

from baton.offline_model import OfflineModelProcess
from baton.provision import provision
from services.executor.adapters import Model
from services.executor.config import Settings
from services.executor.handlers import Handlers
from services.persister.adapters import Store
from shared import messages as m
from shared import model, subjects, wiring
from shared.bus import Consumer
from shared.db import create_pool
from shared.history import History
from tests.integration.conftest import Infra
from tests.integration.test_executor import _task
from tests.support import (
    connect_bus,
    decode_all,
    read_subject,
    running,
    service_metrics,
    user_event,
)


async def test_a_stream_three_times_longer_than_ack_wait_is_called_once(
    infra: Infra, offline_model: OfflineModelProcess
) -> None:
    # ack_wait 1.5 s; the answer streams for about 4.5 s.
    await provision(infra.nats_url, ack_wait_s=1.5)
    offline_model.update_settings(tokens_per_second=6, words_per_reply=27)
    bus = await connect_bus(infra.nats_url, "executor")
    pool = await create_pool(infra.database_url)
    e = user_event("Write me a long answer")
    await Store(pool).insert_user_message(e)
    client = model.client(offline_model.url, "test-key", 10.0)
    h = Handlers(bus, History(pool), Model(client), Settings(), service_metrics("executor"))
    task = _task(e)
    await bus.publish(
        subjects.exec_task(e.project_id, e.conversation_id), task, msg_id=task.event_id
    )
    consumer = Consumer(bus, wiring.EXECUTOR_TASKS, m.ExecTask, h.task)
    async with running(consumer):
        [result] = decode_all(
            await read_subject(bus, subjects.STREAM_RESULTS, "exec.result.>", 1, timeout=30),
            m.ExecResult,
        )
        await asyncio.sleep(2)  # a redelivery, had there been one, would start a call now
    assert consumer.ack_wait_s == 1.5  # learnt from the provisioned consumer
    assert result.call_id.endswith("#1")
    assert list(offline_model.calls()) == [result.call_id]
    assert offline_model.stats()["calls"] == 1
    await bus.close()
    await pool.close()
    await client.close()
