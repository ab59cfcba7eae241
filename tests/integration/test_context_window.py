"""The project's hot window (policy file ``context_messages``) reaches the model: the executor
sends at most the task's ``context_messages`` of history, else its own setting."""

from __future__ import annotations

from typing import Any

import msgspec

from baton.offline_model import OfflineModelProcess
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
    exec_result,
    read_subject,
    running,
    service_metrics,
    user_event,
)


async def _sent(infra: Infra, offline_model: OfflineModelProcess, window: int) -> list[Any]:
    """What the model was sent for the 6th question of a conversation of five answered ones."""
    bus = await connect_bus(infra.nats_url, "executor")
    pool = await create_pool(infra.database_url)
    store = Store(pool)
    first = user_event("question 0")
    events = [first] + [
        user_event(f"question {i}", conversation_id=first.conversation_id) for i in range(1, 6)
    ]
    for i, e in enumerate(events):
        await store.insert_user_message(e)
        if i < 5:
            await store.store_result(exec_result(e, 1, text=f"answer {i}"))
    last = events[-1]
    cfg = Settings(context_messages=50)
    client = model.client(offline_model.url, "test-key", cfg.stall_timeout_s)
    h = Handlers(bus, History(pool), Model(client), cfg, service_metrics("executor"))
    task = msgspec.structs.replace(_task(last), context_messages=window)
    await bus.publish(
        subjects.exec_task(last.project_id, last.conversation_id), task, msg_id=task.event_id
    )
    async with running(Consumer(bus, wiring.EXECUTOR_TASKS, m.ExecTask, h.task)):
        await read_subject(bus, subjects.STREAM_RESULTS, "exec.result.>", 1)
    await bus.close()
    await pool.close()
    await client.close()
    body = offline_model.requests()[-1]["body"]
    messages: list[Any] = body["messages"]
    return messages


def _texts(messages: list[Any]) -> list[str]:
    out = []
    for msg in messages:
        content = msg["content"]
        out.append(content if isinstance(content, str) else content[-1]["text"])
    return out


async def test_the_task_window_bounds_the_history_sent(
    infra: Infra, offline_model: OfflineModelProcess
) -> None:
    sent = _texts(await _sent(infra, offline_model, window=3))
    assert sent == ["question 4", "answer 4", "question 5"]


async def test_without_a_window_in_the_task_the_executor_setting_applies(
    infra: Infra, offline_model: OfflineModelProcess
) -> None:
    sent = _texts(await _sent(infra, offline_model, window=0))
    assert len(sent) == 11 and sent[0] == "question 0" and sent[-1] == "question 5"
