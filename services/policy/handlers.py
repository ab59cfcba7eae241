"""Policy's inbound edge: advice, failures and stored replies in; verdicts, tasks and replies out."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import msgspec
from nats.aio.msg import Msg

from services.policy import budget, core
from services.policy.adapters import Conversations, Limiter, Runs
from services.policy.policyfile import Book
from shared import messages as m
from shared import subjects, tracing
from shared.bus import Bus
from shared.metrics import ServiceMetrics


class Handlers:
    def __init__(
        self,
        bus: Bus,
        runs: Runs,
        conversations: Conversations,
        rules: core.Rules,
        metrics: ServiceMetrics,
        *,
        limiter: Limiter | None = None,
        book: Book | None = None,
    ) -> None:
        self.bus = bus
        self.runs = runs
        self.conversations = conversations
        self.rules = rules
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

    def rules_for(self, project: str) -> core.Rules:
        """The project's rules: from the policy file when there is one, else the env defaults."""
        return self.rules if self.book is None else self.book.rules_for(project)

    async def decision(self, e: m.AgentDecision, _msg: Msg) -> str:
        rules, now = self.rules_for(e.project_id), datetime.now(UTC)
        limited = self.limiter is not None and core.has_limits(rules)
        if limited:
            existing = await self.runs.find(core.run_id_for(e.message_id))
            if existing is not None:
                # Decided before: never count or reserve again, only finish admitting it.
                return f"existing:{await self._admit(existing)}"
        proposed = core.decide(e, rules, now)
        proposed.trace_context = tracing.carrier()
        if limited:
            proposed = await self._limit(proposed, rules, now)
        state, created = await self.runs.create(proposed)
        if created:
            self.verdicts.labels(state.verdict).inc()
            if state.reservation is not None:
                self.reserved_tokens.inc(state.reservation.tokens)
        elif proposed.reservation is not None and state.reservation is None:
            # Another replica decided this run first without a hold: give ours back.
            await self.limiter.release(proposed.run_id, proposed.reservation.keys)  # type: ignore[union-attr]
        # A redelivered decision admits the same run again; what it emits is deduplicated.
        admission = await self._admit(state)
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
        if await self.limiter.settle(state.run_id, r, tokens, cost_usd):
            self.settled_tokens.inc(tokens)
        done = msgspec.structs.replace(
            r, settled=True, actual_tokens=tokens, actual_cost_usd=cost_usd
        )
        return msgspec.structs.replace(state, reservation=done)

    async def failure(self, f: m.ExecFailed, _msg: Msg) -> str:
        state, revision = await self.runs.get(f.run_id)
        new = core.on_failure(state, f, self.rules, datetime.now(UTC))
        if new is None:
            if core.caused_by(state, f):
                await self._emit(state)
            return "stale"
        await self.runs.update(new, revision)
        if new.status == "running":
            self.retries.labels(f.error_class).inc()
        else:
            self.verdicts.labels(new.verdict).inc()
        await self._emit(new)
        return "retry" if new.status == "running" else "failed"

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

    async def _admit(self, state: core.RunState) -> core.Admission:
        """Start the run if its conversation is free, else queue it behind the active one."""
        conv, revision = await self.conversations.get(state.conversation_id)
        changed, admission = core.admit(conv, state.run_id, state.position)
        if changed is not None:
            await self.conversations.put(changed, revision)
            conv = changed
        if admission == "start":
            await self._start(state, conv)
        elif admission == "queued":
            event = core.queued_event(state, len(conv.pending))
            p, c = state.project_id, state.conversation_id
            await self.bus.publish(subjects.policy_verdict(p, c), event, msg_id=event.event_id)
        return admission

    async def _release(self, conversation_id: str, run_id: str) -> None:
        conv, revision = await self.conversations.get(conversation_id)
        nxt = core.release(conv, run_id)
        if nxt is None:
            # Already released (a redelivery): finish starting the next run if a crash cut it off.
            if conv.active is not None and not conv.started:
                await self._start((await self.runs.get(conv.active))[0], conv)
            return
        await self.conversations.put(nxt, revision)
        if nxt.active is not None:
            await self._start((await self.runs.get(nxt.active))[0], nxt)

    async def _start(self, state: core.RunState, conv: core.ConvState) -> None:
        # ``conv`` is the record that gave this run the slot; it is read again before marking.
        """Emit the run's verdict and task (or reply), then record that it started."""
        # Started by the previous run's end, it still continues its own message's trace.
        with tracing.resumed(state.trace_context, "policy start run"):
            await self._emit(state)
        latest, revision = await self.conversations.get(conv.conversation_id)
        if latest.active == state.run_id and not latest.started:
            await self.conversations.put(core.mark_started(latest), revision)

    async def _emit(self, state: core.RunState) -> None:
        p, c = state.project_id, state.conversation_id
        verdict = core.verdict_event(state)
        await self.bus.publish(subjects.policy_verdict(p, c), verdict, msg_id=verdict.event_id)
        if state.status == "running" and state.deadline is not None:
            task = core.task_for(state, state.deadline)
            await self.bus.publish(subjects.exec_task(p, c), task, msg_id=task.event_id)
        reply = core.reply_event(state)
        if reply is not None:
            await self.bus.publish(subjects.policy_reply(p, c), reply, msg_id=reply.event_id)
