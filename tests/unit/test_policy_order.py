"""Per-conversation turn-taking (I6): one run holds the slot, the rest wait in order."""

from __future__ import annotations

from services.policy.core import ConvState, admit, mark_started, release


def test_the_first_run_takes_the_free_slot() -> None:
    conv, action = admit(ConvState(conversation_id="c"), "r1")
    assert action == "start"
    assert conv == ConvState(conversation_id="c", active="r1", started=False, queue=[])


def test_later_runs_queue_in_arrival_order() -> None:
    conv = mark_started(ConvState(conversation_id="c", active="r1"))
    conv2, a2 = admit(conv, "r2")
    assert conv2 is not None
    conv3, a3 = admit(conv2, "r3")
    assert (a2, a3) == ("queued", "queued")
    assert conv3 is not None and conv3.queue == ["r2", "r3"]


def test_admitting_the_same_run_again_changes_nothing() -> None:
    started = ConvState(conversation_id="c", active="r1", started=True, queue=["r2"])
    assert admit(started, "r1") == (None, "wait")
    assert admit(started, "r2") == (None, "queued")


def test_a_run_that_holds_the_slot_but_never_started_is_started_again() -> None:
    # A crash between taking the slot and emitting the task: the redelivery finishes the job.
    assert admit(ConvState(conversation_id="c", active="r1"), "r1") == (None, "start")


def test_releasing_hands_the_slot_to_the_next_in_line() -> None:
    conv = ConvState(conversation_id="c", active="r1", started=True, queue=["r2", "r3"])
    nxt = release(conv, "r1")
    assert nxt == ConvState(conversation_id="c", active="r2", started=False, queue=["r3"])
    assert release(nxt, "r2") == ConvState(conversation_id="c", active="r3", queue=[])


def test_releasing_a_run_that_does_not_hold_the_slot_does_nothing() -> None:
    conv = ConvState(conversation_id="c", active="r2", started=True)
    assert release(conv, "r1") is None
    assert release(ConvState(conversation_id="c"), "r1") is None
