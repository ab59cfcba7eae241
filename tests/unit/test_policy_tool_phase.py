"""The run's tool phase, as tables: every (phase, input) pair of a round of tool calls, with
duplicate, stale and out-of-order inputs — what changes and what is published, without a broker."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from services.policy import core, machine, toolcalls
from shared import messages as m

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
LATER = NOW + timedelta(seconds=5)
TOOLS = core.ToolRules(
    max_rounds=2,
    approval_timeout_s=60.0,
    grants=(
        core.ToolGrant(name="calculator", server="demo", approval="auto", idempotent=True),
        core.ToolGrant(name="create_task", server="demo", approval="ask", per_user_daily=3),
        core.ToolGrant(name="rm_rf", server="demo", approval="deny"),
        core.ToolGrant(name="flights", server="demo", approval="auto", per_user_daily=1),
    ),
)
RULES = core.Rules(
    default_model="small", models={"small": m.Prices(input=1.0, output=5.0)}, tools=TOOLS
)
IDS = {"message_id": "m1", "conversation_id": "c1", "project_id": "acme"}
RUN = core.run_id_for("m1")
STARTED = core.ConvState(conversation_id="c1", active=RUN, started=True, next_position=2)


def call(name: str, value: Any = None, cid: str = "", digest: str | None = None) -> m.ToolCall:
    value = {"x": 1} if value is None else value
    return m.ToolCall(
        id=cid or f"toolu_{name}",
        name=name,
        input=value,
        input_digest=m.input_digest(value) if digest is None else digest,
    )


def turn(*calls: m.ToolCall, round_: int = 0) -> m.ToolTurnPersisted:
    return m.ToolTurnPersisted(
        event_id=f"persisted:toolturn:{RUN}:{round_}", **IDS, run_id=RUN, user_id="u",
        round=round_, call_id="task#1", tool_calls=calls, usage=m.Usage(output_tokens=9),
    )  # fmt: skip


def repeat(*calls: m.ToolCall, round_: int) -> m.ToolTurnPersisted:
    """A turn of ``round_`` as the persister announces it after round 0 stored CALC and DENY."""
    earlier = ("toolu_calculator", "toolu_rm_rf")
    return msgspec.structs.replace(turn(*calls, round_=round_), earlier_call_ids=earlier)


def result(c: m.ToolCall, round_: int = 0, outcome: m.ToolOutcome = "ok") -> m.ToolResultPersisted:
    r = m.ToolResult(
        event_id=f"toolresult:{RUN}:{c.id}", **IDS, run_id=RUN, round=round_, call_id=c.id,
        name=c.name, outcome=outcome, is_error=outcome != "ok", content="42",
    )  # fmt: skip
    return m.ToolResultPersisted(event_id=f"persisted:toolresult:{RUN}:{c.id}", **IDS, result=r)


def decision(
    c: m.ToolCall, approve: bool = True, digest: str | None = None
) -> m.ToolApprovalDecided:
    return m.ToolApprovalDecided(
        event_id=f"approval:{RUN}:{c.id}", **IDS, run_id=RUN, user_id="u", call_id=c.id,
        approve=approve, input_digest=c.input_digest if digest is None else digest,
        reason="" if approve else "not now", decided_at=LATER,
    )  # fmt: skip


def approval_timer(run: core.RunState, round_: int = 0) -> m.RunDeadline:
    return m.RunDeadline(
        event_id=toolcalls.approval_deadline_id(RUN, round_), **IDS, run_id=RUN,
        attempt=run.attempt, due=NOW,
    )  # fmt: skip


def after(run: core.RunState, inp: machine.Input, conv: core.ConvState = STARTED) -> core.RunState:
    s = machine.step(run, conv, inp, RULES, NOW)
    assert s.run is not None, s
    return s.run


CALC, TASK, DENY = call("calculator"), call("create_task", {"title": "call John"}), call("rm_rf")
TASK2 = call("create_task", {"title": "feed the cat"}, cid="toolu_task2")
RUNNING = core.decide(
    m.AgentDecision(
        event_id="d1", **IDS, user_id="u", position=1,
        decision=m.Decision(intent="question", complexity="low", action="answer",
                            executor="chat", estimated_tokens=300),
    ),
    RULES, NOW,
)  # fmt: skip
TOOLS_RUNNING = after(RUNNING, machine.ToolTurnStored(turn(CALC, DENY)))
WAITING = after(RUNNING, machine.ToolTurnStored(turn(TASK, CALC)))
WAITING2 = after(RUNNING, machine.ToolTurnStored(turn(TASK, TASK2)))
APPROVED = after(WAITING, machine.ToolDecided(decision(TASK)))
ONE_LEFT = after(TOOLS_RUNNING, machine.ToolResultStored(result(DENY)))
NEXT_ROUND = after(ONE_LEFT, machine.ToolResultStored(result(CALC)))
BACKOFF = msgspec.structs.replace(
    RUNNING, attempt=2, phase=machine.Backoff(NOW + timedelta(seconds=1))
)
CANCELLING = msgspec.structs.replace(RUNNING, phase=machine.Cancelling(), cause="cancel:1")
COMPLETED = msgspec.structs.replace(RUNNING, phase=machine.Done("completed"))
TIMED_OUT = after(WAITING, machine.DeadlineDue(approval_timer(WAITING)))
USER = machine.Cancel("cancel:u", "cancelled by the user", "user")


def kinds(step: machine.Step) -> list[str]:
    """The effects in order, each in a word or two (a publish: the subjects' first two tokens)."""
    out = []
    for e in step.effects:
        match e:
            case machine.Publish(events=events):
                out.append("+".join(".".join(subject.split(".")[:2]) for subject, _ in events))
            case machine.Abort(event=event):
                out.append(f"abort:{event.reason}")
            case machine.Settle():
                out.append("settle")
            case machine.Defer():
                out.append("defer")
            case machine.Count(metric=metric, label=label):
                out.append(f"count:{metric}:{label}" if label else f"count:{metric}")
            case machine.Observe(metric=metric, labels=labels, value=value):
                out.append(
                    ":".join((metric, *labels)) + ("" if metric == "tool_calls" else f"={value:g}")
                )
            case machine.Continue(run_id=run_id, input=inp):
                out.append(f"then:{type(inp).__name__}:{run_id}")
    return out


def phase(run: core.RunState | None) -> str:
    if run is None:
        return "unchanged"
    p = machine.phase_of(run)
    if isinstance(p, machine.Done):
        return f"done:{p.kind}"
    if isinstance(p, machine.Tools):
        return "tools:waiting" if p.waiting else "tools:running"
    return type(p).__name__.lower()


T = machine.ToolTurnStored
R = machine.ToolResultStored
A = machine.ToolDecided

# (name, run, input, outcome, phase after, effects)
TABLE = [
    # -- the model's turn is stored: each call decided
    ("turn: auto runs at once", RUNNING, T(turn(CALC)), "tools", "tools:running",
     ["tool_calls:calculator:auto", "policy.verdict+tool.task"]),
    ("turn: ask waits for the user", RUNNING, T(turn(TASK)), "requires_action", "tools:waiting",
     ["approvals_pending=1", "policy.verdict+tool.requested+policy.deadline"]),
    ("turn: deny never runs", RUNNING, T(turn(DENY)), "tools", "tools:running",
     ["tool_calls:rm_rf:denied", "policy.verdict+tool.result"]),
    ("turn: an unknown tool is invalid", RUNNING, T(turn(call("format_disk"))), "tools",
     "tools:running", ["tool_calls:format_disk:invalid", "policy.verdict+tool.result"]),
    ("turn: input that is not an object is invalid", RUNNING, T(turn(call("calculator", "1+"))),
     "tools", "tools:running", ["tool_calls:calculator:invalid", "policy.verdict+tool.result"]),
    ("turn: input that does not match its digest is invalid", RUNNING,
     T(turn(call("calculator", digest="0" * 64))), "tools", "tools:running",
     ["tool_calls:calculator:invalid", "policy.verdict+tool.result"]),
    ("turn: over the daily limit", RUNNING, T(turn(call("flights")), {"toolu_flights": False}),
     "tools", "tools:running", ["tool_calls:flights:over_limit", "policy.verdict+tool.result"]),
    ("turn: within the daily limit", RUNNING, T(turn(call("flights")), {"toolu_flights": True}),
     "tools", "tools:running", ["tool_calls:flights:auto", "policy.verdict+tool.task"]),
    ("turn: mixed, in the model's order", RUNNING, T(turn(TASK, CALC, DENY)), "requires_action",
     "tools:waiting", ["tool_calls:calculator:auto", "tool_calls:rm_rf:denied",
                       "approvals_pending=1",
                       "policy.verdict+tool.requested+tool.task+tool.result+policy.deadline"]),
    ("turn: past max_rounds ends the run", msgspec.structs.replace(RUNNING, round=2),
     T(turn(CALC, round_=2)), "failed", "done:failed",
     ["tool_calls:calculator:max_rounds", "count:verdicts:stop", "policy.verdict+policy.reply"]),
    ("turn: during a backoff (an earlier call's turn) is decided", BACKOFF, T(turn(CALC)),
     "tools", "tools:running", ["tool_calls:calculator:auto", "policy.verdict+tool.task"]),
    ("turn: while cancelling ends it cancelled", CANCELLING, T(turn(CALC)), "cancelled",
     "done:cancelled", ["count:verdicts:stop", "policy.verdict", f"then:Release:{RUN}"]),
    ("turn: again (a redelivery) publishes the same again", WAITING, T(turn(TASK, CALC)), "stale",
     "unchanged", ["policy.verdict+tool.requested+tool.task+policy.deadline"]),
    ("turn: the one that ended the run past max_rounds, again, re-publishes its reply",
     after(msgspec.structs.replace(RUNNING, round=2), T(turn(CALC, round_=2))),
     T(turn(CALC, round_=2)), "stale", "unchanged", ["policy.verdict+policy.reply"]),
    ("turn: of an old round is stale", NEXT_ROUND, T(turn(CALC)), "stale", "unchanged", []),
    # -- a tool_use id an earlier round of the run used (the API never repeats one)
    ("turn: a call repeating an earlier round's id never runs, the others do", NEXT_ROUND,
     T(repeat(CALC, TASK2, round_=1)), "requires_action", "tools:waiting",
     ["tool_calls:calculator:invalid", "approvals_pending=1",
      "policy.verdict+tool.requested+policy.deadline"]),
    ("turn: every call repeating an earlier round's id ends the run", NEXT_ROUND,
     T(repeat(CALC, round_=1)), "failed", "done:failed",
     ["tool_calls:calculator:invalid", "count:verdicts:stop", "policy.verdict+policy.reply"]),
    ("turn: repeating ids, again (a redelivery), re-publishes its reply",
     after(NEXT_ROUND, T(repeat(CALC, round_=1))), T(repeat(CALC, round_=1)), "stale",
     "unchanged", ["policy.verdict+policy.reply"]),
    ("turn: an id of an earlier round of another run is no repeat", NEXT_ROUND,
     T(msgspec.structs.replace(turn(CALC, round_=1), earlier_call_ids=("toolu_other",))),
     "tools", "tools:running", ["tool_calls:calculator:auto", "policy.verdict+tool.task"]),
    ("turn: after the run ended is stale", COMPLETED, T(turn(CALC)), "stale", "unchanged", []),
    # -- results
    ("result: one of two is recorded", TOOLS_RUNNING, R(result(DENY)), "result", "tools:running",
     []),
    ("result: the last starts the next round", ONE_LEFT, R(result(CALC)), "next_round", "running",
     ["policy.verdict+exec.task+policy.deadline"]),
    ("result: a duplicate is stale", ONE_LEFT, R(result(DENY)), "stale", "unchanged", []),
    ("result: of an old round is stale", ONE_LEFT, R(result(CALC, round_=1)), "stale",
     "unchanged", []),
    ("result: for a call that does not exist is stale", TOOLS_RUNNING, R(result(TASK)), "stale",
     "unchanged", []),
    ("result: for a call still waiting for approval is stale", WAITING, R(result(TASK)), "stale",
     "unchanged", []),
    ("result: that started the round, again, re-publishes it", NEXT_ROUND, R(result(CALC)),
     "stale", "unchanged", ["policy.verdict+exec.task+policy.deadline"]),
    ("result: after the run ended is stale", TIMED_OUT, R(result(CALC)), "stale", "unchanged", []),
    # -- approvals
    ("approval: approve runs the call", WAITING, A(decision(TASK)), "approved", "tools:running",
     ["tool_calls:create_task:approved", "approvals_pending=-1", "approval_wait=5",
      "policy.verdict+tool.task"]),
    ("approval: deny never runs it", WAITING, A(decision(TASK, False)), "rejected",
     "tools:running", ["tool_calls:create_task:rejected", "approvals_pending=-1",
                       "approval_wait=5", "policy.verdict+tool.result"]),
    ("approval: one of two keeps the run waiting", WAITING2, A(decision(TASK2)), "approved",
     "tools:waiting", ["tool_calls:create_task:approved", "approvals_pending=-1",
                       "approval_wait=5", "tool.task"]),
    ("approval: over the daily limit", WAITING, A(decision(TASK), {TASK.id: False}), "over_limit",
     "tools:running", ["tool_calls:create_task:over_limit", "approvals_pending=-1",
                       "approval_wait=5", "policy.verdict+tool.result"]),
    ("approval: the one that decided, again, publishes it again", APPROVED, A(decision(TASK)),
     "stale", "unchanged", ["policy.verdict+tool.task+tool.task"]),
    ("approval: after its expiry (the timer not handled yet) is ignored",
     msgspec.structs.replace(WAITING, phase=machine.Tools(WAITING.calls, NOW)), A(decision(TASK)),
     "expired",
     "unchanged", ["count:approvals_ignored:expired"]),
    ("approval: for other arguments is ignored", WAITING, A(decision(TASK, digest="f" * 64)),
     "mismatch", "unchanged", ["count:approvals_ignored:digest_mismatch"]),
    ("approval: for a call that does not exist is ignored", WAITING,
     A(decision(call("create_task", cid="toolu_nope"))), "not_pending", "unchanged",
     ["count:approvals_ignored:not_pending"]),
    ("approval: for an auto call is ignored", WAITING, A(decision(CALC)), "not_pending",
     "unchanged", ["count:approvals_ignored:not_pending"]),
    ("approval: a second answer (a different one) is ignored", APPROVED,
     A(msgspec.structs.replace(decision(TASK, False), event_id="approval:again")),
     "not_pending", "unchanged", ["count:approvals_ignored:not_pending"]),
    ("approval: after the run ended is ignored", TIMED_OUT, A(decision(TASK)), "not_pending",
     "unchanged", ["count:approvals_ignored:not_pending"]),
    ("approval: before any turn is ignored", RUNNING, A(decision(TASK)), "not_pending",
     "unchanged", ["count:approvals_ignored:not_pending"]),
    # -- timers
    ("approval timer: still waiting ends the run, the waiting calls' results first", WAITING,
     machine.DeadlineDue(approval_timer(WAITING)), "failed", "done:failed",
     ["tool_calls:create_task:expired", "approvals_pending=-1", "tool.result",
      "count:verdicts:stop", "policy.verdict+policy.reply"]),
    ("approval timer: two waiting, two results", WAITING2,
     machine.DeadlineDue(approval_timer(WAITING2)), "failed", "done:failed",
     ["tool_calls:create_task:expired", "tool_calls:create_task:expired", "approvals_pending=-2",
      "tool.result+tool.result", "count:verdicts:stop", "policy.verdict+policy.reply"]),
    ("approval timer: the one that ended the run, again, re-publishes the results and its reply",
     TIMED_OUT, machine.DeadlineDue(approval_timer(WAITING)), "stale", "unchanged",
     ["tool.result", "policy.verdict+policy.reply"]),
    ("approval timer: answered already is stale", APPROVED,
     machine.DeadlineDue(approval_timer(APPROVED)), "stale", "unchanged", []),
    ("approval timer: of an earlier round is stale",
     msgspec.structs.replace(WAITING, round=1), machine.DeadlineDue(approval_timer(WAITING, 0)),
     "stale", "unchanged", []),
    ("approval timer: after a cancel is stale", after(WAITING, USER),
     machine.DeadlineDue(approval_timer(WAITING)), "stale", "unchanged", []),
    ("attempt timer: while tools run is stale", TOOLS_RUNNING,
     machine.DeadlineDue(core.deadline_event(TOOLS_RUNNING, NOW)), "stale", "unchanged", []),
    ("failure: of the round's call while tools run is stale", TOOLS_RUNNING, machine.Failed(
        m.ExecFailed(event_id="f1", **IDS, task_id="t", call_id="c", run_id=RUN, attempt=1,
                     model="small", error_class="overloaded", error="x", usage=m.Usage(),
                     prices=m.Prices())), "stale", "unchanged", []),
    # -- cancel, in every phase of the round
    ("cancel: while waiting for approval ends it", WAITING, USER, "cancelled", "done:cancelled",
     ["approvals_pending=-1", "count:cancels:user_waiting", "policy.verdict",
      f"then:Release:{RUN}"]),
    ("cancel: while tools run ends it", TOOLS_RUNNING, USER, "cancelled", "done:cancelled",
     ["abort:cancelled", "count:cancels:user_waiting", "policy.verdict", f"then:Release:{RUN}"]),
    ("cancel: a newer message interrupts a waiting run", WAITING,
     machine.Cancel("interrupt:run-m2", "interrupted by a newer message", "interrupt"),
     "cancelled", "done:cancelled", ["approvals_pending=-1", "count:cancels:interrupt_waiting",
                                     "policy.verdict", f"then:Release:{RUN}"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("run", "inp", "outcome", "after_", "effects"),
    [t[1:] for t in TABLE],
    ids=[t[0] for t in TABLE],
)
def test_step(
    run: core.RunState, inp: machine.Input, outcome: str, after_: str, effects: list[str]
) -> None:
    s = machine.step(run, STARTED, inp, RULES, NOW)
    assert (s.outcome, phase(s.run), kinds(s)) == (outcome, after_, effects)


def test_an_ask_call_makes_the_run_require_action_and_back() -> None:
    assert (WAITING.status, APPROVED.status) == ("requires_action", "running")
    verdicts = [
        e for p in (machine.emit(WAITING, RULES, NOW), machine.emit(APPROVED, RULES, NOW))
        for _, e in p.events if isinstance(e, m.RunVerdict)
    ]  # fmt: skip
    # Each status change of the attempt has an id of its own (a repeat is one copy).
    assert [v.event_id for v in verdicts] == [
        f"verdict:{RUN}:1:requires_action",
        f"verdict:{RUN}:1:running:tools",
    ]
    assert [v.status for v in verdicts] == ["requires_action", "running"]


def test_the_ids_derive_from_the_call_key() -> None:
    s = machine.step(RUNNING, STARTED, T(turn(TASK, CALC, DENY)), RULES, NOW)
    publish = s.effects[-1]
    assert isinstance(publish, machine.Publish)
    ids = [e.event_id for _, e in publish.events]  # type: ignore[attr-defined]
    assert ids == [
        f"verdict:{RUN}:1:requires_action",
        f"approval-requested:{RUN}:toolu_create_task",
        f"tooltask:{RUN}:toolu_calculator",
        f"toolresult:{RUN}:toolu_rm_rf",
        f"approval-deadline:{RUN}:0",
    ]
    request = publish.events[1][1]
    assert isinstance(request, m.ToolApprovalRequested)
    assert request.expires_at == NOW + timedelta(seconds=60) and request.call == TASK
    task = publish.events[2][1]
    assert isinstance(task, m.ToolTask) and (task.idempotent, task.server) == (True, "demo")
    refused = publish.events[3][1]
    assert isinstance(refused, m.ToolResult)
    assert (refused.outcome, refused.is_error, refused.executions) == ("denied", True, 0)


def test_the_next_round_is_a_new_attempt_with_the_granted_tools() -> None:
    assert (NEXT_ROUND.round, NEXT_ROUND.attempt, NEXT_ROUND.attempts_before) == (1, 2, 1)
    task = next(
        e for _, e in machine.emit(NEXT_ROUND, RULES, NOW).events if isinstance(e, m.ExecTask)
    )
    assert (task.task_id, task.round) == (f"task:{RUN}:2", 1)
    # Exactly the project's tools not set to deny: policy grants them, the agent never does.
    assert [t.name for t in task.tools] == ["calculator", "create_task", "flights"]
    first = next(
        e for _, e in machine.emit(RUNNING, RULES, NOW).events if isinstance(e, m.ExecTask)
    )
    assert (first.round, [t.name for t in first.tools]) == (0, [t.name for t in task.tools])


def test_retries_count_per_round() -> None:
    rules = msgspec.structs.replace(RULES, max_attempts=2)
    failed = m.ExecFailed(
        event_id="f2", **IDS, task_id="t", call_id="c", run_id=RUN, attempt=2, model="small",
        error_class="overloaded", error="x", usage=m.Usage(), prices=m.Prices(),
    )  # fmt: skip
    s = machine.step(NEXT_ROUND, STARTED, machine.Failed(failed), rules, NOW)
    assert s.outcome == "backoff"  # the first try of round 1, not the second of the run


def test_no_tools_no_grants() -> None:
    plain = msgspec.structs.replace(RULES, tools=core.ToolRules())
    task = next(e for _, e in machine.emit(RUNNING, plain, NOW).events if isinstance(e, m.ExecTask))
    assert task.tools == ()
    assert core.ToolRules(max_rounds=0, grants=TOOLS.grants).offered() == ()


def test_the_turns_calls_that_count_against_a_daily_limit() -> None:
    calls = [call("flights"), TASK, CALC, call("flights", "bad", cid="toolu_bad")]
    assert [c.id for c, _ in toolcalls.turn_quota(RULES, calls)] == ["toolu_flights"]


def test_only_a_turn_that_is_decided_counts_against_daily_limits() -> None:
    assert toolcalls.decides(RUNNING, 0, RULES)
    assert not toolcalls.decides(WAITING, 0, RULES)  # a redelivery
    assert not toolcalls.decides(RUNNING, 1, RULES)  # another round
    assert not toolcalls.decides(msgspec.structs.replace(RUNNING, round=2), 2, RULES)  # too many
    assert not toolcalls.decides(CANCELLING, 0, RULES)
    assert not toolcalls.decides(COMPLETED, 0, RULES)


def test_a_repeated_tool_use_id_in_one_turn_is_decided_once() -> None:
    s = machine.step(RUNNING, STARTED, T(turn(CALC, CALC)), RULES, NOW)
    assert s.run is not None and [c.call.id for c in s.run.calls] == ["toolu_calculator"]


def test_the_tool_inputs_round_trip() -> None:
    for inp in (T(turn(CALC), {"a": True}), R(result(CALC)), A(decision(TASK))):
        back = msgspec.json.decode(msgspec.json.encode(inp), type=machine.Input)
        assert back == inp
    # A run record with calls round-trips too (it lives in the KV bucket).
    assert msgspec.json.decode(msgspec.json.encode(WAITING), type=core.RunState) == WAITING
    assert core.decode_run(core.encode_run(WAITING)) == WAITING


def test_a_repeated_id_of_an_earlier_round_is_refused_and_counts_no_daily_call() -> None:
    flights = call("flights")
    assert toolcalls.turn_quota(RULES, [flights], earlier=(flights.id,)) == []
    [pc] = toolcalls.decide_turn([flights], (flights.id,), RULES, {}, NOW)
    assert (pc.decision, pc.done) == ("invalid", True)
    assert "already used by a call of an earlier round" in pc.reason
    s = machine.step(NEXT_ROUND, STARTED, T(repeat(CALC, TASK2, round_=1)), RULES, NOW)
    assert s.run is not None
    # Nothing is published for it: no task, no approval request, no result under its key.
    published = [e for p in s.effects if isinstance(p, machine.Publish) for _, e in p.events]
    assert not [e for e in published if getattr(e, "call", None) == CALC]
    assert not [e for e in published if isinstance(e, m.ToolResult)]
    assert [c.call.id for c in s.run.calls if not c.done] == [TASK2.id]


def test_an_expired_call_gets_a_stored_result_that_says_so() -> None:
    s = machine.step(WAITING2, STARTED, machine.DeadlineDue(approval_timer(WAITING2)), RULES, NOW)
    results = [
        e for p in s.effects if isinstance(p, machine.Publish)
        for _, e in p.events if isinstance(e, m.ToolResult)
    ]  # fmt: skip
    assert [(r.call_id, r.outcome, r.is_error, r.executions) for r in results] == [
        (TASK.id, "expired", True, 0),
        (TASK2.id, "expired", True, 0),
    ]
    assert [r.event_id for r in results] == [f"toolresult:{RUN}:{c.id}" for c in (TASK, TASK2)]
    assert all("did not answer within 60 s" in r.content for r in results)
    assert all(
        r.input_digest == c.input_digest for r, c in zip(results, (TASK, TASK2), strict=True)
    )
