"""Policy's inbound edge: advice, failures and stored replies in; verdicts, tasks and replies out."""

from __future__ import annotations

from datetime import UTC, datetime

from nats.aio.msg import Msg

from services.policy import core
from services.policy.adapters import Conversations, Runs
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
    ) -> None:
        self.bus = bus
        self.runs = runs
        self.conversations = conversations
        self.rules = rules
        self.verdicts = metrics.counter(
            "verdicts_total", "Verdicts on runs, by kind.", ("verdict",)
        )
        self.retries = metrics.counter(
            "retries_total",
            "New attempts after an executor failure, by error class.",
            ("error_class",),
        )

    async def decision(self, e: m.AgentDecision, _msg: Msg) -> str:
        decided = core.decide(e, self.rules, datetime.now(UTC))
        decided.trace_context = tracing.carrier()
        state, created = await self.runs.create(decided)
        if created:
            self.verdicts.labels(state.verdict).inc()
        # A redelivered decision admits the same run again; what it emits is deduplicated.
        admission = await self._admit(state)
        return f"{state.verdict}:{admission}" if created else f"existing:{admission}"

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
