"""An executor's settle timer for a redelivered call (``subjects.policy_settle``): policy runs it
only as its run's record vouches for it (machine.redelivery_settle), reads only the call it
names, and bills whom the record names, not the timer."""

from __future__ import annotations

from datetime import timedelta

import msgspec
import pytest

from services.policy import machine
from shared import estimate, runs, subjects
from shared import messages as m
from tests.unit.test_dead_call_budgets import NOW, PRICES, RULES, RUN, running

TASK = runs.task_id(RUN, 1)
MAX_DELIVER = 20


def timer(**settle: object) -> m.RunDeadline:
    """The timer an executor running delivery 2 of attempt 1 publishes (it knows no user)."""
    fields: dict[str, object] = {
        "task_id": TASK,
        "user_id": "",
        "model": "small",
        "prices": PRICES,
        "calls": (f"{TASK}#2",),
        **settle,
    }
    attempt = int(str(fields.pop("attempt", 1)))
    return m.RunDeadline(
        event_id=runs.redelivery_settle_id(f"{TASK}#2"),
        message_id="forged",
        conversation_id="elsewhere",
        project_id="other-project",
        run_id=RUN,
        attempt=attempt,
        due=NOW + timedelta(seconds=310),
        settle=m.DeadCalls(**fields),  # type: ignore[arg-type]
    )


def test_a_redelivered_calls_timer_bills_the_runs_own_user_and_conversation() -> None:
    run = running()
    checked = machine.redelivery_settle(timer(user_id="someone-else"), run, MAX_DELIVER)
    assert isinstance(checked, m.RunDeadline) and checked.settle is not None
    assert checked.settle.user_id == run.user_id == "u"
    ids = (checked.message_id, checked.conversation_id, checked.project_id)
    assert ids == (run.message_id, run.conversation_id, run.project_id)
    # It reads the one call it names, not every delivery of the task.
    assert machine.dead_calls(checked, MAX_DELIVER) == [f"{TASK}#2"]
    # The usage row it would publish: the run's user, the timer's model and prices.
    row = estimate.settled_usage(checked, m.EstimatedCall(call_id=f"{TASK}#2", usage=m.Usage()))
    assert (row.user_id, row.project_id, row.model, row.estimated) == ("u", "acme", "small", True)
    assert row.event_id == estimate.estimate_id(f"{TASK}#2")


@pytest.mark.parametrize(
    ("settle", "why"),
    [
        ({"task_id": runs.task_id("another-run", 1)}, "is not attempt"),
        ({"task_id": runs.task_id(RUN, 2)}, "is not attempt"),
        (
            {
                "attempt": 2,
                "task_id": runs.task_id(RUN, 2),
                "calls": (f"{runs.task_id(RUN, 2)}#2",),
            },
            "never started",
        ),
        ({"attempt": 0}, "never started"),
        ({"calls": ()}, "are not deliveries"),
        ({"calls": (f"{runs.task_id('another-run', 1)}#2",)}, "are not deliveries"),
        ({"calls": (f"{TASK}#0",)}, "are not deliveries"),
        (
            {"calls": (f"{TASK}#{estimate.MAX_DELIVERY_BASE + MAX_DELIVER + 1}",)},
            "are not deliveries",
        ),
        ({"calls": (f"{TASK}#{'9' * 5000}",)}, "are not deliveries"),
        ({"calls": (f"{TASK}#\u0663",)}, "are not deliveries"),  # a digit int() refuses
        ({"calls": (f"{TASK}#x",)}, "are not deliveries"),
        ({"calls": (TASK,)}, "are not deliveries"),
        ({"calls": (f"{TASK}#2", "classify:m1#1")}, "are not deliveries"),
    ],
)
def test_a_timer_its_run_does_not_vouch_for_is_refused(settle: dict[str, object], why: str) -> None:
    checked = machine.redelivery_settle(timer(**settle), running(), MAX_DELIVER)
    assert isinstance(checked, str) and why in checked


def test_a_timer_with_no_settle_is_refused() -> None:
    bare = msgspec.structs.replace(timer(), settle=None)
    assert machine.redelivery_settle(bare, running(), MAX_DELIVER) == (
        "a settle timer that names no calls"
    )


def test_policys_own_settle_timer_still_reads_every_delivery() -> None:
    own = machine.settle_timer(running(), RULES, NOW)
    [(_, t)] = own.events
    assert isinstance(t, m.RunDeadline)
    assert machine.dead_calls(t, MAX_DELIVER) == estimate.task_calls(TASK, MAX_DELIVER)


@pytest.mark.parametrize(
    ("subject", "settle"),
    [
        (subjects.policy_settle("acme", "c1"), True),
        (subjects.policy_deadline("acme", "c1"), False),
        ("policy.deadline.acme.c1.other", False),
        ("policy.verdict.acme.c1.settle", False),
        ("policy.deadline.acme.settle", False),
    ],
)
def test_the_settle_subject_is_told_apart(subject: str, settle: bool) -> None:
    assert subjects.is_policy_settle(subject) is settle


def test_a_timer_of_a_task_replayed_from_a_dead_letter_is_accepted() -> None:
    """The copy's deliveries count on from the letter's (estimate.delivery): its calls' numbers
    pass the consumer's bound, and are still deliveries of the task."""
    replayed = f"{TASK}#{MAX_DELIVER + 12}"
    checked = machine.redelivery_settle(timer(calls=(replayed,)), running(), MAX_DELIVER)
    assert isinstance(checked, m.RunDeadline)
    assert machine.dead_calls(checked, MAX_DELIVER) == [replayed]
