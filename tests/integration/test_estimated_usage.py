"""A model call cut by its executor's death (SIGKILL mid-stream) is billed once, by estimate,
when its task is redelivered or its attempt's deadline passes (both: still once): real NATS,
Postgres, the offline model and an executor process."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import anthropic
import asyncpg
import msgspec
import pytest

from baton.offline_model import OfflineModelProcess
from baton.provision import provision
from services.executor.adapters import Model
from services.executor.config import Settings
from services.executor.handlers import Handlers
from services.persister.adapters import Store
from services.persister.handlers import Handlers as PersisterHandlers
from services.policy import core
from services.policy.adapters import Conversations, Runs
from services.policy.config import Settings as PolicySettings
from services.policy.handlers import Handlers as PolicyHandlers
from services.policy.main import rules_from
from services.policy.phase import Backoff
from shared import deadcalls, estimate, model, subjects, wiring
from shared import messages as m
from shared.bus import Bus, Consumer
from shared.db import create_pool
from shared.errors import Deferred
from shared.history import History
from tests.integration.conftest import Infra
from tests.integration.test_executor import _task
from tests.support import (
    agent_decision,
    connect_bus,
    decode_all,
    eventually,
    read_subject,
    running,
    service_metrics,
    user_event,
)


@dataclasses.dataclass
class Rig:
    bus: Bus
    pool: asyncpg.Pool
    client: anthropic.AsyncAnthropic


@pytest.fixture
async def rig(infra: Infra, offline_model: OfflineModelProcess) -> AsyncIterator[Rig]:
    """What the tests of a cut call share: JetStream provisioned with a 2 s ``ack_wait`` (a
    dead executor's task comes back in seconds), a bus, a pool and a model client; the model's
    pace is put back after the test (a test sets its own)."""
    await provision(infra.nats_url, ack_wait_s=2.0)
    before = offline_model.update_settings()
    bus = await connect_bus(infra.nats_url, "test")
    pool = await create_pool(infra.database_url)
    client = model.client(offline_model.url, "test-key", 10.0)
    try:
        yield Rig(bus, pool, client)
    finally:
        offline_model.update_settings(
            tokens_per_second=before["tokens_per_second"],
            words_per_reply=before["words_per_reply"],
        )
        await bus.close()
        await pool.close()
        await client.close()


def _executor_process(infra: Infra, model_url: str, **extra: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        **extra,
        "BATON_NATS_URL": infra.nats_url,
        "BATON_DATABASE_URL": infra.database_url,
        "BATON_METRICS_PORT": "0",
        "EXECUTOR_ANTHROPIC_BASE_URL": model_url,
        "EXECUTOR_ANTHROPIC_API_KEY": "test-key",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "services.executor"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def test_a_call_cut_by_a_sigkilled_executor_gets_one_estimated_usage_row(
    infra: Infra, offline_model: OfflineModelProcess, rig: Rig
) -> None:
    # A short ack_wait (the rig's), so the dead executor's task is redelivered in seconds.
    bus, pool, client = rig.bus, rig.pool, rig.client
    offline_model.update_settings(tokens_per_second=8, words_per_reply=60)
    proc = _executor_process(infra, offline_model.url)
    try:
        e = user_event("Tell me a long story about queues")
        await Store(pool).insert_user_message(e)
        task = _task(e)
        first = f"{task.task_id}#1"
        await bus.publish(
            subjects.exec_task(e.project_id, e.conversation_id), task, msg_id=task.event_id
        )

        async def streamed() -> bool:
            info = await bus.js.stream_info(subjects.STREAM_TOKENS)
            return info.state.messages >= 5  # the call's started record and four pushes

        # Mid-stream: a few pushes are stored, the model is still writing.
        await eventually(streamed, timeout=90)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        pushed = decode_all(
            await read_subject(bus, subjects.STREAM_TOKENS, "chat.stream.>", 4, settle=0),
            m.TokenDelta,
        )
        assert offline_model.calls()[first]["outcome"] != "completed"
        offline_model.update_settings(tokens_per_second=0)

        # Another executor (in this process) gets the redelivered task; the persister bills.
        h = Handlers(bus, History(pool), Model(client), Settings(), service_metrics("executor"))
        p = PersisterHandlers(bus, Store(pool), service_metrics("persister"))
        async with running(
            Consumer(bus, wiring.EXECUTOR_TASKS, m.ExecTask, h.task),
            Consumer(bus, wiring.PERSISTER_RESULTS, m.ExecResult, p.result),
            Consumer(bus, wiring.PERSISTER_FAILED, m.ExecFailed, p.failed_usage),
        ):
            [result] = decode_all(
                await read_subject(bus, subjects.STREAM_RESULTS, "exec.result.>", 1, timeout=60),
                m.ExecResult,
            )
            con: asyncpg.Connection = await asyncpg.connect(infra.database_url)
            try:

                async def billed() -> list[Any] | None:
                    rows = await con.fetch("SELECT * FROM usage ORDER BY call_id")
                    return rows if len(rows) == 2 else None

                rows = await eventually(billed, timeout=30)
                [announced] = decode_all(
                    await read_subject(
                        bus, subjects.STREAM_PERSISTED, "chat.persisted.assistant.>", 1
                    ),
                    m.AssistantMessagePersisted,
                )
                # The outcome is delivered again (a replay): nothing is billed twice.
                await p.result(result, None)  # type: ignore[arg-type]
                # Policy's deadline path settling the same call later is a duplicate too.
                late = estimate.settled_usage(_settle_timer(task), result.estimated[0])
                assert await p.model_usage(late, None) == "duplicate"  # type: ignore[arg-type]
                again = await con.fetch("SELECT * FROM usage ORDER BY call_id")
                totals = await con.fetchrow("SELECT * FROM project_usage")
            finally:
                await con.close()
        assert result.call_id == f"{task.task_id}#2"
        assert [c.call_id for c in result.estimated] == [first]
        ledger = offline_model.calls()
        by_call = {r["call_id"]: r for r in rows}
        assert set(by_call) == {first, result.call_id} == set(ledger)
        cut, answer = by_call[first], by_call[result.call_id]
        assert (cut["estimated"], cut["outcome"]) == (True, estimate.OUTCOME)
        assert (answer["estimated"], answer["outcome"]) == (False, "completed")
        # Input as the provider counted it; output at least what reached the stream, never
        # more than the model had sent.
        served = ledger[first]
        assert (cut["input_tokens"], cut["cache_read_tokens"], cut["cache_write_tokens"]) == (
            served["input_tokens"],
            served["cache_read_input_tokens"],
            served["cache_creation_input_tokens"],
        )
        assert served["input_tokens"] > 0
        assert sum(d.pieces for d in pushed) >= len(pushed) >= 4
        assert sum(d.pieces for d in pushed) == cut["output_tokens"] <= served["output_tokens"]
        assert float(cut["cost_usd"]) > 0
        # Exactly one row each, and the project totals count the estimate once.
        assert [dict(r) for r in again] == [dict(r) for r in rows]
        assert totals is not None
        assert totals["input_tokens"] == sum(r["input_tokens"] for r in rows)
        assert totals["output_tokens"] == sum(r["output_tokens"] for r in rows)
        # Budgets count it: the run's usage announced with its answer (what policy settles
        # the reservation with) includes the estimated call.
        assert announced.usage.input_tokens == sum(r["input_tokens"] for r in rows)
        assert announced.usage.output_tokens == sum(r["output_tokens"] for r in rows)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _settle_timer(task: m.ExecTask) -> m.RunDeadline:
    return m.RunDeadline(
        event_id=f"settle:{task.run_id}:{task.attempt}",
        message_id=task.message_id,
        conversation_id=task.conversation_id,
        project_id=task.project_id,
        run_id=task.run_id,
        attempt=task.attempt,
        due=task.deadline,
        settle=m.DeadCalls(
            task_id=task.task_id, user_id="u1", model=task.model, prices=task.prices
        ),
    )


async def test_a_call_cut_on_its_last_delivery_is_billed_once_by_estimate_at_its_deadline(
    infra: Infra, offline_model: OfflineModelProcess, rig: Rig
) -> None:
    # The executor dies mid-call and no delivery of its task follows before the attempt's
    # deadline: policy's settle timer bills the call. The task's redelivery, when it comes at
    # last, settles the same call again — and it stays one row.
    bus, pool, client = rig.bus, rig.pool, rig.client
    offline_model.update_settings(tokens_per_second=8, words_per_reply=60)
    kv = await bus.js.key_value(subjects.BUCKET_RUNS)
    # One attempt, a deadline past by the time the consumer runs, a short grace after it.
    rules = rules_from(PolicySettings(max_attempts=1, run_deadline_s=1.0, settle_grace_s=1.0))
    policy = PolicyHandlers(bus, Runs(kv), Conversations(kv), rules, service_metrics("policy"))
    p = PersisterHandlers(bus, Store(pool), service_metrics("persister"))
    proc = _executor_process(infra, offline_model.url)
    con: asyncpg.Connection = await asyncpg.connect(infra.database_url)
    try:
        e = user_event("Tell me a long story about deadlines")
        await Store(pool).insert_user_message(e)
        await policy.decision(agent_decision(message=e, position=0), None)  # type: ignore[arg-type]
        [task] = decode_all(
            await read_subject(bus, subjects.STREAM_TASKS, "exec.task.>", 1), m.ExecTask
        )
        first = f"{task.task_id}#1"

        async def streamed() -> bool:
            info = await bus.js.stream_info(subjects.STREAM_TOKENS)
            return info.state.messages >= 5  # the call's started record and four pushes

        await eventually(streamed, timeout=90)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert offline_model.calls()[first]["outcome"] != "completed"

        async def rows() -> list[Any]:
            return await con.fetch("SELECT * FROM usage ORDER BY call_id")

        # Only policy's timers and the persister's estimates consumer run: no redelivery.
        async with running(
            Consumer(bus, wiring.POLICY_DEADLINES, m.RunDeadline, policy.deadline),
            Consumer(bus, wiring.PERSISTER_ESTIMATES, m.ModelUsage, p.model_usage),
        ):
            settled = await eventually(rows, timeout=60)
            timers = decode_all(
                await read_subject(bus, subjects.STREAM_POLICY, "policy.deadline.>", 2),
                m.RunDeadline,
            )
        pushed = decode_all(
            await read_subject(bus, subjects.STREAM_TOKENS, "chat.stream.>", 4, settle=0),
            m.TokenDelta,
        )
        [cut] = settled
        served = offline_model.calls()[first]
        assert (cut["call_id"], cut["estimated"], cut["outcome"]) == (first, True, estimate.OUTCOME)
        assert (cut["task_id"], cut["attempt"], cut["purpose"]) == (task.task_id, 1, "answer")
        assert (cut["input_tokens"], cut["cache_read_tokens"], cut["cache_write_tokens"]) == (
            served["input_tokens"],
            served["cache_read_input_tokens"],
            served["cache_creation_input_tokens"],
        )
        assert served["input_tokens"] > 0
        assert sum(d.pieces for d in pushed) == cut["output_tokens"] <= served["output_tokens"]
        assert float(cut["cost_usd"]) > 0
        [timer] = [t for t in timers if t.settle is not None]
        assert timer.event_id == f"settle:{task.run_id}:1"
        state, _ = await Runs(kv).get(task.run_id)
        assert state.status == "failed"  # the deadline ended the run (one attempt allowed)

        # The settle timer handled again (a redelivery) finds the same call: still one row.
        assert await policy.deadline(timer, None) == "settled:1"  # type: ignore[arg-type]
        again = estimate.settled_usage(timer, m.EstimatedCall(call_id=first, usage=m.Usage()))
        assert await p.model_usage(again, None) == "duplicate"  # type: ignore[arg-type]

        # Now the task's redelivery reaches an executor: it settles the dead call too.
        offline_model.update_settings(tokens_per_second=0)
        h = Handlers(bus, History(pool), Model(client), Settings(), service_metrics("executor"))
        async with running(
            Consumer(bus, wiring.EXECUTOR_TASKS, m.ExecTask, h.task),
            Consumer(bus, wiring.PERSISTER_RESULTS, m.ExecResult, p.result),
        ):
            [result] = decode_all(
                await read_subject(bus, subjects.STREAM_RESULTS, "exec.result.>", 1, timeout=60),
                m.ExecResult,
            )

            async def both() -> list[Any] | None:
                found = await rows()
                return found if len(found) == 2 else None

            after = await eventually(both, timeout=30)
        assert [c.call_id for c in result.estimated] == [first]
        assert result.estimated[0].usage.output_tokens == cut["output_tokens"]
        by_call = {r["call_id"]: dict(r) for r in after}
        assert set(by_call) == {first, result.call_id} == set(offline_model.calls())
        assert by_call[first] == dict(cut)  # the deadline's row stands, counted once
        totals = await con.fetchrow("SELECT * FROM project_usage")
        assert totals is not None
        assert totals["input_tokens"] == sum(r["input_tokens"] for r in after)
        assert totals["output_tokens"] == sum(r["output_tokens"] for r in after)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await con.close()


async def test_a_redelivered_call_cut_after_the_first_deliverys_outcome_is_billed_at_the_deadline(
    infra: Infra, offline_model: OfflineModelProcess, rig: Rig
) -> None:
    # Deliveries overlap: the first delivery's ack is late, so the task is delivered again to
    # another executor while the first still runs. The first's outcome is stored and its ack
    # lands; the second's executor dies mid-call. Nothing is delivered again (the task is
    # acked) and the attempt met its deadline, so policy's own timer settles nothing: only the
    # settle timer the second delivery published before its call bills that call (found by
    # chaos-tools: three completed calls with no usage row).
    bus, pool, client = rig.bus, rig.pool, rig.client
    offline_model.update_settings(tokens_per_second=8, words_per_reply=60)
    kv = await bus.js.key_value(subjects.BUCKET_RUNS)
    # The attempt's deadline is long past when the timers are read; the run is answered first.
    rules = rules_from(PolicySettings(max_attempts=1, run_deadline_s=3.0, settle_grace_s=1.0))
    policy = PolicyHandlers(bus, Runs(kv), Conversations(kv), rules, service_metrics("policy"))
    p = PersisterHandlers(bus, Store(pool), service_metrics("persister"))
    con: asyncpg.Connection = await asyncpg.connect(infra.database_url)
    proc: subprocess.Popen[bytes] | None = None
    try:
        e = user_event("Tell me a long story about overlapping deliveries")
        await Store(pool).insert_user_message(e)
        await policy.decision(agent_decision(message=e, position=0), None)  # type: ignore[arg-type]
        [task] = decode_all(
            await read_subject(bus, subjects.STREAM_TASKS, "exec.task.>", 1), m.ExecTask
        )
        first, second = f"{task.task_id}#1", f"{task.task_id}#2"
        # Delivery 1, held here without heartbeats: its ack_wait runs out.
        pull = await bus.js.pull_subscribe_bind(
            wiring.EXECUTOR_TASKS.durable, stream=wiring.EXECUTOR_TASKS.stream
        )
        [held] = await pull.fetch(1, timeout=30)
        assert held.metadata.num_delivered == 1
        # Delivery 2 goes to an executor process, which calls the model (slowly).
        # Its settle timer is due a stall timeout after its call starts at the earliest (the
        # attempt's deadline is nearer): 3 s here, not the 30 s default.
        proc = _executor_process(
            infra, offline_model.url, EXECUTOR_SETTLE_GRACE_S="1", EXECUTOR_STALL_TIMEOUT_S="3"
        )

        async def streaming() -> bool:
            # Its started record is in, and some of its pushes (the stream holds nothing else).
            record = await deadcalls.last_record(bus.js, second)
            info = await bus.js.stream_info(subjects.STREAM_TOKENS)
            started = record is not None and record[0].state == "started"
            return started and info.state.messages >= 4

        await eventually(streaming, timeout=90)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert offline_model.calls()[second]["outcome"] != "completed"

        # Delivery 1 finishes here, after all: its outcome goes out and its ack lands.
        offline_model.update_settings(tokens_per_second=0)
        h = Handlers(bus, History(pool), Model(client), Settings(), service_metrics("executor"))
        await h.task(task, held)
        await held.ack_sync()

        async def acked() -> bool:
            info = await bus.js.consumer_info(
                wiring.EXECUTOR_TASKS.stream, wiring.EXECUTOR_TASKS.durable
            )
            return info.num_ack_pending == 0 and info.num_pending == 0

        await eventually(acked, timeout=30)

        async def rows() -> list[Any]:
            return await con.fetch("SELECT * FROM usage ORDER BY call_id")

        # The answer is stored and policy ends the run before it reads any timer.
        async with running(
            Consumer(bus, wiring.PERSISTER_RESULTS, m.ExecResult, p.result),
            Consumer(
                bus, wiring.POLICY_OUTCOMES, m.AssistantMessagePersisted, policy.reply_persisted
            ),
        ):

            async def answered() -> bool:
                state, _ = await Runs(kv).get(task.run_id)
                return state.status == "completed"

            await eventually(answered, timeout=60)
        assert [r["call_id"] for r in await rows()] == [first]
        async with running(
            Consumer(bus, wiring.POLICY_DEADLINES, m.RunDeadline, policy.deadline),
            Consumer(bus, wiring.PERSISTER_ESTIMATES, m.ModelUsage, p.model_usage),
        ):

            async def both() -> list[Any] | None:
                found = await rows()
                return found if len(found) == 2 else None

            settled = await eventually(both, timeout=60)
            timers = decode_all(
                await read_subject(bus, subjects.STREAM_POLICY, "policy.deadline.>", 2),
                m.RunDeadline,
            )
        by_call = {r["call_id"]: r for r in settled}
        served = offline_model.calls()[second]
        cut = by_call[second]
        assert (cut["estimated"], cut["outcome"], cut["user_id"]) == (
            True,
            estimate.OUTCOME,
            e.user_id,
        )
        assert (cut["input_tokens"], cut["cache_read_tokens"]) == (
            served["input_tokens"],
            served["cache_read_input_tokens"],
        )
        assert served["input_tokens"] > 0
        assert 0 < cut["output_tokens"] <= served["output_tokens"]
        assert by_call[first]["estimated"] is False
        # The executor's timer did it: policy's own settle timer was never published.
        ids = {t.event_id for t in timers}
        assert f"settle:{second}" in ids
        assert f"settle:{task.run_id}:1" not in ids
        totals = await con.fetchrow("SELECT * FROM project_usage")
        assert totals is not None
        assert totals["input_tokens"] == sum(r["input_tokens"] for r in settled)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        await con.close()


async def test_a_call_cut_before_its_message_start_was_billed_nothing_and_gets_no_row(
    infra: Infra, offline_model: OfflineModelProcess, rig: Rig
) -> None:
    # The provider counts a call's input when it sends message_start (docs/guarantees.md, I4):
    # a call whose executor died while the model had not yet answered was billed nothing, and
    # neither the redelivery nor the deadline path finds a record to estimate it from.
    bus, pool, client = rig.bus, rig.pool, rig.client
    content = "Answer me before your start, please"
    offline_model.add_faults(
        [{"kind": "stall", "after_tokens": -1, "match": content, "stall_seconds": 120}]
    )
    proc = _executor_process(infra, offline_model.url)
    try:
        e = user_event(content)
        await Store(pool).insert_user_message(e)
        task = _task(e)
        first = f"{task.task_id}#1"
        await bus.publish(
            subjects.exec_task(e.project_id, e.conversation_id), task, msg_id=task.event_id
        )

        async def requested() -> bool:
            return first in offline_model.calls()

        # The request is at the model, which has sent nothing yet (no headers, no message_start).
        await eventually(requested, timeout=90)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert await deadcalls.last_record(bus.js, first) is None

        h = Handlers(bus, History(pool), Model(client), Settings(), service_metrics("executor"))
        p = PersisterHandlers(bus, Store(pool), service_metrics("persister"))
        async with running(
            Consumer(bus, wiring.EXECUTOR_TASKS, m.ExecTask, h.task),
            Consumer(bus, wiring.PERSISTER_RESULTS, m.ExecResult, p.result),
        ):
            [result] = decode_all(
                await read_subject(bus, subjects.STREAM_RESULTS, "exec.result.>", 1, timeout=60),
                m.ExecResult,
            )
            con: asyncpg.Connection = await asyncpg.connect(infra.database_url)
            try:

                async def billed() -> list[Any] | None:
                    rows = await con.fetch("SELECT * FROM usage ORDER BY call_id")
                    return rows or None

                rows = await eventually(billed, timeout=30)
            finally:
                await con.close()
        served = offline_model.calls()[first]
        billed_by_model = (
            served["input_tokens"],
            served["output_tokens"],
            served["cache_read_input_tokens"],
            served["cache_creation_input_tokens"],
        )
        assert (served["outcome"], billed_by_model) == ("stall", (0, 0, 0, 0))
        assert result.call_id == f"{task.task_id}#2" and result.estimated == ()
        assert [r["call_id"] for r in rows] == [result.call_id]
        # The deadline path reads the same records: nothing to settle there either.
        calls = estimate.task_calls(task.task_id, 2)
        assert await deadcalls.unsettled(bus.js, e.project_id, e.conversation_id, calls) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        offline_model.clear()


class _Crash(Exception):
    """The policy process dying at a chosen point (raised from our own adapter)."""


class _CrashingRuns(Runs):
    """The runs adapter of a policy that dies at its next write of a deadline's step: before
    the write (``after=False``) or right after it, before the effects that follow it."""

    def __init__(self, kv: Any, after: bool) -> None:
        super().__init__(kv)
        self.after = after
        self.armed = True

    async def update(self, state: Any, revision: int) -> int:
        if not self.armed:
            return await super().update(state, revision)
        self.armed = False
        if self.after:
            await super().update(state, revision)
        raise _Crash("policy died at the record's write")


async def test_a_deadline_that_schedules_a_retry_sends_its_settle_timer_even_if_policy_dies(
    infra: Infra,
) -> None:
    # Policy dies while handling a missed deadline that schedules a retry: before the record's
    # write, or just after it. Either way the attempt's settle timer is in the stream, once,
    # after the redelivered deadline is handled.
    await provision(infra.nats_url)
    bus = await connect_bus(infra.nats_url, "test")
    kv = await bus.js.key_value(subjects.BUCKET_RUNS)
    rules = rules_from(PolicySettings(max_attempts=3, settle_grace_s=1.0))
    try:
        for after in (False, True):
            policy = PolicyHandlers(bus, Runs(kv), Conversations(kv), rules, service_metrics("p"))
            e = user_event(f"Crash while timing out (after the write: {after})")
            await policy.decision(agent_decision(message=e, position=0), None)  # type: ignore[arg-type]
            run, _ = await Runs(kv).get(core.run_id_for(e.message_id))
            assert (run.status, run.attempt) == ("running", 1)
            due = core.deadline_event(run, datetime.now(UTC) - timedelta(seconds=1))

            policy.runs = _CrashingRuns(kv, after)
            with pytest.raises(_Crash):
                await policy.deadline(due, None)  # type: ignore[arg-type]
            moved, _ = await Runs(kv).get(run.run_id)
            assert isinstance(moved.phase, Backoff) == after  # written only if it died after

            # Published before the write: there even though the process died.
            [timer] = await _settle_timers(bus, e)
            assert (timer.event_id, timer.attempt) == (f"settle:{run.run_id}:1", 1)
            assert timer.settle is not None and timer.settle.task_id == f"task:{run.run_id}:1"

            # The deadline is delivered again to a policy that lives: the retry is scheduled
            # (or found scheduled), and the timer stays one message.
            outcome = await _redelivered(policy, due)
            assert outcome in ("backoff", "early", "retry"), outcome
            assert [t.event_id for t in await _settle_timers(bus, e)] == [timer.event_id]
    finally:
        await bus.close()


async def _settle_timers(bus: Any, e: m.UserMessageAccepted) -> list[m.RunDeadline]:
    """The settle timers in the stream for ``e``'s conversation (its attempts' deadlines too)."""
    subject = subjects.policy_deadline(e.project_id, e.conversation_id)
    got = decode_all(
        await read_subject(bus, subjects.STREAM_POLICY, subject, 1, timeout=5), m.RunDeadline
    )
    return [t for t in got if t.settle is not None]


async def _redelivered(policy: PolicyHandlers, d: m.RunDeadline) -> str:
    try:
        return await policy.deadline(d, None)  # type: ignore[arg-type]
    except Deferred:
        return "early"  # the retry's backoff is not over: the message goes back


async def test_a_task_replayed_from_a_dead_letter_bills_its_call_under_an_id_of_its_own(
    infra: Infra, offline_model: OfflineModelProcess, rig: Rig
) -> None:
    """A copy `baton dlq replay` republished carries the deliveries of its earlier lives
    (``Baton-Delivery-Base``, tests/integration/test_dlq.py): its first delivery's call counts
    on from them, so it cannot take the id (and replace the row) of a call of the first life."""
    bus, pool, client = rig.bus, rig.pool, rig.client
    offline_model.update_settings(tokens_per_second=0)
    e = user_event("A second life, please")
    await Store(pool).insert_user_message(e)
    # Replayed after its attempt's deadline, as a dead letter is; from a policy that checks a
    # redelivery's settle timer (user_id set), so the copy's call asks for one.
    task = msgspec.structs.replace(
        _task(e), user_id=e.user_id, deadline=datetime.now(UTC) - timedelta(hours=1)
    )
    settings = Settings()
    h = Handlers(bus, History(pool), Model(client), settings, service_metrics("executor"))
    p = PersisterHandlers(bus, Store(pool), service_metrics("persister"))
    async with running(
        Consumer(bus, wiring.EXECUTOR_TASKS, m.ExecTask, h.task),
        Consumer(bus, wiring.PERSISTER_RESULTS, m.ExecResult, p.result),
    ):
        sent = datetime.now(UTC)
        await bus.publish(
            subjects.exec_task(e.project_id, e.conversation_id),
            task,
            msg_id=f"replay:EXEC_TASKS:1:{task.event_id}",
            headers={estimate.DELIVERY_BASE_HEADER: "3"},
        )
        [result] = decode_all(
            await read_subject(bus, subjects.STREAM_RESULTS, "exec.result.>", 1, timeout=60),
            m.ExecResult,
        )
        con: asyncpg.Connection = await asyncpg.connect(infra.database_url)
        try:

            async def billed() -> list[Any] | None:
                rows = await con.fetch("SELECT * FROM usage ORDER BY call_id")
                return rows or None

            rows = await eventually(billed, timeout=30)
        finally:
            await con.close()
        [timer] = decode_all(
            await read_subject(
                bus,
                subjects.STREAM_POLICY,
                subjects.policy_settle(e.project_id, e.conversation_id),
                1,
            ),
            m.RunDeadline,
        )
    replayed = f"{task.task_id}#4"
    assert result.call_id == replayed and result.estimated == ()
    # Its settle timer is not due at once (the deadline passed long ago): the call's first byte
    # is due first, or the timer would run before the call wrote its record, find nothing, and
    # be gone.
    assert timer.settle is not None and timer.settle.calls == (replayed,)
    grace = timedelta(seconds=settings.stall_timeout_s + settings.settle_grace_s)
    assert timer.due >= sent + grace
    assert [(r["call_id"], r["estimated"]) for r in rows] == [(replayed, False)]
    ledger = offline_model.calls()
    assert replayed in ledger and f"{task.task_id}#1" not in ledger
