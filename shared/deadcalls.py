"""The I/O behind shared/estimate.py: a model call's record written, and read back with its
pushes from CHAT_STREAM.

The executor and the agent write a record of each call at ``message_start`` (``write_record``).
Three places settle calls that died with their process and all read the same way: the
executor, when a task is redelivered (its earlier deliveries' calls); policy, when an
attempt's deadline passed (every call its task's deliveries made); and the agent, when a
message is delivered again (its earlier classification calls). Reads are by subject and
sequence (``STREAM.MSG.GET``), never through a consumer; the estimate itself stays pure.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Literal

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from shared import estimate, subjects
from shared import messages as m
from shared.bus import Bus
from shared.deletion import EXPECTED_LAST_SUBJECT_SEQ, WRONG_LAST_SEQUENCE

_record_decoder = msgspec.json.Decoder(estimate.ModelCallRecord)
_delta_decoder = msgspec.json.Decoder(m.TokenDelta)


async def write_record(
    bus: Bus,
    call_id: str,
    task_id: str,
    state: Literal["started", "finished"],
    usage: m.Usage = m.Usage(),  # noqa: B008 - frozen
) -> bool:
    """A call's record (in CHAT_STREAM, or AGENT_CALLS for a classification): ``started`` create-only (a second is refused by the
    broker), ``finished`` once its outcome is published (then nothing is estimated for it).
    Best effort: False if it was not written; a call is never held up by its record (without
    one, a call that dies is not estimated: docs/guarantees.md, I4)."""
    record = estimate.ModelCallRecord(
        call_id=call_id, task_id=task_id, state=state, at=datetime.now(UTC), usage=usage
    )
    headers = {EXPECTED_LAST_SUBJECT_SEQ: "0"} if state == "started" else None
    try:
        await bus.publish(
            estimate.record_subject(call_id),
            record,
            msg_id=f"call{state}:{call_id}",
            headers=headers,
        )
    except nats.js.errors.APIError as exc:
        if exc.err_code != WRONG_LAST_SEQUENCE:
            bus.log.warning("call_record_failed", call_id=call_id, error=repr(exc))
        return False
    except (nats.errors.Error, TimeoutError, OSError) as exc:
        bus.log.warning("call_record_failed", call_id=call_id, error=repr(exc))
        return False
    return True


async def unsettled(
    js: JetStreamContext,
    project_id: str,
    conversation_id: str,
    call_ids: Iterable[str],
    pushes: bool = True,
) -> list[m.EstimatedCall]:
    """Those of ``call_ids`` that started and never wrote ``finished`` (their process died),
    each with its usage estimated; in the order given. Reading again gives the same numbers.
    ``pushes=False``: calls that push no tokens (the agent's), so none are read."""
    ids = list(call_ids)
    found = await asyncio.gather(*(last_record(js, c) for c in ids))
    out: list[m.EstimatedCall] = []
    for call_id, hit in zip(ids, found, strict=True):
        if hit is None or hit[0].state != "started":
            continue  # never started (or never delivered as that call), or finished
        record, seq = hit
        pushed = await pushes_of(js, project_id, conversation_id, call_id, seq) if pushes else []
        usage = estimate.estimate(record, pushed)
        if usage is not None:
            out.append(m.EstimatedCall(call_id=call_id, usage=usage))
    return out


async def last_record(
    js: JetStreamContext, call_id: str
) -> tuple[estimate.ModelCallRecord, int] | None:
    """The call's last record and its stream sequence; None: it wrote none (or it aged out)."""
    try:
        raw = await js.get_last_msg(
            estimate.record_stream(call_id), estimate.record_subject(call_id)
        )
    except nats.js.errors.NotFoundError:
        return None
    if raw.data is None or raw.seq is None:
        return None
    try:
        return _record_decoder.decode(raw.data), raw.seq
    except msgspec.MsgspecError:
        return None


async def pushes_of(
    js: JetStreamContext, project_id: str, conversation_id: str, call_id: str, after: int
) -> list[m.TokenDelta]:
    """The token pushes of one call: the conversation's deltas stored after its started record,
    read back by sequence, those whose message id names the call."""
    subject = subjects.token_stream(project_id, conversation_id)
    prefix = estimate.delta_prefix(call_id)
    out: list[m.TokenDelta] = []
    cursor = after + 1
    while True:
        try:
            raw = await js.get_msg(subjects.STREAM_TOKENS, seq=cursor, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            return out
        if raw.seq is None:
            return out
        cursor = raw.seq + 1
        msg_id = (raw.headers or {}).get("Nats-Msg-Id", "")
        if raw.data is not None and msg_id.startswith(prefix):
            with contextlib.suppress(msgspec.MsgspecError):
                out.append(_delta_decoder.decode(raw.data))
