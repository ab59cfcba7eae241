"""Policy's inbound edge: advice, failures and stored replies in; verdicts, tasks and replies out."""

from __future__ import annotations

from datetime import UTC, datetime

from nats.aio.msg import Msg

from services.policy import core
from services.policy.adapters import Runs
from shared import messages as m
from shared import subjects
from shared.bus import Bus
from shared.metrics import ServiceMetrics


class Handlers:
    def __init__(self, bus: Bus, runs: Runs, rules: core.Rules, metrics: ServiceMetrics) -> None:
        self.bus = bus
        self.runs = runs
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
        state, created = await self.runs.create(core.decide(e, self.rules, datetime.now(UTC)))
        if created:
            self.verdicts.labels(state.verdict).inc()
        # A redelivered decision re-emits what the stored run says; JetStream drops the copies.
        await self._emit(state)
        return state.verdict if created else "existing"

    async def failure(self, f: m.ExecFailed, _msg: Msg) -> str:
        state, revision = await self.runs.get(f.run_id)
        new = core.on_failure(state, f, self.rules, datetime.now(UTC))
        if new is None:
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
        if new is None:
            return "unchanged"
        await self.runs.update(new, revision)
        return new.status

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
