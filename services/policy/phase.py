"""The phase of a run: one tagged union, stored in the run's record (``RunState.phase``).

A run is in exactly one phase; a transition constructs the next one instead of flipping flags.
What a phase alone has lives in it (a backoff's ``retry_at``, a round's calls); what numbers a
run across its phases stays on the record (``attempt``, ``round``, ``cause``). The run's
user-visible status is read from its phase by ``status_of`` (shared/runs.py vocabulary).
``core`` and ``machine`` both import this module; it imports neither.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

from shared import messages as m

ToolDecision = Literal["auto", "ask", "approved", "rejected", "denied", "invalid", "over_limit"]


class PendingCall(msgspec.Struct, kw_only=True, frozen=True):
    """One tool call of the run's current round, as policy decided it.

    ``decision``: ``auto`` / ``approved`` (a tool task is out), ``ask`` (waits for the user),
    ``rejected`` (the user said no), ``denied`` / ``invalid`` / ``over_limit`` (policy wrote its
    result). ``done``: its result is stored.
    """

    call: m.ToolCall
    server: str = ""
    decision: ToolDecision
    reason: str = ""  # the content of a result policy writes itself
    requested_at: datetime | None = None  # when an ``ask`` call started waiting
    answered_by: str = ""  # the user's answer that decided it (its redelivery publishes again)
    done: bool = False


class Running(msgspec.Struct, frozen=True, tag="running"):
    """Approved; the record's ``attempt`` is the current one, due by ``deadline``. Its call is
    in flight once the conversation's record marks the run started (before that it waits for
    its turn). ``deadline`` None: no task to publish (a run that never got one)."""

    deadline: datetime | None = None


class Backoff(msgspec.Struct, frozen=True, tag="backoff"):
    """The record's ``attempt`` waits for its backoff until ``retry_at``; no call is in flight."""

    retry_at: datetime


class Cancelling(msgspec.Struct, frozen=True, tag="cancelling"):
    """The call of the record's ``attempt`` was asked to stop; the executor's report (or the
    deadline) ends it."""


class Tools(msgspec.Struct, frozen=True, tag="tools"):
    """The model asked for tools in the record's ``round``: its ``calls`` run (results not yet
    stored) or wait for the user (``ask``; the run's status is ``requires_action``), the waiting
    ones until ``approval_due``. No model call is in flight; the last stored result starts the
    next round."""

    calls: tuple[PendingCall, ...]
    approval_due: datetime | None = None

    @property
    def open(self) -> tuple[str, ...]:
        """The ids of the calls whose result is not stored yet."""
        return tuple(c.call.id for c in self.calls if not c.done)

    @property
    def waiting(self) -> tuple[str, ...]:
        """The ids of the calls waiting for the user's answer."""
        return tuple(c.call.id for c in self.calls if c.decision == "ask")


class Done(msgspec.Struct, frozen=True, tag="done"):
    """Ended (``kind``: completed, refused, clarified, failed, cancelled). ``skipped``: it ended
    before its turn and is passed over when its turn comes. ``limited``: refused by a limit (or
    a rule), it interrupts no earlier run. ``calls``: the round's, when it ended during a tool
    round (an approval timeout, a cancel), as they stood. A refusal or a question still
    publishes its reply at its turn."""

    kind: m.RunStatus
    skipped: bool = False
    limited: bool = False
    calls: tuple[PendingCall, ...] = ()


Phase = Running | Backoff | Cancelling | Tools | Done


def status_of(phase: Phase) -> m.RunStatus:
    """The user-visible status of a run in ``phase``: the one place the two are related."""
    if isinstance(phase, Done):
        return phase.kind
    if isinstance(phase, Tools) and any(c.decision == "ask" for c in phase.calls):
        return "requires_action"
    return "running"
