"""The executor's inbound edge: task → model stream → token deltas → result or classified failure."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import PubAck

from services.executor import core
from services.executor.adapters import Model, StreamFailed, StreamOutcome
from services.executor.config import Settings
from services.executor.tools import ToolRunner
from shared import deadcalls, estimate, runs, subjects
from shared import messages as m
from shared.bus import Bus
from shared.history import History, Turn
from shared.metrics import ServiceMetrics

_abort_decoder = msgspec.json.Decoder(m.RunAbort)
# Token pushes of one call in flight without a PubAck before the call stops pushing (its answer
# still arrives whole with the result): 32 calls x 64 stay well inside nats-py's window of 4,000.
MAX_UNACKED_PUSHES = 64


class Call:
    """A model call in flight, so an abort from policy can reach it."""

    def __init__(self, run_id: str, attempt: int) -> None:
        self.run_id = run_id
        self.attempt = attempt
        self.abort = asyncio.Event()
        self.task: asyncio.Task[Any] | None = None
        self.system = ""  # the system prompt of the call (the conversation's, else the default)

    def stop(self) -> None:
        self.abort.set()
        if self.task is not None:
            self.task.cancel()


class Handlers:
    def __init__(
        self,
        bus: Bus,
        history: History,
        model: Model,
        settings: Settings,
        metrics: ServiceMetrics,
        aborts: Any = None,
        tools: ToolRunner | None = None,
    ) -> None:
        self.bus = bus
        self.tools = tools  # the runner of tool.task (services/executor/tools.py)
        self.history = history
        self.model = model
        self.settings = settings
        self.aborts = aborts  # policy's aborted attempts (KV, read only); None: not checked
        self.calls: dict[str, Call] = {}
        self.aborted = metrics.counter(
            "aborted_calls_total",
            "Calls policy stopped, by when (before the model was called, or while streaming).",
            ("when",),
        )
        self.tokens = metrics.counter(
            "model_tokens_total",
            "Tokens used by model calls, by kind and model.",
            ("kind", "model"),
        )
        self.errors = metrics.counter(
            "model_errors_total", "Failed model calls, by error class.", ("error_class",)
        )
        self.model_seconds = metrics.histogram(
            "model_seconds", "Duration of a model call, by model.", ("model",)
        )
        self.stream_interruptions = metrics.counter(
            "token_stream_interruptions_total",
            "Calls whose token pushes stopped because the broker did not take them.",
        )
        self.ttft = metrics.histogram(
            "time_to_first_token_seconds", "Time from task start to the first token.", ("model",)
        )
        self.estimated = metrics.counter(
            "estimated_calls_total",
            "Model calls cut by an executor's death, billed by estimate on their redelivery.",
        )

    async def abort(self, msg: Msg) -> None:
        """Policy's abort (core NATS, heard by every replica): stop the run's calls here."""
        try:
            a = _abort_decoder.decode(msg.data)
        except msgspec.MsgspecError as exc:
            self.bus.log.warning("bad_abort", error=str(exc)[:200])
            return
        for call in list(self.calls.values()):
            if call.run_id == a.run_id and call.attempt <= a.attempt and not call.abort.is_set():
                self.aborted.labels("streaming").inc()
                self.bus.log.info("call_aborted", run_id=a.run_id, attempt=call.attempt)
                call.stop()

    async def _was_aborted(self, t: m.ExecTask) -> bool:
        """Whether policy aborted this attempt before it reached us (a cancel wins the race)."""
        if self.aborts is None:
            return False
        try:
            entry = await self.aborts.get(subjects.abort_key(t.run_id, t.attempt))
        except nats.js.errors.KeyNotFoundError:
            return False
        return entry.value is not None

    async def offered(self, t: m.ExecTask) -> tuple[m.ToolSpec, ...]:
        """The tools policy granted the task, completed from their servers' own descriptions
        where the policy file gave none (nothing is added: only what was granted is sent)."""
        if not t.tools or self.tools is None:
            return t.tools
        return await self.tools.tools.complete(t.tools)

    async def tool_task(self, t: m.ToolTask, msg: Msg) -> str:
        """``tool.task.>`` (durable ``executor-tools``): one authorized call, run at most once."""
        if self.tools is None:
            raise RuntimeError("no tool runner: the executor was built without MCP servers")
        return await self.tools.task(t, msg)

    async def task(self, t: m.ExecTask, msg: Msg) -> str:
        delivery = estimate.delivery(msg.metadata.num_delivered, msg.headers)
        call_id = f"{t.task_id}#{delivery}"
        # Registered before the check: an abort that lands after the check still finds it.
        call = Call(t.run_id, t.attempt)
        self.calls[call_id] = call
        try:
            # The abort mark, the history, the calls earlier deliveries left unsettled and the
            # conversation's own system prompt (POST /api/conversations) are read together.
            aborted, history, estimated, system, _ = await asyncio.gather(
                self._was_aborted(t),
                self.history.upto(
                    t.conversation_id,
                    t.message_id,
                    t.context_messages or self.settings.context_messages,
                    tools=bool(t.tools),  # tool exchanges only where tools are offered
                    before=(t.run_id, t.round),  # what this round's first call saw
                ),
                self._unsettled(t, delivery),
                self.history.system_prompt(t.conversation_id),
                self._settle_later(t, call_id, delivery),
            )
            if aborted:
                self.aborted.labels("before_call").inc()
                call.abort.set()
            call.system = system or self.settings.system_prompt
            return await self._run(t, call_id, call, history, estimated)
        finally:
            self.calls.pop(call_id, None)

    async def _run(
        self,
        t: m.ExecTask,
        call_id: str,
        call: Call,
        history: list[Turn],
        estimated: tuple[m.EstimatedCall, ...] = (),
    ) -> str:
        prompt = core.build_messages(history, self.settings.context_token_budget)
        if not prompt:
            prompt = [{"role": "user", "content": "(empty message)"}]
        return await ModelCall(self, t, call_id, call, estimated).run(prompt)

    async def _unsettled(self, t: m.ExecTask, delivery: int) -> tuple[m.EstimatedCall, ...]:
        """The calls of this task's earlier deliveries that started and never published their
        outcome (their executor died): each with its usage estimated (shared/estimate.py), to
        be billed once with this delivery's outcome. The reads are repeated by a later delivery
        if this one dies too (or by policy at the attempt's deadline); the estimate comes out
        the same, and the call id bills it once."""
        if delivery <= 1:
            return ()
        calls = estimate.earlier_calls(t.task_id, delivery)
        out = await deadcalls.unsettled(self.bus.js, t.project_id, t.conversation_id, calls)
        for c in out:
            self.estimated.inc()
            self.bus.log.warning(
                "call_estimated",
                call_id=c.call_id,
                input_tokens=c.usage.input_tokens,
                output_tokens=c.usage.output_tokens,
            )
        return tuple(out)

    async def _settle_later(self, t: m.ExecTask, call_id: str, delivery: int) -> None:
        """A redelivered task's call asks policy, before it starts, to settle it at the
        attempt's deadline (``subjects.policy_settle``). Deliveries can overlap: one whose ack
        was lost comes back while it still runs, and when the other's outcome is stored and
        acked, nothing is delivered again, and the attempt meets its deadline. If this call
        then dies before its outcome goes out, only this timer bills it (docs/decisions.md,
        gap 4). A first delivery has none: a redelivery, or the deadline, settles it. A task
        without ``user_id`` comes from a policy that does not check such timers (a rolling
        deploy), so none is sent. Best effort, like the call's record: without it, such a call
        stays unbilled."""
        if delivery <= 1 or not t.user_id:
            return
        timer = m.RunDeadline(
            event_id=runs.redelivery_settle_id(call_id),
            message_id=t.message_id,
            conversation_id=t.conversation_id,
            project_id=t.project_id,
            causation_id=t.event_id,
            run_id=t.run_id,
            attempt=t.attempt,
            due=self._settle_due(t),
            # Who is billed is policy's to say: it takes the user from the run's record.
            settle=m.DeadCalls(
                task_id=t.task_id,
                user_id=t.user_id,
                model=t.model,
                prices=t.prices,
                calls=(call_id,),
            ),
        )
        subject = subjects.policy_settle(t.project_id, t.conversation_id)
        try:
            await self.bus.publish(subject, timer, msg_id=timer.event_id)
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            self.bus.log.warning("settle_timer_failed", call_id=call_id, error=repr(exc))

    def _settle_due(self, t: m.ExecTask) -> datetime:
        """The attempt's deadline plus the grace; for a task whose deadline is near or past (a
        copy ``baton dlq replay`` made, or a redelivery late in its attempt), not before the
        call's first byte is due plus the grace: a timer run before the call wrote its record
        would find nothing, and be gone."""
        first_byte = datetime.now(UTC) + timedelta(seconds=self.settings.stall_timeout_s)
        return max(t.deadline, first_byte) + timedelta(seconds=self.settings.settle_grace_s)

    async def _publish_outcome(self, subject: str, event: m.ExecResult | m.ExecFailed) -> None:
        """Publish a call's outcome, riding out a broker restart: the call is already paid for.

        Giving up (a nak) would mean calling the model again and losing this call's usage.
        """
        deadline = time.monotonic() + self.settings.outcome_publish_s
        delay = 0.2
        while True:
            try:
                await self.bus.publish(subject, event, msg_id=event.event_id)
                return
            except (nats.errors.Error, TimeoutError, OSError) as exc:
                if time.monotonic() + delay > deadline:
                    raise
                self.bus.log.warning(
                    "outcome_publish_retry", call_id=event.call_id, error=repr(exc)
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    @staticmethod
    async def _outcome(call: Call) -> StreamOutcome:
        """The call's outcome; an abort that cancelled it before it even ran is a failure too."""
        assert call.task is not None
        try:
            result: StreamOutcome = await call.task
            return result
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if not call.abort.is_set() or (me is not None and me.cancelling()):
                raise  # a shutdown, not an abort
            raise StreamFailed(core.CallAborted("aborted before it started"), m.Usage()) from None

    def _count(self, model: str, usage: m.Usage) -> None:
        self.tokens.labels("input", model).inc(usage.input_tokens)
        self.tokens.labels("output", model).inc(usage.output_tokens)
        self.tokens.labels("cache_read", model).inc(usage.cache_read_tokens)
        self.tokens.labels("cache_write", model).inc(usage.cache_write_tokens)


class ModelCall:
    """One model call of a task: its coalesced token pushes, then its one outcome.

    The pushes are best effort (a broker hiccup stops them, never the call, which is being paid
    for); the outcome, a result or a failure, is built in one place (``_outcome_of``) and
    published once, after the PubAcks of the pushes are in.
    """

    def __init__(
        self,
        h: Handlers,
        t: m.ExecTask,
        call_id: str,
        call: Call,
        estimated: tuple[m.EstimatedCall, ...] = (),
    ) -> None:
        self.h, self.t, self.call_id, self.call = h, t, call_id, call
        self.estimated = estimated  # earlier deliveries' dead calls, billed with this outcome
        self.recorded = False  # whether this call's started record is in CHAT_STREAM
        self.coalescer = core.Coalescer(h.settings.coalesce_chars, h.settings.coalesce_ms / 1000)
        self.seq = 0
        self.live = True  # pushes go out until the broker fails one
        self.unacked = 0
        # One push at a time, so seq order is publish order; a timer flushes a batch the model
        # is slow to add to (a slow stream's words must not wait for the next word).
        self.pushing = asyncio.Lock()
        self.timer: asyncio.Task[None] | None = None
        # PubAcks of the pushes still on their way: the stream is not held up by a round trip
        # per push; they are awaited together when the call ends.
        self.acks: list[asyncio.Future[PubAck]] = []
        self.started = time.perf_counter()

    async def run(self, prompt: list[dict[str, Any]]) -> str:
        """Stream the answer, push what is left, publish the outcome; the handled-as label."""
        t = self.t
        try:
            ending = await self._stream(prompt)
            # What the model wrote before a failure reaches clients too (they see it cut).
            rest = self.coalescer.flush()
            if rest:
                await self._send(rest, self.coalescer.taken)
            outcome = self._outcome_of(ending)
            await self._settle_pushes()
            if isinstance(outcome, m.ExecFailed):
                subject, handled = subjects.exec_failed, f"failed:{outcome.error_class}"
            else:
                subject, handled = subjects.exec_result, "completed"
            await self.h._publish_outcome(subject(t.project_id, t.conversation_id), outcome)
            await self._record("finished", ending.usage)
            return handled
        finally:
            await self._settle_pushes()  # after an error too: no PubAck is left waiting

    async def _stream(self, prompt: list[dict[str, Any]]) -> StreamOutcome | StreamFailed:
        """The model's answer, or why there is none; the flush timer is stopped either way."""
        h, t = self.h, self.t
        tools = core.api_tools(await h.offered(t))
        try:
            self.call.task = asyncio.create_task(
                h.model.stream(
                    t.model,
                    core.system_blocks(self.call.system or h.settings.system_prompt),
                    prompt,
                    t.max_tokens,
                    self._on_text,
                    self.call_id,
                    abort=self.call.abort,
                    tools=tools,
                    on_start=self._started,
                )
            )
            return await h._outcome(self.call)
        except StreamFailed as exc:
            return exc
        finally:
            h.model_seconds.labels(t.model).observe(time.perf_counter() - self.started)
            if self.timer is not None:
                self.timer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self.timer

    def _outcome_of(self, ending: StreamOutcome | StreamFailed) -> m.ExecResult | m.ExecFailed:
        """The call's one outcome, counted: the answer, or the classified failure with its usage."""
        h, t = self.h, self.t
        h._count(t.model, ending.usage)
        if isinstance(ending, StreamFailed):
            error_class = core.classify(ending.cause)
            h.errors.labels(error_class).inc()
            return m.ExecFailed(
                event_id=f"failed:{self.call_id}",
                error_class=error_class,
                error=str(ending.cause)[:500],
                usage=ending.usage,
                **_call_ids(t, self.call_id),
                estimated=self.estimated,
            )
        return m.ExecResult(
            event_id=f"result:{self.call_id}",
            text=ending.text,
            usage=ending.usage,
            **_call_ids(t, self.call_id),
            stop_reason=ending.stop_reason,
            tool_calls=ending.tool_calls,
            round=t.round,
            estimated=self.estimated,
        )

    async def _started(self, usage: m.Usage) -> None:
        """``message_start``: the call is billed from now on, so its record goes first (before
        any push, whose scan starts after it), with the input tokens the provider counted."""
        await self._record("started", usage)

    async def _record(self, state: Literal["started", "finished"], usage: m.Usage) -> None:
        """This call's record in CHAT_STREAM (shared/deadcalls.py): ``started`` create-only,
        ``finished`` after the outcome is published (then nothing is estimated for it)."""
        if state == "finished" and not self.recorded:
            return
        written = await deadcalls.write_record(
            self.h.bus, self.call_id, self.t.task_id, state, usage
        )
        if state == "started" and written:
            self.recorded = True

    async def _on_text(self, text: str) -> None:
        if self.seq == 0 and not self.coalescer.buffer:
            self.h.ttft.labels(self.t.model).observe(time.perf_counter() - self.started)
        batch = self.coalescer.add(text, time.perf_counter())
        if batch:
            await self._send(batch, self.coalescer.taken)
        elif self.timer is None or self.timer.done():
            self.timer = asyncio.create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(self.coalescer.max_age_s)
        batch = self.coalescer.flush()
        if batch:
            # Once taken from the coalescer a batch is pushed, even if the call ends now.
            await asyncio.shield(self._send(batch, self.coalescer.taken))

    async def _send(self, text: str, pieces: int) -> None:
        async with self.pushing:
            await self._push(text, pieces)

    async def _push(self, text: str, pieces: int = 0) -> None:
        # Token pushes are best effort: a broker hiccup must not abort a call that is being
        # paid for; the answer still arrives whole with the result.
        if not self.live:
            return
        if self.unacked >= MAX_UNACKED_PUSHES:
            # The broker stopped acking: stop pushing rather than fill the connection's
            # window of unacked publishes, which every call in this process shares.
            self._interrupted(TimeoutError(f"{MAX_UNACKED_PUSHES} token pushes unacknowledged"))
            return
        t = self.t
        self.seq += 1
        delta = m.TokenDelta(
            conversation_id=t.conversation_id,
            run_id=t.run_id,
            attempt=t.attempt,
            seq=self.seq,
            text=text,
            pieces=pieces,
        )
        try:
            ack = await self.h.bus.publish_async(
                subjects.token_stream(t.project_id, t.conversation_id),
                delta,
                msg_id=f"delta:{self.call_id}:{self.seq}",
            )
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            self._interrupted(exc)
            return
        self.unacked += 1
        ack.add_done_callback(self._acked)
        self.acks.append(ack)

    def _acked(self, f: asyncio.Future[PubAck]) -> None:
        self.unacked -= 1
        if not f.cancelled() and f.exception() is not None:
            self._interrupted(f.exception())  # type: ignore[arg-type]

    def _interrupted(self, exc: BaseException) -> None:
        if self.live:
            self.live = False
            self.h.stream_interruptions.inc()
            self.h.bus.log.warning(
                "token_stream_interrupted", call_id=self.call_id, error=repr(exc)
            )

    async def _settle_pushes(self) -> None:
        # Pushes go out without a round trip each; their acks are collected before the
        # outcome is published, so every token a client can get is stored before the
        # answer or the retry that follows it. A lost one is counted.
        async with self.pushing:
            for lost in await Bus.settle(self.acks, timeout=1.0):
                self._interrupted(lost)
            self.acks.clear()


def _call_ids(t: m.ExecTask, call_id: str) -> dict[str, Any]:
    """What a call's outcome (result or failure) carries from its task."""
    return {
        "message_id": t.message_id,
        "conversation_id": t.conversation_id,
        "project_id": t.project_id,
        "causation_id": t.event_id,
        "task_id": t.task_id,
        "call_id": call_id,
        "run_id": t.run_id,
        "attempt": t.attempt,
        "model": t.model,
        "prices": t.prices,
    }
