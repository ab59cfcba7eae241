"""A run's life as a pure state machine: ``step(run, conversation, input, rules, now)``.

Every rule of what a run does next lives here (and in the helpers of ``core``): which record
changes, what is published, in which order. ``handlers.py`` only interprets the result: it
reads the records with their revisions, steps, writes them back by compare-and-set, carries
out the effects in order and acks. Nothing here reads a clock, the environment or the network.

The **phase** of a run is a tagged union stored in its record (``RunState.phase``; the types
are in ``phase.py``, which ``core`` shares): a transition constructs the next phase, and the
run's status is read from it. An **input** is what happened (a tagged union, ``Input``); an
**effect** is what must be done about it (``Effect``). ``Continue`` is the effect that makes
one input lead to another (the cancel of an earlier run, the start of the next one in line):
the interpreter handles it depth-first, in place, which is the order the old recursive handler
had.

The tool phase (docs/tools.md) is one more member of each: ``Tools`` (the round's calls run
or wait for the user; no model call is in flight), the inputs ``ToolTurnStored``,
``ToolResultStored`` and ``ToolDecided``, and the effect ``Observe`` for its metrics. How each
call is decided and what it publishes is in ``toolcalls``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Literal

import msgspec

from services.policy import budget, core, toolcalls
from services.policy.core import ConvState, Rules, RunState
from services.policy.phase import Backoff, Cancelling, Done, Phase, Running, Tools
from shared import estimate, runs, subjects
from shared import messages as m

# ---------------------------------------------------------------- phases (``phase.py``)


def phase_of(run: RunState) -> Phase:
    """The run's phase: its record carries it (``RunState.phase``)."""
    return run.phase


# ---------------------------------------------------------------- inputs


class Admit(msgspec.Struct, frozen=True, tag="admit"):
    """The run is decided (just now, or before: a redelivery): place it in its conversation."""

    position: int


class Start(msgspec.Struct, frozen=True, tag="start"):
    """The run holds its conversation's slot: publish it, then mark it started."""


class MarkStarted(msgspec.Struct, frozen=True, tag="mark_started"):
    """Its task is out: the conversation's record says the run started (conversation only)."""

    run_id: str


class Release(msgspec.Struct, frozen=True, tag="release"):
    """The run is finished: its slot passes to the next position (conversation only)."""

    run_id: str


class Cancel(msgspec.Struct, frozen=True, tag="cancel"):
    """Stop the run: the user asked (``how="user"``) or a newer message interrupts it."""

    cause: str
    why: str
    how: Literal["user", "interrupt", "deleted"]  # deleted: the conversation was deleted


class Failed(msgspec.Struct, frozen=True, tag="failed"):
    """An executor reported an attempt failed (a redelivery may repeat it; it may be stale)."""

    report: m.ExecFailed


class DeadlineDue(msgspec.Struct, frozen=True, tag="deadline"):
    """An attempt's timer is due (the interpreter hands it back until then)."""

    timer: m.RunDeadline


class DeadCallsBilled(msgspec.Struct, frozen=True, tag="dead_calls"):
    """A settle timer published the estimated usage of these calls of the run (``timer``'s
    attempt): each is counted in the run's day budgets once (``_dead_billed``)."""

    timer: m.RunDeadline
    calls: tuple[m.EstimatedCall, ...]


class ReplyStored(msgspec.Struct, frozen=True, tag="reply_stored"):
    """The persister stored the run's reply: it is closed, settled and its slot passed on."""

    event: m.AssistantMessagePersisted


class ToolTurnStored(msgspec.Struct, frozen=True, tag="tool_turn"):
    """The persister stored the model's tool_use turn of a round: decide each of its calls.
    ``quota``: per call id, whether the user's daily limit of its tool let it through (counted
    by the interpreter, once per call, for the calls ``toolcalls.turn_quota`` names)."""

    event: m.ToolTurnPersisted
    quota: dict[str, bool] = {}


class ToolResultStored(msgspec.Struct, frozen=True, tag="tool_result"):
    """The persister stored one call's result (the first one for the call wins)."""

    event: m.ToolResultPersisted


class ToolDecided(msgspec.Struct, frozen=True, tag="tool_decided"):
    """The user's answer to a waiting call; ``quota`` as for a turn (an approval counts)."""

    event: m.ToolApprovalDecided
    quota: dict[str, bool] = {}


Input = (
    Admit
    | Start
    | MarkStarted
    | Release
    | Cancel
    | Failed
    | DeadlineDue
    | DeadCallsBilled
    | ReplyStored
    | ToolTurnStored
    | ToolResultStored
    | ToolDecided
)
CONVERSATION_ONLY = (MarkStarted, Release)  # steps that need no run record

# ---------------------------------------------------------------- effects


class Publish(msgspec.Struct, frozen=True, tag="publish"):
    """JetStream messages, in order, acked together; each one's id is its ``event_id``.
    ``resume``: the stored trace of the run's own message, published on its behalf.
    ``early``: carried out *before* the records are written, like ``Settle``: for a message
    no redelivery could publish again once the record moved on (a settle timer); a repeat is
    harmless (the same id, and what it leads to is keyed by call id)."""

    events: tuple[tuple[str, msgspec.Struct], ...]
    resume: dict[str, str] | None = None
    early: bool = False


class Abort(msgspec.Struct, frozen=True, tag="abort"):
    """Mark the attempt aborted (executors check before calling) and tell every executor."""

    subject: str
    event: m.RunAbort


class Settle(msgspec.Struct, frozen=True, tag="settle"):
    """Replace the run's holds by its real usage. Carried out *before* the records are written
    (the counters settle a run once, so a crash in between is finished by the redelivery)."""

    run_id: str
    reservation: core.Reservation
    tokens: int
    cost_usd: float


class Charge(msgspec.Struct, frozen=True, tag="charge"):
    """Count one call in the day budgets of a run that settled without it (once per call id)."""

    keys: tuple[str, ...]
    call_id: str
    tokens: int
    cost_usd: float


class Defer(msgspec.Struct, frozen=True, tag="defer"):
    """Hand the message back to the server for ``delay`` seconds (a backoff, a timer)."""

    why: str
    delay: float


class Count(msgspec.Struct, frozen=True, tag="count"):
    """Add one to a metric (``verdicts``, ``retries``, ``cancels``, ``deadlines``, …)."""

    metric: str
    label: str = ""


class Continue(msgspec.Struct, frozen=True, tag="continue"):
    """Step ``input`` on run ``run_id`` of ``conversation_id`` now, before the effects after it."""

    conversation_id: str
    run_id: str
    input: Input


class Observe(msgspec.Struct, frozen=True, tag="observe"):
    """A metric with several labels or a value: ``tool_calls`` (counter: tool, outcome),
    ``approval_wait`` (histogram, seconds), ``approvals_pending`` (gauge, added to)."""

    metric: str
    labels: tuple[str, ...] = ()
    value: float = 1.0


Effect = Publish | Abort | Settle | Charge | Defer | Count | Continue | Observe


class Step(msgspec.Struct, frozen=True):
    """What an input does: the records to write (None: unchanged), the effects, an outcome."""

    run: RunState | None = None
    conversation: ConvState | None = None
    effects: tuple[Effect, ...] = ()
    outcome: str = ""


# ---------------------------------------------------------------- the step


def step(run: RunState | None, conv: ConvState, inp: Input, rules: Rules, now: datetime) -> Step:
    """What ``inp`` does to ``run`` (None only for conversation-only inputs) and ``conv``."""
    match inp:
        case MarkStarted(run_id=run_id):
            if conv.active != run_id or conv.started:
                return Step(outcome="unchanged")
            return Step(conversation=core.mark_started(conv), outcome="started")
        case Release(run_id=run_id):
            return _release(conv, run_id)
    assert run is not None, f"{type(inp).__name__} needs the run's record"
    match inp:
        case Admit(position=position):
            return _admit(run, conv, position, rules, now)
        case Start():
            return _start(run, conv, rules, now)
        case Cancel(cause=cause, why=why, how=how):
            return _cancel(run, conv, cause, why, how, rules, now)
        case Failed(report=f):
            return _failed(run, conv, f, rules, now)
        case DeadlineDue(timer=d):
            return _deadline(run, conv, d, rules, now)
        case DeadCallsBilled(timer=d, calls=found):
            return _dead_billed(run, d, found)
        case ReplyStored(event=e):
            return _reply_stored(run, e)
        case ToolTurnStored(event=e, quota=quota):
            return _tool_turn(run, conv, e, quota, rules, now)
        case ToolResultStored(event=e):
            return _tool_result(run, conv, e, rules, now)
        case ToolDecided(event=e, quota=quota):
            return _tool_decided(run, e, quota, rules, now)
    raise AssertionError(f"no step for {inp!r}")  # pragma: no cover


def _admit(run: RunState, conv: ConvState, position: int, rules: Rules, now: datetime) -> Step:
    position = run.position or position  # a run cancelled before its decision: now it has one
    changed, admission = core.admit(conv, run.run_id, position)
    conv = changed or conv
    effects: list[Effect] = []
    new: RunState | None = None
    interrupt = rules.double_texting == "interrupt"
    if admission == "start":
        if interrupt and run.status == "running" and core.superseded(conv, position):
            # Its turn came, but a newer message already waits: it is interrupted unrun.
            effects.append(_follow(run, _superseded(run)))
        else:
            effects.append(_follow(run, Start()))
    elif admission == "queued":
        if core.skipped(run):
            effects.append(emit(run, rules, now))  # finished before its turn: it is skipped
        else:
            new, handled = _double_text(run, conv, position, rules, now, effects)
            if not handled:
                event = core.queued_event(run, len(conv.pending))
                subject = subjects.policy_verdict(run.project_id, run.conversation_id)
                effects.append(Publish(((subject, event),)))
    return Step(new, changed, tuple(effects), admission)


def _double_text(
    run: RunState,
    conv: ConvState,
    position: int,
    rules: Rules,
    now: datetime,
    effects: list[Effect],
) -> tuple[RunState | None, bool]:
    """A message while an earlier one is unfinished, by strategy: the run to write and whether
    it was handled (rejected or superseded) rather than simply waiting."""
    strategy = rules.double_texting
    if strategy == "reject":
        if run.status != "running":
            return None, False  # a refusal or a question keeps its place, replies at its turn
        # It never runs: its hold is given back now, not when its refusal is stored.
        new, settle = _closing(core.reject(run))
        effects.extend([*settle, Count("double_texts", "reject"), Count("verdicts", new.verdict)])
        effects.append(emit(new, rules, now))
        return new, True
    if strategy == "interrupt":
        if core.limited(run):
            # Refused by a limit: it interrupts nothing and replies at its turn.
            effects.append(Count("double_texts", "interrupt_limited"))
            return None, False
        if core.superseded(conv, position):
            effects.append(_follow(run, _superseded(run)))  # a newer message is already here
            return None, True
        effects.append(Count("double_texts", "interrupt"))
        why = "interrupted by a newer message"
        for earlier in core.ahead_of(conv, position):
            cancel = Cancel(f"interrupt:{run.run_id}", why, "interrupt")
            effects.append(Continue(run.conversation_id, earlier, cancel))
        return None, False
    effects.append(Count("double_texts", "enqueue"))
    return None, False


def _start(run: RunState, conv: ConvState, rules: Rules, now: datetime) -> Step:
    """Publish the run's verdict and task (or reply), then mark it started; a run that ended
    before its turn (cancelled while queued, or rejected) passes the slot on instead."""
    effects: list[Effect] = [emit(run, rules, now, resume=True)]
    if core.skipped(run) or run.status == "cancelled":
        effects.append(Continue(run.conversation_id, run.run_id, Release(run.run_id)))
    else:
        effects.append(Continue(run.conversation_id, run.run_id, MarkStarted(run.run_id)))
    return Step(effects=tuple(effects), outcome="start")


def _release(conv: ConvState, run_id: str) -> Step:
    nxt = core.release(conv, run_id)
    if nxt is None:
        # Already released (a redelivery): finish starting the next run if a crash cut it off.
        if conv.active is not None and not conv.started:
            return Step(effects=(Continue(conv.conversation_id, conv.active, Start()),))
        return Step(outcome="unchanged")
    effects = () if nxt.active is None else (Continue(nxt.conversation_id, nxt.active, Start()),)
    return Step(conversation=nxt, effects=effects, outcome="released")


def _cancel(
    run: RunState,
    conv: ConvState,
    cause: str,
    why: str,
    how: str,
    rules: Rules,
    now: datetime,
) -> Step:
    active = conv.active == run.run_id
    # A call is in flight once the run started and no retry is waiting for its backoff.
    # While its tools run or wait for the user there is no model call to stop: it ends at once.
    in_flight = active and conv.started and isinstance(run.phase, Running | Cancelling)
    new = core.cancel(run, in_flight, active, cause, why)
    if new is None:
        # Finished, or asked already (a redelivery): finish what the first handling began.
        settled, after = _after(run, conv, rules, now)
        return Step(settled, None, after, "unchanged")
    new, settle = _closing(new)
    effects: list[Effect] = list(settle)
    if active and new.status == "cancelled" and run.status == "running":
        # Had it got as far as publishing its task (a crash before it was marked started), the
        # executor finds the marker and never calls the model.
        effects.append(_abort(run, "cancelled"))
    effects.extend(_unwait(run))
    if new.status == "cancelled":
        effects.append(Count("cancels", f"{how}_queued" if not active else f"{how}_waiting"))
    else:
        effects.append(Count("cancels", f"{how}_in_flight"))
    _, after = _after(new, conv, rules, now)
    outcome = new.status if new.status == "cancelled" else "cancelling"
    return Step(new, None, (*effects, *after), outcome)


def _after(
    run: RunState, conv: ConvState, rules: Rules, now: datetime
) -> tuple[RunState | None, tuple[Effect, ...]]:
    """What a run's cancel still needs: a cancelled run settles (if a crash cut that short) and
    frees its conversation's slot if it holds it (a queued one is skipped at its turn); a
    cancel in flight reaches the executors and has a timer to end it if none answers."""
    match phase_of(run):
        case Done(kind="cancelled"):
            settled, settle = _closing(run)
            effects: list[Effect] = [*settle, emit(run, rules, now)]
            if conv.active == run.run_id:
                effects.append(Continue(run.conversation_id, run.run_id, Release(run.run_id)))
            return (settled if settle else None), tuple(effects)
        case Cancelling():
            timer = core.deadline_event(run, now + timedelta(seconds=rules.run_deadline_s))
            subject = subjects.policy_deadline(run.project_id, run.conversation_id)
            effects = [
                emit(run, rules, now),
                _abort(run, "cancelled"),
                Publish(((subject, timer),)),
            ]
            return None, tuple(effects)
    return None, ()


def _failed(run: RunState, conv: ConvState, f: m.ExecFailed, rules: Rules, now: datetime) -> Step:
    if isinstance(phase_of(run), Tools):
        # A second model call of the round (a redelivered task) failed: the stored turn stands.
        return Step(outcome="stale")
    if run.cause == f.event_id and isinstance(phase_of(run), Backoff):
        return _retry(run, f.attempt, rules, now)
    new = core.on_failure(run, f, rules, now)
    if new is None:
        # Stale or a repeat; only the report that moved the run here may re-emit its state.
        return _again(run, conv, rules, now) if core.caused_by(run, f) else Step(outcome="stale")
    new, settle = _closing(_known_dead(core.spent(new, f), f.estimated, f.prices))
    return _attempt_over(new, conv, f.error_class, settle, rules, now)


def _deadline(
    run: RunState, conv: ConvState, d: m.RunDeadline, rules: Rules, now: datetime
) -> Step:
    if d.event_id.startswith("approval-deadline:"):
        return _approval_timeout(run, conv, d, rules, now)
    if isinstance(phase_of(run), Tools):
        return Step(outcome="stale")  # the attempt ended with its tool_use turn
    if run.cause == d.event_id and isinstance(phase_of(run), Backoff):
        # The retry this deadline scheduled: its settle timer went out before the record was
        # written (``early``); again here, for a record written before timers were early.
        retry = _retry(run, d.attempt, rules, now)
        return msgspec.structs.replace(
            retry, effects=(*_settle_again(run, d, rules, now), *retry.effects)
        )
    new = core.on_deadline(run, d, rules, now)
    if new is None:
        if run.cause != d.event_id:
            return Step(outcome="stale")
        # Moved on by this deadline (a crash may have cut the first handling short): its
        # state again (a retry that started: its task, the same ids), and the settle timer.
        again = _again(run, conv, rules, now)
        return msgspec.structs.replace(
            again, effects=(*again.effects, *_settle_again(run, d, rules, now))
        )
    new, settle = _closing(new)
    # The late call may still be streaming somewhere: stop it, its usage still counts; a call
    # of it whose executor died is billed by estimate once the stopped ones had time to report.
    before: tuple[Effect, ...] = (
        *settle,
        Count("deadlines"),
        _abort(run, "deadline"),
        settle_timer(run, rules, now),
    )
    return _attempt_over(new, conv, "timeout", before, rules, now)


# ---------------------------------------------------------------- dead calls (I4)
#
# A call cut by its executor's death on the last delivery of its task (no redelivery comes
# before the attempt's deadline) is billed here: the deadline publishes a settle timer; when it
# is due, the interpreter reads the task's calls' records (shared/deadcalls.py) and publishes
# the usage of each one still only ``started``, estimated (shared/estimate.py), for the persister.


def settle_timer(run: RunState, rules: Rules, now: datetime, attempt: int | None = None) -> Publish:
    """The timer that settles the dead calls of ``attempt`` (default: the current one) after
    ``settle_grace_s``: a call the deadline's abort stopped reports its exact usage (and writes
    ``finished``) first. Published before the record is written (``early``): once the record
    says the deadline moved the run on, no branch of a redelivery may be the only one to send
    it; a crash before the write re-handles the deadline and publishes the same id again."""
    a = run.attempt if attempt is None else attempt
    timer = m.RunDeadline(
        event_id=runs.settle_id(run.run_id, a),
        message_id=run.message_id,
        conversation_id=run.conversation_id,
        project_id=run.project_id,
        causation_id=runs.deadline_id(run.run_id, a),
        run_id=run.run_id,
        attempt=a,
        due=now + timedelta(seconds=rules.settle_grace_s),
        settle=m.DeadCalls(
            task_id=runs.task_id(run.run_id, a),
            user_id=run.user_id,
            model=run.model,
            prices=run.prices,
        ),
    )
    subject = subjects.policy_deadline(run.project_id, run.conversation_id)
    return Publish(((subject, timer),), early=True)


# A deadline's retry keeps the attempt's model (a timeout is no fallback class), so a record a
# deadline moved on still names the model the dead attempt's calls ran on.
_DEADLINE_KEEPS_MODEL = "timeout" not in core.FALLBACK_CLASSES


def _settle_again(
    run: RunState, d: m.RunDeadline, rules: Rules, now: datetime
) -> tuple[Publish, ...]:
    """The settle timer of ``d``'s attempt once more, for a run that deadline moved on (the
    same id: a duplicate unless the first handling died before its early publish, which only a
    record written before timers were early can show)."""
    if run.attempt != d.attempt and not _DEADLINE_KEEPS_MODEL:
        return ()  # pragma: no cover - the record names the retry's model, not the dead one's
    return (settle_timer(run, rules, now, d.attempt),)


def dead_calls(d: m.RunDeadline, max_deliver: int) -> list[str]:
    """The calls a due settle timer reads: those it names (a redelivery's own), else every
    delivery its task may have had."""
    assert d.settle is not None
    if d.settle.calls:
        return list(d.settle.calls)
    return estimate.task_calls(d.settle.task_id, max_deliver)


def redelivery_settle(d: m.RunDeadline, run: RunState, max_deliver: int) -> m.RunDeadline | str:
    """An executor's settle timer (``subjects.policy_settle``), checked against the run's
    record: a timer for one redelivered delivery's own call, which its executor publishes
    before the call, so a call that dies after its task's outcome came from another delivery
    (the task acked, nothing delivered again, the attempt's deadline met) is still billed. The
    executor names the task, its calls, the model and prices (as its results do); who is
    billed, and where, come from the record. The reason it is refused, or the timer to run."""
    s = d.settle
    if s is None:
        return "a settle timer that names no calls"
    if d.attempt < 1 or d.attempt > run.attempt:
        return f"attempt {d.attempt} of run {run.run_id} was never started"
    if s.task_id != runs.task_id(run.run_id, d.attempt):
        return f"task {s.task_id!r} is not attempt {d.attempt} of run {run.run_id}"
    if not s.calls or any(not estimate.is_delivery_of(s.task_id, c, max_deliver) for c in s.calls):
        return f"calls {list(s.calls)[:3]!r} are not deliveries of task {s.task_id}"
    return msgspec.structs.replace(
        d,
        message_id=run.message_id,
        conversation_id=run.conversation_id,
        project_id=run.project_id,
        settle=msgspec.structs.replace(s, user_id=run.user_id),
    )


def settle_dead(d: m.RunDeadline, found: list[m.EstimatedCall]) -> Step:
    """Bill each dead call found once: its usage (id ``estimate:<call id>``; the persister keys
    the row by call id, so a redelivery of the task that billed it first makes this a duplicate).
    The interpreter then steps ``DeadCallsBilled`` on the run: its day budgets."""
    subject = subjects.policy_usage(d.project_id, d.conversation_id)
    events = tuple((subject, estimate.settled_usage(d, c)) for c in found)
    effects: tuple[Effect, ...] = (Publish(events),) if events else ()
    counts = tuple(Count("dead_calls") for _ in found)
    return Step(effects=(*effects, *counts), outcome=f"settled:{len(found)}")


def _dead_billed(run: RunState, d: m.RunDeadline, found: tuple[m.EstimatedCall, ...]) -> Step:
    """Dead calls billed by a settle timer, in the run's day budgets once each: known before the
    run settles, they are kept in its record and its settlement counts them; known after, each
    is charged on its own (``Charge``, before the record is written: the counters keep each
    charged call, so a crash in between charges nothing twice). A run that settled with its
    stored reply is charged only for calls the persister's sum did not hold; with no word of
    what that sum held (an older persister), nothing (docs/decisions.md)."""
    assert d.settle is not None
    new = _known_dead(run, found, d.settle.prices)
    if new is run:
        return Step(outcome="unchanged")
    r = run.reservation
    if r is None or not r.settled:
        return Step(new, None, (), f"kept:{len(new.dead) - len(run.dead)}")
    if _by_reply(run) and run.summed is None:
        return Step(new, None, (), "unknown")
    late = new.dead[len(run.dead) :]
    return Step(new, None, _charges(r, late), f"charged:{len(late)}")


def _charges(r: core.Reservation, calls: Sequence[core.DeadCall]) -> tuple[Charge, ...]:
    """Each dead call charged on its own to the reservation's day budgets (none without one)."""
    keys = tuple(k for k in r.keys if k.startswith("budget."))
    return tuple(Charge(keys, c.call_id, c.tokens, c.cost_usd) for c in calls) if keys else ()


def _known_dead(
    run: RunState, calls: tuple[m.EstimatedCall, ...] | list[m.EstimatedCall], prices: m.Prices
) -> RunState:
    """The run with the dead calls it did not know yet (not kept, not in its reply's sum)."""
    known = {c.call_id for c in run.dead} | set(run.summed or ())
    new: list[core.DeadCall] = []
    for c in calls:
        if c.call_id in known:
            continue
        known.add(c.call_id)
        cost = c.usage.cost_usd(prices)
        tokens = max(0, budget.total_tokens(c.usage))
        new.append(
            core.DeadCall(c.call_id, tokens, cost if math.isfinite(cost) and cost > 0 else 0.0)
        )
    return msgspec.structs.replace(run, dead=(*run.dead, *new)) if new else run


def _by_reply(run: RunState) -> bool:
    """Whether the run settles (or settled) with its stored reply, not in ``_closing``."""
    return not (run.status == "cancelled" or (run.status == "refused" and core.skipped(run)))


def _again(run: RunState, conv: ConvState, rules: Rules, now: datetime) -> Step:
    """The redelivery of the event that moved the run here: emit its state again and finish
    what the first handling began (a crash may have cut it short)."""
    settled, after = _after(run, conv, rules, now)
    return Step(settled, None, (emit(run, rules, now), *after), "stale")


def _attempt_over(
    new: RunState,
    conv: ConvState,
    error_class: str,
    before: tuple[Effect, ...],
    rules: Rules,
    now: datetime,
) -> Step:
    """After an attempt failed: a retry waits for its backoff; a final state is emitted."""
    if isinstance(phase := phase_of(new), Backoff):
        wait = max((phase.retry_at - now).total_seconds(), 0.0)
        effects = (
            *before,
            Count("retries", error_class),
            emit(new, rules, now),  # run.status of the new attempt: clients drop partial text
            Defer("retry after backoff", wait),
        )
        return Step(new, None, effects, "backoff")
    effects = (
        *before,
        Count("verdicts", new.verdict),
        emit(new, rules, now),
        *_after(new, conv, rules, now)[1],
    )
    return Step(new, None, effects, new.status)


def _retry(run: RunState, failed_attempt: int, rules: Rules, now: datetime) -> Step:
    """The event that scheduled a retry is back: start the attempt, or wait on if early."""
    due = core.retry_due(run, failed_attempt, rules, now)
    if due is None:
        assert isinstance(run.phase, Backoff)
        wait = max((run.phase.retry_at - now).total_seconds(), 0.0)
        return Step(effects=(Defer("retry not due yet", wait),), outcome="early")
    return Step(due, None, (emit(due, rules, now),), "retry")


def _reply_stored(run: RunState, e: m.AssistantMessagePersisted) -> Step:
    new = core.on_reply_persisted(run, e)
    settled, settle = settlement(new or run, e.usage, e.cost_usd, e.calls)
    if settled is not None:
        settled = msgspec.structs.replace(settled, summed=e.calls)
    new = settled or new
    # Done (also on a redelivery): the conversation's next run gets its turn.
    release = Continue(run.conversation_id, run.run_id, Release(run.run_id))
    return Step(new, None, (*settle, release), new.status if new is not None else "unchanged")


# ---------------------------------------------------------------- the tool phase


def _tool_turn(
    run: RunState,
    conv: ConvState,
    e: m.ToolTurnPersisted,
    quota: dict[str, bool],
    rules: Rules,
    now: datetime,
) -> Step:
    """The model's tool_use turn is stored: decide each call (or end the run past its rounds)."""
    phase = phase_of(run)
    if isinstance(phase, Done) and run.cause == e.event_id:
        return _again(run, conv, rules, now)  # it ended the run: its reply, its release again
    if isinstance(phase, Done) or e.round != run.round:
        return Step(outcome="stale")
    if isinstance(phase, Tools):
        # Decided before (a redelivery): publish again what a crash may have cut short.
        return Step(effects=(emit(run, rules, now),), outcome="stale")
    usage, cost = toolcalls.usage_so_far(run, e)
    spent = msgspec.structs.replace(run, usage=usage, cost_usd=cost)
    if isinstance(phase, Cancelling):
        # The call finished asking for tools while its cancel travelled: nothing runs.
        new, settle = _closing(core.cancelled(spent, e.event_id, "cancelled while running"))
        return _ended(new, conv, settle, rules, now)
    calls = toolcalls.unique(e.tool_calls)
    if e.round >= rules.tools.max_rounds:
        new = msgspec.structs.replace(
            spent,
            phase=core.ended(spent, "failed"),
            verdict="stop",
            reason=f"the model asked for tools after {rules.tools.max_rounds} tool rounds",
            reply_kind="failure",
            reply_text=toolcalls.MAX_ROUNDS_TEXT.format(rounds=rules.tools.max_rounds),
            cause=e.event_id,
        )
        over = tuple(Observe("tool_calls", (c.name, "max_rounds")) for c in calls)
        return _ended(new, conv, over, rules, now)
    decided = toolcalls.decide_turn(calls, e.earlier_call_ids, rules, quota, now)
    if toolcalls.all_repeated(decided):
        new = msgspec.structs.replace(
            spent,
            phase=core.ended(spent, "failed"),
            verdict="stop",
            reason=f"round {e.round}: every tool call repeats a call id of an earlier round",
            reply_kind="failure",
            reply_text=toolcalls.REPEATED_TEXT,
            cause=e.event_id,
        )
        invalid = tuple(Observe("tool_calls", (c.call.name, "invalid")) for c in decided)
        return _ended(new, conv, invalid, rules, now)
    asks = [c for c in decided if c.decision == "ask"]
    due = now + timedelta(seconds=rules.tools.approval_timeout_s) if asks else None
    new = msgspec.structs.replace(
        spent,
        phase=Tools(decided, due),  # status: requires_action while a call waits
        reason=f"round {e.round}: {len(decided)} tool call(s), {len(asks)} waiting for approval",
        cause=e.event_id,
    )
    effects: list[Effect] = [
        Observe("tool_calls", (c.call.name, toolcalls.OUTCOME_LABEL[c.decision]))
        for c in decided
        if c.decision != "ask"  # counted when the user answers
    ]
    if asks:
        effects.append(Observe("approvals_pending", (), float(len(asks))))
    effects.append(emit(new, rules, now))
    return Step(new, None, tuple(effects), "requires_action" if asks else "tools")


def _tool_result(
    run: RunState, conv: ConvState, e: m.ToolResultPersisted, rules: Rules, now: datetime
) -> Step:
    """A call's result is stored: the round's last one starts the next model call."""
    r = e.result
    phase = phase_of(run)
    if not isinstance(phase, Tools) or r.round != run.round or r.call_id not in phase.open:
        if run.cause == e.event_id and isinstance(phase, Running):
            return _again(run, conv, rules, now)  # it started the round: publish it again
        return Step(outcome="stale")
    if r.call_id in phase.waiting:
        return Step(outcome="stale")  # no task or result of policy's was ever out for it
    calls = toolcalls.mark_done(run, r.call_id)
    if any(not c.done for c in calls):
        same = msgspec.structs.replace(phase, calls=calls)
        return Step(msgspec.structs.replace(run, phase=same), None, (), "result")
    # Every result is in: the next model call, with the tool_use and tool_result blocks.
    new = msgspec.structs.replace(
        run,
        phase=Running(now + timedelta(seconds=rules.run_deadline_s)),
        reason=f"tool round {run.round + 1}",
        round=run.round + 1,
        attempt=run.attempt + 1,
        attempts_before=run.attempt,
        cause=e.event_id,
    )
    return Step(new, None, (emit(new, rules, now),), "next_round")


def _tool_decided(
    run: RunState, e: m.ToolApprovalDecided, quota: dict[str, bool], rules: Rules, now: datetime
) -> Step:
    """The user's answer to a waiting call: it binds to the digest of the input it was shown."""
    phase = phase_of(run)
    pc = next((c for c in run.calls if c.call.id == e.call_id), None)
    if isinstance(phase, Tools) and pc is not None and pc.answered_by == e.event_id:
        # This answer decided the call (a redelivery): publish what a crash may have cut short.
        return Step(effects=(emit(run, rules, now),), outcome="stale")
    if not isinstance(phase, Tools) or pc is None or e.call_id not in phase.waiting:
        return Step(effects=(Count("approvals_ignored", "not_pending"),), outcome="not_pending")
    if run.approval_due is not None and now >= run.approval_due:
        # Too late: the round's timer ends the run (it may not have been handled yet).
        return Step(effects=(Count("approvals_ignored", "expired"),), outcome="expired")
    if e.input_digest != pc.call.input_digest:
        # Never authorizes other arguments; the call keeps waiting for a matching answer.
        return Step(effects=(Count("approvals_ignored", "digest_mismatch"),), outcome="mismatch")
    answered = toolcalls.answer(pc, e, rules, quota.get(e.call_id))
    calls = toolcalls.replace_call(run, answered)
    still = any(c.decision == "ask" for c in calls)
    # Its status is requires_action while another call still waits.
    new = msgspec.structs.replace(run, phase=Tools(calls, phase.approval_due if still else None))
    effects: list[Effect] = [
        Observe("tool_calls", (pc.call.name, toolcalls.OUTCOME_LABEL[answered.decision])),
        Observe("approvals_pending", (), -1.0),
    ]
    if pc.requested_at is not None:
        wait = max((e.decided_at - pc.requested_at).total_seconds(), 0.0)
        effects.append(Observe("approval_wait", (), wait))
    out = toolcalls.events(new, (answered,), rules, now)
    if not still:
        out.insert(0, (subjects.policy_verdict(run.project_id, run.conversation_id),
                       toolcalls.verdict(new, core.verdict_event(new))))  # fmt: skip
    effects.append(Publish(tuple(out)))
    return Step(new, None, tuple(effects), answered.decision)


def _approval_timeout(
    run: RunState, conv: ConvState, d: m.RunDeadline, rules: Rules, now: datetime
) -> Step:
    """The round's approvals are due: a call still waiting ends the run (recorded, I6)."""
    phase = phase_of(run)
    if isinstance(phase, Done) and run.cause == d.event_id:
        # It ended the run: the waiting calls' results and its reply again.
        again = _again(run, conv, rules, now)
        results = Publish(tuple(toolcalls.expired_results(run, rules)))
        return msgspec.structs.replace(again, effects=(results, *again.effects))
    if not isinstance(phase, Tools) or not phase.waiting:
        return Step(outcome="stale")
    if d.event_id != toolcalls.approval_deadline_id(run.run_id, run.round):
        return Step(outcome="stale")
    waited = toolcalls.waiting(run)
    new = msgspec.structs.replace(
        run,
        phase=core.ended(run, "failed"),  # its calls stay, as they stood
        verdict="stop",
        reason=f"no answer to {len(waited)} tool approval(s) within "
        f"{rules.tools.approval_timeout_s:g} s",
        reply_kind="failure",
        reply_text=toolcalls.APPROVAL_TIMEOUT_TEXT,
        cause=d.event_id,
    )
    expired = tuple(Observe("tool_calls", (c.call.name, "expired")) for c in waited)
    # Every waiting call gets its stored result (expired) before the run's verdict and reply.
    results = Publish(tuple(toolcalls.expired_results(new, rules)))
    return _ended(new, conv, (*expired, *_unwait(run), results), rules, now)


def _ended(
    new: RunState, conv: ConvState, before: tuple[Effect, ...], rules: Rules, now: datetime
) -> Step:
    """A run its tool phase ended: its verdict and reply (a cancelled one frees its slot now,
    another when its reply is stored)."""
    after = _after(new, conv, rules, now)[1]  # a cancelled run: its verdict and the release
    effects = (*before, Count("verdicts", new.verdict), *(after or (emit(new, rules, now),)))
    return Step(new, None, effects, new.status)


def _unwait(run: RunState) -> tuple[Effect, ...]:
    """The gauge of waiting approvals, for a run whose waiting calls will never be answered."""
    n = len(toolcalls.waiting(run)) if run.status not in runs.TERMINAL else 0
    return (Observe("approvals_pending", (), -float(n)),) if n else ()


# ---------------------------------------------------------------- helpers


def settlement(
    run: RunState, usage: m.Usage, cost_usd: float, summed: tuple[str, ...] | None = ()
) -> tuple[RunState | None, tuple[Settle | Charge, ...]]:
    """Settle the run's reservation with its real usage, once per run: the run to store (its
    reservation marked settled) and the effects, or (None, ()) when there is nothing to settle.
    ``summed``: the calls ``usage`` holds; each dead call the run's record keeps that it does
    not hold is charged on its own (None: the sum's calls are not known, and none is). Not
    folded into the ``Settle``: a step repeated after a compare-and-set conflict may find a
    call kept meanwhile, when the counters already settled the run and would take nothing more;
    a ``Charge`` counts once by its call id, whichever step carries it out."""
    r = run.reservation
    if r is None or r.settled:
        return None, ()
    # Counters must never be poisoned: negative or non-finite usage counts as nothing.
    tokens = max(0, budget.total_tokens(usage))
    cost_usd = cost_usd if math.isfinite(cost_usd) and cost_usd > 0 else 0.0
    # The agent's call that decided the run counts too (its usage came with the decision).
    tokens += max(0, budget.total_tokens(run.classification))
    extra = run.classification_cost_usd
    cost_usd += extra if math.isfinite(extra) and extra > 0 else 0.0
    held = set(summed or ())
    dead = [c for c in run.dead if c.call_id not in held] if summed is not None else []
    charges = _charges(r, dead)
    done = msgspec.structs.replace(
        r,
        settled=True,
        actual_tokens=tokens + sum(c.tokens for c in dead),
        actual_cost_usd=cost_usd + sum(c.cost_usd for c in dead),
    )
    return msgspec.structs.replace(run, reservation=done), (
        Settle(run.run_id, r, tokens, cost_usd),
        *charges,
    )


def _closing(new: RunState) -> tuple[RunState, tuple[Settle | Charge, ...]]:
    """A run that ends with no reply to store (cancelled) settles here, with what its attempts
    reported, and so does a run rejected before its turn (it never ran); any other run settles
    when its reply is stored (that settles nothing twice)."""
    if new.status != "cancelled" and not (new.status == "refused" and core.skipped(new)):
        return new, ()
    settled, effects = settlement(new, new.usage, new.cost_usd)
    return settled or new, effects


def emit(run: RunState, rules: Rules, now: datetime, resume: bool = False) -> Publish:
    """The run's verdict, and its task and timer or its reply, in this order. A redelivery
    emits the same ids again (JetStream keeps one copy)."""
    p, c = run.project_id, run.conversation_id
    verdict = core.verdict_event(run)
    phase = phase_of(run)
    if isinstance(phase, Tools):
        verdict = toolcalls.verdict(run, verdict)
    out: list[tuple[str, msgspec.Struct]] = [(subjects.policy_verdict(p, c), verdict)]
    if isinstance(phase, Tools):
        # Every call not yet answered again (the same ids), and the approvals' timer.
        out.extend(toolcalls.events(run, run.calls, rules, now))
        if phase.waiting:
            out.append((subjects.policy_deadline(p, c), toolcalls.approval_timer(run)))
    if isinstance(phase, Running) and phase.deadline is not None:
        tools = rules.tools.offered()
        task = core.task_for(run, phase.deadline, tools, rules.context_messages)
        out.append((subjects.exec_task(p, c), task))
        # The attempt's timer: an attempt with no outcome by then is retried or failed.
        timer = core.deadline_event(run, now + timedelta(seconds=rules.run_deadline_s))
        out.append((subjects.policy_deadline(p, c), timer))
    reply = core.reply_event(run)
    if reply is not None:
        out.append((subjects.policy_reply(p, c), reply))
    return Publish(tuple(out), dict(run.trace_context) if resume else None)


def _abort(run: RunState, reason: Literal["cancelled", "deadline"]) -> Abort:
    subject = subjects.exec_abort(run.project_id, run.conversation_id)
    return Abort(subject, core.abort_event(run, run.attempt, reason))


def _superseded(run: RunState) -> Cancel:
    return Cancel(f"superseded:{run.run_id}", "interrupted by a newer message", "interrupt")


def _follow(run: RunState, inp: Input) -> Continue:
    return Continue(run.conversation_id, run.run_id, inp)


def deadline_wait(d: m.RunDeadline, now: datetime) -> float | None:
    """Seconds until an attempt's timer is due; None once it is (then it is stepped)."""
    return (d.due - now).total_seconds() if now < d.due else None


def foreign_cancel(run: RunState, e: m.CancelRequested) -> str | None:
    """Why a cancel may not touch this run (another conversation or user), or None."""
    if (run.conversation_id, run.project_id, run.user_id) != (
        e.conversation_id,
        e.project_id,
        e.user_id,
    ):
        return f"cancel of run {e.run_id} from another conversation or user"
    return None


# ---------------------------------------------------------------- admission (rate and budgets)
#
# Before a freshly decided run is recorded, its limits are applied: the user's rate windows for
# every message, then (for an approval) the day budgets and the runs in flight. Both are counted
# by compare-and-set on KV counters, so the rules are steps of their own: ``admit_limits``
# takes the proposed run and what the last counting said, and returns the run as it stands and
# the one counting still to do (``CountRate``, ``ReserveBudget``) or none (the run is final).


class Proposed(msgspec.Struct, frozen=True, tag="proposed"):
    """A run just decided, its limits not applied yet."""


class RateCounted(msgspec.Struct, frozen=True, tag="rate_counted"):
    """The message is counted in the user's windows: allowed, or which window is full."""

    allowed: bool
    window: str = ""
    limit: int = 0
    retry_after_s: int = 0
    counts: dict[str, int] = msgspec.field(default_factory=dict)


class Reserved(msgspec.Struct, frozen=True, tag="reserved"):
    """The budgets' answer: None (no cap or concurrency limit applies), or the plan and, when
    it fits, the reservation held."""

    plan: budget.Plan | None = None
    reservation: core.Reservation | None = None


AdmissionInput = Proposed | RateCounted | Reserved


class CountRate(msgspec.Struct, frozen=True, tag="count_rate"):
    """Count the message in its user's minute and hour windows (once per message id)."""

    project_id: str
    user_id: str
    message_id: str
    limits: m.Limits


class ReserveBudget(msgspec.Struct, frozen=True, tag="reserve_budget"):
    """Hold the run's estimate in its day budgets and a slot of the runs in flight."""


AdmissionEffect = CountRate | ReserveBudget | Count


class Admission(msgspec.Struct, frozen=True):
    """The run as the limits leave it so far, the metrics to count, and the counting still to
    do (``next``; None: ``run`` is what is recorded)."""

    run: RunState
    effects: tuple[Count, ...] = ()
    next: CountRate | ReserveBudget | None = None


def admit_limits(run: RunState, inp: AdmissionInput, rules: Rules, now: datetime) -> Admission:
    """One step of applying a project's limits to a proposed run (see the section's note)."""
    limits = rules.limits
    match inp:
        case Proposed():
            if limits.user_messages_per_minute is None and limits.user_messages_per_hour is None:
                # No rate windows: the counts stay zero, the budgets come next.
                return _after_rate(
                    msgspec.structs.replace(run, limits=m.LimitsSnapshot(limits=limits))
                )
            return Admission(
                run, next=CountRate(run.project_id, run.user_id, run.message_id, limits)
            )
        case RateCounted():
            snapshot = m.LimitsSnapshot(
                limits=limits,
                user_messages_minute=inp.counts.get("m", 0),
                user_messages_hour=inp.counts.get("h", 0),
            )
            if not inp.allowed:
                reason, text = budget.rate_refusal(inp.window, inp.limit, inp.retry_after_s, now)
                stopped = msgspec.structs.replace(core.stop(run, reason, text), limits=snapshot)
                return Admission(stopped, (Count("rate_limited", inp.window),))
            return _after_rate(msgspec.structs.replace(run, limits=snapshot))
        case Reserved(plan=None):
            return Admission(run)
        case Reserved(plan=plan, reservation=reservation):
            assert plan is not None
            counted = run.limits or m.LimitsSnapshot(limits=limits)
            snapshot = msgspec.structs.replace(
                plan.snapshot,
                user_messages_minute=counted.user_messages_minute,
                user_messages_hour=counted.user_messages_hour,
            )
            if reservation is None:
                if plan.scope == "concurrency":
                    reason, text = budget.concurrency_refusal(limits.max_concurrent_runs or 0)
                else:
                    reason, text = budget.budget_refusal(plan.scope, now)
                stopped = msgspec.structs.replace(core.stop(run, reason, text), limits=snapshot)
                return Admission(stopped, (Count("exhausted", plan.scope),))
            reason, verdict = run.reason, run.verdict
            if plan.downgraded:
                reason = f"{reason}; past {rules.downgrade_at:.0%} of a daily cap: {plan.model}"
                verdict = "downgrade"
            approved = msgspec.structs.replace(
                run,
                model=plan.model,
                prices=rules.models.get(plan.model, m.Prices()),
                verdict=verdict,
                reason=reason,
                reservation=reservation,
                limits=snapshot,
            )
            return Admission(approved)
    raise AssertionError(f"unknown admission input {inp!r}")  # pragma: no cover


def _after_rate(run: RunState) -> Admission:
    """Past the rate windows: only an approval goes on to the budgets."""
    if run.status != "running":
        return Admission(run)
    return Admission(run, next=ReserveBudget())
