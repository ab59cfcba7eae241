"""A cancelled run settles its day budgets with what its attempts reported; a call of it that
died with its executor, billed later by the deadline's settle timer, is charged to those budgets
then, once per call id: real NATS (the limits bucket, CHAT_STREAM), policy's handlers."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from baton.provision import provision
from services.policy import budget, core, machine
from services.policy.adapters import Aborts, Conversations, Limiter, Runs
from services.policy.handlers import Handlers
from shared import estimate, subjects
from shared import messages as m
from shared.errors import Deferred
from tests.integration.conftest import Infra
from tests.support import connect_bus, decode_all, read_subject, service_metrics

DEAD_INPUT = 700  # what the dead call's message_start said the provider counted


def _decision() -> m.AgentDecision:
    mid = str(uuid.uuid4())
    return m.AgentDecision(
        event_id=f"decision:{mid}",
        message_id=mid,
        conversation_id=str(uuid.uuid4()),
        project_id="p1",
        user_id="u1",
        position=1,
        decision=m.Decision(
            intent="question",
            complexity="low",
            action="answer",
            executor="chat",
            estimated_tokens=200,
        ),
    )


async def test_a_dead_call_of_a_cancelled_run_is_charged_to_its_day_budgets_once(
    infra: Infra,
) -> None:
    await provision(infra.nats_url)
    bus = await connect_bus(infra.nats_url, "policy")
    runs_kv = await bus.js.key_value(subjects.BUCKET_RUNS)
    limits = m.Limits(project_daily_tokens=1_000_000, user_daily_tokens=1_000_000)
    rules = core.Rules(default_model="claude-sonnet-4-6", models=core.DEFAULT_PRICES, limits=limits)
    h = Handlers(
        bus,
        Runs(runs_kv),
        Conversations(runs_kv),
        rules,
        service_metrics("policy"),
        Aborts(await bus.js.key_value(subjects.BUCKET_ABORTS)),
        limiter=Limiter(await bus.js.key_value(subjects.BUCKET_LIMITS)),
    )
    limits_kv = await bus.js.key_value(subjects.BUCKET_LIMITS)
    try:
        d = _decision()
        await h.decision(d, None)  # type: ignore[arg-type]
        run, _ = await Runs(runs_kv).get(core.run_id_for(d.message_id))
        assert run.reservation is not None and run.status == "running"
        keys = [k for k in run.reservation.keys if k.startswith("budget.")]
        assert len(keys) == 2  # the project's day and the user's

        # The executor got as far as message_start, wrote its started record, and died.
        call_id = f"{_task_id(run)}#1"
        record = estimate.ModelCallRecord(
            call_id=call_id,
            task_id=_task_id(run),
            state="started",
            at=datetime.now(UTC),
            usage=m.Usage(input_tokens=DEAD_INPUT),
        )
        await bus.publish(estimate.record_subject(call_id), record, msg_id=f"callstarted:{call_id}")

        # The user cancels; nobody confirms; the attempt's deadline ends the cancel.
        cancel = m.CancelRequested(
            event_id=f"cancel:{run.run_id}",
            message_id=run.message_id,
            conversation_id=run.conversation_id,
            project_id=run.project_id,
            run_id=run.run_id,
            user_id=run.user_id,
            requested_at=datetime.now(UTC),
        )
        assert await h.cancel(cancel, None) == "cancelling"  # type: ignore[arg-type]
        due = core.deadline_event(run, datetime.now(UTC) - timedelta(seconds=1))
        assert await h.deadline(due, None) == "cancelled"  # type: ignore[arg-type]
        settled = [await _counter(limits_kv, k) for k in keys]
        assert all(c.settled_tokens == 0 and run.run_id not in c.open for c in settled)

        [timer] = [
            t
            for t in decode_all(
                await read_subject(
                    bus,
                    subjects.STREAM_POLICY,
                    subjects.policy_deadline(run.project_id, run.conversation_id),
                    2,
                ),
                m.RunDeadline,
            )
            if t.settle is not None
        ]
        with pytest.raises(Deferred):  # not due yet: the grace is for an exact report
            await h.deadline(timer, None)  # type: ignore[arg-type]
        timer = msgspec.structs.replace(timer, due=datetime.now(UTC) - timedelta(seconds=1))
        assert await h.deadline(timer, None) == "settled:1"  # type: ignore[arg-type]
        charged = [await _counter(limits_kv, k) for k in keys]
        assert [c.settled_tokens for c in charged] == [DEAD_INPUT, DEAD_INPUT]
        cost = m.Usage(input_tokens=DEAD_INPUT).cost_usd(run.prices)
        assert all(c.settled_cost_usd == pytest.approx(cost) for c in charged)

        # The timer again (a redelivery): billed and charged once.
        assert await h.deadline(timer, None) == "settled:1"  # type: ignore[arg-type]
        again = [await _counter(limits_kv, k) for k in keys]
        assert [c.settled_tokens for c in again] == [DEAD_INPUT, DEAD_INPUT]
    finally:
        await bus.close()


def _task_id(run: core.RunState) -> str:
    return f"task:{run.run_id}:{run.attempt}"


async def _counter(kv: object, key: str) -> budget.Counter:
    entry = await kv.get(key)  # type: ignore[attr-defined]
    return msgspec.json.decode(entry.value or b"", type=budget.Counter)


def test_a_run_that_settled_with_its_stored_reply_is_not_charged_again() -> None:
    # A run the deadline failed settles with the persister's sum of its rows, which may hold
    # the estimate already: only a cancelled run is charged late (docs/decisions.md).
    hold = core.Reservation(keys=("budget.20260101.p.p1",), tokens=10, settled=True)
    run = core.RunState(
        run_id="run-1", message_id="m", conversation_id="c", project_id="p1", user_id="u",
        phase=machine.Done("failed"), verdict="stop", reason="", reservation=hold,
    )  # fmt: skip
    timer = m.RunDeadline(
        event_id="settle:run-1:1", message_id="m", conversation_id="c", project_id="p1",
        run_id="run-1", attempt=1, due=datetime.now(UTC),
        settle=m.DeadCalls(task_id="task:run-1:1", user_id="u", model="x", prices=m.Prices()),
    )  # fmt: skip
    found = [m.EstimatedCall(call_id="task:run-1:1#1", usage=m.Usage(input_tokens=5))]
    assert machine.late_charges(run, timer, found) == ()
    cancelled = msgspec.structs.replace(run, phase=machine.Done("cancelled"))
    [charge] = machine.late_charges(cancelled, timer, found)
    assert (charge.keys, charge.call_id, charge.tokens) == (hold.keys, "task:run-1:1#1", 5)
