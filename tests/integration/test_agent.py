"""The agent against real NATS, Postgres and the offline model through the anthropic SDK."""

from __future__ import annotations

from baton.offline_model import OfflineModelProcess
from services.agent.adapters import Classifier
from services.agent.config import Settings
from services.agent.handlers import Handlers
from services.persister.adapters import Store
from shared import messages as m
from shared import model, subjects
from shared.bus import Consumer
from shared.db import create_pool
from shared.history import History
from tests.integration.conftest import Infra
from tests.support import (
    connect_bus,
    decode_all,
    read_subject,
    running,
    service_metrics,
    user_event,
)


async def _run_agent(infra: Infra, url: str, e: m.UserMessageAccepted) -> list[m.AgentDecision]:
    bus = await connect_bus(infra.nats_url, "agent")
    pool = await create_pool(infra.database_url)
    await Store(pool).insert_user_message(e)
    settings = Settings()
    client = model.client(url, "test-key", 5.0)
    h = Handlers(
        bus,
        History(pool),
        Classifier(client, settings.model, settings.max_tokens),
        settings,
        service_metrics("agent"),
    )
    persisted = m.UserMessagePersisted(**{f: getattr(e, f) for f in e.__struct_fields__})
    await bus.publish(
        subjects.persisted_user(e.project_id, e.conversation_id), persisted, msg_id="p"
    )
    async with running(Consumer(bus, subjects.AGENT_IN, m.UserMessagePersisted, h.user_message)):
        found = await read_subject(bus, subjects.STREAM_DECISIONS, "agent.decision.>", 1)
    await bus.close()
    await pool.close()
    await client.close()
    return decode_all(found, m.AgentDecision)


async def test_the_model_classifies_a_message_through_forced_tool_use(
    infra: Infra, offline_model: OfflineModelProcess
) -> None:
    e = user_event("Please write a python function that reverses a list")
    [decision] = await _run_agent(infra, offline_model.url, e)
    assert decision.fallback is False
    assert decision.event_id == f"decision:{e.message_id}"
    assert 1 <= decision.decision.estimated_tokens <= 8192
    stats = offline_model.stats()
    assert stats["calls"] == 1 and stats["completed"] == 1


async def test_a_failing_model_leaves_a_marked_rule_based_decision(
    infra: Infra, offline_model: OfflineModelProcess
) -> None:
    offline_model.set_faults([{"kind": "500", "count": 5}])
    e = user_event("Why does my SQL query return duplicate rows?")
    [decision] = await _run_agent(infra, offline_model.url, e)
    assert decision.fallback is True
    assert decision.fallback_reason.startswith("model_error")
    assert (decision.decision.intent, decision.decision.executor) == ("code", "code")
