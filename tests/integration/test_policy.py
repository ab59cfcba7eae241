"""Policy against real NATS: one run per message, tasks only on approval, retries it owns."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from services.policy import core
from services.policy.adapters import Conversations, Runs
from services.policy.config import Settings
from services.policy.handlers import Handlers
from services.policy.main import rules_from
from services.policy.phase import Backoff
from shared import messages as m
from shared import subjects, wiring
from shared.bus import Consumer
from shared.errors import Deferred
from tests.integration.conftest import Infra
from tests.support import connect_bus, decode_all, read_subject, running, service_metrics


def _decision(action: m.Action = "answer", executor: str = "chat") -> m.AgentDecision:
    return m.AgentDecision(
        event_id="decision:1",
        message_id="00000000-0000-0000-0000-000000000001",
        conversation_id="00000000-0000-0000-0000-0000000000c1",
        project_id="p1",
        user_id="u1",
        decision=m.Decision(
            intent="question",
            complexity="low",
            action=action,
            executor=executor,  # type: ignore[arg-type]
            estimated_tokens=200,
        ),
    )


async def _policy(infra: Infra, max_attempts: int = 2):  # type: ignore[no-untyped-def]
    bus = await connect_bus(infra.nats_url, "policy")
    kv = await bus.js.key_value(subjects.BUCKET_RUNS)
    rules = rules_from(Settings(max_attempts=max_attempts))
    h = Handlers(bus, Runs(kv), Conversations(kv), rules, service_metrics("policy"))
    consumers = [
        Consumer(bus, wiring.POLICY_DECISIONS, m.AgentDecision, h.decision),
        Consumer(bus, wiring.POLICY_FAILURES, m.ExecFailed, h.failure),
        Consumer(bus, wiring.POLICY_OUTCOMES, m.AssistantMessagePersisted, h.reply_persisted),
    ]
    return bus, consumers


def _failure(task: m.ExecTask, error_class: m.ErrorClass) -> m.ExecFailed:
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
        error_class=error_class,
        error="boom",
        usage=m.Usage(),
        prices=task.prices,
    )


async def test_a_decision_delivered_three_times_makes_one_run_and_one_task(infra: Infra) -> None:
    bus, consumers = await _policy(infra)
    d = _decision()
    subject = subjects.agent_decision(d.project_id, d.conversation_id)
    for i in range(3):
        await bus.publish(subject, d, msg_id=f"copy-{i}")
    async with running(*consumers):
        tasks = decode_all(
            await read_subject(bus, subjects.STREAM_TASKS, "exec.task.>", 1), m.ExecTask
        )
        verdicts = decode_all(
            await read_subject(bus, subjects.STREAM_POLICY, "policy.verdict.>", 1), m.RunVerdict
        )
    assert [(t.run_id, t.attempt, t.model, t.executor) for t in tasks] == [
        (core.run_id_for(d.message_id), 1, "claude-sonnet-4-6", "chat")
    ]
    assert tasks[0].deadline > datetime.now(UTC)
    assert [(v.verdict, v.status) for v in verdicts] == [("approve", "running")]
    await bus.close()


async def test_clarify_advice_becomes_a_reply_and_never_a_task(infra: Infra) -> None:
    bus, consumers = await _policy(infra)
    d = _decision(action="clarify")
    await bus.publish(subjects.agent_decision("p1", d.conversation_id), d, msg_id="d")
    async with running(*consumers):
        replies = decode_all(
            await read_subject(bus, subjects.STREAM_POLICY, "policy.reply.>", 1), m.PolicyReply
        )
        info = await bus.js.stream_info(subjects.STREAM_TASKS)
    assert [(r.kind, r.status) for r in replies] == [("clarify", "clarified")]
    assert info.state.messages == 0
    await bus.close()


async def test_retryable_failures_retry_until_attempts_run_out_then_a_failure_notice(
    infra: Infra,
) -> None:
    bus, consumers = await _policy(infra, max_attempts=2)
    d = _decision()
    p, c = d.project_id, d.conversation_id
    await bus.publish(subjects.agent_decision(p, c), d, msg_id="d")
    async with running(*consumers):
        first = decode_all(
            await read_subject(bus, subjects.STREAM_TASKS, "exec.task.>", 1), m.ExecTask
        )[0]
        await bus.publish(subjects.exec_failed(p, c), _failure(first, "overloaded"), msg_id="f1")
        tasks = decode_all(
            await read_subject(bus, subjects.STREAM_TASKS, "exec.task.>", 2), m.ExecTask
        )
        second = tasks[1]
        # A stale copy of the first failure changes nothing.
        await bus.publish(subjects.exec_failed(p, c), _failure(first, "overloaded"), msg_id="f1b")
        await bus.publish(subjects.exec_failed(p, c), _failure(second, "timeout"), msg_id="f2")
        replies = decode_all(
            await read_subject(bus, subjects.STREAM_POLICY, "policy.reply.>", 1), m.PolicyReply
        )
        tasks = decode_all(
            await read_subject(bus, subjects.STREAM_TASKS, "exec.task.>", 2), m.ExecTask
        )
    assert [t.attempt for t in tasks] == [1, 2]
    assert [(r.kind, r.status) for r in replies] == [("failure", "failed")]
    assert "timeout" in replies[0].text
    await bus.close()


async def test_a_bad_request_is_not_retried(infra: Infra) -> None:
    bus, consumers = await _policy(infra, max_attempts=3)
    d = _decision()
    p, c = d.project_id, d.conversation_id
    await bus.publish(subjects.agent_decision(p, c), d, msg_id="d")
    async with running(*consumers):
        first = decode_all(
            await read_subject(bus, subjects.STREAM_TASKS, "exec.task.>", 1), m.ExecTask
        )[0]
        await bus.publish(subjects.exec_failed(p, c), _failure(first, "bad_request"), msg_id="f1")
        replies = decode_all(
            await read_subject(bus, subjects.STREAM_POLICY, "policy.reply.>", 1), m.PolicyReply
        )
        info = await bus.js.stream_info(subjects.STREAM_TASKS)
    assert replies[0].kind == "failure"
    assert info.state.messages == 1
    await bus.close()


def _second(d: m.AgentDecision, n: int) -> m.AgentDecision:
    mid = f"00000000-0000-0000-0000-00000000000{n}"
    return msgspec.structs.replace(d, message_id=mid, event_id=f"decision:{mid}", position=n)


def _persisted(task: m.ExecTask) -> m.AssistantMessagePersisted:
    return m.AssistantMessagePersisted(
        event_id=f"persisted:assistant:{task.run_id}",
        message_id=task.message_id,
        conversation_id=task.conversation_id,
        project_id=task.project_id,
        run_id=task.run_id,
        reply_to=task.message_id,
        kind="answer",
        content="done",
        created_at=datetime.now(UTC),
        status="completed",
    )


async def test_runs_of_one_conversation_take_turns_in_arrival_order(infra: Infra) -> None:
    bus, consumers = await _policy(infra)
    first = _decision()
    later = [_second(first, 2), _second(first, 3)]
    p, c = first.project_id, first.conversation_id
    async with running(*consumers):
        await bus.publish(subjects.agent_decision(p, c), first, msg_id="d1")
        [t1] = decode_all(
            await read_subject(bus, subjects.STREAM_TASKS, "exec.task.>", 1), m.ExecTask
        )
        for i, d in enumerate(later):
            await bus.publish(subjects.agent_decision(p, c), d, msg_id=f"d{i + 2}")
        verdicts = decode_all(
            await read_subject(bus, subjects.STREAM_POLICY, "policy.verdict.>", 3), m.RunVerdict
        )
        # While the first run is active the others wait: queued, and no task for them.
        assert sorted(v.status for v in verdicts) == ["queued", "queued", "running"]
        assert (await bus.js.stream_info(subjects.STREAM_TASKS)).state.messages == 1
        await bus.publish(subjects.persisted_assistant(p, c), _persisted(t1), msg_id="a1")
        tasks = decode_all(
            await read_subject(bus, subjects.STREAM_TASKS, "exec.task.>", 2), m.ExecTask
        )
        assert [t.message_id for t in tasks] == [first.message_id, later[0].message_id]
        # A redelivered completion of the first run does not start a third.
        await bus.publish(subjects.persisted_assistant(p, c), _persisted(t1), msg_id="a1-again")
        await bus.publish(subjects.persisted_assistant(p, c), _persisted(tasks[1]), msg_id="a2")
        tasks = decode_all(
            await read_subject(bus, subjects.STREAM_TASKS, "exec.task.>", 3), m.ExecTask
        )
    assert [t.message_id for t in tasks] == [d.message_id for d in (first, *later)]
    await bus.close()


def _cancel(d: m.AgentDecision, **changes: str) -> m.CancelRequested:
    run_id = core.run_id_for(d.message_id)
    c = m.CancelRequested(
        event_id=f"cancel:{run_id}",
        message_id=d.message_id,
        conversation_id=d.conversation_id,
        project_id=d.project_id,
        user_id=d.user_id,
        run_id=run_id,
        requested_at=datetime.now(UTC),
    )
    return msgspec.structs.replace(c, **changes)


async def test_hostile_cancels_are_dead_lettered_and_leave_the_run_alone(infra: Infra) -> None:
    bus, consumers = await _policy(infra)
    kv = await bus.js.key_value(subjects.BUCKET_RUNS)
    d = _decision()
    await bus.publish(subjects.agent_decision(d.project_id, d.conversation_id), d, msg_id="d")
    cancels = subjects.chat_cancel(d.project_id, d.conversation_id)
    other = "00000000-0000-0000-0000-000000000002"
    hostile = [
        _cancel(d, user_id="mallory"),  # someone else's run
        _cancel(d, conversation_id="00000000-0000-0000-0000-0000000000c2"),
        _cancel(d, project_id="p2"),
        _cancel(d, run_id=f"run-{other}"),  # run and message disagree
    ]
    rules = rules_from(Settings())
    h = Handlers(bus, Runs(kv), Conversations(kv), rules, service_metrics("policy-2"))
    async with running(
        *consumers, Consumer(bus, wiring.POLICY_CANCELS, m.CancelRequested, h.cancel)
    ):
        await read_subject(bus, subjects.STREAM_TASKS, "exec.task.>", 1)
        for i, c in enumerate(hostile):
            await bus.publish(cancels, c, msg_id=f"hostile-{i}")
        await bus.js.publish(cancels, b"{not json", headers={"Nats-Msg-Id": "bad"})
        await bus.js.publish(cancels, b'{"v": 1}', headers={"Nats-Msg-Id": "partial"})
        letters = await read_subject(
            bus, subjects.STREAM_DLQ, subjects.dead_letter("CHAT_CANCEL", "policy-cancels"), 6
        )
    assert len(letters) == 6
    state = msgspec.json.decode((await kv.get(core.run_id_for(d.message_id))).value)
    assert (state["status"], state["cancel_requested"]) == ("running", False)
    assert state["phase"]["type"] == "running"
    await bus.close()


async def test_a_retry_waits_for_its_backoff_in_the_stream_not_in_a_worker(infra: Infra) -> None:
    bus = await connect_bus(infra.nats_url, "policy")
    kv = await bus.js.key_value(subjects.BUCKET_RUNS)
    rules = rules_from(Settings(retry_backoff_s="60"))
    h = Handlers(bus, Runs(kv), Conversations(kv), rules, service_metrics("policy"))
    d = _decision()
    await h.decision(d, None)  # type: ignore[arg-type]
    [task] = decode_all(
        await read_subject(bus, subjects.STREAM_TASKS, "exec.task.>", 1), m.ExecTask
    )
    f = _failure(task, "overloaded")
    # The handler returns at once, asking the server to hand the report back in 60 s.
    with pytest.raises(Deferred) as first:
        await h.failure(f, None)  # type: ignore[arg-type]
    assert 55 < first.value.delay <= 60
    state, _ = await Runs(kv).get(task.run_id)
    assert (state.attempt, state.cause) == (2, f.event_id)
    assert isinstance(state.phase, Backoff)
    # Handed back early (a restart, a redelivery): still waiting, still no second task.
    with pytest.raises(Deferred) as again:
        await h.failure(f, None)  # type: ignore[arg-type]
    assert again.value.delay <= first.value.delay
    assert len(await read_subject(bus, subjects.STREAM_TASKS, "exec.task.>", 1)) == 1
    # Once due (here: the record says so), the redelivered report starts attempt 2, once.
    due = msgspec.structs.replace(state, phase=Backoff(datetime.now(UTC)))
    await Runs(kv).update(due, (await Runs(kv).get(task.run_id))[1])
    assert await h.failure(f, None) == "retry"  # type: ignore[arg-type]
    assert await h.failure(f, None) == "stale"  # type: ignore[arg-type]
    tasks = decode_all(await read_subject(bus, subjects.STREAM_TASKS, "exec.task.>", 2), m.ExecTask)
    assert [t.attempt for t in tasks] == [1, 2]
    await bus.close()


async def test_a_run_is_marked_started_even_if_its_conversation_changed_since_it_got_the_slot(
    infra: Infra,
) -> None:
    # The slot's record is not read again before marking the run started: the compare-and-set
    # names the revision that gave it the slot, and only a conflict makes it read again.
    bus, _ = await _policy(infra)
    kv = await bus.js.key_value(subjects.BUCKET_RUNS)
    convs = Conversations(kv)
    h = Handlers(bus, Runs(kv), convs, rules_from(Settings()), service_metrics("policy"))
    c = "00000000-0000-0000-0000-0000000000c1"
    gave = core.ConvState(conversation_id=c, active="run-a", next_position=2)
    revision = await convs.put(gave, 0)
    # Unchanged since: one write, no read.
    await h._mark_started(gave, revision, "run-a")
    stored, now = await convs.get(c)
    assert stored.started and stored.active == "run-a" and now > revision
    # Changed since (a newer message queued behind it): read again, marked all the same,
    # and the newer message's place is kept.
    fresh = core.ConvState(conversation_id=c, active="run-b", next_position=3)
    revision = await convs.put(fresh, now)
    await convs.put(msgspec.structs.replace(fresh, pending={3: "run-c"}), revision)
    await h._mark_started(fresh, revision, "run-b")
    stored, _ = await convs.get(c)
    assert (stored.active, stored.started, stored.pending) == ("run-b", True, {3: "run-c"})
    # Moved on meanwhile (another run holds the slot): nothing is marked.
    moved = core.ConvState(conversation_id=c, active="run-d", next_position=4)
    _, revision = await convs.get(c)
    await convs.put(moved, revision)
    await h._mark_started(stored, revision, "run-b")
    stored, _ = await convs.get(c)
    assert (stored.active, stored.started) == ("run-d", False)
    await bus.close()


async def test_a_run_admitted_on_a_conversation_record_read_before_a_change_reads_it_again(
    infra: Infra,
) -> None:
    # The record is read while the run is created; if another message changed it meanwhile,
    # the compare-and-set fails and the run is admitted on the fresh record.
    bus, _ = await _policy(infra)
    kv = await bus.js.key_value(subjects.BUCKET_RUNS)
    convs, runs = Conversations(kv), Runs(kv)
    h = Handlers(bus, runs, convs, rules_from(Settings()), service_metrics("policy"))
    d = msgspec.structs.replace(_decision(), position=2)
    state = core.decide(d, rules_from(Settings()), datetime.now(UTC))
    await runs.create(state)
    c = d.conversation_id
    seen = core.ConvState(conversation_id=c, active="run-earlier", next_position=2)
    revision = await convs.put(seen, 0)
    # Meanwhile the earlier run finished: the slot is free for position 2.
    await convs.put(msgspec.structs.replace(seen, active=None), revision)
    admission = await h._admit(state, (seen, revision))
    assert admission == "start"
    stored, _ = await convs.get(c)
    assert (stored.active, stored.started, stored.next_position) == (state.run_id, True, 3)
    tasks = decode_all(await read_subject(bus, subjects.STREAM_TASKS, "exec.task.>", 1), m.ExecTask)
    assert [t.run_id for t in tasks] == [state.run_id]
    await bus.close()
