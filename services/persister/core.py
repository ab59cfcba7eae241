"""Pure persister decisions: ids of what it writes and how run statuses move forward."""

from __future__ import annotations

import uuid

from shared import runs
from shared.messages import ExecResult, call_key

# Assistant message ids derive from the run, so a replayed result maps to the same row.
ASSISTANT_NS = uuid.UUID("0b7f3c56-5d8e-4c7e-9a59-6a1f2c9e7d10")

STATUS_RANK = runs.STATUS_RANK
REPLY_STATUS = runs.REPLY_STATUS


def assistant_message_id(run_id: str) -> uuid.UUID:
    return uuid.uuid5(ASSISTANT_NS, run_id)


def rank(status: str) -> int:
    """How far along a status is; a run's stored status only ever moves forward."""
    return runs.rank(status)


def persisted_event_id(run_id: str) -> str:
    return runs.persisted_id(run_id)


def is_tool_turn(r: ExecResult) -> bool:
    """A model call that ended asking for tools: stored as a tool turn, not as the run's answer."""
    return r.stop_reason == "tool_use" and bool(r.tool_calls)


def tool_turn_event_id(run_id: str, round_: int) -> str:
    return f"persisted:toolturn:{run_id}:{round_}"


def tool_result_event_id(run_id: str, call_id: str) -> str:
    return f"persisted:toolresult:{call_key(run_id, call_id)}"
