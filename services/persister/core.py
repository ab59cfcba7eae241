"""Pure persister decisions: ids of what it writes and how run statuses move forward."""

from __future__ import annotations

import uuid

from shared import runs

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
