"""The run's state machine, as tables: every (phase, input) pair, with stale, repeated and
out-of-order inputs — what changes and what is done, without a broker."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from services.policy import core, machine
from shared import messages as m

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
RULES = core.Rules(default_model="small", models={"small": m.Prices(input=1.0, output=5.0)})
IDS = {"message_id": "m1", "conversation_id": "c1", "project_id": "acme"}
RUN = core.run_id_for("m1")
HOLD = core.Reservation(keys=("k",), tokens=100)


def decided(position: int = 1, **advice: object) -> core.RunState:
    d = m.Decision(
        intent="question", complexity="low", action="answer", executor="chat", estimated_tokens=300
    )
    d = msgspec.structs.replace(d, **advice)
    e = m.AgentDecision(event_id="d1", **IDS, user_id="u", decision=d, position=position)
    return core.decide(e, RULES, NOW)


def failure(
    run: core.RunState,
    error_class: str = "overloaded",
    attempt: int | None = None,
    event_id: str = "f1",
) -> m.ExecFailed:
    return m.ExecFailed(
        event_id=event_id, **IDS, task_id="t", call_id="c", run_id=run.run_id,
        attempt=run.attempt if attempt is None else attempt, model=run.model,
        error_class=error_class, error="boom", usage=m.Usage(output_tokens=7), prices=m.Prices(),
    )  # fmt: skip


def timer(run: core.RunState, attempt: int | None = None) -> m.RunDeadline:
    a = run.attempt if attempt is None else attempt
    d = core.deadline_event(msgspec.structs.replace(run, attempt=a), NOW - timedelta(seconds=1))
    return d


def stored(run: core.RunState, status: m.RunStatus = "completed") -> m.AssistantMessagePersisted:
    return m.AssistantMessagePersisted(
        event_id="p1", **IDS, run_id=run.run_id, reply_to="m1", kind="answer", content="hi",
        created_at=NOW, status=status,
        usage=m.Usage(input_tokens=10, output_tokens=20), cost_usd=0.01,
    )  # fmt: skip


# ------------------------------------------------------------ the runs, in each phase

RUNNING = decided()
BACKOFF = machine.step(
    RUNNING, core.ConvState(conversation_id="c1", active=RUN, started=True, next_position=2),
    machine.Failed(failure(RUNNING)), RULES, NOW,
).run  # fmt: skip
assert BACKOFF is not None
CANCELLING = msgspec.structs.replace(RUNNING, phase=machine.Cancelling(), cause="cancel:1")
FAILED = core.after_failure(RUNNING, "bad_request", "f1", RULES, NOW)
COMPLETED = msgspec.structs.replace(RUNNING, phase=machine.Done("completed"))
REFUSED = decided(action="refuse")
CANCELLED = core.cancelled(RUNNING, "cancel:1", "cancelled by the user")
SKIPPED = msgspec.structs.replace(CANCELLED, phase=machine.Done("cancelled", skipped=True))

# The conversation as each run sees it: waiting in line, holding the slot, or started.
FREE = core.ConvState(conversation_id="c1")
QUEUED = core.ConvState(conversation_id="c1", active="run-m0", started=True, next_position=1,
                        pending={1: RUN})  # fmt: skip
TURN = core.ConvState(conversation_id="c1", active=RUN, started=False, next_position=2)
STARTED = core.ConvState(conversation_id="c1", active=RUN, started=True, next_position=2)

# A deadline moved it on: the retry it scheduled waits for its backoff, then it started.
TIMED_OUT = machine.step(RUNNING, STARTED, machine.DeadlineDue(timer(RUNNING)), RULES, NOW).run
assert TIMED_OUT is not None and isinstance(TIMED_OUT.phase, machine.Backoff)
RETRIED = core.retry_due(TIMED_OUT, 1, RULES, TIMED_OUT.phase.retry_at)
assert RETRIED is not None


def kinds(step: machine.Step) -> list[str]:
    """The effects in order, each in a word or two."""
    out = []
    for e in step.effects:
        match e:
            case machine.Publish(events=events):
                out.append("+".join(subject.split(".")[1] for subject, _ in events))
            case machine.Abort(event=event):
                out.append(f"abort:{event.reason}")
            case machine.Settle():
                out.append("settle")
            case machine.Defer():
                out.append("defer")
            case machine.Count(metric=metric, label=label):
                out.append(f"count:{metric}:{label}" if label else f"count:{metric}")
            case machine.Continue(run_id=run_id, input=inp):
                out.append(f"then:{type(inp).__name__}:{run_id}")
    return out


def phase(run: core.RunState | None) -> str:
    if run is None:
        return "unchanged"
    p = machine.phase_of(run)
    return f"done:{p.kind}" if isinstance(p, machine.Done) else type(p).__name__.lower()


def test_each_record_reads_as_one_phase() -> None:
    assert [phase(r) for r in (RUNNING, BACKOFF, CANCELLING, FAILED, COMPLETED, REFUSED)] == [
        "running",
        "backoff",
        "cancelling",
        "done:failed",
        "done:completed",
        "done:refused",
    ]
    assert machine.phase_of(SKIPPED) == machine.Done("cancelled", skipped=True)
    assert (BACKOFF.attempt, BACKOFF.phase) == (2, machine.Backoff(NOW + timedelta(seconds=1)))


USER = machine.Cancel("cancel:u", "cancelled by the user", "user")

# (name, run, conversation, input, outcome, phase after, conversation changed, effects)
TABLE = [
    # -- admit: the decision places the run
    ("admit: free slot starts", RUNNING, FREE, machine.Admit(1), "start", "unchanged", True,
     [f"then:Start:{RUN}"]),
    ("admit: behind an earlier run waits", decided(2), core.ConvState(
        conversation_id="c1", active="run-m0", started=True, next_position=2), machine.Admit(2),
     "queued", "unchanged", True, ["count:double_texts:enqueue", "verdict"]),
    ("admit: a duplicate decision while queued", RUNNING, QUEUED, machine.Admit(1), "queued",
     "unchanged", False, ["count:double_texts:enqueue", "verdict"]),
    ("admit: a duplicate decision after its start", RUNNING, STARTED, machine.Admit(1), "wait",
     "unchanged", False, []),
    ("admit: a decision whose predecessor has not arrived waits", decided(2), FREE,
     machine.Admit(2), "queued", "unchanged", True, ["count:double_texts:enqueue", "verdict"]),
    ("admit: a position already passed", RUNNING, core.ConvState(
        conversation_id="c1", next_position=3), machine.Admit(1), "wait", "unchanged", False, []),
    ("admit: cancelled before its decision is skipped in line", SKIPPED, QUEUED,
     machine.Admit(1), "queued", "unchanged", False, ["verdict"]),
    ("admit: cancelled before its decision, its turn", SKIPPED, FREE, machine.Admit(1),
     "start", "unchanged", True, [f"then:Start:{RUN}"]),
    # -- start: its turn
    ("start: approved publishes verdict, task and timer", RUNNING, TURN, machine.Start(),
     "start", "unchanged", False, ["verdict+task+deadline", f"then:MarkStarted:{RUN}"]),
    ("start: a refusal publishes its reply", REFUSED, TURN, machine.Start(), "start",
     "unchanged", False, ["verdict+reply", f"then:MarkStarted:{RUN}"]),
    ("start: skipped passes the slot on", SKIPPED, TURN, machine.Start(), "start", "unchanged",
     False, ["verdict", f"then:Release:{RUN}"]),
    ("start: cancelled while waiting passes the slot on", CANCELLED, TURN, machine.Start(),
     "start", "unchanged", False, ["verdict", f"then:Release:{RUN}"]),
    # -- cancel
    ("cancel: in flight asks the executor", RUNNING, STARTED, USER, "cancelling", "cancelling",
     False, ["count:cancels:user_in_flight", "verdict", "abort:cancelled", "deadline"]),
    ("cancel: its turn, not started yet, ends it", RUNNING, TURN, USER, "cancelled",
     "done:cancelled", False, ["abort:cancelled", "count:cancels:user_waiting", "verdict",
                               f"then:Release:{RUN}"]),
    ("cancel: queued ends it, skipped at its turn", RUNNING, QUEUED, USER, "cancelled",
     "done:cancelled", False, ["count:cancels:user_queued", "verdict"]),
    ("cancel: during a backoff ends it", BACKOFF, STARTED, USER, "cancelled", "done:cancelled",
     False, ["abort:cancelled", "count:cancels:user_waiting", "verdict", f"then:Release:{RUN}"]),
    ("cancel: repeated while cancelling re-sends the abort", CANCELLING, STARTED, USER,
     "unchanged", "unchanged", False, ["verdict", "abort:cancelled", "deadline"]),
    ("cancel: after completion changes nothing", COMPLETED, STARTED, USER, "unchanged",
     "unchanged", False, []),
    ("cancel: after a failure changes nothing", FAILED, STARTED, USER, "unchanged", "unchanged",
     False, []),
    ("cancel: repeated after cancelled finishes the release", CANCELLED, STARTED, USER,
     "unchanged", "unchanged", False, ["verdict", f"then:Release:{RUN}"]),
    # -- failure reports
    ("failed: retryable moves to a backoff", RUNNING, STARTED, machine.Failed(failure(RUNNING)),
     "backoff", "backoff", False, ["count:retries:overloaded", "verdict", "defer"]),
    ("failed: not retryable fails the run", RUNNING, STARTED,
     machine.Failed(failure(RUNNING, "bad_request")), "failed", "done:failed", False,
     ["count:verdicts:stop", "verdict+reply"]),
    ("failed: of an old attempt is stale", BACKOFF, STARTED,
     machine.Failed(failure(RUNNING, event_id="f0")), "stale", "unchanged", False, []),
    ("failed: its cause redelivered early waits on", BACKOFF, STARTED,
     machine.Failed(failure(RUNNING)), "early", "unchanged", False, ["defer"]),
    ("failed: while cancelling ends it cancelled", CANCELLING, STARTED,
     machine.Failed(failure(RUNNING, "cancelled")), "cancelled", "done:cancelled", False,
     ["count:verdicts:stop", "verdict", "verdict", f"then:Release:{RUN}"]),
    ("failed: after completion is stale", COMPLETED, STARTED, machine.Failed(failure(RUNNING)),
     "stale", "unchanged", False, []),
    ("failed: the report that failed the run, again", FAILED, STARTED,
     machine.Failed(failure(RUNNING, "bad_request")), "stale", "unchanged", False,
     ["verdict+reply"]),
    # -- deadlines
    ("deadline: no outcome in time retries", RUNNING, STARTED, machine.DeadlineDue(timer(RUNNING)),
     "backoff", "backoff", False, ["count:deadlines", "abort:deadline", "deadline",
                                   "count:retries:timeout", "verdict", "defer"]),
    ("deadline: of an earlier attempt is stale", BACKOFF, STARTED,
     machine.DeadlineDue(timer(BACKOFF, 1)), "stale", "unchanged", False, []),
    ("deadline: ends a cancel no executor confirmed", CANCELLING, STARTED,
     machine.DeadlineDue(timer(CANCELLING)), "cancelled", "done:cancelled", False,
     ["count:deadlines", "abort:deadline", "deadline", "count:verdicts:stop", "verdict",
      "verdict", f"then:Release:{RUN}"]),
    ("deadline: after completion is stale", COMPLETED, STARTED,
     machine.DeadlineDue(timer(COMPLETED)), "stale", "unchanged", False, []),
    ("deadline: again, its retry not due, sends its settle timer again", TIMED_OUT, STARTED,
     machine.DeadlineDue(timer(RUNNING)), "early", "unchanged", False, ["deadline", "defer"]),
    ("deadline: again, its retry started, sends that task and its settle timer again", RETRIED,
     STARTED, machine.DeadlineDue(timer(RUNNING)), "stale", "unchanged", False,
     ["verdict+task+deadline", "deadline"]),
    # -- stored replies
    ("reply stored: completes and releases", RUNNING, STARTED, machine.ReplyStored(stored(RUNNING)),
     "completed", "done:completed", False, [f"then:Release:{RUN}"]),
    ("reply stored: again changes nothing, releases again", COMPLETED, STARTED,
     machine.ReplyStored(stored(COMPLETED)), "unchanged", "unchanged", False,
     [f"then:Release:{RUN}"]),
    ("reply stored: of a failure notice", FAILED, STARTED,
     machine.ReplyStored(stored(FAILED, "failed")), "unchanged", "unchanged", False,
     [f"then:Release:{RUN}"]),
    # -- pairs of each phase and input not covered above (the record carries its phase)
    ("admit: a duplicate decision while cancelling", CANCELLING, STARTED, machine.Admit(1),
     "wait", "unchanged", False, []),
    ("admit: a duplicate decision during a backoff", BACKOFF, STARTED, machine.Admit(1), "wait",
     "unchanged", False, []),
    ("admit: a refusal behind an earlier run waits for its turn", REFUSED, QUEUED,
     machine.Admit(1), "queued", "unchanged", False, ["count:double_texts:enqueue", "verdict"]),
    ("start: cancelling (a crash before it was marked started) marks it started", CANCELLING,
     TURN, machine.Start(), "start", "unchanged", False, ["verdict", f"then:MarkStarted:{RUN}"]),
    ("start: during a backoff publishes its verdict only", BACKOFF, TURN, machine.Start(),
     "start", "unchanged", False, ["verdict", f"then:MarkStarted:{RUN}"]),
    ("cancel: a skipped run changes nothing", SKIPPED, QUEUED, USER, "unchanged", "unchanged",
     False, ["verdict"]),
    ("cancel: a refusal changes nothing", REFUSED, STARTED, USER, "unchanged", "unchanged",
     False, []),
    ("failed: while cancelling, any class ends it cancelled", CANCELLING, STARTED,
     machine.Failed(failure(RUNNING)), "cancelled", "done:cancelled", False,
     ["count:verdicts:stop", "verdict", "verdict", f"then:Release:{RUN}"]),
    ("failed: of the attempt a backoff waits for is stale", BACKOFF, STARTED,
     machine.Failed(failure(BACKOFF, event_id="f2")), "stale", "unchanged", False, []),
    ("failed: after a cancel is stale", CANCELLED, STARTED, machine.Failed(failure(RUNNING)),
     "stale", "unchanged", False, []),
    ("deadline: of the attempt a backoff waits for is stale", BACKOFF, STARTED,
     machine.DeadlineDue(timer(BACKOFF)), "stale", "unchanged", False, []),
    ("deadline: after a cancel is stale", CANCELLED, STARTED,
     machine.DeadlineDue(timer(CANCELLED)), "stale", "unchanged", False, []),
    ("reply stored: while cancelling completes it", CANCELLING, STARTED,
     machine.ReplyStored(stored(CANCELLING)), "completed", "done:completed", False,
     [f"then:Release:{RUN}"]),
    ("reply stored: of a refusal changes nothing, releases", REFUSED, STARTED,
     machine.ReplyStored(stored(REFUSED, "refused")), "unchanged", "unchanged", False,
     [f"then:Release:{RUN}"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("run", "conv", "inp", "outcome", "after", "conv_changed", "effects"),
    [t[1:] for t in TABLE],
    ids=[t[0] for t in TABLE],
)
def test_step(
    run: core.RunState,
    conv: core.ConvState,
    inp: machine.Input,
    outcome: str,
    after: str,
    conv_changed: bool,
    effects: list[str],
) -> None:
    s = machine.step(run, conv, inp, RULES, NOW + timedelta(milliseconds=1))
    assert (s.outcome, phase(s.run), s.conversation is not None, kinds(s)) == (
        outcome, after, conv_changed, effects,
    )  # fmt: skip


def test_a_backoff_starts_its_attempt_once_due_and_only_by_its_cause() -> None:
    assert isinstance(BACKOFF.phase, machine.Backoff)
    retry_at = BACKOFF.phase.retry_at
    due = machine.step(BACKOFF, STARTED, machine.Failed(failure(RUNNING)), RULES, retry_at)
    assert (due.outcome, phase(due.run), kinds(due)) == (
        "retry",
        "running",
        ["verdict+task+deadline"],
    )
    # Started already: its cause again is stale; it repeats the same ids (JetStream keeps one
    # copy), so no second call; an older report publishes nothing at all.
    assert due.run is not None
    again = machine.step(due.run, STARTED, machine.Failed(failure(RUNNING)), RULES, NOW)
    assert (again.outcome, kinds(again)) == ("stale", ["verdict+task+deadline"])
    assert machine.emit(due.run, RULES, NOW).events[1][1] == again.effects[0].events[1][1]  # type: ignore[union-attr]
    older = machine.step(
        due.run, STARTED, machine.Failed(failure(RUNNING, event_id="f0")), RULES, NOW
    )
    assert (older.outcome, kinds(older)) == ("stale", [])


def test_a_cancelled_run_with_a_hold_settles_before_it_is_written() -> None:
    held = msgspec.structs.replace(RUNNING, reservation=HOLD)
    s = machine.step(held, QUEUED, USER, RULES, NOW)
    assert kinds(s)[0] == "settle" and s.run is not None and s.run.reservation is not None
    assert s.run.reservation.settled
    # The redelivery finds it settled: nothing settles twice.
    again = machine.step(s.run, QUEUED, USER, RULES, NOW)
    assert "settle" not in kinds(again)


def test_a_stored_reply_settles_the_whole_runs_usage_once() -> None:
    held = msgspec.structs.replace(RUNNING, reservation=HOLD)
    s = machine.step(held, STARTED, machine.ReplyStored(stored(held)), RULES, NOW)
    settle = s.effects[0]
    assert isinstance(settle, machine.Settle) and (settle.tokens, settle.cost_usd) == (30, 0.01)
    assert s.run is not None
    again = machine.step(s.run, STARTED, machine.ReplyStored(stored(held)), RULES, NOW)
    assert "settle" not in kinds(again)


@pytest.mark.parametrize(
    ("strategy", "effects", "handled"),
    [
        ("enqueue", ["count:double_texts:enqueue", "verdict"], False),
        ("reject", ["settle", "count:double_texts:reject", "count:verdicts:stop", "verdict+reply"],
         True),
        ("interrupt", ["count:double_texts:interrupt", "then:Cancel:run-m0", "verdict"], False),
    ],
)  # fmt: skip
def test_a_double_text_by_strategy(strategy: str, effects: list[str], handled: bool) -> None:
    rules = msgspec.structs.replace(RULES, double_texting=strategy)
    busy = core.ConvState(conversation_id="c1", active="run-m0", started=True, next_position=2)
    run = msgspec.structs.replace(decided(2), reservation=HOLD)
    s = machine.step(run, busy, machine.Admit(2), rules, NOW)
    assert kinds(s) == effects
    assert (s.run is not None) == handled
    if handled:
        assert s.run is not None and (s.run.status, core.skipped(s.run)) == ("refused", True)


def test_interrupt_cancels_a_run_whose_newer_message_already_waits() -> None:
    rules = msgspec.structs.replace(RULES, double_texting="interrupt")
    newer_waits = core.ConvState(conversation_id="c1", next_position=1, pending={2: "run-m2"})
    s = machine.step(RUNNING, newer_waits, machine.Admit(1), rules, NOW)
    assert kinds(s) == [f"then:Cancel:{RUN}"]
    cancel = s.effects[0]
    assert isinstance(cancel, machine.Continue) and isinstance(cancel.input, machine.Cancel)
    assert cancel.input.cause == f"superseded:{RUN}"


def test_a_run_refused_by_a_limit_interrupts_nothing() -> None:
    rules = msgspec.structs.replace(RULES, double_texting="interrupt")
    busy = core.ConvState(conversation_id="c1", active="run-m0", started=True, next_position=2)
    limited = core.stop(decided(2), "over budget", "no")
    s = machine.step(limited, busy, machine.Admit(2), rules, NOW)
    assert kinds(s) == ["count:double_texts:interrupt_limited", "verdict"]


@pytest.mark.parametrize(
    ("conv", "outcome", "effects"),
    [
        (STARTED, "released", []),
        (core.ConvState(conversation_id="c1", active=RUN, started=True, next_position=2,
                        pending={2: "run-m2"}), "released", ["then:Start:run-m2"]),
        # Released already (a redelivery) and the next never marked started: start it again.
        (core.ConvState(conversation_id="c1", active="run-m2", next_position=3), "",
         ["then:Start:run-m2"]),
        (core.ConvState(conversation_id="c1", active="run-m2", started=True, next_position=3),
         "unchanged", []),
    ],
)  # fmt: skip
def test_release(conv: core.ConvState, outcome: str, effects: list[str]) -> None:
    s = machine.step(None, conv, machine.Release(RUN), RULES, NOW)
    assert (s.outcome, kinds(s)) == (outcome, effects)


def test_mark_started_only_for_the_run_holding_the_slot() -> None:
    s = machine.step(None, TURN, machine.MarkStarted(RUN), RULES, NOW)
    assert s.conversation is not None and s.conversation.started
    assert machine.step(None, STARTED, machine.MarkStarted(RUN), RULES, NOW).conversation is None
    moved = core.ConvState(conversation_id="c1", active="run-m2", next_position=3)
    assert machine.step(None, moved, machine.MarkStarted(RUN), RULES, NOW).conversation is None


def test_published_ids_are_derived_from_the_run_so_a_redelivery_repeats_them() -> None:
    first = machine.emit(RUNNING, RULES, NOW)
    again = machine.emit(RUNNING, RULES, NOW + timedelta(seconds=5))
    ids = [e.event_id for _, e in first.events]  # type: ignore[attr-defined]
    assert ids == [e.event_id for _, e in again.events]  # type: ignore[attr-defined]
    assert ids == [f"verdict:{RUN}:1:running", f"task:{RUN}:1", f"deadline:{RUN}:1"]


def test_effects_and_inputs_are_tagged_unions_that_round_trip() -> None:
    effects = machine.step(RUNNING, STARTED, USER, RULES, NOW).effects
    counted = [e for e in effects if isinstance(e, machine.Count)]
    back = msgspec.json.decode(msgspec.json.encode(counted), type=list[machine.Effect])
    assert back == counted
    inp = msgspec.json.decode(msgspec.json.encode(USER), type=machine.Input)
    assert inp == USER


# ------------------------------------------------------------ dead calls (settled at a deadline)


def _settle_timer(step: machine.Step) -> m.RunDeadline:
    [timer] = [
        e
        for p in step.effects
        if isinstance(p, machine.Publish)
        for _, e in p.events
        if isinstance(e, m.RunDeadline) and e.settle is not None
    ]
    return timer


def test_a_missed_deadline_publishes_a_settle_timer_for_that_attempt_after_the_grace() -> None:
    done = machine.step(RUNNING, STARTED, machine.DeadlineDue(timer(RUNNING)), RULES, NOW)
    t = _settle_timer(done)
    assert t.event_id == f"settle:{RUN}:1" and t.attempt == 1
    assert t.due == NOW + timedelta(seconds=RULES.settle_grace_s)
    assert t.settle == m.DeadCalls(
        task_id=f"task:{RUN}:1", user_id=RUNNING.user_id, model="small", prices=RUNNING.prices
    )
    # The run moved on to its retry (attempt 2); the timer still names the dead attempt.
    assert done.run is not None and done.run.attempt == 2


def test_a_redelivered_deadline_that_ended_the_run_publishes_its_settle_timer_again() -> None:
    rules = msgspec.structs.replace(RULES, max_attempts=1)
    first = machine.step(RUNNING, STARTED, machine.DeadlineDue(timer(RUNNING)), rules, NOW)
    assert first.run is not None and first.run.status == "failed"
    again = machine.step(first.run, STARTED, machine.DeadlineDue(timer(RUNNING)), rules, NOW)
    assert again.outcome == "stale"
    assert _settle_timer(again).event_id == _settle_timer(first).event_id


def test_a_settle_timer_is_published_before_the_record_moves_on() -> None:
    done = machine.step(RUNNING, STARTED, machine.DeadlineDue(timer(RUNNING)), RULES, NOW)
    # Only the timer: the verdict (and a task, a reply) wait for the record's write.
    [early] = [e for e in done.effects if isinstance(e, machine.Publish) and e.early]
    assert early.events == (("policy.deadline.acme.c1", _settle_timer(done)),)


@pytest.mark.parametrize("after", ["backoff", "retry started", "retry started on a fallback"])
def test_a_redelivered_deadline_sends_the_same_settle_timer_for_the_dead_attempt(
    after: str,
) -> None:
    """Whichever branch the redelivery takes, the timer names the attempt the deadline ended
    and the model its calls ran on (an attempt on a fallback model is priced as such)."""
    rules = msgspec.structs.replace(
        RULES, fallback_model="big", models={**RULES.models, "big": m.Prices(input=9.0)}
    )
    run = RUNNING
    if after.endswith("fallback"):  # attempt 1 overloaded: attempt 2 runs on the fallback
        run = machine.step(run, STARTED, machine.Failed(failure(run)), rules, NOW).run
        assert run is not None and isinstance(run.phase, machine.Backoff)
        run = core.retry_due(run, 1, rules, run.phase.retry_at)
        assert run is not None and (run.model, run.attempt) == ("big", 2)
    d = timer(run)
    first = machine.step(run, STARTED, machine.DeadlineDue(d), rules, NOW)
    moved = first.run
    assert moved is not None and isinstance(moved.phase, machine.Backoff)
    if after.startswith("retry started"):
        moved = core.retry_due(moved, d.attempt, rules, moved.phase.retry_at)
        assert moved is not None and moved.attempt == d.attempt + 1
    later = NOW + timedelta(seconds=30)
    again = machine.step(moved, STARTED, machine.DeadlineDue(d), rules, later)
    t0, t1 = _settle_timer(first), _settle_timer(again)
    assert (t1.event_id, t1.attempt, t1.settle) == (t0.event_id, t0.attempt, t0.settle)
    assert t0.settle is not None and t0.settle.model == run.model
    assert t0.settle.task_id == f"task:{RUN}:{d.attempt}"


def test_a_deadline_of_a_finished_attempt_settles_nothing() -> None:
    done = machine.step(COMPLETED, STARTED, machine.DeadlineDue(timer(COMPLETED)), RULES, NOW)
    assert done.effects == ()


def test_a_settle_timer_reads_every_delivery_and_bills_each_dead_call_once_by_its_call_id() -> None:
    done = machine.step(RUNNING, STARTED, machine.DeadlineDue(timer(RUNNING)), RULES, NOW)
    t = _settle_timer(done)
    assert machine.dead_calls(t, 3) == [f"task:{RUN}:1#1", f"task:{RUN}:1#2", f"task:{RUN}:1#3"]
    usage = m.Usage(input_tokens=100, output_tokens=7)
    found = [m.EstimatedCall(call_id=f"task:{RUN}:1#2", usage=usage)]
    settled = machine.settle_dead(t, found)
    assert settled.outcome == "settled:1" and settled.run is None
    [publish, count] = settled.effects
    assert count == machine.Count("dead_calls")
    assert isinstance(publish, machine.Publish)
    [(subject, u)] = publish.events
    assert subject == "policy.usage.acme.c1"
    assert isinstance(u, m.ModelUsage)
    assert (u.event_id, u.call_id, u.task_id, u.attempt) == (
        f"estimate:task:{RUN}:1#2", f"task:{RUN}:1#2", f"task:{RUN}:1", 1,
    )  # fmt: skip
    assert (u.estimated, u.outcome, u.purpose, u.usage) == (
        True,
        "died_with_executor",
        "answer",
        usage,
    )
    assert machine.settle_dead(t, []) == machine.Step(outcome="settled:0")
