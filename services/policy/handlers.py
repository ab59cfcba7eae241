"""Policy's inbound edge: advice, failures, cancels, deadlines and stored replies in; verdicts,
tasks, aborts and replies out."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal

import msgspec
from nats.aio.msg import Msg

from services.policy import core
from services.policy.adapters import Aborts, Conversations, Runs
from shared import messages as m
from shared import subjects
from shared.bus import Bus
from shared.errors import BadData, Deferred
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
    ) -> None:
        self.bus = bus
        self.runs = runs
        self.conversations = conversations
        self.rules = rules
        self.aborts = aborts
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

    async def decision(self, e: m.AgentDecision, _msg: Msg) -> str:
        state, created = await self.runs.create(core.decide(e, self.rules, datetime.now(UTC)))
        if created:
            self.verdicts.labels(state.verdict).inc()
        if not state.position:  # a run cancelled before its decision: now it has its place
            state = msgspec.structs.replace(state, position=e.position)
        # A redelivered decision admits the same run again; what it emits is deduplicated.
        admission = await self._admit(state)
        return f"{state.verdict}:{admission}" if created else f"existing:{admission}"

    async def failure(self, f: m.ExecFailed, _msg: Msg) -> str:
        state, revision = await self.runs.get(f.run_id)
        now = datetime.now(UTC)
        if state.cause == f.event_id and state.retry_at is not None:
            return await self._start_retry(state, revision, f.attempt, now)
        new = core.on_failure(state, f, self.rules, now)
        if new is None:
            if core.caused_by(state, f):
                await self._emit(state)
                await self._after(state)
            return "stale"
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
        new = core.on_deadline(state, d, self.rules, now)
        if new is None:
            if state.cause == d.event_id:
                await self._emit(state)
                await self._after(state)
            return "stale"
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
            await self._emit(state)
            conv, _ = await self.conversations.get(state.conversation_id)
            if conv.active == state.run_id:
                await self._release(state.conversation_id, state.run_id)
        elif state.status == "running" and state.cancel_requested:
            await self._emit(state)
            await self._abort(state, "cancelled")
            due = datetime.now(UTC) + timedelta(seconds=self.rules.run_deadline_s)
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
        due = core.retry_due(state, failed_attempt, self.rules, now)
        if due is None:
            assert state.retry_at is not None
            wait = (state.retry_at - now).total_seconds()
            raise Deferred("retry not due yet", max(wait, 0.0))
        await self.runs.update(due, revision)
        await self._emit(due)
        return "retry"

    async def _admit(self, state: core.RunState) -> core.Admission:
        """Start the run if its conversation is free, else queue it behind the active one."""
        conv, revision = await self.conversations.get(state.conversation_id)
        changed, admission = core.admit(conv, state.run_id, state.position)
        if changed is not None:
            await self.conversations.put(changed, revision)
            conv = changed
        interrupt = self.rules.double_texting == "interrupt"
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
                await self._start(state, conv)
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
        strategy = self.rules.double_texting
        if strategy == "reject":
            state, revision = await self.runs.get(state.run_id)
            if state.status != "running":
                # Already a refusal or a question: it keeps its place and replies at its turn.
                return state.out_of_turn
            new = core.reject(state)
            await self.runs.update(new, revision)
            self.double_texts.labels("reject").inc()
            self.verdicts.labels(new.verdict).inc()
            await self._emit(new)
            return True
        if strategy == "interrupt":
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
                await self._start((await self.runs.get(conv.active))[0], conv)
            return
        await self.conversations.put(nxt, revision)
        if nxt.active is not None:
            await self._start((await self.runs.get(nxt.active))[0], nxt)

    async def _start(self, state: core.RunState, conv: core.ConvState) -> None:
        # ``conv`` is the record that gave this run the slot; it is read again before marking.
        """Emit the run's verdict and task (or reply), then record that it started."""
        if state.out_of_turn or state.status == "cancelled":
            # Finished before its turn (cancelled while queued, or rejected): pass the slot on.
            await self._emit(state)
            await self._release(conv.conversation_id, state.run_id)
            return
        await self._emit(state)
        latest, revision = await self.conversations.get(conv.conversation_id)
        if latest.active == state.run_id and not latest.started:
            await self.conversations.put(core.mark_started(latest), revision)

    async def _emit(self, state: core.RunState) -> None:
        p, c = state.project_id, state.conversation_id
        verdict = core.verdict_event(state)
        await self.bus.publish(subjects.policy_verdict(p, c), verdict, msg_id=verdict.event_id)
        if state.status == "running" and state.deadline is not None and not state.cancel_requested:
            task = core.task_for(state, state.deadline)
            await self.bus.publish(subjects.exec_task(p, c), task, msg_id=task.event_id)
            # The attempt's timer: an attempt with no outcome by then is retried or failed.
            due = datetime.now(UTC) + timedelta(seconds=self.rules.run_deadline_s)
            timer = core.deadline_event(state, due)
            await self.bus.publish(subjects.policy_deadline(p, c), timer, msg_id=timer.event_id)
        reply = core.reply_event(state)
        if reply is not None:
            await self.bus.publish(subjects.policy_reply(p, c), reply, msg_id=reply.event_id)
