"""Policy's inbound edge, the interpreter of ``machine``: advice, failures, cancels, deadlines
and stored replies in; verdicts, tasks, aborts and replies out.

Each handler reads the run's record, turns the message into a ``machine`` input and drives it:
step, settle, write by compare-and-set, publish, and on to the inputs it leads to. Every rule
is in ``machine.py`` / ``core.py``; nothing here decides."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

from nats.aio.msg import Msg

from services.policy import core, lifecycle, machine, toolcalls
from services.policy.adapters import Aborts, Conversations, Limiter, Runs, ToolQuota
from services.policy.policyfile import Book
from shared import deadcalls, subjects, tracing, wiring
from shared import messages as m
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
        quota: ToolQuota | None = None,
    ) -> None:
        self.bus = bus
        self.runs = runs
        self.conversations = conversations
        self.rules = rules
        self.aborts = aborts
        self.limiter = limiter
        self.book = book  # the policy file's rules; replaced when the file changes
        self.quota = quota  # per_user_daily of tools; None: such limits are not counted
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
        self.dead_calls = metrics.counter(
            "dead_calls_settled_total",
            "Model calls that died with their executor, billed by estimate at their deadline.",
        )
        self.double_texts = metrics.counter(
            "double_texts_total",
            "Messages that arrived while an earlier run of their conversation was unfinished, "
            "by strategy.",
            ("strategy",),
        )

        # The tool phase (docs/tools.md; dashboards and alerts use these names).
        self.tool_calls = metrics.counter(
            "tool_calls_total",
            "Tool calls the model asked for, by tool and how policy decided each (auto, "
            "approved, rejected, denied, invalid, over_limit, expired, max_rounds).",
            ("tool", "outcome"),
        )
        self.approval_wait = metrics.histogram(
            "tool_approval_wait_seconds",
            "Time from a tool call's approval request to the user's answer.",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 86_400),
        )
        self.approvals_pending = metrics.gauge(
            "tool_approvals_pending",
            "Tool calls waiting for the user's approval, as this replica moved them (sum over "
            "replicas).",
        )
        self.approvals_ignored = metrics.counter(
            "tool_approvals_ignored_total",
            "Approvals that decided nothing, by why (not_pending, digest_mismatch, expired).",
            ("why",),
        )

        # The metrics a step's ``Count`` effects name.
        self.counters = {
            "verdicts": self.verdicts,
            "retries": self.retries,
            "cancels": self.cancels,
            "deadlines": self.deadlines,
            "dead_calls": self.dead_calls,
            "double_texts": self.double_texts,
            "approvals_ignored": self.approvals_ignored,
            "rate_limited": self.rate_limited,
            "exhausted": self.exhausted,
        }

    def rules_for(self, project: str) -> core.Rules:
        """The project's rules: from the policy file when there is one, else the env defaults."""
        return self.rules if self.book is None else self.book.rules_for(project)

    async def decision(self, e: m.AgentDecision, _msg: Msg) -> str:
        rules, now = self.rules_for(e.project_id), _now()
        # The conversation's record first: a deleted one gets no run, and its settings may
        # name the model its runs use.
        read = await self.conversations.get(e.conversation_id)
        if read[0].deleted:
            return "conversation_deleted"
        limited = self.limiter is not None and core.has_limits(rules)
        existing = await self.runs.find(core.run_id_for(e.message_id)) if limited else None
        carry = _Carry()
        if existing is not None:
            # Decided before (or cancelled before its decision): never count or reserve again,
            # only finish admitting it.
            state, created = existing, False
        else:
            proposed = core.decide(e, rules, now, conversation_model=read[0].model)
            proposed.trace_context = tracing.carrier()
            proposed.classification, proposed.classification_cost_usd = e.usage, e.cost_usd
            if limited:
                proposed = await self._limit(proposed, rules, now)
            # Admitting the run is a compare-and-set on the conversation's record as read above.
            state, revision, created = await self.runs.create(proposed)
            carry.run = (state, revision)
            if created:
                self.verdicts.labels(state.verdict).inc()
                if state.reservation is not None:
                    self.reserved_tokens.inc(state.reservation.tokens)
            elif proposed.reservation is not None and state.reservation is None:
                # Another replica decided this run first without a hold (or the user cancelled
                # it before its decision): give ours back.
                await self.limiter.release(proposed.run_id, proposed.reservation.keys)  # type: ignore[union-attr]
            carry.conv = read
        # A redelivered decision admits the same run again; what it emits is deduplicated.
        admission = await self._drive(_on(state, machine.Admit(e.position)), carry)
        return f"{state.verdict}:{admission}" if created else f"existing:{admission}"

    async def _limit(self, state: core.RunState, rules: core.Rules, now: datetime) -> core.RunState:
        """Rate windows for every message, then budgets and runs in flight for an approval: the
        rules are ``machine.admit_limits``; here, only the counting it asks for."""
        assert self.limiter is not None
        done = machine.admit_limits(state, machine.Proposed(), rules, now)
        while True:
            for effect in done.effects:
                await self._carry_out(effect)
            match done.next:
                case None:
                    return done.run
                case machine.CountRate(project_id=p, user_id=u, message_id=mid, limits=limits):
                    rate = await self.limiter.count_message(p, u, mid, limits, now)
                    inp: machine.AdmissionInput = machine.RateCounted(
                        rate.allowed, rate.window, rate.limit, rate.retry_after_s, rate.counts
                    )
                case machine.ReserveBudget():
                    reserved = await self.limiter.reserve(done.run, rules, now)
                    inp = machine.Reserved() if reserved is None else machine.Reserved(*reserved)
            done = machine.admit_limits(done.run, inp, rules, now)

    async def failure(self, f: m.ExecFailed, _msg: Msg) -> str:
        run, revision = await self.runs.get(f.run_id)
        return await self._drive(_on(run, machine.Failed(f)), _Carry.of(run, revision))

    async def deadline(self, d: m.RunDeadline, msg: Msg | None) -> str:
        """A timer per attempt: handed back by the server until due, then checked. On
        ``subjects.policy_settle`` (an executor's, for its redelivered call) only a settle
        timer its run's record vouches for is run."""
        wait = machine.deadline_wait(d, datetime.now(UTC))
        if wait is not None:
            raise Deferred("deadline not reached", wait)
        if msg is not None and subjects.is_policy_settle(msg.subject):
            run, _ = await self.runs.get(d.run_id)
            checked = machine.redelivery_settle(d, run, wiring.EXECUTOR_TASKS.max_deliver)
            if isinstance(checked, str):
                raise BadData(checked)
            return await self._settle_dead_calls(checked)
        if d.settle is not None:
            return await self._settle_dead_calls(d)
        run, revision = await self.runs.get(d.run_id)
        return await self._drive(_on(run, machine.DeadlineDue(d)), _Carry.of(run, revision))

    async def _settle_dead_calls(self, d: m.RunDeadline) -> str:
        """A missed deadline's settle timer, due: the task's calls that died with their
        executor are read back from CHAT_STREAM and billed by estimate (machine.settle_dead)."""
        calls = machine.dead_calls(d, wiring.EXECUTOR_TASKS.max_deliver)
        found = await deadcalls.unsettled(self.bus.js, d.project_id, d.conversation_id, calls)
        done = machine.settle_dead(d, found)
        for effect in done.effects:
            await self._carry_out(effect)
        if found and self.limiter is not None:
            # Their run's day budgets: kept for its settlement, or charged after it.
            run, revision = await self.runs.get(d.run_id)
            billed = machine.DeadCallsBilled(d, tuple(found))
            await self._drive(
                machine.Continue(d.conversation_id, d.run_id, billed), _Carry.of(run, revision)
            )
        return done.outcome

    async def cancel(self, e: m.CancelRequested, _msg: Msg) -> str:
        """A user's cancel: policy decides whether there is anything left to stop."""
        if e.run_id != core.run_id_for(e.message_id):
            raise BadData(f"cancel names run {e.run_id} but message {e.message_id}")
        try:
            run, revision = await self.runs.get(e.run_id)
        except BadData:
            # Cancelled before policy decided on it: the decision will find this record.
            run, revision, created = await self.runs.create(core.tombstone(e))
            if created:
                self.cancels.labels("before_decision").inc()
                await self._publish(machine.emit(run, self.rules_for(run.project_id), _now()))
                return "cancelled"
            run, revision = await self.runs.get(e.run_id)
        if (why := machine.foreign_cancel(run, e)) is not None:
            raise BadData(why)
        cancel = machine.Cancel(e.event_id, "cancelled by the user", "user")
        return await self._drive(_on(run, cancel), _Carry.of(run, revision))

    async def conversation_settings(self, e: m.ConversationChanged, _msg: Msg) -> str:
        return await lifecycle.conversation_settings(self, e)

    async def conversation_deleted(self, d: m.ConversationDeleteRequested, _msg: Msg) -> str:
        return await lifecycle.conversation_deleted(self, d)

    async def reply_persisted(self, e: m.AssistantMessagePersisted, _msg: Msg) -> str:
        run, revision = await self.runs.get(e.run_id)
        return await self._drive(_on(run, machine.ReplyStored(e)), _Carry.of(run, revision))

    async def tool_turn(self, e: m.ToolTurnPersisted, _msg: Msg) -> str:
        """The model's tool_use turn of a round is stored: policy decides each call."""
        run, revision = await self.runs.get(e.run_id)
        _same_run(run, e)
        rules, now = self.rules_for(run.project_id), _now()
        quota: dict[str, bool] = {}
        if toolcalls.decides(run, e.round, rules):
            for call, grant in toolcalls.turn_quota(rules, e.tool_calls, e.earlier_call_ids):
                quota[call.id] = await self._take_quota(run, call, grant, now)
        inp = machine.ToolTurnStored(e, quota)
        return await self._drive(_on(run, inp), _Carry.of(run, revision))

    async def tool_result(self, e: m.ToolResultPersisted, _msg: Msg) -> str:
        """A call's result is stored: the round's last one starts the next model call."""
        run, revision = await self.runs.get(e.result.run_id)
        _same_run(run, e)
        inp = machine.ToolResultStored(e)
        return await self._drive(_on(run, inp), _Carry.of(run, revision))

    async def tool_approval(self, e: m.ToolApprovalDecided, _msg: Msg) -> str:
        """The user's answer to a waiting call (the gateway checked who asks; so does this)."""
        run, revision = await self.runs.get(e.run_id)
        _same_run(run, e)
        if e.user_id != run.user_id:
            raise BadData(f"approval for run {e.run_id} from another user")
        rules, now = self.rules_for(run.project_id), _now()
        quota: dict[str, bool] = {}
        pending = next((c for c in toolcalls.waiting(run) if c.call.id == e.call_id), None)
        if (
            e.approve
            and pending is not None
            and e.input_digest == pending.call.input_digest
            and run.status not in core.TERMINAL
            and (run.approval_due is None or now < run.approval_due)
        ):
            grant = rules.tools.grant(pending.call.name)
            if toolcalls.quota_wanted(grant, pending.call):
                assert grant is not None
                quota[e.call_id] = await self._take_quota(run, pending.call, grant, now)
        inp = machine.ToolDecided(e, quota)
        return await self._drive(_on(run, inp), _Carry.of(run, revision))

    async def _take_quota(
        self, run: core.RunState, call: m.ToolCall, grant: core.ToolGrant, now: datetime
    ) -> bool:
        if self.quota is None or grant.per_user_daily is None:
            return True
        return await self.quota.take(
            run.project_id,
            run.user_id,
            grant.name,
            now,
            m.call_key(run.run_id, call.id),
            grant.per_user_daily,
        )

    async def _admit(
        self, state: core.RunState, known: tuple[core.ConvState, int] | None = None
    ) -> str:
        """Place a decided run in its conversation (``known``: its record as read a moment ago;
        if it changed since, the compare-and-set fails and it is read again)."""
        _, revision = await self.runs.get(state.run_id)
        carry = _Carry.of(state, revision)
        if known is not None and known[0].conversation_id == state.conversation_id:
            carry.conv = known
        return await self._drive(_on(state, machine.Admit(state.position)), carry)

    async def _mark_started(self, conv: core.ConvState, revision: int, run_id: str) -> None:
        """Record that the run holding the slot started, by compare-and-set on the revision that
        gave it the slot; only if someone changed it since is it read again."""
        first = machine.Continue(conv.conversation_id, run_id, machine.MarkStarted(run_id))
        await self._drive(first, _Carry(conv=(conv, revision)))

    # ------------------------------------------------------------ the interpreter

    async def _drive(self, first: machine.Continue, carry: _Carry) -> str:
        """Step ``first`` and every input it leads to, depth-first (the order of the effects):
        read the records, step, carry out the settlements and early publishes, write by compare-and-set (a conflict
        reads again and steps again), then the other effects in order. Returns the outcome of
        the first step; a ``Defer`` hands the message back at once."""
        pending: list[Iterator[machine.Effect]] = [iter((first,))]
        outcome: str | None = None
        while pending:
            effect = next(pending[-1], None)
            if effect is None:
                pending.pop()
            elif isinstance(effect, machine.Continue):
                done, carry = await self._step(effect, carry)
                outcome = done.outcome if outcome is None else outcome
                pending.append(iter(done.effects))
            else:
                await self._carry_out(effect)
        return outcome or ""

    async def _step(self, c: machine.Continue, carry: _Carry) -> tuple[machine.Step, _Carry]:
        """One input on one run and its conversation; returns the step and the records it
        leaves (what the next input on the same run or conversation starts from)."""
        # A cancel and a release decide on the records as they are now, as a first read does.
        fresh = isinstance(c.input, machine.Cancel | machine.Release)
        for tries in range(1, CAS_TRIES + 1):
            run_rec = None if fresh else carry.run_for(c.run_id)
            conv_rec = None if fresh else carry.conv_for(c.conversation_id)
            if run_rec is None and not isinstance(c.input, machine.CONVERSATION_ONLY):
                run_rec = await self.runs.get(c.run_id)
            if conv_rec is None:
                conv_rec = await self.conversations.get(c.conversation_id)
            fresh = False
            run = run_rec[0] if run_rec is not None else None
            rules = self.rules if run is None else self.rules_for(run.project_id)
            done = machine.step(run, conv_rec[0], c.input, rules, _now())
            for effect in done.effects:
                if _before_writes(effect):
                    await self._carry_out(effect)
            try:
                if done.conversation is not None:
                    revision = await self.conversations.put(done.conversation, conv_rec[1])
                    conv_rec = (done.conversation, revision)
                if done.run is not None:
                    assert run_rec is not None
                    revision = await self.runs.update(done.run, run_rec[1])
                    run_rec = (done.run, revision)
            except RetryLater:
                if tries == CAS_TRIES:
                    raise
                fresh = True  # someone changed a record since it was read: read and step again
                continue
            kept = _Carry(conv=conv_rec)
            if run_rec is not None:
                kept.run = run_rec
            return machine.Step(
                done.run, done.conversation, _after_writes(done), done.outcome
            ), kept
        raise AssertionError("unreachable")  # pragma: no cover

    async def _carry_out(self, effect: machine.Effect) -> None:
        match effect:
            case machine.Publish():
                await self._publish(effect)
            case machine.Abort(subject=subject, event=event):
                # A marker any executor checks before calling the model, then a core message
                # every executor hears (for the calls already streaming).
                if self.aborts is not None:
                    await self.aborts.mark(event.run_id, event.attempt)
                await self.bus.nc.publish(subject, m.encode(event))
            case machine.Settle(run_id=run_id, reservation=r, tokens=tokens, cost_usd=cost):
                if self.limiter is not None and await self.limiter.settle(run_id, r, tokens, cost):
                    self.settled_tokens.inc(tokens)
            case machine.Charge(keys=keys, call_id=call_id, tokens=tokens, cost_usd=cost):
                if self.limiter is not None and await self.limiter.charge(
                    keys, call_id, tokens, cost
                ):
                    self.settled_tokens.inc(tokens)
            case machine.Defer(why=why, delay=delay):
                raise Deferred(why, delay)
            case machine.Count(metric=metric, label=label):
                counter = self.counters[metric]
                (counter.labels(label) if label else counter).inc()
            case machine.Observe(metric="tool_calls", labels=labels, value=value):
                self.tool_calls.labels(*labels).inc(value)
            case machine.Observe(metric="approval_wait", value=value):
                self.approval_wait.observe(value)
            case machine.Observe(metric="approvals_pending", value=value):
                self.approvals_pending.inc(value)

    async def _publish(self, p: machine.Publish) -> None:
        out = [(subject, event, event.event_id) for subject, event in p.events]  # type: ignore[attr-defined]
        if p.resume is None:
            await self.bus.publish_all(out)
            return
        # Started by the previous run's end, it still continues its own message's trace.
        with tracing.resumed(p.resume, "policy start run"):
            await self.bus.publish_all(out)


CAS_TRIES = 3  # reads and steps again after a conflict before handing the message back


def _now() -> datetime:
    return datetime.now(UTC)


def _same_run(run: core.RunState, e: m.Event) -> None:
    """A tool input names its run's conversation and project, or it is refused."""
    if (run.conversation_id, run.project_id) != (e.conversation_id, e.project_id):
        raise BadData(f"{type(e).__name__} {e.event_id} names another conversation's run")


def _on(run: core.RunState, inp: machine.Input) -> machine.Continue:
    return machine.Continue(run.conversation_id, run.run_id, inp)


def _before_writes(effect: machine.Effect) -> bool:
    """Settlements, charges and early publishes (a settle timer) are carried out before the
    writes (each counts once by its own id, so a crash in between is finished by the redelivery)."""
    return isinstance(effect, machine.Settle | machine.Charge) or (
        isinstance(effect, machine.Publish) and effect.early
    )


def _after_writes(done: machine.Step) -> tuple[machine.Effect, ...]:
    """The effects still to carry out once the records are written (the early ones ran before)."""
    return tuple(e for e in done.effects if not _before_writes(e))


class _Carry:
    """The records (with revisions) the last step read or wrote: the next input on the same
    run or conversation starts from them instead of reading again."""

    def __init__(
        self,
        run: tuple[core.RunState, int] | None = None,
        conv: tuple[core.ConvState, int] | None = None,
    ) -> None:
        self.run = run
        self.conv = conv

    @classmethod
    def of(cls, run: core.RunState, revision: int) -> _Carry:
        return cls(run=(run, revision))

    def run_for(self, run_id: str) -> tuple[core.RunState, int] | None:
        return self.run if self.run is not None and self.run[0].run_id == run_id else None

    def conv_for(self, conversation_id: str) -> tuple[core.ConvState, int] | None:
        if self.conv is not None and self.conv[0].conversation_id == conversation_id:
            return self.conv
        return None
