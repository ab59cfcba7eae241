"""Pure logic of the tool edge: the approvals body, which calls wait, the tool push events.

What a run's tool calls look like to the gateway comes from the TOOLS stream (policy's
``ToolApprovalRequested``, the gateway's own ``ToolApprovalDecided``, every ``ToolResult``) and
from the stored results; this module decides from those, without I/O (docs/tools.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import msgspec

from services.gateway.core import ApiError, pending_call, shown_digest
from shared import messages as m

MAX_DECISIONS = 64
MAX_REASON_CHARS = 1000
# A tool_use id as the Messages API makes them (toolu_…); nothing else can name a call.
CALL_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")


class DecisionIn(msgspec.Struct, forbid_unknown_fields=True):
    tool_call_id: str
    approve: bool
    reason: str = ""
    # The digest of the arguments the client was shown (``tool.requested``, ``/state``): if
    # given, it must be the one policy asked about, else 409 digest_mismatch.
    input_digest: str | None = None


class ApprovalsIn(msgspec.Struct, forbid_unknown_fields=True):
    decisions: list[DecisionIn]


_approvals = msgspec.json.Decoder(ApprovalsIn)


def parse_approvals(body: bytes) -> list[DecisionIn]:
    """The decisions of a ``tool-approvals`` body; 400 malformed, 422 wrong values."""
    if not body.strip():
        raise ApiError(400, "invalid_body", "request body is empty; expected a JSON object")
    try:
        req = _approvals.decode(body)
    except msgspec.ValidationError as exc:
        raise ApiError(400, "invalid_body", f"invalid request body: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {exc}") from exc
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_json", "request body is not valid UTF-8") from None
    if not 1 <= len(req.decisions) <= MAX_DECISIONS:
        raise ApiError(
            422, "invalid_decisions", f"decisions must hold 1 to {MAX_DECISIONS} decisions"
        )
    seen: set[str] = set()
    for d in req.decisions:
        if CALL_ID_RE.fullmatch(d.tool_call_id) is None:
            raise ApiError(400, "invalid_id", "tool_call_id must match [A-Za-z0-9_-]{1,128}")
        if d.tool_call_id in seen:
            raise ApiError(
                422, "duplicate_decision", f"tool call {d.tool_call_id} is decided twice"
            )
        seen.add(d.tool_call_id)
        if len(d.reason) > MAX_REASON_CHARS:
            raise ApiError(422, "invalid_reason", f"reason exceeds {MAX_REASON_CHARS} characters")
        if "\x00" in d.reason:
            raise ApiError(422, "invalid_reason", "reason must not contain NUL characters")
        if d.input_digest is not None and DIGEST_RE.fullmatch(d.input_digest) is None:
            raise ApiError(
                422, "invalid_digest", "input_digest must be 64 lower-case hex digits (sha256)"
            )
    return req.decisions


class RunTools(msgspec.Struct):
    """One run's tool calls as the gateway can see them (first of each kind per call wins)."""

    requested: dict[str, m.ToolApprovalRequested] = msgspec.field(default_factory=dict)
    decided: dict[str, m.ToolApprovalDecided] = msgspec.field(default_factory=dict)
    resulted: set[str] = msgspec.field(default_factory=set)


def run_tools(
    run_id: str,
    requests: Iterable[m.ToolApprovalRequested],
    decisions: Iterable[m.ToolApprovalDecided],
    results: Iterable[str],
) -> RunTools:
    """``results``: the call ids of the run with a result (stored or in the stream)."""
    out = RunTools(resulted=set(results))
    for r in requests:
        if r.run_id == run_id:
            out.requested.setdefault(r.call.id, r)
    for d in decisions:
        if d.run_id == run_id:
            out.decided.setdefault(d.call_id, d)
    return out


def check(d: DecisionIn, tools: RunTools, now: datetime) -> bool:
    """Whether a decision is new (True) or repeats the recorded one (False); 409 otherwise.

    A repeat with the same answer is idempotent (the first decision's reason stays); a
    different answer never replaces the first.
    """
    req = tools.requested.get(d.tool_call_id)
    if req is None:
        raise ApiError(409, "not_waiting", f"the run is not waiting for tool call {d.tool_call_id}")
    digest = shown_digest(req)
    if d.input_digest is not None and d.input_digest != digest:
        raise ApiError(
            409,
            "digest_mismatch",
            f"tool call {d.tool_call_id} asks about other arguments than the ones given",
        )
    first = tools.decided.get(d.tool_call_id)
    if first is not None:
        if first.approve != d.approve:
            raise ApiError(
                409,
                "already_decided",
                f"tool call {d.tool_call_id} was already "
                f"{'approved' if first.approve else 'denied'}",
            )
        return False
    if d.tool_call_id in tools.resulted:
        raise ApiError(409, "not_waiting", f"tool call {d.tool_call_id} already has a result")
    if req.expires_at <= now:
        raise ApiError(
            409, "approval_expired", f"the approval of tool call {d.tool_call_id} has expired"
        )
    return True


def decided_event(
    req: m.ToolApprovalRequested, d: DecisionIn, user: str, now: datetime
) -> m.ToolApprovalDecided:
    """The user's decision as policy reads it: bound to the digest of the shown arguments."""
    key = m.call_key(req.run_id, req.call.id)
    return m.ToolApprovalDecided(
        event_id=approval_id(req.run_id, req.call.id),
        message_id=req.message_id,
        conversation_id=req.conversation_id,
        project_id=req.project_id,
        causation_id=f"approval-requested:{key}",
        run_id=req.run_id,
        user_id=user,
        call_id=req.call.id,
        approve=d.approve,
        input_digest=shown_digest(req),
        reason=d.reason,
        decided_at=now,
    )


def approval_id(run_id: str, call_id: str) -> str:
    return f"approval:{m.call_key(run_id, call_id)}"


def pending_calls(tools: RunTools) -> list[dict[str, Any]]:
    """The calls of a run waiting for the user's answer (requested, undecided, no result)."""
    return [
        pending_call(r)
        for cid, r in tools.requested.items()
        if cid not in tools.decided and cid not in tools.resulted
    ]
