"""A call that died with its executor, billed later by a settle timer, counts once in its run's
day budgets: in the cancel's settlement if the timer came before it, charged on its own if it
came after (once per call id, a redelivered timer included). Real NATS (the limits and runs
buckets, CHAT_STREAM), policy's handlers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
import pytest_asyncio

from baton.provision import provision
from services.policy import budget, core, machine
from services.policy.adapters import Aborts, Conversations, Limiter, Runs
from services.policy.handlers import Handlers
from shared import estimate, subjects
from shared import messages as m
from shared.bus import Bus
from shared.errors import Deferred
from tests.integration.conftest import Infra
from tests.support import agent_decision, connect_bus, decode_all, read_subject, service_metrics

DEAD_INPUT = 700  # what the dead call's message_start said the provider counted


class Policy(msgspec.Struct):
    bus: Bus
    h: Handlers
    runs: Runs
    limits_kv: object

    async def counters(self, run: core.RunState) -> list[budget.Counter]:
        assert run.reservation is not None
        keys = [k for k in run.reservation.keys if k.startswith("budget.")]
        assert len(keys) == 2  # the project's day and the user's
        out = []
        for k in keys:
            entry = await self.limits_kv.get(k)  # type: ignore[attr-defined]
            out.append(msgspec.json.decode(entry.value or b"", type=budget.Counter))
        return out

    async def run(self, run_id: str) -> core.RunState:
        return (await self.runs.get(run_id))[0]


@pytest_asyncio.fixture
async def policy(infra: Infra) -> AsyncIterator[Policy]:
    await provision(infra.nats_url)
    bus = await connect_bus(infra.nats_url, "policy")
    runs_kv = await bus.js.key_value(subjects.BUCKET_RUNS)
    limits = m.Limits(project_daily_tokens=1_000_000, user_daily_tokens=1_000_000)
    rules = core.Rules(default_model="claude-sonnet-4-6", models=core.DEFAULT_PRICES, limits=limits)
    limits_kv = await bus.js.key_value(subjects.BUCKET_LIMITS)
    h = Handlers(
        bus,
        Runs(runs_kv),
        Conversations(runs_kv),
        rules,
        service_metrics("policy"),
        Aborts(await bus.js.key_value(subjects.BUCKET_ABORTS)),
        limiter=Limiter(limits_kv),
    )
    try:
        yield Policy(bus, h, Runs(runs_kv), limits_kv)
    finally:
        await bus.close()


async def _started_and_died(p: Policy) -> core.RunState:
    """A run whose executor got as far as message_start, wrote its started record, and died."""
    d = agent_decision()
    await p.h.decision(d, None)  # type: ignore[arg-type]
    run = await p.run(core.run_id_for(d.message_id))
    assert run.reservation is not None and run.status == "running"
    call_id = f"{_task_id(run)}#1"
    record = estimate.ModelCallRecord(
        call_id=call_id,
        task_id=_task_id(run),
        state="started",
        at=datetime.now(UTC),
        usage=m.Usage(input_tokens=DEAD_INPUT),
    )
    await p.bus.publish(estimate.record_subject(call_id), record, msg_id=f"callstarted:{call_id}")
    return run


def _cancel(run: core.RunState) -> m.CancelRequested:
    return m.CancelRequested(
        event_id=f"cancel:{run.run_id}",
        message_id=run.message_id,
        conversation_id=run.conversation_id,
        project_id=run.project_id,
        run_id=run.run_id,
        user_id=run.user_id,
        requested_at=datetime.now(UTC),
    )


def _due(timer: m.RunDeadline) -> m.RunDeadline:
    return msgspec.structs.replace(timer, due=datetime.now(UTC) - timedelta(seconds=1))


async def test_a_dead_call_of_a_cancelled_run_is_charged_to_its_day_budgets_once(
    policy: Policy,
) -> None:
    p = policy
    run = await _started_and_died(p)
    # The user cancels; nobody confirms; the attempt's deadline ends the cancel.
    assert await p.h.cancel(_cancel(run), None) == "cancelling"  # type: ignore[arg-type]
    due = core.deadline_event(run, datetime.now(UTC) - timedelta(seconds=1))
    assert await p.h.deadline(due, None) == "cancelled"  # type: ignore[arg-type]
    settled = await p.counters(run)
    assert all(c.settled_tokens == 0 and run.run_id not in c.open for c in settled)

    [timer] = [
        t
        for t in decode_all(
            await read_subject(
                p.bus,
                subjects.STREAM_POLICY,
                subjects.policy_deadline(run.project_id, run.conversation_id),
                2,
            ),
            m.RunDeadline,
        )
        if t.settle is not None
    ]
    with pytest.raises(Deferred):  # not due yet: the grace is for an exact report
        await p.h.deadline(timer, None)  # type: ignore[arg-type]
    timer = _due(timer)
    assert await p.h.deadline(timer, None) == "settled:1"  # type: ignore[arg-type]
    charged = await p.counters(run)
    assert [c.settled_tokens for c in charged] == [DEAD_INPUT, DEAD_INPUT]
    cost = m.Usage(input_tokens=DEAD_INPUT).cost_usd(run.prices)
    assert all(c.settled_cost_usd == pytest.approx(cost) for c in charged)

    # The timer again (a redelivery): billed and charged once.
    assert await p.h.deadline(timer, None) == "settled:1"  # type: ignore[arg-type]
    again = await p.counters(run)
    assert [c.settled_tokens for c in again] == [DEAD_INPUT, DEAD_INPUT]
    assert [c.call_id for c in (await p.run(run.run_id)).dead] == [f"{_task_id(run)}#1"]


async def test_a_dead_call_whose_timer_fires_before_the_cancel_is_counted_in_its_settlement(
    policy: Policy,
) -> None:
    # An earlier attempt's timer fires while the run still runs: nothing is settled yet, so the
    # call is kept in the run's record; the user's cancel later settles with it.
    p = policy
    run = await _started_and_died(p)
    timer = machine.settle_timer(run, p.h.rules, datetime.now(UTC)).events[0][1]
    assert isinstance(timer, m.RunDeadline)
    assert await p.h.deadline(_due(timer), None) == "settled:1"  # type: ignore[arg-type]
    kept = await p.run(run.run_id)
    assert kept.status == "running" and [c.tokens for c in kept.dead] == [DEAD_INPUT]
    assert [c.settled_tokens for c in await p.counters(run)] == [0, 0]

    assert await p.h.cancel(_cancel(run), None) == "cancelling"  # type: ignore[arg-type]
    due = core.deadline_event(run, datetime.now(UTC) - timedelta(seconds=1))
    assert await p.h.deadline(due, None) == "cancelled"  # type: ignore[arg-type]
    settled = await p.counters(run)
    assert [c.settled_tokens for c in settled] == [DEAD_INPUT, DEAD_INPUT]
    assert all(run.run_id not in c.open and c.settled_runs == 1 for c in settled)
    # The timer again after the settlement: the call is known, nothing is charged twice.
    assert await p.h.deadline(_due(timer), None) == "settled:1"  # type: ignore[arg-type]
    assert [c.settled_tokens for c in await p.counters(run)] == [DEAD_INPUT, DEAD_INPUT]


def _task_id(run: core.RunState) -> str:
    return f"task:{run.run_id}:{run.attempt}"
