"""The agent's inbound edge: persisted user message → classification → agent.decision."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import nats.errors
from nats.aio.msg import Msg

from services.agent import core
from services.agent.adapters import CallFailed, Classifier
from services.agent.config import Settings
from shared import deadcalls, estimate, runs, subjects, wiring
from shared import messages as m
from shared.bus import Bus
from shared.errors import BadData, Deferred, DependencyDown
from shared.history import History
from shared.metrics import ServiceMetrics


class Handlers:
    def __init__(
        self,
        bus: Bus,
        history: History,
        classifier: Classifier,
        settings: Settings,
        metrics: ServiceMetrics,
    ) -> None:
        self.bus = bus
        self.history = history
        self.classifier = classifier
        self.settings = settings
        self.fallbacks = metrics.counter(
            "fallback_decisions_total", "Decisions made by rules instead of the model.", ("reason",)
        )
        self.model_seconds = metrics.histogram("model_seconds", "Classification call latency.")
        self.estimated = metrics.counter(
            "estimated_calls_total",
            "Classification calls an earlier agent died in, billed by estimate.",
        )
        self.unread = metrics.counter(
            "estimate_reads_failed_total",
            "Redelivered messages whose earlier calls' records could not be read (the broker "
            "refused or did not answer): those calls, if any died, stay unbilled.",
        )
        self.timers_late = metrics.counter(
            "settle_timers_late_total",
            "Settle timers run so long after their due time (no agent ran them) that the calls' "
            "records may be gone: a call of theirs that died may stay unbilled.",
        )
        self.timers_failed = metrics.counter(
            "settle_timers_failed_total",
            "Redelivered messages whose settle timer could not be published: a call of theirs "
            "that dies after another delivery's decision was acked stays unbilled.",
        )

    async def user_message(self, e: m.UserMessagePersisted, msg: Msg) -> str:
        began = time.monotonic()
        delivery = estimate.delivery(msg.metadata.num_delivered, msg.headers)
        if delivery > 1:
            turns, dead, _ = await asyncio.gather(
                self._context(e), self._unsettled(e, delivery), self._settle_later(e, delivery)
            )
        else:
            # A first delivery has no earlier calls and sends no timer: the history alone.
            turns, dead = await self._context(e), []
        # Calls an earlier delivery's agent died in are billed first, by estimate.
        for call in dead:
            await self._bill(e, call.call_id, estimate.AGENT_OUTCOME, call.usage, estimated=True)
        transcript = core.render_transcript(
            core.select_context(turns, self.settings.context_token_budget)
        )
        # Each delivery that reaches the model is a call of its own, billed on its own.
        call_id = core.call_id(e.message_id, delivery)
        decision, reason, usage, late = await self._classify(
            e, transcript, call_id, delivery, began
        )
        prices = self.settings.prices()
        # The usage goes out before the decision: once policy acts on the decision, the call it
        # came from is already on its way to the persister (which alone writes the database).
        outcome = reason.split(":")[0] if reason.startswith("model_error") else "completed"
        await self._bill(e, call_id, outcome, usage)
        if decision is None:
            decision = core.fallback(e.content)
            self.fallbacks.labels(reason.split(":")[0]).inc()
        out = m.AgentDecision(
            event_id=runs.decision_id(e.message_id),
            message_id=e.message_id,
            conversation_id=e.conversation_id,
            project_id=e.project_id,
            causation_id=e.event_id,
            user_id=e.user_id,
            decision=decision,
            fallback=bool(reason),
            fallback_reason=reason[:500],
            position=e.position,
            call_id=call_id,
            usage=usage,
            cost_usd=usage.cost_usd(prices),
        )
        decided = self.bus.publish(
            subjects.agent_decision(e.project_id, e.conversation_id), out, msg_id=out.event_id
        )
        if delivery > 1 or late or time.monotonic() - began >= self.settings.settle_late_s:
            # The call's usage went out: a timer (its own, or a redelivery's that overlapped a
            # long delivery: it ran an ack_wait at least) has nothing to estimate for it.
            work = core.work_id(e.message_id)
            await asyncio.gather(
                decided, deadcalls.write_record(self.bus, call_id, work, "finished", usage)
            )
        else:
            await decided
        return "fallback" if reason else "classified"

    async def user_message_exhausted(self, e: m.UserMessagePersisted, msg: Msg) -> None:
        """A delivery past the bound: the message is dead-lettered unhandled, so no later
        delivery would bill the calls its earlier agents died in. Bill them here, by estimate,
        as a redelivery does (the call ids keep one row each)."""
        delivery = estimate.delivery(msg.metadata.num_delivered, msg.headers)
        failed: list[BaseException] = []
        for call in await self._unsettled(e, delivery):
            try:
                await self._bill(
                    e, call.call_id, estimate.AGENT_OUTCOME, call.usage, estimated=True
                )
            except (nats.errors.Error, TimeoutError, OSError) as exc:
                failed.append(exc)  # the other calls are still billed
        if failed:
            raise failed[0]  # logged by the consumer (exhausted_hook_failed)

    async def settle(self, t: m.ClassificationSettle, msg: Msg) -> str:
        """``agent.settle`` (durable ``agent-settle``): a redelivered message's timer, handed
        back until due; then each call it names that started and never billed is billed by
        estimate (a call whose exact usage went out keeps it: the persister keys rows by call
        id, and an estimate never replaces an exact row)."""
        now = datetime.now(UTC)
        if (why := core.settle_refusal(t, wiring.AGENT_IN.max_deliver, now)) is not None:
            raise BadData(why)
        if msg.subject != subjects.agent_settle(t.project_id, t.conversation_id):
            raise BadData("a settle timer for another conversation than its subject's")
        wait = core.settle_wait(t, now)
        if wait is not None:
            raise Deferred("settle timer not due", wait)
        if now - t.due > core.SETTLE_RECORDS_KEPT:
            # No agent ran it for about the records' age: those gone read as never started.
            self.timers_late.inc()
            self.bus.log.warning("settle_timer_late", due=t.due.isoformat(), calls=len(t.calls))
        found = await deadcalls.unsettled(
            self.bus.js, t.project_id, t.conversation_id, t.calls, pushes=False
        )
        for call in found:
            self.estimated.inc()
            self.bus.log.warning(
                "call_estimated", call_id=call.call_id, input_tokens=call.usage.input_tokens
            )
            await self._bill(t, call.call_id, estimate.AGENT_OUTCOME, call.usage, estimated=True)
        return f"settled:{len(found)}"

    async def _settle_later(
        self, e: m.UserMessagePersisted, delivery: int, late: bool = False
    ) -> None:
        """A redelivered message's agent asks itself, before its call, to bill later the
        calls of this delivery and the earlier ones that died by then. Deliveries can overlap: one
        that outlasted ``ack_wait`` runs on while the next one reads its record, before it wrote
        it; if that one then dies after its call and another delivery's decision is acked,
        nothing is delivered again, and only this timer bills it (docs/decisions.md, "An agent's
        overlapping deliveries"). A first delivery has none: a redelivery reads its record.
        ``late``: a call whose record comes after a redelivery's timer may have read it sends
        one for itself alone, before its record. Best effort, like the call's record: counted
        when it cannot be published."""
        if delivery <= 1 and not late:
            return
        due = datetime.now(UTC) + timedelta(
            seconds=self.settings.model_timeout_s + self.settings.settle_grace_s
        )
        calls = core.settle_calls(e.message_id, delivery)
        if late:
            calls = calls[-1:]
        timer = m.ClassificationSettle(
            event_id=runs.classification_settle_id(calls[-1], late),
            message_id=e.message_id,
            conversation_id=e.conversation_id,
            project_id=e.project_id,
            causation_id=e.event_id,
            user_id=e.user_id,
            due=due,
            calls=calls,
        )
        subject = subjects.agent_settle(e.project_id, e.conversation_id)
        try:
            await self.bus.publish(subject, timer, msg_id=timer.event_id)
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            self.timers_failed.inc()
            self.bus.log.warning("settle_timer_failed", call_id=calls[-1], error=repr(exc))

    async def _bill(
        self,
        e: m.UserMessagePersisted | m.ClassificationSettle,
        call_id: str,
        outcome: str,
        usage: m.Usage,
        estimated: bool = False,
    ) -> None:
        """One classification call's usage, for the persister to write once (by call id: an
        exact usage replaces an estimate of the same call, never the other way round). The two
        go out under different message ids (estimate.estimate_id): a late exact usage is kept."""
        spent = m.ModelUsage(
            event_id=(estimate.estimate_id if estimated else estimate.usage_id)(call_id),
            message_id=e.message_id,
            conversation_id=e.conversation_id,
            project_id=e.project_id,
            causation_id=e.event_id,
            call_id=call_id,
            run_id=core.run_id_for(e.message_id),
            user_id=e.user_id,
            purpose="classification",
            model=self.settings.model,
            outcome=outcome,
            usage=usage,
            prices=self.settings.prices(),
            estimated=estimated,
        )
        await self.bus.publish(
            subjects.agent_usage(e.project_id, e.conversation_id), spent, msg_id=spent.event_id
        )

    async def _unsettled(self, e: m.UserMessagePersisted, delivery: int) -> list[m.EstimatedCall]:
        """The classification calls of this message's earlier deliveries that started (the model
        counted their input) and never published their usage: their agent died. Read again by
        a later delivery if this one dies too; the call id bills each once."""
        if delivery <= 1:
            return []
        calls = estimate.earlier_calls(core.work_id(e.message_id), delivery)
        try:
            out = await deadcalls.unsettled(
                self.bus.js, e.project_id, e.conversation_id, calls, pushes=False
            )
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            # Best effort: billing a dead call never holds up the message's classification.
            # A read the broker refuses (a rolling deploy whose NATS config and agents do not
            # yet agree on AGENT_CALLS) would otherwise fail every delivery until the message
            # is dead-lettered; one it did not answer is read again by the next delivery only
            # if this one dies too. Counted, so a lasting refusal shows.
            self.unread.inc()
            self.bus.log.warning("estimate_read_failed", delivery=delivery, error=repr(exc))
            return []
        for c in out:
            self.estimated.inc()
            self.bus.log.warning(
                "call_estimated", call_id=c.call_id, input_tokens=c.usage.input_tokens
            )
        return out

    async def _context(self, e: m.UserMessagePersisted) -> list[core.Turn]:
        if e.position == 1:
            # A conversation's first message: nothing came before it, so its history is itself
            # (one database round trip less on the way to the first answer).
            return [core.Turn("user", e.content)]
        try:
            turns = await self.history.upto(
                e.conversation_id, e.message_id, self.settings.context_messages
            )
        except DependencyDown:
            turns = []
        # Degraded but moving: without history, the message itself is the context.
        return turns or [core.Turn("user", e.content)]

    async def _classify(
        self,
        e: m.UserMessagePersisted,
        transcript: str,
        call_id: str,
        delivery: int,
        began: float,
    ) -> tuple[m.Decision | None, str, m.Usage, bool]:
        """The decision (None: the fallback's), why it fell back, the usage, and whether the
        call's record came late (then it sent a settle timer for itself)."""
        late = False

        async def started(usage: m.Usage) -> None:
            nonlocal late
            # message_start: the provider counted the call's input, so its record goes out.
            # Late, another delivery may have read it before this: a timer for itself first
            # (an overlapping delivery starts an ack_wait after this one at the earliest).
            if time.monotonic() - began >= self.settings.settle_late_s:
                late = True
                await self._settle_later(e, delivery, late=True)
            work = core.work_id(e.message_id)
            written = await deadcalls.write_record(self.bus, call_id, work, "started", usage)
            if not written and not late:
                # A publish that timed out may still land, later (the client sends what it
                # buffered when it reconnects): as late as any, so a timer of its own, after it.
                late = True
                await self._settle_later(e, delivery, late=True)

        try:
            with self.model_seconds.time():
                called, raw, usage = await self.classifier.classify(transcript, call_id, started)
        except CallFailed as exc:
            # An error reply bills nothing; a call cut after message_start bills its input.
            return None, f"model_error: {type(exc.cause).__name__}", exc.usage, late
        if not called:
            return None, "no_tool_use: model did not call the tool", usage, late
        checked = core.validate(raw)
        if isinstance(checked, str):
            return None, f"invalid_output: {checked}", usage, late
        return checked, "", usage, late
