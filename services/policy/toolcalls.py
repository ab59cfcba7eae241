"""Pure rules of a run's tool calls (docs/tools.md): how policy decides each call the model
asks for, and the events a decided call publishes. ``machine.py`` calls these from its tool
phase; nothing here reads a clock, the environment or the network.

Every id derives from the call key ``<run id>:<tool_use id>`` (``messages.call_key``), so a
redelivery or a second replica publishes the same ids and JetStream keeps one copy.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

import msgspec

from services.policy import budget
from services.policy.core import PendingCall, Rules, RunState, ToolDecision, ToolGrant
from services.policy.phase import Backoff, Running
from shared import messages as m
from shared import runs, subjects

# What the model reads in the tool_result of a call policy never let run.
UNKNOWN_TOOL = "tool {name!r} is not available in this conversation"
NOT_AN_OBJECT = "the tool's input must be a JSON object; this call was not run"
BAD_DIGEST = "the call's input does not match its digest; this call was not run"
DENIED = "tool {name!r} is not allowed in this project; this call was not run"
OVER_LIMIT = (
    "the daily limit of {limit} calls of {name!r} per user is reached; this call was not run"
)
REJECTED = "the user did not approve this call; it was not run"
REPEATED_ID = (
    "tool_use id {id!r} was already used by a call of an earlier round of this answer; "
    "this call was not run"
)
REPEATED_TEXT = (
    "I stopped: the model asked again for tool calls it had already made in this answer "
    "(the same call ids), so none of them was run again."
)
EXPIRED = "the user did not answer within {timeout:g} s; this call was not run"
APPROVAL_TIMEOUT_TEXT = (
    "The tool call I wanted to make was not approved in time, so I stopped here. Send your "
    "message again if you still want it."
)
MAX_ROUNDS_TEXT = (
    "I stopped: this answer needed more tool calls than this project allows ({rounds} rounds)."
)

# The label of ``tool_calls_total`` per decision (one per call, when it is decided).
OUTCOME_LABEL: dict[ToolDecision, str] = {
    "auto": "auto",
    "approved": "approved",
    "rejected": "rejected",
    "denied": "denied",
    "invalid": "invalid",
    "over_limit": "over_limit",
}
POLICY_RESULT: dict[ToolDecision, m.ToolOutcome] = {
    "rejected": "denied",
    "denied": "denied",
    "invalid": "invalid",
    "over_limit": "over_limit",
}


def approval_deadline_id(run_id: str, round_: int) -> str:
    """The timer of a round's approvals (on policy.deadline, like the attempts' timers)."""
    return f"approval-deadline:{run_id}:{round_}"


def key(run: RunState, call_id: str) -> str:
    return m.call_key(run.run_id, call_id)


def quota_wanted(grant: ToolGrant | None, call: m.ToolCall) -> bool:
    """Whether authorizing ``call`` takes one of the user's daily calls of its tool."""
    return grant is not None and grant.per_user_daily is not None and _valid(call) is None


def decides(run: RunState, round_: int, rules: Rules) -> bool:
    """Whether a stored turn of ``round_`` is decided now (not a repeat, not stale, not past the
    rounds, not cancelled): only then are its calls counted against daily limits."""
    return (
        isinstance(run.phase, Running | Backoff)
        and round_ == run.round
        and round_ < rules.tools.max_rounds
    )


def turn_quota(
    rules: Rules, calls: Iterable[m.ToolCall], earlier: Iterable[str] = ()
) -> list[tuple[m.ToolCall, ToolGrant]]:
    """The calls of a stored turn that policy authorizes at once and that count against a daily
    limit (the interpreter counts them before stepping; ``ask`` calls count when approved). A
    call repeating an id of an ``earlier`` round is refused, so it counts nothing."""
    out = []
    seen = set(earlier)
    for call in unique(calls):
        if call.id in seen:
            continue
        grant = rules.tools.grant(call.name)
        if grant is not None and grant.approval == "auto" and quota_wanted(grant, call):
            out.append((call, grant))
    return out


def unique(calls: Iterable[m.ToolCall]) -> list[m.ToolCall]:
    """The calls with distinct ids, first kept (a broken model may repeat an id in a turn)."""
    seen: set[str] = set()
    out = []
    for c in calls:
        if c.id not in seen:
            seen.add(c.id)
            out.append(c)
    return out


def _valid(call: m.ToolCall) -> str | None:
    """Why the call's input cannot be run (None: it can): it must be an object, and its digest
    must be the one policy authorizes (an approval binds to it)."""
    if not isinstance(call.input, dict):
        return NOT_AN_OBJECT
    if m.input_digest(call.input) != call.input_digest:
        return BAD_DIGEST
    return None


def decide_turn(
    calls: Iterable[m.ToolCall],
    earlier: Iterable[str],
    rules: Rules,
    quota: dict[str, bool],
    now: datetime,
) -> tuple[PendingCall, ...]:
    """Policy's decision on each call of a stored turn (``calls``: distinct ids). A call whose
    tool_use id an ``earlier`` round of the run used is refused and never runs: that id is the
    key of the earlier call's task, record, result and approval, so a task for it would be taken
    for the earlier one (deduplicated, or answered with its result). Its stored turn has no
    result for it: the model reads it as an error (``history.NO_RESULT``)."""
    seen = set(earlier)
    return tuple(
        repeated(c) if c.id in seen else decide(c, rules, quota.get(c.id), now) for c in calls
    )


def repeated(call: m.ToolCall) -> PendingCall:
    """A call that repeats an earlier round's id: invalid, done (nothing is published for it)."""
    reason = REPEATED_ID.format(id=call.id[:128])
    return PendingCall(call=call, decision="invalid", reason=reason, done=True)


def all_repeated(decided: Iterable[PendingCall]) -> bool:
    """Whether every call of a turn repeats an earlier round's id: nothing would run, and the
    round would wait for results that never come, so the run ends (``REPEATED_TEXT``)."""
    decided = list(decided)
    return bool(decided) and all(c.done for c in decided)


def decide(call: m.ToolCall, rules: Rules, within_quota: bool | None, now: datetime) -> PendingCall:
    """Policy's decision on one call the model asked for. ``within_quota``: the counted answer
    for a call that takes a daily call (None: not counted)."""
    grant = rules.tools.grant(call.name)
    if grant is None:
        return PendingCall(
            call=call, decision="invalid", reason=UNKNOWN_TOOL.format(name=call.name)
        )
    if (why := _valid(call)) is not None:
        return PendingCall(call=call, server=grant.server, decision="invalid", reason=why)
    if grant.approval == "deny":
        reason = DENIED.format(name=call.name)
        return PendingCall(call=call, server=grant.server, decision="denied", reason=reason)
    if grant.approval == "ask":
        return PendingCall(call=call, server=grant.server, decision="ask", requested_at=now)
    if within_quota is False:
        return _over(PendingCall(call=call, server=grant.server, decision="auto"), grant)
    return PendingCall(call=call, server=grant.server, decision="auto")


def answer(
    pc: PendingCall, e: m.ToolApprovalDecided, rules: Rules, within_quota: bool | None
) -> PendingCall:
    """A waiting call after the user's answer (its digest already checked)."""
    pc = msgspec.structs.replace(pc, answered_by=e.event_id)
    if not e.approve:
        reason = REJECTED + (f" (the user said: {e.reason[:500]})" if e.reason else "")
        return msgspec.structs.replace(pc, decision="rejected", reason=reason)
    grant = rules.tools.grant(pc.call.name)
    if grant is None:  # the policy file dropped the tool while the call waited
        return msgspec.structs.replace(
            pc, decision="invalid", reason=UNKNOWN_TOOL.format(name=pc.call.name)
        )
    if within_quota is False:
        return _over(pc, grant)
    return msgspec.structs.replace(pc, decision="approved")


def _over(pc: PendingCall, grant: ToolGrant) -> PendingCall:
    reason = OVER_LIMIT.format(limit=grant.per_user_daily, name=grant.name)
    return msgspec.structs.replace(pc, decision="over_limit", reason=reason)


def waiting(run: RunState) -> list[PendingCall]:
    return [c for c in run.calls if c.decision == "ask"]


def events(
    run: RunState, calls: Iterable[PendingCall], rules: Rules, now: datetime
) -> list[tuple[str, msgspec.Struct]]:
    """What decided calls publish: a tool task (auto, approved), an approval request (ask), or
    the result policy writes itself (rejected, denied, invalid, over limit). A call whose
    result is stored publishes nothing more."""
    p, c = run.project_id, run.conversation_id
    out: list[tuple[str, msgspec.Struct]] = []
    for pc in calls:
        if pc.done:
            continue
        if pc.decision in ("auto", "approved"):
            out.append((subjects.tool_task(p, c), tool_task(run, pc, rules, now)))
        elif pc.decision == "ask":
            out.append((subjects.tool_requested(p, c), approval_request(run, pc)))
        else:
            out.append((subjects.tool_result(p, c), policy_result(run, pc)))
    return out


def tool_task(run: RunState, pc: PendingCall, rules: Rules, now: datetime) -> m.ToolTask:
    grant = rules.tools.grant(pc.call.name)
    timeout_s = grant.timeout_s if grant is not None else 30.0
    return m.ToolTask(
        event_id=f"tooltask:{key(run, pc.call.id)}",
        message_id=run.message_id,
        conversation_id=run.conversation_id,
        project_id=run.project_id,
        causation_id=run.cause,
        run_id=run.run_id,
        user_id=run.user_id,
        round=run.round,
        call=pc.call,
        server=pc.server,
        idempotent=grant.idempotent if grant is not None else False,
        timeout_s=timeout_s,
        # Not started after this: a task that waited that long in the stream is answered
        # ``timeout`` (nothing ran) rather than run long after the user moved on.
        deadline=now + timedelta(seconds=rules.run_deadline_s),
    )


def approval_request(run: RunState, pc: PendingCall) -> m.ToolApprovalRequested:
    assert run.approval_due is not None
    return m.ToolApprovalRequested(
        event_id=f"approval-requested:{key(run, pc.call.id)}",
        message_id=run.message_id,
        conversation_id=run.conversation_id,
        project_id=run.project_id,
        causation_id=run.cause,
        run_id=run.run_id,
        user_id=run.user_id,
        round=run.round,
        call=pc.call,
        server=pc.server,
        expires_at=run.approval_due,
    )


def expired_results(run: RunState, rules: Rules) -> list[tuple[str, msgspec.Struct]]:
    """The results of the calls still waiting when the round's approval timeout ended the run:
    outcome ``expired``, stored like every result (the model's history, ``tool.result``, and the
    end of the call's ``pending_tool_calls``). From the ended run's record, so a redelivered
    timer publishes the same ids again."""
    p, c = run.project_id, run.conversation_id
    reason = EXPIRED.format(timeout=rules.tools.approval_timeout_s)
    return [
        (subjects.tool_result(p, c), policy_result(run, pc, outcome="expired", reason=reason))
        for pc in waiting(run)
        if not pc.done
    ]


def policy_result(
    run: RunState, pc: PendingCall, outcome: m.ToolOutcome | None = None, reason: str = ""
) -> m.ToolResult:
    return m.ToolResult(
        event_id=f"toolresult:{key(run, pc.call.id)}",
        message_id=run.message_id,
        conversation_id=run.conversation_id,
        project_id=run.project_id,
        causation_id=run.cause,
        run_id=run.run_id,
        round=run.round,
        call_id=pc.call.id,
        name=pc.call.name,
        outcome=outcome or POLICY_RESULT[pc.decision],
        is_error=True,
        content=reason or pc.reason,
        input_digest=pc.call.input_digest,
        executions=0,
    )


def approval_timer(run: RunState) -> m.RunDeadline:
    assert run.approval_due is not None
    return m.RunDeadline(
        event_id=approval_deadline_id(run.run_id, run.round),
        message_id=run.message_id,
        conversation_id=run.conversation_id,
        project_id=run.project_id,
        causation_id=run.cause,
        run_id=run.run_id,
        attempt=run.attempt,
        due=run.approval_due,
    )


def verdict(run: RunState, base: m.RunVerdict) -> m.RunVerdict:
    """The run's verdict while its calls run or wait. Back to ``running`` after the approvals of
    a round, it needs an id of its own: the attempt's ``running`` id was used when it started."""
    if run.status != "running":
        return base
    return msgspec.structs.replace(
        base, event_id=f"{runs.verdict_id(run.run_id, run.attempt, 'running')}:tools"
    )


def mark_done(run: RunState, call_id: str) -> tuple[PendingCall, ...]:
    return tuple(
        msgspec.structs.replace(c, done=True) if c.call.id == call_id else c for c in run.calls
    )


def replace_call(run: RunState, new: PendingCall) -> tuple[PendingCall, ...]:
    return tuple(new if c.call.id == new.call.id else c for c in run.calls)


def usage_so_far(run: RunState, e: m.ToolTurnPersisted) -> tuple[m.Usage, float]:
    """The run's usage with a stored turn's (the persister's total of every call so far): what a
    run that ends with no reply (cancelled) settles with."""
    if budget.total_tokens(e.usage) <= budget.total_tokens(run.usage):
        return run.usage, run.cost_usd
    return e.usage, max(run.cost_usd, e.usage.cost_usd(run.prices))
