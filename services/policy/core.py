"""Pure policy: verdicts on agent advice, retries of failed attempts, the run state they move."""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Any, Literal

import msgspec

from services.policy.phase import (
    Backoff,
    Cancelling,
    Done,
    Phase,
    Running,
    Tools,
    status_of,
)

# Re-exported: toolcalls and the tests read the tool-call types from here.
from services.policy.phase import PendingCall as PendingCall
from services.policy.phase import ToolDecision as ToolDecision
from shared import messages as m
from shared import runs

CLARIFY_TEXT = (
    "Could you tell me a little more about what you need? I want to be sure I answer the "
    "right question."
)
REFUSAL_TEXT = "I can't help with that request."
DISALLOWED_TEXT = (
    "I can't help with that request: this project does not allow this kind of request."
)
REJECT_TEXT = (
    "I'm still working on your previous message in this conversation. Please wait for that "
    "answer (or cancel it) and send this one again."
)
FAILURE_TEXT = (
    "Sorry — I could not produce an answer this time ({error_class}). Your message is saved; "
    "please try again in a moment."
)
RETRYABLE: frozenset[str] = frozenset(
    {"rate_limited", "overloaded", "timeout", "cut_stream", "server_error"}
)
TERMINAL = runs.TERMINAL
# Failures for which another model may do better than waiting for the same one.
FALLBACK_CLASSES: frozenset[str] = frozenset({"overloaded", "rate_limited"})


class ToolGrant(msgspec.Struct, frozen=True, kw_only=True):
    """One tool a project's runs may use, with its rules (from the policy file's ``tools``)."""

    name: str
    server: str
    approval: m.ToolApproval = "ask"
    idempotent: bool = False
    per_user_daily: int | None = None
    timeout_s: float = 30.0
    # What the model is shown; empty: the executor fills in the server's own (tools/list).
    description: str = ""
    input_schema: dict[str, Any] | None = None

    def spec(self) -> m.ToolSpec:
        if self.input_schema is None:
            return m.ToolSpec(name=self.name, description=self.description, server=self.server)
        return m.ToolSpec(
            name=self.name,
            description=self.description,
            input_schema=self.input_schema,
            server=self.server,
        )


class ToolRules(msgspec.Struct, frozen=True, kw_only=True):
    """A project's tools as policy applies them (none: runs are text only)."""

    max_rounds: int = 5
    approval_timeout_s: float = 600.0
    grants: tuple[ToolGrant, ...] = ()

    def grant(self, name: str) -> ToolGrant | None:
        return next((g for g in self.grants if g.name == name), None)

    def offered(self) -> tuple[m.ToolSpec, ...]:
        """Exactly what a run's tasks carry: every granted tool not set to ``deny``."""
        if self.max_rounds <= 0:
            return ()
        return tuple(g.spec() for g in self.grants if g.approval != "deny")


class Rules(msgspec.Struct, frozen=True, kw_only=True):
    """The limits a verdict is checked against (a snapshot is stored with each run)."""

    default_model: str
    models: dict[str, m.Prices]
    allowed_executors: frozenset[str] = frozenset({"chat", "code"})
    default_executor: m.Executor = "chat"
    max_attempts: int = 3
    max_output_tokens: int = 4096
    run_deadline_s: float = 300.0
    # After a missed deadline, how long the aborted call has to report before a call of the
    # attempt that never finished is taken for dead and billed by estimate (shared/estimate.py).
    settle_grace_s: float = 10.0
    double_texting: Literal["enqueue", "reject", "interrupt"] = "enqueue"
    retry_backoff_s: tuple[float, ...] = (1.0, 4.0)
    fallback_model: str | None = None
    # Limits (the policy file; docs/policy.md): daily caps, rates, runs in flight.
    limits: m.Limits = m.Limits()
    disallowed_intents: frozenset[str] = frozenset()
    clarify_ambiguous: bool = True
    estimated_input_tokens: int = 1000  # input allowance of a reservation (output: max_tokens)
    downgrade_at: float | None = None  # fraction of a daily cap past which ...
    downgrade_model: str | None = None  # ... this cheaper model answers
    tools: ToolRules = ToolRules()  # the tools runs may use (policy grants them, I7)
    context_messages: int = 0  # the history a task may send (0: the executor's own setting)


DEFAULT_PRICES: dict[str, m.Prices] = {
    "claude-sonnet-4-6": m.Prices(input=3.0, output=15.0, cache_read=0.3, cache_write=3.75),
    "claude-haiku-4-5": m.Prices(input=1.0, output=5.0, cache_read=0.1, cache_write=1.25),
}


class Reservation(msgspec.Struct, kw_only=True, frozen=True):
    """What a run holds in the limits bucket, so settling it happens once (by run id)."""

    keys: tuple[str, ...]  # the counters holding it (day budgets, runs in flight)
    tokens: int = 0
    cost_usd: float = 0.0
    settled: bool = False
    actual_tokens: int = 0
    actual_cost_usd: float = 0.0


class DeadCall(msgspec.Struct, array_like=True, frozen=True):
    """A call of the run that died with its executor, billed by estimate (a settle timer, or
    a later delivery of its task): what it counts in the run's day budgets, once."""

    call_id: str
    tokens: int
    cost_usd: float


class RunState(msgspec.Struct, kw_only=True):
    """Policy's record of one run, kept in the runs bucket (created once per message).

    Its ``phase`` (``services/policy/phase.py``) is where the run is in its life; ``status`` is
    read from it. Stored by ``encode_run`` and read by ``decode_run`` (a record of the previous
    version, with flags instead of a phase, reads as the same phase)."""

    run_id: str
    message_id: str
    conversation_id: str
    project_id: str
    user_id: str
    phase: Phase
    verdict: m.Verdict
    reason: str
    model: str = ""
    executor: m.Executor = "chat"
    attempt: int = 0
    max_tokens: int = 0
    estimated_tokens: int = 0
    prices: m.Prices = m.Prices()
    reply_kind: m.ReplyKind | None = None
    reply_text: str = ""
    position: int = 0
    # The W3C context of the decision that created the run: a run started later, when the
    # conversation's previous run ends, still belongs to its own message's trace.
    trace_context: dict[str, str] = {}
    reservation: Reservation | None = None
    limits: m.LimitsSnapshot | None = None
    # The event that moved the run to its current attempt or phase; only its redelivery may
    # re-emit that state (an older event re-emitting a task could start a second call).
    cause: str = ""
    # What the run's failed attempts reported using (a cancelled run, which stores no reply,
    # settles its budget reservation with it; a stored reply carries the whole run's usage).
    usage: m.Usage = m.Usage()
    cost_usd: float = 0.0
    # What the agent's classification call used (from its decision): settled with the run's
    # reservation, so the budgets count every model call, not only the answer attempts.
    classification: m.Usage = m.Usage()
    classification_cost_usd: float = 0.0
    # Tools (docs/tools.md): the current tool round (0: the first model call) and the attempts
    # of earlier rounds (retries count per round); the round's calls are in the ``Tools`` phase.
    round: int = 0
    attempts_before: int = 0
    # The run's dead calls known to policy (docs/decisions.md, "Dead calls in the day
    # budgets"): known before the run settles, its settlement counts them (unless the
    # persister's sum already did); known after, each is charged on its own.
    dead: tuple[DeadCall, ...] = ()
    # The calls whose usage the stored reply's sum held (None: the persister did not say).
    summed: tuple[str, ...] | None = None

    @property
    def status(self) -> m.RunStatus:
        return status_of(self.phase)

    @property
    def calls(self) -> tuple[PendingCall, ...]:
        """The current round's calls (in ``Tools``, or ``Done`` during a round; else none)."""
        return self.phase.calls if isinstance(self.phase, Tools | Done) else ()

    @property
    def approval_due(self) -> datetime | None:
        """When the round's calls waiting for the user expire (None outside ``Tools``)."""
        return self.phase.approval_due if isinstance(self.phase, Tools) else None


def ended(
    state: RunState, kind: m.RunStatus, *, skipped: bool = False, limited: bool = False
) -> Done:
    """The phase of ``state`` ending as ``kind`` (the calls of a tool round it ends in stay)."""
    return Done(kind, skipped=skipped, limited=limited, calls=state.calls)


def skipped(run: RunState) -> bool:
    """Ended before its turn (cancelled while queued, or rejected): passed over at its turn."""
    return isinstance(run.phase, Done) and run.phase.skipped


def limited(run: RunState) -> bool:
    """Refused by a limit or a rule: under ``interrupt`` it stops nothing (a message that
    cannot run must not cancel the answer the user is already getting)."""
    return isinstance(run.phase, Done) and run.phase.limited


# ---------------------------------------------------------------- the stored record
#
# The previous version stored flags instead of a phase. Both versions run side by side in a
# rolling deploy, so a record is read either way (``decode_run``: no ``phase`` field means the
# flags are read as one, once, and the next write stores the phase) and written both ways
# (``encode_run`` adds the flags, derived from the phase, for replicas of the previous
# version; nothing here reads them from a record that has a phase). docs/decisions.md.


class LegacyFields(msgspec.Struct, kw_only=True):
    """The previous version's fields that its phase replaced (``status`` it still reads)."""

    status: m.RunStatus
    deadline: datetime | None = None
    cancel_requested: bool = False
    retry_at: datetime | None = None
    out_of_turn: bool = False
    limited: bool = False
    calls: tuple[PendingCall, ...] = ()
    approval_due: datetime | None = None


def phase_from_legacy(f: LegacyFields) -> Phase:
    """The phase a record of the previous version was in (its own ``phase_of``, in order)."""
    if f.status in runs.TERMINAL:
        return Done(f.status, skipped=f.out_of_turn, limited=f.limited, calls=f.calls)
    if f.retry_at is not None:
        return Backoff(f.retry_at)
    if f.cancel_requested:
        return Cancelling()
    if f.calls:
        return Tools(f.calls, f.approval_due)
    return Running(f.deadline)


def legacy_fields(phase: Phase) -> LegacyFields:
    """The flags a replica of the previous version reads ``phase`` from."""
    status = status_of(phase)
    match phase:
        case Running(deadline=deadline):
            return LegacyFields(status=status, deadline=deadline)
        case Backoff(retry_at=retry_at):
            return LegacyFields(status=status, retry_at=retry_at)
        case Cancelling():
            return LegacyFields(status=status, cancel_requested=True)
        case Tools(calls=calls, approval_due=due):
            return LegacyFields(status=status, calls=calls, approval_due=due)
        case Done(skipped=skipped_, limited=limited_, calls=calls):
            return LegacyFields(status=status, out_of_turn=skipped_, limited=limited_, calls=calls)
    raise AssertionError(f"unknown phase {phase!r}")  # pragma: no cover


_run_decoder = msgspec.json.Decoder(RunState)
_legacy_decoder = msgspec.json.Decoder(LegacyFields)
_record_encoder = msgspec.json.Encoder()


def decode_run(raw: bytes) -> RunState:
    """A stored run, of this version or (no ``phase`` field) the previous one."""
    try:
        return _run_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        try:
            flags = _legacy_decoder.decode(raw)
            fields = msgspec.json.decode(raw)
        except msgspec.ValidationError:
            raise exc from None
        if not isinstance(fields, dict) or "phase" in fields:
            raise
        fields["phase"] = msgspec.to_builtins(phase_from_legacy(flags))
        return msgspec.convert(fields, RunState)


def encode_run(run: RunState) -> bytes:
    """The stored record: the run's fields, then the previous version's flags (one object)."""
    body = _record_encoder.encode(run)
    flags = _record_encoder.encode(legacy_fields(run.phase))
    return body[:-1] + b"," + flags[1:]  # both are non-empty JSON objects, with no key in common


def has_limits(rules: Rules) -> bool:
    """Whether any counted limit applies (without one, a decision touches no counter)."""
    return any(v is not None for v in msgspec.structs.astuple(rules.limits))


def run_id_for(message_id: str) -> str:
    """One run per user message, so a second trigger for the message finds the first run."""
    return runs.run_id(message_id)


def model_verdict(requested: str, rules: Rules) -> tuple[bool, str]:
    """Whether a conversation may use the model it asks for (the project's price table lists
    the models it allows), and why."""
    if requested in rules.models:
        return True, f"model {requested} is allowed in this project"
    allowed = ", ".join(sorted(rules.models)) or "none"
    return False, f"model {requested} is not allowed in this project (allowed: {allowed})"


def decide(
    e: m.AgentDecision, rules: Rules, now: datetime, conversation_model: str | None = None
) -> RunState:
    """The verdict on the agent's advice; the advice itself is bounded, never obeyed blindly.

    ``conversation_model``: the model the conversation's settings asked for and policy allowed;
    it wins over the agent's hint while the project still allows it.
    """
    d = e.decision
    base = RunState(
        run_id=run_id_for(e.message_id),
        message_id=e.message_id,
        conversation_id=e.conversation_id,
        project_id=e.project_id,
        user_id=e.user_id,
        estimated_tokens=d.estimated_tokens,
        position=e.position,
        phase=Running(),
        verdict="approve",
        reason="",
    )
    if d.action == "refuse":
        return msgspec.structs.replace(
            base,
            phase=Done("refused"),
            verdict="stop",
            reason="the request was classified as one baton does not serve",
            reply_kind="refusal",
            reply_text=REFUSAL_TEXT,
        )
    if d.intent in rules.disallowed_intents:
        return stop(base, f"intent {d.intent} is not allowed in this project", DISALLOWED_TEXT)
    if d.action == "clarify" or (d.ambiguous and rules.clarify_ambiguous):
        return msgspec.structs.replace(
            base,
            phase=Done("clarified"),
            verdict="clarify",
            reason="the request is ambiguous",
            reply_kind="clarify",
            reply_text=CLARIFY_TEXT,
        )
    verdict: m.Verdict = "approve"
    reasons = [f"intent={d.intent} complexity={d.complexity}"]
    executor: m.Executor = d.executor
    if executor not in rules.allowed_executors:
        if rules.default_executor not in rules.allowed_executors:
            return stop(base, f"executor {d.executor} is not allowed", DISALLOWED_TEXT)
        executor, verdict = rules.default_executor, "override"
        reasons.append(f"executor {d.executor} not allowed; using {executor}")
    model = rules.default_model
    if conversation_model and conversation_model in rules.models:
        model = conversation_model
        reasons.append(f"the conversation's model {model}")
    elif d.model_hint and d.model_hint in rules.models:
        model = d.model_hint
    max_tokens = max(256, min(d.estimated_tokens * 2, rules.max_output_tokens))
    return msgspec.structs.replace(
        base,
        phase=Running(now + timedelta(seconds=rules.run_deadline_s)),
        verdict=verdict,
        reason="; ".join(reasons),
        model=model,
        executor=executor,
        attempt=1,
        max_tokens=max_tokens,
        prices=rules.models.get(model, m.Prices()),
    )


def stop(state: RunState, reason: str, text: str) -> RunState:
    """A recorded refusal: the run ends here with a reply that says why."""
    return msgspec.structs.replace(
        state,
        phase=ended(state, "refused", limited=True),
        verdict="stop",
        reason=reason,
        reply_kind="refusal",
        reply_text=text,
        model="",
        attempt=0,
    )


def backoff_s(rules: Rules, attempt: int) -> float:
    """The wait before the attempt after ``attempt`` (the last value repeats)."""
    if not rules.retry_backoff_s:
        return 0.0
    return rules.retry_backoff_s[min(attempt, len(rules.retry_backoff_s)) - 1]


def on_failure(state: RunState, f: m.ExecFailed, rules: Rules, now: datetime) -> RunState | None:
    """Retry or give up after a failed attempt; None when the report is stale or a repeat."""
    if isinstance(state.phase, Done | Backoff) or f.attempt != state.attempt:
        return None
    return after_failure(state, f.error_class, f.event_id, rules, now)


def after_failure(
    state: RunState, error_class: str, cause: str, rules: Rules, now: datetime
) -> RunState:
    """The run after its current attempt failed: cancelled, retried after a backoff, or failed."""
    if isinstance(state.phase, Cancelling) or error_class == "cancelled":
        return cancelled(state, cause, "cancelled while running")
    if error_class in RETRYABLE and state.attempt - state.attempts_before < rules.max_attempts:
        model = state.model
        if rules.fallback_model and error_class in FALLBACK_CLASSES:
            model = rules.fallback_model
        wait = backoff_s(rules, state.attempt)
        on = f" on {model}" if model != state.model else ""
        return msgspec.structs.replace(
            state,
            attempt=state.attempt + 1,
            model=model,
            prices=rules.models.get(model, state.prices),
            reason=f"retry{on} in {wait:g}s after {error_class} on attempt {state.attempt}",
            phase=Backoff(now + timedelta(seconds=wait)),
            cause=cause,
        )
    return msgspec.structs.replace(
        state,
        phase=ended(state, "failed"),
        verdict="stop",
        reason=f"attempt {state.attempt} failed ({error_class}); no retry left",
        reply_kind="failure",
        reply_text=FAILURE_TEXT.format(error_class=error_class),
        cause=cause,
    )


def retry_due(state: RunState, after_attempt: int, rules: Rules, now: datetime) -> RunState | None:
    """The scheduled attempt, started now if its backoff is over; None if not (yet) this one's."""
    if not isinstance(state.phase, Backoff):
        return None
    if state.attempt != after_attempt + 1 or now < state.phase.retry_at:
        return None
    deadline = now + timedelta(seconds=rules.run_deadline_s)
    return msgspec.structs.replace(state, phase=Running(deadline))


def on_deadline(state: RunState, d: m.RunDeadline, rules: Rules, now: datetime) -> RunState | None:
    """An attempt with no outcome by its deadline fails as a ``timeout`` (or ends a cancel the
    executor never confirmed); None when the attempt is already over."""
    if isinstance(state.phase, Done | Backoff) or d.attempt != state.attempt:
        return None
    if isinstance(state.phase, Cancelling):
        return cancelled(
            state, d.event_id, "cancelled; the call was not confirmed stopped by its deadline"
        )
    return after_failure(state, "timeout", d.event_id, rules, now)


def cancelled(state: RunState, cause: str, why: str, skipped: bool = False) -> RunState:
    return msgspec.structs.replace(
        state,
        phase=ended(state, "cancelled", skipped=skipped),
        verdict="stop",
        reason=why,
        reply_kind=None,
        reply_text="",
        cause=cause,
    )


def cancel(state: RunState, in_flight: bool, active: bool, cause: str, why: str) -> RunState | None:
    """A cancel request: a call in flight is asked to stop (the executor reports back); a run
    without one ends at once. None when there is nothing to change (finished, or already asked).

    ``active``: the run holds its conversation's slot; a run that does not (queued) is skipped
    when its turn comes.
    """
    if isinstance(state.phase, Done):
        return None
    if in_flight:
        if isinstance(state.phase, Cancelling):
            return None
        return msgspec.structs.replace(state, phase=Cancelling(), reason=why, cause=cause)
    return cancelled(state, cause, why, skipped=not active)


def tombstone(e: m.CancelRequested) -> RunState:
    """The record of a run cancelled before policy decided on it: its decision finds it."""
    return RunState(
        run_id=e.run_id,
        message_id=e.message_id,
        conversation_id=e.conversation_id,
        project_id=e.project_id,
        user_id=e.user_id,
        phase=Done("cancelled", skipped=True),
        verdict="stop",
        reason="cancelled before a decision",
        cause=e.event_id,
    )


def reject(state: RunState) -> RunState:
    """Double texting ``reject``: a refusal now, and the run gives up its place in line."""
    return msgspec.structs.replace(
        state,
        phase=ended(state, "refused", skipped=True, limited=limited(state)),
        verdict="stop",
        reason="another message of this conversation is still being answered (double texting: reject)",
        reply_kind="refusal",
        reply_text=REJECT_TEXT,
    )


def ahead_of(conv: ConvState, position: int) -> list[str]:
    """Runs a newer message interrupts: the active one and those queued before ``position``."""
    runs = [run for pos, run in sorted(conv.pending.items()) if pos < position]
    return ([conv.active] if conv.active else []) + runs


def superseded(conv: ConvState, position: int) -> bool:
    """Whether a newer message already waits: under ``interrupt`` this run is cancelled."""
    return any(pos > position for pos in conv.pending)


def deadline_event(state: RunState, due: datetime) -> m.RunDeadline:
    return m.RunDeadline(
        event_id=runs.deadline_id(state.run_id, state.attempt),
        message_id=state.message_id,
        conversation_id=state.conversation_id,
        project_id=state.project_id,
        causation_id=runs.task_id(state.run_id, state.attempt),
        run_id=state.run_id,
        attempt=state.attempt,
        due=due,
    )


def abort_event(
    state: RunState, attempt: int, reason: Literal["cancelled", "deadline"]
) -> m.RunAbort:
    return m.RunAbort(
        event_id=runs.abort_id(state.run_id, attempt),
        message_id=state.message_id,
        conversation_id=state.conversation_id,
        project_id=state.project_id,
        run_id=state.run_id,
        attempt=attempt,
        reason=reason,
    )


def caused_by(state: RunState, f: m.ExecFailed) -> bool:
    """Whether the run's current state is what this failure led to.

    Only then may a redelivered failure re-emit that state (a crash may have cut the first
    emit short); an older failure re-emitting a task could start a second call of a run.
    """
    if state.cause:
        return state.cause == f.event_id
    if state.status == "running":
        return f.attempt == state.attempt - 1
    return state.status == "failed" and f.attempt == state.attempt


def spent(state: RunState, f: m.ExecFailed) -> RunState:
    """The run with a failed attempt's partial usage added (never negative, never NaN)."""
    u, add = state.usage, f.usage
    cost = f.usage.cost_usd(f.prices)
    return msgspec.structs.replace(
        state,
        usage=m.Usage(
            input_tokens=u.input_tokens + max(0, add.input_tokens),
            output_tokens=u.output_tokens + max(0, add.output_tokens),
            cache_read_tokens=u.cache_read_tokens + max(0, add.cache_read_tokens),
            cache_write_tokens=u.cache_write_tokens + max(0, add.cache_write_tokens),
        ),
        cost_usd=state.cost_usd + (cost if math.isfinite(cost) and cost > 0 else 0.0),
    )


def on_reply_persisted(state: RunState, e: m.AssistantMessagePersisted) -> RunState | None:
    """Close the run once its reply is stored; None when nothing changes (or the event names
    no final status: a reply stored always ends its run)."""
    if (state.status in TERMINAL and state.status == e.status) or e.status not in TERMINAL:
        return None
    if isinstance(state.phase, Done):  # how it ended before its turn still holds
        return msgspec.structs.replace(
            state, phase=msgspec.structs.replace(state.phase, kind=e.status)
        )
    return msgspec.structs.replace(state, phase=ended(state, e.status))


def task_for(
    state: RunState,
    deadline: datetime,
    tools: tuple[m.ToolSpec, ...] = (),
    context_messages: int = 0,
) -> m.ExecTask:
    return m.ExecTask(
        event_id=runs.task_id(state.run_id, state.attempt),
        message_id=state.message_id,
        conversation_id=state.conversation_id,
        project_id=state.project_id,
        causation_id=runs.decision_id(state.message_id),
        task_id=runs.task_id(state.run_id, state.attempt),
        run_id=state.run_id,
        attempt=state.attempt,
        model=state.model,
        executor=state.executor,
        max_tokens=state.max_tokens,
        prices=state.prices,
        deadline=deadline,
        tools=tools,
        round=state.round,
        context_messages=context_messages,
        user_id=state.user_id,
    )


def verdict_event(state: RunState) -> m.RunVerdict:
    return m.RunVerdict(
        event_id=runs.verdict_id(state.run_id, state.attempt, state.status),
        message_id=state.message_id,
        conversation_id=state.conversation_id,
        project_id=state.project_id,
        run_id=state.run_id,
        user_id=state.user_id,
        verdict=state.verdict,
        status=state.status,
        reason=state.reason,
        model=state.model,
        executor=state.executor,
        attempt=state.attempt,
        estimated_tokens=state.estimated_tokens,
        limits=state.limits,
        reserved_tokens=state.reservation.tokens if state.reservation else 0,
        reserved_cost_usd=state.reservation.cost_usd if state.reservation else 0.0,
    )


def reply_event(state: RunState) -> m.PolicyReply | None:
    if state.reply_kind is None:
        return None
    return m.PolicyReply(
        event_id=runs.reply_id(state.run_id),
        message_id=state.message_id,
        conversation_id=state.conversation_id,
        project_id=state.project_id,
        run_id=state.run_id,
        user_id=state.user_id,
        kind=state.reply_kind,
        text=state.reply_text,
        status=state.status,
    )


class ConvState(msgspec.Struct, kw_only=True):
    """One conversation's turn-taking (I6): the run holding the slot, the next position allowed
    to start, and runs whose decision arrived before their turn, by message position."""

    conversation_id: str
    active: str | None = None
    started: bool = False
    next_position: int = 1
    pending: dict[int, str] = msgspec.field(default_factory=dict)
    # Set by the conversation's settings (issue 16): the model its runs use, if policy allowed
    # the one it asked for; and whether it was deleted (its later messages get no run).
    model: str | None = None
    deleted: bool = False


Admission = Literal["start", "queued", "wait"]


def admit(conv: ConvState, run_id: str, position: int) -> tuple[ConvState | None, Admission]:
    """Where a run goes: the slot if it is free and the run is next in line, else it waits.

    Decisions arrive in any order (the agent handles messages concurrently), so the order is
    the messages' positions, not arrival. Returns the changed state (None when nothing
    changes) and what to do; ``wait`` means the run already had its turn.
    """
    if conv.active == run_id:
        return (None, "wait") if conv.started else (None, "start")
    if run_id in conv.pending.values():
        return None, "queued"
    if position <= 0:  # a message from before positions existed: it goes to the back
        position = max([conv.next_position - 1, *conv.pending]) + 1
    if position < conv.next_position:
        return None, "wait"
    pending = {**conv.pending, position: run_id}
    if conv.active is None and position == conv.next_position:
        del pending[position]
        changed = msgspec.structs.replace(
            conv, active=run_id, started=False, next_position=position + 1, pending=pending
        )
        return changed, "start"
    return msgspec.structs.replace(conv, pending=pending), "queued"


def release(conv: ConvState, run_id: str) -> ConvState | None:
    """Free the slot of a finished run and hand it to the next position if its run is here."""
    if conv.active != run_id:
        return None
    pending = dict(conv.pending)
    nxt = pending.pop(conv.next_position, None)
    return msgspec.structs.replace(
        conv,
        active=nxt,
        started=False,
        next_position=conv.next_position + (1 if nxt is not None else 0),
        pending=pending,
    )


def mark_started(conv: ConvState) -> ConvState:
    return msgspec.structs.replace(conv, started=True)


def queued_event(state: RunState, waiting: int) -> m.RunVerdict:
    """What clients and the run record see while a run waits for its conversation's turn."""
    return msgspec.structs.replace(
        verdict_event(state),
        event_id=runs.verdict_id(state.run_id, 0, "queued"),
        status="queued",
        attempt=0,
        reason=f"waiting for earlier messages of the conversation ({waiting} waiting)",
    )
