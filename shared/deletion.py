"""Deleting a conversation: the one way to ask for it, and the tombstone every reader checks.

The request is the conversation's tombstone: one message, published create-only on
``conv.delete.<project>.<conversation>`` in the CONVERSATIONS stream, which no deletion
purges. The gateway (``DELETE /api/conversations/{id}``) and the retention sweep both call
``request_delete``; a publisher needs the ``conv.delete.*.*`` grant in shared/wiring.py.
"""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import nats.js.errors

from shared import messages, subjects
from shared.bus import Bus

EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
WRONG_LAST_SEQUENCE = 10071  # JetStream's error code for a failed expected-sequence check
_decoder = msgspec.json.Decoder(messages.ConversationDeleteRequested)


def delete_request(
    project: str,
    conversation: str,
    owner: str,
    requested_by: str,
    reason: messages.DeleteReason = "user",
    at: datetime | None = None,
) -> messages.ConversationDeleteRequested:
    """The deletion request of one conversation (its ids fixed by the contract)."""
    return messages.ConversationDeleteRequested(
        event_id=subjects.delete_event_id(conversation),
        message_id="",
        conversation_id=conversation,
        project_id=project,
        user_id=owner,
        requested_by=requested_by,
        reason=reason,
        requested_at=at or datetime.now(UTC),
    )


async def request_delete(
    bus: Bus, request: messages.ConversationDeleteRequested, timeout: float = 5.0
) -> bool:
    """Publish the request and wait for JetStream to have it; ``False``: it was already there
    (deleted before — still a success). Raises what the publish raised otherwise."""
    try:
        ack = await bus.publish(
            subjects.conversation_delete(request.project_id, request.conversation_id),
            request,
            msg_id=request.event_id,
            headers={EXPECTED_LAST_SUBJECT_SEQ: "0"},
            timeout=timeout,
        )
    except nats.js.errors.APIError as exc:
        if exc.err_code == WRONG_LAST_SEQUENCE:
            return False
        raise
    return not ack.duplicate


async def tombstone(
    bus: Bus, project: str, conversation: str
) -> messages.ConversationDeleteRequested | None:
    """The conversation's deletion request if there is one: one read of the stream by subject
    (``project`` may be ``*``: a conversation id names one conversation in any project). The
    request is create-only, so the first message on the subject is the only one."""
    subject = subjects.conversation_delete(project, conversation)
    try:
        raw = await bus.js.get_msg(subjects.STREAM_CONVERSATIONS, 0, subject, next=True)
    except nats.js.errors.NotFoundError:
        return None
    if raw.data is None:
        return None
    return _decoder.decode(raw.data)
