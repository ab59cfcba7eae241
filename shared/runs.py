"""The run vocabulary: statuses, the terminal set, and the ids every service derives from a
message (one run per user message; one task, timer and abort per attempt).

This is the one module that spells them; services import these names instead. An id is
derived, never generated, so a redelivery or a second replica derives the same one and
JetStream (``Nats-Msg-Id``) or the store keeps one copy (docs/decisions.md, Ids).
"""

from __future__ import annotations

import re
import typing

from shared.messages import ReplyKind, RunStatus

STATUSES: tuple[RunStatus, ...] = typing.get_args(RunStatus)
# A run in one of these has ended; nothing moves it again (a stored reply may only confirm it).
TERMINAL: frozenset[RunStatus] = frozenset(
    {"completed", "refused", "clarified", "failed", "cancelled"}
)
# How far along a status is (a run's stored status only moves forward): 0 for an unknown one.
# ``requires_action`` ranks with ``running``: a run moves between the two while its tool calls
# wait for the user, and an equal rank below the terminal ones may move either way.
STATUS_RANK: dict[str, int] = {"queued": 1, "running": 2, "requires_action": 2} | {
    s: 3 for s in TERMINAL
}
# The status a run ends with when its reply of this kind is stored.
REPLY_STATUS: dict[ReplyKind, RunStatus] = {
    "answer": "completed",
    "refusal": "refused",
    "clarify": "clarified",
    "failure": "failed",
}

RUN_PREFIX = "run-"
_RUN_ID = re.compile(r"^run-([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$")


def rank(status: str) -> int:
    return STATUS_RANK.get(status, 0)


def run_id(message_id: str) -> str:
    """One run per user message, so a second trigger for the message finds the first run."""
    return f"{RUN_PREFIX}{message_id}"


def message_of(run_id: str) -> str | None:
    """The message id of a well-formed run id (``run-<lowercase uuid>``), else None."""
    match = _RUN_ID.fullmatch(run_id)
    return match.group(1) if match is not None else None


def is_run_id(key: str) -> bool:
    """Whether ``key`` names a run (by its prefix; use ``message_of`` to validate one)."""
    return key.startswith(RUN_PREFIX)


def decision_id(message_id: str) -> str:
    """The agent's decision on a message (the cause of every task of its run)."""
    return f"decision:{message_id}"


def task_id(run_id: str, attempt: int) -> str:
    return f"task:{run_id}:{attempt}"


def deadline_id(run_id: str, attempt: int) -> str:
    return f"deadline:{run_id}:{attempt}"


def settle_id(run_id: str, attempt: int) -> str:
    """The timer that bills an attempt's dead calls once its deadline passed (shared/estimate.py)."""
    return f"settle:{run_id}:{attempt}"


def redelivery_settle_id(call_id: str) -> str:
    """The timer a redelivered task's executor publishes for its own call (``<task id>#<n>``)."""
    return f"settle:{call_id}"


def classification_settle_id(call_id: str, late: bool = False) -> str:
    """The timer a redelivered message's agent publishes with its call (``classify:<m>#<n>``),
    or (``late``) the one a call sends for itself when its record comes late."""
    return f"classifysettle:{call_id}{':late' if late else ''}"


def abort_id(run_id: str, attempt: int) -> str:
    return f"abort:{run_id}:{attempt}"


def verdict_id(run_id: str, attempt: int, status: str) -> str:
    """One verdict event per (attempt, status) of a run: a repeat of the same change is one."""
    return f"verdict:{run_id}:{attempt}:{status}"


def reply_id(run_id: str) -> str:
    return f"reply:{run_id}"


def persisted_id(run_id: str) -> str:
    """The persister's event that a run's assistant message is stored."""
    return f"persisted:assistant:{run_id}"
