"""The persister's own metrics count like the database does: once per run, once per billed call."""

from __future__ import annotations

from typing import Any

import pytest

from services.persister.adapters import Store
from services.persister.handlers import Handlers
from shared import messages as m
from shared.db import create_pool
from tests.integration.conftest import Infra
from tests.support import SONNET_PRICES, connect_bus, exec_result, service_metrics, user_event

MODEL = "claude-sonnet-4-6"
PRICES = SONNET_PRICES


def _value(metrics: Any, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_cost_and_latency_count_once_however_often_a_result_arrives(infra: Infra) -> None:
    bus = await connect_bus(infra.nats_url, "persister")
    pool = await create_pool(infra.database_url)
    metrics = service_metrics("persister")
    h = Handlers(bus, Store(pool), metrics)
    e = user_event()
    await h.user_message(e, None)  # type: ignore[arg-type]
    first = exec_result(e, 1)
    for _ in range(3):  # redeliveries of one call
        assert await h.result(first, None) in ("inserted", "duplicate")  # type: ignore[arg-type]
    one_call = first.usage.cost_usd(PRICES)
    assert _value(metrics, "baton_persister_cost_usd_total", model=MODEL) == pytest.approx(one_call)
    answered = "baton_persister_answer_latency_seconds_count"
    assert _value(metrics, answered, kind="answer") == 1
    assert 0 < _value(metrics, "baton_persister_answer_latency_seconds_sum", kind="answer") < 60
    # A second real call for the run (a redelivered task) is billed, but answers nothing new.
    await h.result(exec_result(e, 2), None)  # type: ignore[arg-type]
    assert _value(metrics, "baton_persister_cost_usd_total", model=MODEL) == pytest.approx(
        2 * one_call
    )
    assert _value(metrics, answered, kind="answer") == 1
    assert _value(metrics, "baton_persister_commit_seconds_count", write="result") == 4
    assert _value(metrics, "baton_persister_commit_seconds_count", write="user_messages") == 1
    billed = await pool.fetchval("SELECT sum(cost_usd) FROM usage")
    assert float(billed) == pytest.approx(
        _value(metrics, "baton_persister_cost_usd_total", model=MODEL)
    )
    await bus.close()
    await pool.close()


async def test_a_failed_call_is_billed_once_and_answers_nothing(infra: Infra) -> None:
    bus = await connect_bus(infra.nats_url, "persister")
    pool = await create_pool(infra.database_url)
    metrics = service_metrics("persister")
    h = Handlers(bus, Store(pool), metrics)
    e = user_event()
    await h.user_message(e, None)  # type: ignore[arg-type]
    run_id = f"run-{e.message_id}"
    failed = m.ExecFailed(
        event_id="f1",
        message_id=e.message_id,
        conversation_id=e.conversation_id,
        project_id=e.project_id,
        task_id=f"task:{run_id}:1",
        call_id=f"task:{run_id}:1#1",
        run_id=run_id,
        attempt=1,
        model=MODEL,
        error_class="cut_stream",
        error="stream cut",
        usage=m.Usage(input_tokens=40, output_tokens=7),
        prices=PRICES,
    )
    for _ in range(3):
        assert await h.failed_usage(failed, None) == "cut_stream"  # type: ignore[arg-type]
    assert _value(metrics, "baton_persister_cost_usd_total", model=MODEL) == pytest.approx(
        failed.usage.cost_usd(PRICES)
    )
    assert _value(metrics, "baton_persister_answer_latency_seconds_count", kind="answer") == 0
    await bus.close()
    await pool.close()
