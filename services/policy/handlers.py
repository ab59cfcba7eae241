"""Policy's inbound edge: advice, failures, cancels, deadlines and stored replies in; verdicts,
tasks, aborts and replies out."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime, timedelta
from typing import Literal

import msgspec
from nats.aio.msg import Msg

from services.policy import budget, core
from services.policy.adapters import Aborts, Conversations, Limiter, Runs
from services.policy.policyfile import Book
from shared import messages as m
from shared import subjects, tracing
from shared.bus import Bus
from shared.errors import BadData, Deferred, RetryLater
from shared.metrics import ServiceMetrics


class Handlers:
    def __init__(
        self,
        bus: Bus,
        runs: Runs,
        conversations: Conversations,
        rules: core.Rules,
        metrics: ServiceMetrics,
        aborts: Aborts | None = None,
        *,
        limiter: Limiter | None = None,
        book: Book | None = None,
    ) -> None:
        self.bus = bus
        self.runs = runs
        self.conversations = conversations
        self.rules = rules
        self.aborts = aborts
        self.limiter = limiter
        self.book = book  # the policy file's rules; replaced when the file changes
        self.rate_limited = metrics.counter(
            "rate_limited_total",
            "Messages stopped by a per-user rate limit, by window.",
            ("window",),
        )
        self.reserved_tokens = metrics.counter(
            "budget_reserved_tokens_total", "Tokens reserved for approved runs (estimates)."
        )
        self.settled_tokens = metrics.counter(
            "budget_settled_tokens_total", "Tokens settled against budgets (real usage)."
        )
        self.exhausted = metrics.counter(
            "budget_exhausted_total",
            "Messages stopped because a budget or the runs-in-flight limit was exhausted, by scope.",
            ("scope",),
        )
        self.verdicts = metrics.counter(
            "verdicts_total", "Verdicts on runs, by kind.", ("verdict",)
        )
        self.retries = metrics.counter(
            "retries_total",
            "New attempts after an executor failure, by error class.",
            ("error_class",),
        )
        self.cancels = metrics.counter(
            "cancels_total",
            "Runs cancelled, by how (user or interrupt; queued or in flight).",
            ("how",),
        )
        self.deadlines = metrics.counter(
            "deadlines_missed_total", "Attempts with no outcome by their deadline."
        )
        self.double_texts = metrics.counter(
            "double_texts_total",
            "Messages that arrived while an earlier run of their conversation was unfinished, "
            "by strategy.",
            ("strategy",),
        )

    def rules_for(self, project: str) -> core.Rules:
        """The project's rules: from the policy file when there is one, else the env defaults."""
        return self.rules if self.book is None else self.book.rules_for(project)

    async def decision(self, e: m.AgentDecision, _msg: Msg) -> str:
        rules, now = self.rules_for(e.project_id), datetime.now(UTC)
        limited = self.limiter is not None and core.has_limits(rules)
        existing = await self.runs.find(core.run_id_for(e.message_id)) if limited else None
        known: tuple[core.ConvState, int] | None = None
        if existing is not None:
            # Decided before (or cancelled before its decision): never count or reserve again,
            # only finish admitting it.
            state, created = existing, False
        else:
            proposed = core.decide(e, rules, now)
            proposed.trace_context = tracing.carrier()
            proposed.classification, proposed.classification_cost_usd = e.usage, e.cost_usd
            if limited:
                proposed = await self._limit(proposed, rules, now)
            # The conversation's record is read while the run is created (one round trip less);
            # admitting the run is a compare-and-set on what was read.
            created_run, read = await asyncio.gather(
                self.runs.create(proposed),
                self.conversations.get(e.conversation_id),
                return_exceptions=True,
            )
            if isinstance(created_run, BaseException):
                raise created_run
            state, created = created_run
            if created:
                self.verdicts.labels(state.verdict).inc()
                if state.reservation is not None:
                    self.reserved_tokens.inc(state.reservation.tokens)
            elif proposed.reservation is not None and state.reservation is None:
                # Another replica decided this run first without a hold (or the user cancelled
                # it before its decision): give ours back.
                await self.limiter.release(proposed.run_id, proposed.reservation.keys)  # type: ignore[union-attr]
            # A failed read is raised only now: a hold this delivery will not keep is released
            # first (its redelivery finds the run decided and would never give it back).
            if isinstance(read, BaseException):
                raise read
            known = read
        if not state.position:  # a run cancelled before its decision: now it has its place
            state = msgspec.structs.replace(state, position=e.position)
        # A redelivered decision admits the same run again; what it emits is deduplicated.
        admission = await self._admit(state, known)
        return f"{state.verdict}:{admission}" if created else f"existing:{admission}"

    async def _limit(self, state: core.RunState, rules: core.Rules, now: datetime) -> core.RunState:
        """Rate windows for every message, then budgets and runs in flight for an approval."""
        assert self.limiter is not None
        limits = rules.limits
        rate = None
        if limits.user_messages_per_minute is not None or limits.user_messages_per_hour is not None:
            rate = await self.limiter.count_message(
                state.project_id, state.user_id, state.message_id, limits, now
            )
        snapshot = m.LimitsSnapshot(
            limits=limits,
            user_messages_minute=rate.counts.get("m", 0) if rate else 0,
            user_messages_hour=rate.counts.get("h", 0) if rate else 0,
        )
        if rate is not None and not rate.allowed:
            self.rate_limited.labels(rate.window).inc()
            reason, text = budget.rate_refusal(rate.window, rate.limit, rate.retry_after_s, now)
            return msgspec.structs.replace(core.stop(state, reason, text), limits=snapshot)
        if state.status != "running":
            return msgspec.structs.replace(state, limits=snapshot)
        reserved = await self.limiter.reserve(state, rules, now)
        if reserved is None:
            return msgspec.structs.replace(state, limits=snapshot)
        plan, reservation = reserved
        snapshot = msgspec.structs.replace(
            plan.snapshot,
            user_messages_minute=snapshot.user_messages_minute,
            user_messages_hour=snapshot.user_messages_hour,
        )
        if reservation is None:
            self.exhausted.labels(plan.scope).inc()
            if plan.scope == "concurrency":
                reason, text = budget.concurrency_refusal(limits.max_concurrent_runs or 0)
            else:
                reason, text = budget.budget_refusal(plan.scope, now)
            return msgspec.structs.replace(core.stop(state, reason, text), limits=snapshot)
        reason, verdict = state.reason, state.verdict
        if plan.downgraded:
            reason = f"{reason}; past {rules.downgrade_at:.0%} of a daily cap: {plan.model}"
            verdict = "downgrade"
        return msgspec.structs.replace(
            state,
            model=plan.model,
            prices=rules.models.get(plan.model, m.Prices()),
            verdict=verdict,
            reason=reason,
            reservation=reservation,
            limits=snapshot,
        )

    async def settle(
        self, state: core.RunState, usage: m.Usage, cost_usd: float
    ) -> core.RunState | None:
        """Settle the run's reservation with its real usage, once per run (idempotent).

        Call it whenever a run reaches a terminal status (completed, failed, cancelled, …);
        returns the state to store (its reservation marked settled), None if nothing changed.
        """
        r = state.reservation
        if r is None or r.settled or self.limiter is None:
            return None
        # Counters must never be poisoned: negative or non-finite usage counts as nothing.
        tokens = max(0, budget.total_tokens(usage))
        cost_usd = cost_usd if math.isfinite(cost_usd) and cost_usd > 0 else 0.0
        # The agent's call that decided the run counts too (its usage came with the decision).
        tokens += max(0, budget.total_tokens(state.classification))
        extra = state.classification_cost_usd
        cost_usd += extra if math.isfinite(extra) and extra > 0 else 0.0
        if await self.limiter.settle(state.run_id, r, tokens, cost_usd):
            self.settled_tokens.inc(tokens)
        done = msgspec.structs.replace(
            r, settled=True, actual_tokens=tokens, actual_cost_usd=cost_usd
        )
        return msgspec.structs.replace(state, reservation=done)

    async def _closing(self, new: core.RunState) -> core.RunState:
        """A run that ends with no reply to store (cancelled) settles its reservation here, with
        what its attempts reported, and so does a run rejected before its turn (it never ran);
        any other run settles when its reply is stored (that settles nothing twice)."""
        if new.status != "cancelled" and not (new.status == "refused" and new.out_of_turn):
            return new
        return await self.settle(new, new.usage, new.cost_usd) or new

    async def _settle_stored(self, state: core.RunState) -> None:
        """Finish a settlement a crash cut short (the cancelled state stored, its hold not)."""
        r = state.reservation
        if r is None or r.settled or self.limiter is None:
            return
        current, revision = await self.runs.get(state.run_id)
        settled = await self._closing(current)
        if settled is not current:
            await self.runs.update(settled, revision)

    async def failure(self, f: m.ExecFailed, _msg: Msg) -> str:
        state, revision = await self.runs.get(f.run_id)
        now = datetime.now(UTC)
        if state.cause == f.event_id and state.retry_at is not None:
            return await self._start_retry(state, revision, f.attempt, now)
        new = core.on_failure(state, f, self.rules_for(state.project_id), now)
        if new is None:
            if core.caused_by(state, f):
                await self._emit(state)
                await self._after(state)
            return "stale"
        new = await self._closing(core.spent(new, f))
        await self.runs.update(new, revision)
        return await self._failed(new, f.error_class)

    async def deadline(self, d: m.RunDeadline, _msg: Msg) -> str:
        """A timer per attempt: handed back by the server until due, then checked."""
        now = datetime.now(UTC)
        if now < d.due:
            raise Deferred("deadline not reached", (d.due - now).total_seconds())
        state, revision = await self.runs.get(d.run_id)
        if state.cause == d.event_id and state.retry_at is not None:
            return await self._start_retry(state, revision, d.attempt, now)
        new = core.on_deadline(state, d, self.rules_for(state.project_id), now)
        if new is None:
            if state.cause == d.event_id:
                await self._emit(state)
                await self._after(state)
            return "stale"
        new = await self._closing(new)
        await self.runs.update(new, revision)
        self.deadlines.inc()
        # The late call may still be streaming somewhere: stop it, its usage still counts.
        await self._abort(state, "deadline")
        return await self._failed(new, "timeout")

    async def cancel(self, e: m.CancelRequested, _msg: Msg) -> str:
        """A user's cancel: policy decides whether there is anything left to stop."""
        if e.run_id != core.run_id_for(e.message_id):
            raise BadData(f"cancel names run {e.run_id} but message {e.message_id}")
        try:
            state, revision = await self.runs.get(e.run_id)
        except BadData:
            # Cancelled before policy decided on it: the decision will find this record.
            state, created = await self.runs.create(core.tombstone(e))
            if created:
                self.cancels.labels("before_decision").inc()
                await self._emit(state)
                return "cancelled"
            state, revision = await self.runs.get(e.run_id)
        if (state.conversation_id, state.project_id, state.user_id) != (
            e.conversation_id,
            e.project_id,
            e.user_id,
        ):
            raise BadData(f"cancel of run {e.run_id} from another conversation or user")
        return await self._cancel(state, revision, e.event_id, "cancelled by the user", "user")

    async def reply_persisted(self, e: m.AssistantMessagePersisted, _msg: Msg) -> str:
        state, revision = await self.runs.get(e.run_id)
        new = core.on_reply_persisted(state, e)
        settled = await self.settle(new or state, e.usage, e.cost_usd)
        new = settled or new
        if new is not None:
            await self.runs.update(new, revision)
        # Done (also on a redelivery): the conversation's next run gets its turn.
        await self._release(state.conversation_id, e.run_id)
        return new.status if new is not None else "unchanged"

    async def _cancel(
        self, state: core.RunState, revision: int, cause: str, why: str, how: str
    ) -> str:
        conv, _ = await self.conversations.get(state.conversation_id)
        active = conv.active == state.run_id
        # A call is in flight once the run started and no retry is waiting for its backoff.
        in_flight = active and conv.started and state.status == "running"
        in_flight = in_flight and state.retry_at is None
        new = core.cancel(state, in_flight, active, cause, why)
        if new is None:
            # Finished, or asked already (a redelivery): finish what the first handling began.
            await self._after(state)
            return "unchanged"
        new = await self._closing(new)
        await self.runs.update(new, revision)
        if active and new.status == "cancelled" and state.status == "running":
            # Had it got as far as publishing its task (a crash before it was marked started),
            # the executor finds the marker and never calls the model.
            await self._abort(state, "cancelled")
        if new.status == "cancelled":
            self.cancels.labels(f"{how}_queued" if not active else f"{how}_waiting").inc()
        else:
            self.cancels.labels(f"{how}_in_flight").inc()
        await self._after(new)
        return new.status if new.status == "cancelled" else "cancelling"

    async def _after(self, state: core.RunState) -> None:
        """What a run's cancel state still needs: a cancelled run frees its conversation's slot
        (if it holds it; a queued one is skipped at its turn); a cancel in flight reaches the
        executors and has a deadline to end it should no executor answer."""
        if state.status == "cancelled":
            await self._settle_stored(state)
            await self._emit(state)
            conv, _ = await self.conversations.get(state.conversation_id)
            if conv.active == state.run_id:
                await self._release(state.conversation_id, state.run_id)
        elif state.status == "running" and state.cancel_requested:
            await self._emit(state)
            await self._abort(state, "cancelled")
            rules = self.rules_for(state.project_id)
            due = datetime.now(UTC) + timedelta(seconds=rules.run_deadline_s)
            event = core.deadline_event(state, due)
            p, c = state.project_id, state.conversation_id
            await self.bus.publish(subjects.policy_deadline(p, c), event, msg_id=event.event_id)

    async def _abort(self, state: core.RunState, reason: Literal["cancelled", "deadline"]) -> None:
        """Stop the run's current call: a marker any executor checks before calling the model,
        then a core message every executor hears (for the calls already streaming)."""
        if self.aborts is not None:
            await self.aborts.mark(state.run_id, state.attempt)
        event = core.abort_event(state, state.attempt, reason)
        await self.bus.nc.publish(
            subjects.exec_abort(state.project_id, state.conversation_id), m.encode(event)
        )

    async def _failed(self, new: core.RunState, error_class: str) -> str:
        """After an attempt failed: the retry waits for its backoff; a final state is emitted."""
        if new.status == "running":
            self.retries.labels(error_class).inc()
            await self._emit(new)  # run.status of the new attempt: clients drop partial text
            assert new.retry_at is not None
            wait = (new.retry_at - datetime.now(UTC)).total_seconds()
            raise Deferred("retry after backoff", max(wait, 0.0))
        self.verdicts.labels(new.verdict).inc()
        await self._emit(new)
        await self._after(new)
        return new.status

    async def _start_retry(
        self, state: core.RunState, revision: int, failed_attempt: int, now: datetime
    ) -> str:
        """The event that scheduled a retry is back: start the attempt, or wait on if early."""
        due = core.retry_due(state, failed_attempt, self.rules_for(state.project_id), now)
        if due is None:
            assert state.retry_at is not None
            wait = (state.retry_at - now).total_seconds()
            raise Deferred("retry not due yet", max(wait, 0.0))
        await self.runs.update(due, revision)
        await self._emit(due)
        return "retry"

    async def _admit(
        self, state: core.RunState, known: tuple[core.ConvState, int] | None = None
    ) -> core.Admission:
        """Start the run if its conversation is free, else queue it behind the active one.

        ``known``: the conversation's record as read a moment ago; if it changed since, the
        compare-and-set fails and the record is read again."""
        if known is None or known[0].conversation_id != state.conversation_id:
            known = None
            conv, revision = await self.conversations.get(state.conversation_id)
        else:
            conv, revision = known
        changed, admission = core.admit(conv, state.run_id, state.position)
        if changed is not None:
            try:
                revision = await self.conversations.put(changed, revision)
            except RetryLater:
                if known is None:
                    raise
                return await self._admit(state)
            conv = changed
        interrupt = self.rules_for(state.project_id).double_texting == "interrupt"
        if admission == "start":
            if interrupt and state.status == "running" and core.superseded(conv, state.position):
                # Its turn came, but a newer message already waits: it is interrupted unrun.
                current, revision = await self.runs.get(state.run_id)
                await self._cancel(
                    current,
                    revision,
                    f"superseded:{state.run_id}",
                    "interrupted by a newer message",
                    "interrupt",
                )
            else:
                await self._start(state, conv, revision)
        elif admission == "queued":
            if state.out_of_turn:
                await self._emit(state)  # finished before its turn: it will be skipped
                return admission
            if await self._double_text(state, conv):
                return admission
            event = core.queued_event(state, len(conv.pending))
            p, c = state.project_id, state.conversation_id
            await self.bus.publish(subjects.policy_verdict(p, c), event, msg_id=event.event_id)
        return admission

    async def _double_text(self, state: core.RunState, conv: core.ConvState) -> bool:
        """A message while an earlier one is unfinished, by strategy; True when it was handled
        (rejected, or superseded), False when it simply waits (``enqueue``, ``interrupt``)."""
        strategy = self.rules_for(state.project_id).double_texting
        if strategy == "reject":
            state, revision = await self.runs.get(state.run_id)
            if state.status != "running":
                # Already a refusal or a question: it keeps its place and replies at its turn.
                return state.out_of_turn
            # It never runs: its hold is given back now, not when its refusal is stored.
            new = await self._closing(core.reject(state))
            await self.runs.update(new, revision)
            self.double_texts.labels("reject").inc()
            self.verdicts.labels(new.verdict).inc()
            await self._emit(new)
            return True
        if strategy == "interrupt":
            if state.limited:
                # Refused by a limit: it interrupts nothing and replies at its turn.
                self.double_texts.labels("interrupt_limited").inc()
                return False
            if core.superseded(conv, state.position):
                # A newer message is already here: this one is interrupted before it ran.
                current, revision = await self.runs.get(state.run_id)
                await self._cancel(
                    current,
                    revision,
                    f"superseded:{state.run_id}",
                    "interrupted by a newer message",
                    "interrupt",
                )
                return True
            self.double_texts.labels("interrupt").inc()
            for run_id in core.ahead_of(conv, state.position):
                earlier, revision = await self.runs.get(run_id)
                await self._cancel(
                    earlier,
                    revision,
                    f"interrupt:{state.run_id}",
                    "interrupted by a newer message",
                    "interrupt",
                )
            return False
        self.double_texts.labels("enqueue").inc()
        return False

    async def _release(self, conversation_id: str, run_id: str) -> None:
        conv, revision = await self.conversations.get(conversation_id)
        nxt = core.release(conv, run_id)
        if nxt is None:
            # Already released (a redelivery): finish starting the next run if a crash cut it off.
            if conv.active is not None and not conv.started:
                await self._start((await self.runs.get(conv.active))[0], conv, revision)
            return
        revision = await self.conversations.put(nxt, revision)
        if nxt.active is not None:
            await self._start((await self.runs.get(nxt.active))[0], nxt, revision)

    async def _start(self, state: core.RunState, conv: core.ConvState, revision: int) -> None:
        """Emit the run's verdict and task (or reply), then record that it started.

        ``conv`` is the record (at ``revision``) that gave this run the slot."""
        # Started by the previous run's end, it still continues its own message's trace.
        with tracing.resumed(state.trace_context, "policy start run"):
            await self._emit(state)
        if state.out_of_turn or state.status == "cancelled":
            # Finished before its turn (cancelled while queued, or rejected): pass the slot on.
            await self._release(conv.conversation_id, state.run_id)
            return
        await self._mark_started(conv, revision, state.run_id)

    async def _mark_started(self, conv: core.ConvState, revision: int, run_id: str) -> None:
        """Record that the run holding the slot started. The record that gave it the slot is
        changed by compare-and-set; only if someone changed it since is it read again."""
        for fresh in (False, True):
            if fresh:
                conv, revision = await self.conversations.get(conv.conversation_id)
            if conv.active != run_id or conv.started:
                return
            try:
                await self.conversations.put(core.mark_started(conv), revision)
                return
            except RetryLater:
                if fresh:
                    raise

    async def _emit(self, state: core.RunState) -> None:
        """The run's verdict, and its task and timer or its reply: published in this order and
        acked together (one round trip). A redelivery emits the same ids again."""
        p, c = state.project_id, state.conversation_id
        verdict = core.verdict_event(state)
        out: list[tuple[str, msgspec.Struct, str]] = [
            (subjects.policy_verdict(p, c), verdict, verdict.event_id)
        ]
        if state.status == "running" and state.deadline is not None and not state.cancel_requested:
            task = core.task_for(state, state.deadline)
            out.append((subjects.exec_task(p, c), task, task.event_id))
            # The attempt's timer: an attempt with no outcome by then is retried or failed.
            rules = self.rules_for(state.project_id)
            due = datetime.now(UTC) + timedelta(seconds=rules.run_deadline_s)
            timer = core.deadline_event(state, due)
            out.append((subjects.policy_deadline(p, c), timer, timer.event_id))
        reply = core.reply_event(state)
        if reply is not None:
            out.append((subjects.policy_reply(p, c), reply, reply.event_id))
        await self.bus.publish_all(out)
