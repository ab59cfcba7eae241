"""Limits against real NATS with two policy replicas: caps, runs in flight and rate windows hold."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import nats.js.errors
import pytest

from services.policy import budget, core, policyfile
from services.policy.adapters import Aborts, Conversations, Limiter, Runs
from services.policy.handlers import Handlers
from services.policy.phase import Cancelling
from shared import messages as m
from shared import ratelimit, subjects, wiring
from shared.bus import Bus, Consumer
from shared.errors import Deferred
from tests.integration.conftest import Infra
from tests.support import (
    agent_decision,
    connect_bus,
    decode_all,
    eventually,
    read_subject,
    running,
    service_metrics,
)

PER_RUN = 1000 + 400  # input allowance + max tokens (twice the estimate of 200)


def _rules(limits: m.Limits) -> core.Rules:
    return core.Rules(default_model="claude-sonnet-4-6", models=core.DEFAULT_PRICES, limits=limits)


async def _replica(infra: Infra, rules: core.Rules) -> tuple[Bus, Handlers, list[Consumer[Any]]]:
    bus = await connect_bus(infra.nats_url, "policy")
    runs_kv = await bus.js.key_value(subjects.BUCKET_RUNS)
    limits_kv = await bus.js.key_value(subjects.BUCKET_LIMITS)
    aborts_kv = await bus.js.key_value(subjects.BUCKET_ABORTS)
    h = Handlers(
        bus,
        Runs(runs_kv),
        Conversations(runs_kv),
        rules,
        service_metrics("policy"),
        Aborts(aborts_kv),
        limiter=Limiter(limits_kv),
    )
    consumers: list[Consumer[Any]] = [
        Consumer(bus, wiring.POLICY_DECISIONS, m.AgentDecision, h.decision, concurrency=16),
        Consumer(bus, wiring.POLICY_OUTCOMES, m.AssistantMessagePersisted, h.reply_persisted),
        Consumer(bus, wiring.POLICY_FAILURES, m.ExecFailed, h.failure),
        Consumer(bus, wiring.POLICY_CANCELS, m.CancelRequested, h.cancel),
    ]
    return bus, h, consumers


def _persisted(task: m.ExecTask, tokens: int) -> m.AssistantMessagePersisted:
    return m.AssistantMessagePersisted(
        event_id=f"persisted:assistant:{task.run_id}",
        message_id=str(uuid.uuid4()),
        conversation_id=task.conversation_id,
        project_id=task.project_id,
        run_id=task.run_id,
        reply_to=task.message_id,
        kind="answer",
        content="ok",
        created_at=datetime.now(UTC),
        status="completed",
        usage=m.Usage(input_tokens=tokens - 10, output_tokens=10),
        cost_usd=0.001,
    )


async def _counter(bus: Bus, key: str) -> budget.Counter:
    kv = await bus.js.key_value(subjects.BUCKET_LIMITS)
    entry = await kv.get(key)
    return msgspec.json.decode(entry.value or b"", type=budget.Counter)


async def test_two_replicas_and_200_concurrent_decisions_never_pass_a_cap_that_fits_50(
    infra: Infra,
) -> None:
    rules = _rules(m.Limits(project_daily_tokens=50 * PER_RUN))
    (a, _, ca), (b, _, cb) = await _replica(infra, rules), await _replica(infra, rules)
    pub = await connect_bus(infra.nats_url)
    decisions = [agent_decision() for _ in range(200)]
    await asyncio.gather(
        *(
            pub.publish(subjects.agent_decision("p1", d.conversation_id), d, msg_id=d.event_id)
            for d in decisions
        )
    )
    day = budget.day_of(datetime.now(UTC))
    key = subjects.budget_key(day, "p1")
    async with running(*ca, *cb):
        replies = decode_all(
            await read_subject(pub, subjects.STREAM_POLICY, "policy.reply.>", 150, timeout=60),
            m.PolicyReply,
        )
        tasks = decode_all(
            await read_subject(pub, subjects.STREAM_TASKS, "exec.task.>", 50), m.ExecTask
        )
        assert len(tasks) == 50 and len(replies) == 150
        assert {t.run_id for t in tasks}.isdisjoint({r.run_id for r in replies})
        assert all(r.kind == "refusal" and r.status == "refused" for r in replies)
        assert all("resets at 00:00 UTC" in r.text for r in replies)
        held = await _counter(pub, key)
        assert len(held.open) == 50 and held.tokens() == 50 * PER_RUN

        # Every decision again (redeliveries): nothing is reserved, emitted or refused twice.
        await asyncio.gather(
            *(
                pub.publish(
                    subjects.agent_decision("p1", d.conversation_id), d, msg_id=f"again-{i}"
                )
                for i, d in enumerate(decisions)
            )
        )
        await asyncio.sleep(2)
        assert (await _counter(pub, key)) == held
        again = await read_subject(pub, subjects.STREAM_TASKS, "exec.task.>", 50)
        assert len(again) == 50

        # Each run's reply stored, announced twice: settled once with the real usage.
        for copy in range(2):
            for t in tasks:
                event = _persisted(t, 300)
                subject = subjects.persisted_assistant("p1", t.conversation_id)
                await pub.publish(subject, event, msg_id=f"{event.event_id}#{copy}")

        async def settled() -> budget.Counter | None:
            c = await _counter(pub, key)
            return c if not c.open and c.settled_runs == 50 else None

        done = await eventually(settled, timeout=30)
    assert done.settled_tokens == 50 * 300
    assert abs(done.settled_cost_usd - 50 * 0.001) < 1e-9
    runs = await a.js.key_value(subjects.BUCKET_RUNS)
    sample = msgspec.json.decode((await runs.get(tasks[0].run_id)).value or b"", type=core.RunState)
    assert sample.reservation is not None and sample.reservation.settled
    assert sample.reservation.actual_tokens == 300
    for bus in (a, b, pub):
        await bus.close()


async def test_a_full_project_gets_room_again_once_runs_settle_below_their_estimate(
    infra: Infra,
) -> None:
    rules = _rules(m.Limits(project_daily_tokens=2 * PER_RUN, max_concurrent_runs=2))
    bus, _, consumers = await _replica(infra, rules)
    first = [agent_decision() for _ in range(3)]
    async with running(*consumers):
        for d in first:
            await bus.publish(
                subjects.agent_decision("p1", d.conversation_id), d, msg_id=d.event_id
            )
        tasks = decode_all(
            await read_subject(bus, subjects.STREAM_TASKS, "exec.task.>", 2), m.ExecTask
        )
        [refusal] = decode_all(
            await read_subject(bus, subjects.STREAM_POLICY, "policy.reply.>", 1), m.PolicyReply
        )
        assert len(tasks) == 2 and "daily token allowance" in refusal.text
        for t in tasks:
            await bus.publish(
                subjects.persisted_assistant("p1", t.conversation_id),
                _persisted(t, 100),
                msg_id=t.run_id,
            )
        key = subjects.active_key("p1")

        async def slots_free() -> bool:
            return not (await _counter(bus, key)).open

        await eventually(slots_free)
        late = agent_decision()
        await bus.publish(
            subjects.agent_decision("p1", late.conversation_id), late, msg_id=late.event_id
        )
        tasks = decode_all(
            await read_subject(bus, subjects.STREAM_TASKS, "exec.task.>", 3), m.ExecTask
        )
    assert core.run_id_for(late.message_id) in {t.run_id for t in tasks}
    await bus.close()


async def test_the_rate_limit_holds_across_two_replicas_and_tells_when_to_retry(
    infra: Infra,
) -> None:
    rules = _rules(m.Limits(user_messages_per_minute=5))
    (a, _, ca), (b, _, cb) = await _replica(infra, rules), await _replica(infra, rules)
    decisions = [agent_decision(user="chatty") for _ in range(12)]
    # Fixed windows: start away from a minute's edge so the burst falls in one window. Checked
    # once the replicas are built, just before the burst: building them takes time of its own.
    if time.time() % 60 > 40:
        await asyncio.sleep(61 - time.time() % 60)
    burst = time.time()
    async with running(*ca, *cb):
        await asyncio.gather(
            *(
                a.publish(subjects.agent_decision("p1", d.conversation_id), d, msg_id=d.event_id)
                for d in decisions
            )
        )
        replies = decode_all(
            await read_subject(a, subjects.STREAM_POLICY, "policy.reply.>", 7), m.PolicyReply
        )
        tasks = await read_subject(a, subjects.STREAM_TASKS, "exec.task.>", 5)
        other = agent_decision(user="calm")  # another user is not limited by chatty's window
        await a.publish(subjects.agent_decision("p1", other.conversation_id), other, msg_id="calm")
        tasks = await read_subject(a, subjects.STREAM_TASKS, "exec.task.>", 6)
    assert len(replies) == 7 and len(tasks) == 6
    assert all("5 per minute" in r.text and "try again after" in r.text for r in replies)
    kv = await a.js.key_value(subjects.BUCKET_LIMITS)

    window = ratelimit.decoder.decode(
        (await kv.get(ratelimit.key("m", burst, "p1", "chatty"))).value or b""
    )
    assert window.full and len(window.ids) == 5
    for bus in (a, b):
        await bus.close()


def test_policy_refuses_to_start_with_a_bad_file_naming_key_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "policy.toml"
    bad.write_text("[defaults.caps]\nproject_daily_tokens = -5\n")
    env = {**os.environ, "BATON_POLICY_FILE": str(bad), "BATON_NATS_URL": "nats://127.0.0.1:1"}
    done = subprocess.run(
        [sys.executable, "-m", "services.policy"], env=env, capture_output=True, timeout=60
    )
    assert done.returncode == 2
    assert b"'defaults.caps.project_daily_tokens' (line 2)" in done.stderr
    assert b"Traceback" not in done.stderr


async def test_runs_in_flight_past_the_limit_are_refused_and_a_finished_run_frees_its_slot(
    infra: Infra,
) -> None:
    rules = _rules(m.Limits(max_concurrent_runs=2))
    bus, _, consumers = await _replica(infra, rules)
    first = [agent_decision() for _ in range(3)]
    p = "p1"
    async with running(*consumers):
        for d in first:
            await bus.publish(subjects.agent_decision(p, d.conversation_id), d, msg_id=d.event_id)
        tasks = decode_all(
            await read_subject(bus, subjects.STREAM_TASKS, "exec.task.>", 2), m.ExecTask
        )
        [refusal] = decode_all(
            await read_subject(bus, subjects.STREAM_POLICY, "policy.reply.>", 1), m.PolicyReply
        )
        assert len(tasks) == 2 and "2 answers in progress" in refusal.text
        done = tasks[0]
        await bus.publish(
            subjects.persisted_assistant(p, done.conversation_id),
            _persisted(done, 100),
            msg_id=done.run_id,
        )

        async def one_slot_left() -> bool:
            return len((await _counter(bus, subjects.active_key(p))).open) == 1

        await eventually(one_slot_left)
        late = agent_decision()
        await bus.publish(
            subjects.agent_decision(p, late.conversation_id), late, msg_id=late.event_id
        )
        tasks = decode_all(
            await read_subject(bus, subjects.STREAM_TASKS, "exec.task.>", 3), m.ExecTask
        )
    assert core.run_id_for(late.message_id) in {t.run_id for t in tasks}
    await bus.close()


async def test_past_the_downgrade_fraction_runs_are_answered_by_the_cheaper_model(
    infra: Infra,
) -> None:
    rules = msgspec.structs.replace(
        _rules(m.Limits(project_daily_tokens=10 * PER_RUN)),
        downgrade_at=0.1,
        downgrade_model="claude-haiku-4-5",
    )
    bus, _, consumers = await _replica(infra, rules)
    async with running(*consumers):
        for n in (1, 2):
            d = agent_decision()
            await bus.publish(
                subjects.agent_decision("p1", d.conversation_id), d, msg_id=d.event_id
            )
            tasks = decode_all(
                await read_subject(bus, subjects.STREAM_TASKS, "exec.task.>", n), m.ExecTask
            )
        verdicts = decode_all(
            await read_subject(bus, subjects.STREAM_POLICY, "policy.verdict.>", 2), m.RunVerdict
        )
    assert [t.model for t in tasks] == ["claude-sonnet-4-6", "claude-haiku-4-5"]
    assert tasks[1].prices == core.DEFAULT_PRICES["claude-haiku-4-5"]
    by_run = {v.run_id: v for v in verdicts}
    second = by_run[tasks[1].run_id]
    assert second.verdict == "downgrade" and "past 10%" in second.reason
    assert second.limits is not None and second.limits.project_tokens_used == PER_RUN
    assert second.reserved_tokens == PER_RUN
    await bus.close()


async def test_a_hostile_usage_report_cannot_lower_the_days_counters(infra: Infra) -> None:
    rules = _rules(m.Limits(project_daily_tokens=10 * PER_RUN))
    bus, _, consumers = await _replica(infra, rules)
    d = agent_decision()
    async with running(*consumers):
        await bus.publish(subjects.agent_decision("p1", d.conversation_id), d, msg_id="d")
        [task] = decode_all(
            await read_subject(bus, subjects.STREAM_TASKS, "exec.task.>", 1), m.ExecTask
        )
        hostile = msgspec.structs.replace(
            _persisted(task, 100), usage=m.Usage(input_tokens=-(10**12)), cost_usd=-5.0
        )
        await bus.publish(
            subjects.persisted_assistant("p1", task.conversation_id), hostile, msg_id="h"
        )
        key = subjects.budget_key(budget.day_of(datetime.now(UTC)), "p1")

        async def settled() -> budget.Counter | None:
            c = await _counter(bus, key)
            return c if c.settled_runs == 1 else None

        c = await eventually(settled)
    assert (c.settled_tokens, c.settled_cost_usd, c.open) == (0, 0.0, {})
    await bus.close()


def _cancel(d: m.AgentDecision) -> m.CancelRequested:
    run_id = core.run_id_for(d.message_id)
    return m.CancelRequested(
        event_id=f"cancel:{run_id}",
        message_id=d.message_id,
        conversation_id=d.conversation_id,
        project_id=d.project_id,
        user_id=d.user_id,
        run_id=run_id,
        requested_at=datetime.now(UTC),
    )


def _cancelled(task: m.ExecTask, usage: m.Usage) -> m.ExecFailed:
    """What the executor reports for a call it stopped: class ``cancelled``, partial usage."""
    return m.ExecFailed(
        event_id=f"failed:{task.task_id}",
        message_id=task.message_id,
        conversation_id=task.conversation_id,
        project_id=task.project_id,
        task_id=task.task_id,
        call_id=f"{task.task_id}#1",
        run_id=task.run_id,
        attempt=task.attempt,
        model=task.model,
        error_class="cancelled",
        error="aborted by policy",
        usage=usage,
        prices=task.prices,
    )


async def test_a_cancelled_run_frees_its_slot_and_settles_its_partial_usage(infra: Infra) -> None:
    """A cancelled run stores no reply, yet its runs-in-flight slot is freed and the tokens its
    stopped call used are settled in the day's counters — once, whatever is redelivered."""
    rules = _rules(m.Limits(max_concurrent_runs=1, project_daily_tokens=10 * PER_RUN))
    bus, _, consumers = await _replica(infra, rules)
    p = "p1"
    first, second, third = agent_decision(), agent_decision(), agent_decision()
    partial = m.Usage(input_tokens=120, output_tokens=30)
    day = budget.day_of(datetime.now(UTC))
    async with running(*consumers):
        await bus.publish(subjects.agent_decision(p, first.conversation_id), first, msg_id="d1")
        [task] = decode_all(
            await read_subject(bus, subjects.STREAM_TASKS, "exec.task.>", 1), m.ExecTask
        )
        # The slot is taken: a message of another conversation of the project is refused.
        await bus.publish(subjects.agent_decision(p, second.conversation_id), second, msg_id="d2")
        [refusal] = decode_all(
            await read_subject(bus, subjects.STREAM_POLICY, "policy.reply.>", 1), m.PolicyReply
        )
        assert refusal.run_id == core.run_id_for(second.message_id)
        assert "1 answers in progress" in refusal.text

        # The user cancels the running run; policy aborts the call, the executor reports it
        # stopped with what it had used.
        sub = await bus.nc.subscribe(subjects.EXEC_ABORT_ALL)
        cancel = _cancel(first)
        await bus.publish(subjects.chat_cancel(p, first.conversation_id), cancel, msg_id="c1")
        abort = msgspec.json.decode((await sub.next_msg(timeout=30)).data, type=m.RunAbort)
        assert (abort.run_id, abort.reason) == (task.run_id, "cancelled")
        stopped = _cancelled(task, partial)
        await bus.publish(subjects.exec_failed(p, task.conversation_id), stopped, msg_id="f1")

        runs = Runs(await bus.js.key_value(subjects.BUCKET_RUNS))

        async def settled() -> core.RunState | None:
            # Policy settles the run on every counter it held (the project's and the user's day,
            # then the runs in flight) and writes the run's record after all of them: the
            # record is what says the settlement is over, not the first counter.
            state, _ = await runs.get(task.run_id)
            done = state.reservation is not None and state.reservation.settled
            return state if done else None

        state = await eventually(settled)
        c = await _counter(bus, subjects.budget_key(day, p))
        assert (c.settled_runs, c.settled_tokens, c.open) == (1, 150, {})
        assert c.settled_cost_usd == pytest.approx(partial.cost_usd(task.prices))
        assert (await _counter(bus, subjects.active_key(p))).open == {}
        assert state.status == "cancelled"
        assert state.reservation is not None and state.reservation.settled
        assert state.reservation.actual_tokens == 150

        # Redeliveries (the failure, the cancel) settle nothing twice.
        again = (
            (
                wiring.POLICY_FAILURES,
                await bus.publish(
                    subjects.exec_failed(p, task.conversation_id), stopped, msg_id="f1b"
                ),
            ),
            (
                wiring.POLICY_CANCELS,
                await bus.publish(
                    subjects.chat_cancel(p, first.conversation_id), cancel, msg_id="c1b"
                ),
            ),
        )

        # The freed slot: the next message of the project is approved.
        await bus.publish(subjects.agent_decision(p, third.conversation_id), third, msg_id="d3")
        tasks = decode_all(
            await read_subject(bus, subjects.STREAM_TASKS, "exec.task.>", 2), m.ExecTask
        )
        assert [t.run_id for t in tasks] == [task.run_id, core.run_id_for(third.message_id)]

        async def handled() -> bool:
            # Acked after their handling: whatever the redeliveries did is in the counters now.
            for spec, ack in again:
                info = await bus.js.consumer_info(spec.stream, spec.durable)
                if info.ack_floor is None or (info.ack_floor.stream_seq or 0) < ack.seq:
                    return False
            return True

        await eventually(handled)
        c = await _counter(bus, subjects.budget_key(day, p))
        assert (c.settled_runs, c.settled_tokens) == (1, 150)
        assert list(c.open) == [core.run_id_for(third.message_id)]
        await sub.unsubscribe()
    await bus.close()


async def test_a_run_cancelled_while_queued_gives_its_reservation_back(infra: Infra) -> None:
    rules = _rules(m.Limits(project_daily_tokens=10 * PER_RUN))
    bus, _, consumers = await _replica(infra, rules)
    p = "p1"
    first = agent_decision()
    queued = msgspec.structs.replace(
        agent_decision(), conversation_id=first.conversation_id, position=2
    )
    day = budget.day_of(datetime.now(UTC))
    async with running(*consumers):
        await bus.publish(subjects.agent_decision(p, first.conversation_id), first, msg_id="d1")
        await bus.publish(subjects.agent_decision(p, first.conversation_id), queued, msg_id="d2")
        run_id = core.run_id_for(queued.message_id)

        async def both_held() -> bool:
            try:
                return len((await _counter(bus, subjects.budget_key(day, p))).open) == 2
            except nats.js.errors.KeyNotFoundError:
                return False  # no decision counted yet

        await eventually(both_held)
        cancels = subjects.chat_cancel(p, first.conversation_id)
        await bus.publish(cancels, _cancel(queued), msg_id="c2")

        runs = Runs(await bus.js.key_value(subjects.BUCKET_RUNS))

        async def given_back() -> tuple[budget.Counter, core.RunState] | None:
            # The hold is given back first, the run's record written after it: wait for both.
            c = await _counter(bus, subjects.budget_key(day, p))
            state, _ = await runs.get(run_id)
            settled = state.reservation is None or state.reservation.settled
            done = state.status == "cancelled" and settled
            return (c, state) if run_id not in c.open and done else None

        c, state = await eventually(given_back)
        assert list(c.open) == [core.run_id_for(first.message_id)]
        assert state.status == "cancelled" and core.skipped(state)
        if state.reservation is not None:
            # The cancel found the queued run: its hold settled with nothing used.
            assert state.reservation.settled and (c.settled_runs, c.settled_tokens) == (1, 0)
        else:
            # Seen on a loaded machine: the cancel came between the decision's hold and its
            # record, so it wrote the run's tombstone; the decision found it and gave its
            # hold back uncounted.
            assert (c.settled_runs, c.settled_tokens) == (0, 0)
    await bus.close()


async def test_the_policy_files_lifecycle_rules_apply_per_project(infra: Infra) -> None:
    """Double texting and retry backoff come from the project's rules in the policy file."""
    book = policyfile.parse(
        b'[projects.strict]\ndouble_texting = "reject"\nretry_backoff_s = [30.0]\n'
        b"[defaults]\nretry_backoff_s = [0.0]\n"
        b"[defaults.caps]\nproject_daily_tokens = 1000000\n"
    )
    bus = await connect_bus(infra.nats_url, "policy")
    runs_kv = await bus.js.key_value(subjects.BUCKET_RUNS)
    runs = Runs(runs_kv)
    limiter = Limiter(await bus.js.key_value(subjects.BUCKET_LIMITS))
    h = Handlers(
        bus,
        runs,
        Conversations(runs_kv),
        _rules(m.Limits()),
        service_metrics("p"),
        limiter=limiter,
        book=book,
    )
    second_states: dict[str, core.RunState] = {}
    for project in ("strict", "lenient"):
        first = msgspec.structs.replace(agent_decision(project), position=1)
        second = msgspec.structs.replace(
            agent_decision(project), conversation_id=first.conversation_id, position=2
        )
        await h.decision(first, None)  # type: ignore[arg-type]
        await h.decision(second, None)  # type: ignore[arg-type]
        second_states[project] = (await runs.get(core.run_id_for(second.message_id)))[0]
    strict, lenient = second_states["strict"], second_states["lenient"]
    assert (strict.status, strict.reply_text) == ("refused", core.REJECT_TEXT)
    assert (lenient.status, lenient.reply_kind) == ("running", None)  # waits its turn
    # The rejected run never runs: its hold is given back at once (the queued one keeps its).
    assert strict.reservation is not None and strict.reservation.settled
    assert lenient.reservation is not None and not lenient.reservation.settled
    day = budget.day_of(datetime.now(UTC))
    assert len((await _counter(bus, subjects.budget_key(day, "strict"))).open) == 1
    assert len((await _counter(bus, subjects.budget_key(day, "lenient"))).open) == 2
    tasks = decode_all(await read_subject(bus, subjects.STREAM_TASKS, "exec.task.>", 2), m.ExecTask)
    waits: dict[str, float] = {}
    for task in tasks:
        failed = msgspec.structs.replace(_cancelled(task, m.Usage()), error_class="overloaded")
        try:
            await h.failure(failed, None)  # type: ignore[arg-type]
        except Deferred as d:
            waits[task.project_id] = d.delay
    assert waits["strict"] > 20 and waits["lenient"] < 1
    await bus.close()


async def test_under_interrupt_a_message_refused_by_a_limit_interrupts_nothing(
    infra: Infra,
) -> None:
    rules = msgspec.structs.replace(
        _rules(m.Limits(max_concurrent_runs=1)), double_texting="interrupt"
    )
    bus, h, _ = await _replica(infra, rules)
    first = msgspec.structs.replace(agent_decision(), position=1)
    second = msgspec.structs.replace(
        agent_decision(), conversation_id=first.conversation_id, position=2
    )
    await h.decision(first, None)  # type: ignore[arg-type]
    await h.decision(second, None)  # type: ignore[arg-type]
    runs = Runs(await bus.js.key_value(subjects.BUCKET_RUNS))
    a = (await runs.get(core.run_id_for(first.message_id)))[0]
    b = (await runs.get(core.run_id_for(second.message_id)))[0]
    assert (a.status, isinstance(a.phase, Cancelling)) == ("running", False)
    assert (b.status, core.limited(b)) == ("refused", True) and "in progress" in b.reply_text
    assert len((await _counter(bus, subjects.active_key("p1"))).open) == 1
    await bus.close()


async def test_the_agents_classification_call_counts_against_the_days_budgets(
    infra: Infra,
) -> None:
    # Every model call counts against the caps: the answer's, and the call that decided it.
    rules = _rules(m.Limits(project_daily_tokens=10 * PER_RUN, user_daily_tokens=10 * PER_RUN))
    bus, _, consumers = await _replica(infra, rules)
    classified = m.Usage(input_tokens=120, output_tokens=30)
    d = msgspec.structs.replace(
        agent_decision(), call_id="classify:x#1", usage=classified, cost_usd=0.00027
    )
    async with running(*consumers):
        await bus.publish(subjects.agent_decision("p1", d.conversation_id), d, msg_id="d")
        [task] = decode_all(
            await read_subject(bus, subjects.STREAM_TASKS, "exec.task.>", 1), m.ExecTask
        )
        await bus.publish(
            subjects.persisted_assistant("p1", task.conversation_id),
            _persisted(task, 100),
            msg_id=task.run_id,
        )
        day = budget.day_of(datetime.now(UTC))
        keys = (subjects.budget_key(day, "p1"), subjects.budget_key(day, "p1", "u1"))

        async def settled() -> list[budget.Counter] | None:
            cs = [await _counter(bus, k) for k in keys]
            return cs if all(c.settled_runs == 1 for c in cs) else None

        counters = await eventually(settled)
    for c in counters:
        assert (c.settled_tokens, c.open) == (100 + 150, {})
        assert c.settled_cost_usd == pytest.approx(0.001 + 0.00027)
    await bus.close()
