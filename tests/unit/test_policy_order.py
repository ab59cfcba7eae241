"""Per-conversation turn-taking (I6): one run at a time, strictly in message-position order."""

from __future__ import annotations

from services.policy.core import ConvState, RunState, admit, caused_by, mark_started, release
from services.policy.phase import Done, Running
from shared import messages as m

C = "c"


def test_the_first_message_takes_the_free_slot() -> None:
    conv, action = admit(ConvState(conversation_id=C), "r1", 1)
    assert action == "start"
    assert conv == ConvState(conversation_id=C, active="r1", next_position=2)


def test_a_later_message_waits_while_the_slot_is_held() -> None:
    held = mark_started(ConvState(conversation_id=C, active="r1", next_position=2))
    conv, action = admit(held, "r2", 2)
    assert action == "queued"
    assert conv is not None and conv.pending == {2: "r2"} and conv.active == "r1"


def test_a_decision_that_overtakes_an_earlier_message_waits_for_it() -> None:
    # Message 2's decision arrives first: the slot is free, but message 1 goes first.
    conv, action = admit(ConvState(conversation_id=C), "r2", 2)
    assert action == "queued" and conv is not None
    conv, action = admit(conv, "r1", 1)
    assert action == "start" and conv is not None
    assert (conv.active, conv.pending, conv.next_position) == ("r1", {2: "r2"}, 2)
    nxt = release(mark_started(conv), "r1")
    assert nxt == ConvState(conversation_id=C, active="r2", next_position=3)


def test_releasing_with_the_next_decision_not_here_yet_leaves_the_slot_free() -> None:
    conv = ConvState(
        conversation_id=C, active="r1", started=True, next_position=2, pending={3: "r3"}
    )
    nxt = release(conv, "r1")
    assert nxt == ConvState(conversation_id=C, next_position=2, pending={3: "r3"})
    started, action = admit(nxt, "r2", 2)
    assert action == "start" and started is not None and started.active == "r2"


def test_admitting_the_same_run_again_changes_nothing() -> None:
    started = ConvState(
        conversation_id=C, active="r1", started=True, next_position=2, pending={3: "r3"}
    )
    assert admit(started, "r1", 1) == (None, "wait")
    assert admit(started, "r3", 3) == (None, "queued")
    # A run whose turn is over (finished, slot moved on) is not started again.
    assert admit(ConvState(conversation_id=C, next_position=5), "r2", 2) == (None, "wait")


def test_a_run_that_holds_the_slot_but_never_started_is_started_again() -> None:
    # A crash between taking the slot and emitting the task: the redelivery finishes the job.
    assert admit(ConvState(conversation_id=C, active="r1", next_position=2), "r1", 1) == (
        None,
        "start",
    )


def test_releasing_a_run_that_does_not_hold_the_slot_does_nothing() -> None:
    assert release(ConvState(conversation_id=C, active="r2", started=True), "r1") is None
    assert release(ConvState(conversation_id=C), "r1") is None


def test_a_message_without_a_position_goes_to_the_back() -> None:
    conv = ConvState(
        conversation_id=C, active="r1", started=True, next_position=2, pending={3: "r3"}
    )
    changed, action = admit(conv, "legacy", 0)
    assert action == "queued" and changed is not None and changed.pending[4] == "legacy"


def _failure(attempt: int) -> m.ExecFailed:
    return m.ExecFailed(
        event_id="f",
        message_id="m",
        conversation_id=C,
        project_id="p",
        task_id="t",
        call_id="t#1",
        run_id="r",
        attempt=attempt,
        model="x",
        error_class="overloaded",
        error="",
        usage=m.Usage(),
        prices=m.Prices(),
    )


def _run(status: m.RunStatus, attempt: int) -> RunState:
    return RunState(
        run_id="r",
        message_id="m",
        conversation_id=C,
        project_id="p",
        user_id="u",
        phase=Running() if status == "running" else Done(status),
        verdict="approve",
        reason="",
        attempt=attempt,
    )


def test_only_the_failure_that_moved_a_run_may_re_emit_its_state() -> None:
    # A redelivery of the failure that started attempt 3 may re-emit attempt 3's task...
    assert caused_by(_run("running", 3), _failure(2))
    # ...but an older one must not, or a run could get a second call after the dedup window.
    assert not caused_by(_run("running", 3), _failure(1))
    assert caused_by(_run("failed", 3), _failure(3))
    assert not caused_by(_run("completed", 2), _failure(1))
