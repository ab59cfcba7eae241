"""The agent's classification calls billed: the agent publishes each call's usage, the persister
writes it once (real NATS, Postgres and the offline model), and it matches the model's ledger."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from baton.offline_model import OfflineModelProcess
from services.agent.adapters import Classifier
from services.agent.config import Settings
from services.agent.handlers import Handlers as AgentHandlers
from services.persister.adapters import Store
from services.persister.handlers import Handlers as PersisterHandlers
from shared import messages as m
from shared import model, subjects, wiring
from shared.bus import Consumer
from shared.db import create_pool
from shared.history import History
from tests.integration.conftest import Infra
from tests.support import connect_bus, eventually, running, service_metrics, user_event

AGENT_MODEL = Settings().model


@asynccontextmanager
async def _agent_and_persister(infra: Infra, model_url: str) -> AsyncIterator[Any]:
    """The agent and the persister's consumers, running; yields a bus to publish with."""
    settings = Settings()
    agent_bus = await connect_bus(infra.nats_url, "agent")
    persister_bus = await connect_bus(infra.nats_url, "persister")
    pool = await create_pool(infra.database_url)
    client = model.client(model_url, "test-key", 5.0)
    agent = AgentHandlers(
        agent_bus,
        History(pool),
        Classifier(client, settings.model, settings.max_tokens),
        settings,
        service_metrics("agent"),
    )
    persister = PersisterHandlers(persister_bus, Store(pool), service_metrics("persister"))
    consumers = [
        Consumer(persister_bus, wiring.PERSISTER_IN, m.UserMessageAccepted, persister.user_message),
        Consumer(persister_bus, wiring.PERSISTER_USAGE, m.ModelUsage, persister.model_usage),
        Consumer(agent_bus, wiring.AGENT_IN, m.UserMessagePersisted, agent.user_message),
    ]
    try:
        async with running(*consumers):
            yield persister_bus
    finally:
        await agent_bus.close()
        await persister_bus.close()
        await pool.close()
        await client.close()


async def _rows(dsn: str, purpose: str = "classification") -> list[Any]:
    con = await asyncpg.connect(dsn)
    try:
        return list(await con.fetch("SELECT * FROM usage WHERE purpose = $1", purpose))
    finally:
        await con.close()


async def _totals(dsn: str, project: str) -> Any:
    con = await asyncpg.connect(dsn)
    try:
        return await con.fetchrow("SELECT * FROM project_usage WHERE project_id = $1", project)
    finally:
        await con.close()


async def test_every_classification_call_has_one_usage_row_with_the_tokens_the_model_served(
    infra: Infra, offline_model: OfflineModelProcess
) -> None:
    project, conversation = f"p{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
    texts = ("What is a stream?", "And a consumer?", "Write a python function that sorts")
    async with _agent_and_persister(infra, offline_model.url) as bus:
        for text in texts:
            e = user_event(text, project=project, conversation_id=conversation)
            await bus.publish(subjects.chat_in(project, conversation), e, msg_id=e.message_id)

        async def three_rows() -> list[Any] | None:
            rows = await _rows(infra.database_url)
            return rows if len(rows) == 3 else None

        rows = await eventually(three_rows)
    ledger = {k: v for k, v in offline_model.calls().items() if k.startswith("classify:")}
    assert sorted(ledger) == sorted(r["call_id"] for r in rows)
    prices = Settings().prices()
    for r in rows:
        served = ledger[r["call_id"]]
        assert served["model"] == r["model"] == AGENT_MODEL
        assert (r["input_tokens"], r["output_tokens"]) == (
            served["input_tokens"],
            served["output_tokens"],
        )
        assert served["input_tokens"] > 0 and served["output_tokens"] > 0
        assert r["outcome"] == "completed" and r["project_id"] == project
        assert r["run_id"] == f"run-{r['call_id'].removeprefix('classify:').split('#')[0]}"
        usage = m.Usage(input_tokens=r["input_tokens"], output_tokens=r["output_tokens"])
        assert float(r["cost_usd"]) == round(usage.cost_usd(prices), 8) > 0
    # The project's totals (what GET /api/usage shows) are the ledger's, token for token.
    totals = await _totals(infra.database_url, project)
    assert totals["input_tokens"] == sum(c["input_tokens"] for c in ledger.values())
    assert totals["output_tokens"] == sum(c["output_tokens"] for c in ledger.values())
    assert totals["runs"] == 0  # classifying is not answering


async def test_a_usage_event_delivered_twice_is_written_and_counted_once(
    infra: Infra, offline_model: OfflineModelProcess
) -> None:
    project, conversation = f"p{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
    async with _agent_and_persister(infra, offline_model.url) as bus:
        e = user_event("What is a subject?", project=project, conversation_id=conversation)
        await bus.publish(subjects.chat_in(project, conversation), e, msg_id=e.message_id)
        [row] = await eventually(lambda: _rows(infra.database_url))
        # The same call's usage again, past JetStream's dedup (a new message id): the key holds.
        again = m.ModelUsage(
            event_id="usage:again",
            message_id=e.message_id,
            conversation_id=conversation,
            project_id=project,
            call_id=row["call_id"],
            run_id=row["run_id"],
            user_id=e.user_id,
            purpose="classification",
            model=row["model"],
            outcome="completed",
            usage=m.Usage(input_tokens=row["input_tokens"], output_tokens=row["output_tokens"]),
            prices=Settings().prices(),
        )
        await bus.publish(subjects.agent_usage(project, conversation), again, msg_id="again")
        marker = m.ModelUsage(
            **{f: getattr(again, f) for f in again.__struct_fields__ if f not in ("call_id",)},
            call_id="marker",
        )
        await bus.publish(subjects.agent_usage(project, conversation), marker, msg_id="marker")

        async def marker_written() -> list[Any] | None:
            rows = await _rows(infra.database_url)
            return rows if any(r["call_id"] == "marker" for r in rows) else None

        rows = await eventually(marker_written)
    assert sorted(r["call_id"] for r in rows) == sorted([row["call_id"], "marker"])
    totals = await _totals(infra.database_url, project)
    assert totals["input_tokens"] == 2 * row["input_tokens"]  # the call and the marker, once each


async def test_a_failed_classification_call_is_recorded_with_what_it_used(
    infra: Infra, offline_model: OfflineModelProcess
) -> None:
    offline_model.set_faults([{"kind": "529", "count": 1}])
    project, conversation = f"p{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
    async with _agent_and_persister(infra, offline_model.url) as bus:
        e = user_event("Why is the sky blue?", project=project, conversation_id=conversation)
        await bus.publish(subjects.chat_in(project, conversation), e, msg_id=e.message_id)
        [row] = await eventually(lambda: _rows(infra.database_url))
    [(call_id, served)] = [(k, v) for k, v in offline_model.calls().items() if "classify:" in k]
    assert row["call_id"] == call_id and served["outcome"] == "529"
    assert (row["outcome"], row["input_tokens"], row["output_tokens"]) == ("model_error", 0, 0)
