"""Policy's part in a conversation's life: the verdict on its model, and its deletion.

A creation that asks for a model gets a recorded verdict (allowed by the project's price table
or not) and, when allowed, the model goes into the conversation's record, where every later
decision finds it. A deletion marks the record deleted (later decisions make no run) and
cancels its runs, queued ones first, so releasing the slot never starts one of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from services.policy import core, machine
from shared import messages as m
from shared import subjects
from shared.errors import BadData, RetryLater

if TYPE_CHECKING:
    from services.policy.handlers import Handlers

CAS_TRIES = 5


async def conversation_settings(h: Handlers, e: m.ConversationChanged) -> str:
    """`conv.settings.>`: the verdict on a new conversation's model, recorded and published."""
    if e.op != "create" or e.model is None:
        return "no_model"
    allowed, reason = core.model_verdict(e.model, h.rules_for(e.project_id))
    for tries in range(1, CAS_TRIES + 1):
        conv, revision = await h.conversations.get(e.conversation_id)
        if conv.deleted:
            return "deleted"
        wanted = e.model if allowed else None
        if conv.model == wanted:
            break
        try:
            await h.conversations.put(msgspec.structs.replace(conv, model=wanted), revision)
            break
        except RetryLater:
            if tries == CAS_TRIES:
                raise
    verdict = m.ConversationModelVerdict(
        event_id=f"convverdict:{e.conversation_id}",
        message_id="",
        conversation_id=e.conversation_id,
        project_id=e.project_id,
        causation_id=e.event_id,
        user_id=e.user_id,
        requested_model=e.model,
        allowed=allowed,
        model=e.model if allowed else "",
        reason=reason,
    )
    await h.bus.publish(
        subjects.conversation_verdict(e.project_id, e.conversation_id),
        verdict,
        msg_id=verdict.event_id,
    )
    h.verdicts.labels("model_allowed" if allowed else "model_refused").inc()
    return "model_allowed" if allowed else "model_refused"


async def conversation_deleted(h: Handlers, d: m.ConversationDeleteRequested) -> str:
    """`conv.delete.>`: mark the conversation deleted, then cancel its runs."""
    from services.policy.handlers import _Carry  # the interpreter's own record carrier

    for tries in range(1, CAS_TRIES + 1):
        conv, revision = await h.conversations.get(d.conversation_id)
        if conv.deleted:
            break
        try:
            await h.conversations.put(
                msgspec.structs.replace(conv, deleted=True, model=None), revision
            )
            break
        except RetryLater:
            if tries == CAS_TRIES:
                raise
    # Queued runs first (newest first), then the one holding the slot: when its release
    # hands the slot on, every run it could hand it to is cancelled already.
    queued = [conv.pending[p] for p in sorted(conv.pending, reverse=True)]
    runs = [r for r in (*queued, conv.active) if r is not None]
    cancelled = 0
    for run_id in dict.fromkeys(runs):
        try:
            run, run_revision = await h.runs.get(run_id)
        except BadData:
            continue  # no record (cancelled before its decision, or never decided)
        cancel = machine.Cancel(d.event_id, "the conversation was deleted", "deleted")
        outcome = await h._drive(
            machine.Continue(run.conversation_id, run.run_id, cancel),
            _Carry.of(run, run_revision),
        )
        cancelled += outcome in ("cancelled", "cancelling")
    return f"deleted:{cancelled}"
