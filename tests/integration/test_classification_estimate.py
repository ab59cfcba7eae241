"""A classification call cut by its agent's death is billed once, by estimate, when the message
is delivered again; a call whose exact usage went out before the agent died keeps it. Real NATS,
Postgres, the offline model and an agent process (SIGKILL mid-stream)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
import nats.js.errors
import pytest

from baton import dlq
from baton.offline_model import OfflineModelProcess
from baton.provision import provision
from services.agent.adapters import Classifier
from services.agent.config import Settings
from services.agent.handlers import Handlers as AgentHandlers
from services.persister.adapters import Store
from services.persister.handlers import Handlers as PersisterHandlers
from shared import deadcalls, estimate, model, runs, subjects, wiring
from shared import messages as m
from shared.bus import Bus, Consumer
from shared.db import create_pool
from shared.errors import Transient
from shared.history import History
from tests.integration.conftest import Infra
from tests.support import (
    connect_bus,
    decode_all,
    eventually,
    read_subject,
    running,
    service_metrics,
    user_event,
)


def _agent_process(infra: Infra, model_url: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "BATON_NATS_URL": infra.nats_url,
        "BATON_DATABASE_URL": infra.database_url,
        "BATON_METRICS_PORT": "0",
        "AGENT_ANTHROPIC_BASE_URL": model_url,
        "AGENT_ANTHROPIC_API_KEY": "test-key",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "services.agent"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@asynccontextmanager
async def _persister(infra: Infra) -> AsyncIterator[Bus]:
    """The persister's consumers of user messages and classification usage; yields a bus."""
    bus = await connect_bus(infra.nats_url, "persister")
    pool = await create_pool(infra.database_url)
    p = PersisterHandlers(bus, Store(pool), service_metrics("persister"))
    try:
        async with running(
            Consumer(bus, wiring.PERSISTER_IN, m.UserMessageAccepted, p.user_message),
            Consumer(bus, wiring.PERSISTER_USAGE, m.ModelUsage, p.model_usage),
        ):
            yield bus
    finally:
        await bus.close()
        await pool.close()


@asynccontextmanager
async def _agent(
    infra: Infra, model_url: str, kind: type[AgentHandlers]
) -> AsyncIterator[AgentHandlers]:
    """An agent in this process (``kind``: its handlers), consuming ``chat.persisted.user``."""
    settings = Settings()
    bus = await connect_bus(infra.nats_url, "agent")
    pool = await create_pool(infra.database_url)
    client = model.client(model_url, "test-key", 10.0)
    classifier = Classifier(client, settings.model, settings.max_tokens)
    h = kind(bus, History(pool), classifier, settings, service_metrics("agent"))
    try:
        async with running(Consumer(bus, wiring.AGENT_IN, m.UserMessagePersisted, h.user_message)):
            yield h
    finally:
        await bus.close()
        await pool.close()
        await client.close()


async def _rows(
    dsn: str, n: int = 0, having: tuple[str, ...] = (), estimated: tuple[str, ...] | None = None
) -> list[Any]:
    """Every usage row, once there are at least ``n`` and each of ``having`` has one (and, with
    ``estimated``, the estimated rows are those: an overlapping delivery's estimate of a call
    whose exact usage is on its way is replaced by it)."""

    async def written() -> list[Any] | None:
        con = await asyncpg.connect(dsn)
        try:
            rows = await con.fetch("SELECT * FROM usage ORDER BY call_id")
        finally:
            await con.close()
        enough = len(rows) >= n and set(having) <= {r["call_id"] for r in rows}
        if estimated is not None:
            enough = enough and {r["call_id"] for r in rows if r["estimated"]} == set(estimated)
        return list(rows) if enough else None

    return await eventually(written, timeout=90)


async def _record(bus: Bus, call_id: str) -> estimate.ModelCallRecord | None:
    try:
        raw = await bus.js.get_last_msg(
            estimate.record_stream(call_id), estimate.record_subject(call_id)
        )
    except nats.js.errors.NotFoundError:
        return None
    return msgspec.json.decode(raw.data or b"", type=estimate.ModelCallRecord)


def _message(text: str) -> tuple[m.UserMessageAccepted, str, str]:
    """A user message of a project and conversation of its own, and the call ids of its first
    two deliveries' classification calls."""
    project, conversation = f"p{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
    e = user_event(text, project=project, conversation_id=conversation)
    return e, f"classify:{e.message_id}#1", f"classify:{e.message_id}#2"


def _assert_exact(rows: dict[str, Any], ledger: dict[str, Any], calls: tuple[str, ...]) -> None:
    """Each of ``calls`` has its exact row: the tokens the model's ledger says it served."""
    for call_id in calls:
        row, served = rows[call_id], ledger[call_id]
        assert (row["estimated"], row["outcome"]) == (False, "completed"), call_id
        assert _input(row) == _served_input(served), call_id
        assert row["output_tokens"] == served["output_tokens"], call_id


def _input(row: Any) -> tuple[int, int, int]:
    return row["input_tokens"], row["cache_read_tokens"], row["cache_write_tokens"]


def _served_input(served: dict[str, Any]) -> tuple[int, int, int]:
    keys = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
    return served[keys[0]], served[keys[1]], served[keys[2]]


async def test_a_call_cut_by_a_sigkilled_agent_gets_one_estimated_row_when_the_message_returns(
    infra: Infra, offline_model: OfflineModelProcess
) -> None:
    # A short ack_wait, so the dead agent's message is delivered again in seconds.
    await provision(infra.nats_url, ack_wait_s=2.0)
    before = offline_model.update_settings()
    # The classification's tool input streams slowly: the agent is killed mid-call.
    offline_model.update_settings(tokens_per_second=2)
    proc = _agent_process(infra, offline_model.url)
    project, conversation = f"p{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
    e = user_event("What is a durable consumer?", project=project, conversation_id=conversation)
    first, second = f"classify:{e.message_id}#1", f"classify:{e.message_id}#2"
    try:
        async with _persister(infra) as bus:
            await bus.publish(subjects.chat_in(project, conversation), e, msg_id=e.message_id)
            # message_start has come: the record holds the input the provider counted.
            record = await eventually(lambda: _record(bus, first), timeout=90)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            assert offline_model.calls()[first]["outcome"] != "completed"
            offline_model.update_settings(tokens_per_second=0)
            async with _agent(infra, offline_model.url, AgentHandlers) as agent:
                decisions = decode_all(
                    await read_subject(bus, subjects.STREAM_DECISIONS, "agent.decision.>", 1),
                    m.AgentDecision,
                )
                # The decision's call billed before the decision went out.
                rows = await _rows(
                    infra.database_url, having=(first, decisions[0].call_id), estimated=(first,)
                )
            con = await asyncpg.connect(infra.database_url)
            try:
                totals = await con.fetchrow(
                    "SELECT * FROM project_usage WHERE project_id = $1", project
                )
                again = await con.fetch("SELECT * FROM usage ORDER BY call_id")
            finally:
                await con.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        offline_model.update_settings(tokens_per_second=before["tokens_per_second"])
    ledger = offline_model.calls()
    by_call = {r["call_id"]: r for r in rows}
    # One decision, from a later call. On a busy machine the second delivery can outlast the
    # 2 s ack_wait, and a third one overlaps it (a call of its own, exact too): the count of
    # deliveries is not the point, the rows are.
    [decision] = decisions
    assert decision.call_id != first and second in ledger
    assert all(c.startswith(f"classify:{e.message_id}#") for c in by_call)
    assert set(by_call) <= set(ledger)
    cut, exact = by_call[first], by_call[decision.call_id]
    # The cut call: flagged, input exactly as the model counted it, output never more than it
    # sent (what message_start reported), priced; the redelivery's call exact.
    assert (cut["estimated"], cut["outcome"], cut["purpose"]) == (
        True,
        estimate.AGENT_OUTCOME,
        "classification",
    )
    assert (
        _input(cut)
        == _served_input(ledger[first])
        == (
            record.usage.input_tokens,
            record.usage.cache_read_tokens,
            record.usage.cache_write_tokens,
        )
    )
    assert cut["input_tokens"] > 0 and float(cut["cost_usd"]) > 0
    assert cut["output_tokens"] == record.usage.output_tokens <= ledger[first]["output_tokens"]
    assert (exact["estimated"], exact["outcome"]) == (False, "completed")
    _assert_exact(by_call, ledger, tuple(c for c in by_call if c != first))
    assert cut["run_id"] == exact["run_id"] == f"run-{e.message_id}"
    assert agent.estimated._value.get() >= 1
    # Nothing is billed twice: a row once written stays as it was.
    assert {r["call_id"]: dict(r) for r in again if r["call_id"] in by_call} == {
        c: dict(r) for c, r in by_call.items()
    }
    assert totals["input_tokens"] == sum(r["input_tokens"] for r in again)
    assert totals["output_tokens"] == sum(r["output_tokens"] for r in again)


class _LosesTheBrokerAfterItsFirstUsage(AgentHandlers):
    """An agent whose broker went away right after the first call's exact usage was stored:
    the decision is never published, the message comes back."""

    async def _bill(
        self,
        e: m.UserMessagePersisted,
        call_id: str,
        outcome: str,
        usage: m.Usage,
        estimated: bool = False,
    ) -> None:
        await super()._bill(e, call_id, outcome, usage, estimated)
        if call_id.endswith("#1") and not estimated:
            raise Transient("the broker went away after the usage was stored")


async def test_a_call_whose_exact_usage_went_out_keeps_it_when_the_message_returns(
    infra: Infra, offline_model: OfflineModelProcess
) -> None:
    await provision(infra.nats_url, ack_wait_s=2.0)
    e, first, second = _message("And a stream?")
    async with (
        _persister(infra) as bus,
        _agent(infra, offline_model.url, _LosesTheBrokerAfterItsFirstUsage) as agent,
    ):
        await bus.publish(subjects.chat_in(e.project_id, e.conversation_id), e, msg_id=e.message_id)
        [decision] = decode_all(
            await read_subject(bus, subjects.STREAM_DECISIONS, "agent.decision.>", 1),
            m.AgentDecision,
        )
        # The decision's call billed before the decision went out: its row and the first's.
        rows = await _rows(infra.database_url, having=(first, decision.call_id), estimated=())
        # The first call's record says "started" (the agent writes no "finished"): each later
        # delivery estimates it, and the persister keeps the exact row.
        record = await _record(bus, first)
    assert record is not None and record.state == "started"
    # Estimated at least once, never stored. On a busy machine a second delivery can outlast
    # the 2 s ack_wait, and a third one, overlapping it, estimates the call again (and makes a
    # call of its own): the count is not the point, the rows are.
    assert agent.estimated._value.get() >= 1
    ledger = offline_model.calls()
    by_call = {r["call_id"]: r for r in rows}
    later = set(by_call) - {first}
    assert second in later and decision.call_id in later
    assert all(c.startswith(f"classify:{e.message_id}#") for c in later)
    _assert_exact(by_call, ledger, tuple(by_call))
    assert all(ledger[c]["output_tokens"] > 1 for c in by_call)


class _CutOffPastAckWait(AgentHandlers):
    """An agent cut off from the broker once its first call finished: its exact usage does not
    go out (the message comes back after ``ack_wait`` and another delivery estimates the call);
    it goes out late, once the agent is back (``late``), as a publish that was retried would."""

    held: list[tuple[Any, ...]]

    async def _bill(
        self,
        e: m.UserMessagePersisted,
        call_id: str,
        outcome: str,
        usage: m.Usage,
        estimated: bool = False,
    ) -> None:
        if call_id.endswith("#1") and not estimated:
            self.held = [(e, call_id, outcome, usage)]
            raise Transient("the broker is unreachable")
        await super()._bill(e, call_id, outcome, usage, estimated)

    async def late(self) -> None:
        for args in self.held:
            await super()._bill(*args)


async def test_an_exact_usage_that_comes_after_the_calls_estimate_replaces_it(
    infra: Infra, offline_model: OfflineModelProcess
) -> None:
    """The exact usage wins even when it comes second, within the broker's dedup window: the
    estimate and the exact usage of one call are two messages, the row is one (by call id)."""
    await provision(infra.nats_url, ack_wait_s=2.0)
    e, first, second = _message("Cut off?")
    async with (
        _persister(infra) as bus,
        _agent(infra, offline_model.url, _CutOffPastAckWait) as agent,
    ):
        await bus.publish(subjects.chat_in(e.project_id, e.conversation_id), e, msg_id=e.message_id)
        rows = {r["call_id"]: r for r in await _rows(infra.database_url, 2)}
        assert set(rows) == {first, second}
        assert rows[first]["estimated"] and not rows[second]["estimated"]
        await agent.late()

        async def replaced() -> list[Any] | None:
            got = await _rows(infra.database_url, 2)
            return got if not any(r["estimated"] for r in got) else None

        final = {r["call_id"]: r for r in await eventually(replaced, timeout=60)}
        con = await asyncpg.connect(infra.database_url)
        try:
            totals = await con.fetchrow(
                "SELECT * FROM project_usage WHERE project_id = $1", e.project_id
            )
        finally:
            await con.close()
    ledger = offline_model.calls()
    assert set(final) == {first, second}
    _assert_exact(final, ledger, (first, second))
    assert totals["input_tokens"] == sum(r["input_tokens"] for r in final.values())
    assert totals["output_tokens"] == sum(r["output_tokens"] for r in final.values())


async def test_a_call_cut_on_the_messages_last_delivery_is_billed_when_it_is_dead_lettered_and_its_replay_apart(
    infra: Infra, offline_model: OfflineModelProcess
) -> None:
    """The delivery past the bound is dead-lettered unhandled, and no delivery comes after it
    to bill the call its agent died in: the consumer's exhausted hook bills it first. The
    letter's replay then makes a call of its own, billed in a row of its own."""
    await provision(infra.nats_url, ack_wait_s=2.0)
    before = offline_model.update_settings()
    offline_model.update_settings(tokens_per_second=2)
    proc = _agent_process(infra, offline_model.url)
    e, first, _ = _message("What is a dead letter?")
    try:
        async with _persister(infra) as bus:
            await bus.publish(
                subjects.chat_in(e.project_id, e.conversation_id), e, msg_id=e.message_id
            )
            record = await eventually(lambda: _record(bus, first), timeout=90)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            assert offline_model.calls()[first]["outcome"] != "completed"
            offline_model.update_settings(tokens_per_second=0)
            # The agent as main.py wires it, with the bound at one delivery: the one the dead
            # agent held was the message's last allowed delivery.
            agent_bus = await connect_bus(infra.nats_url, "agent")
            pool = await create_pool(infra.database_url)
            client = model.client(offline_model.url, "test-key", 10.0)
            settings = Settings()
            h = AgentHandlers(
                agent_bus,
                History(pool),
                Classifier(client, settings.model, settings.max_tokens),
                settings,
                service_metrics("agent"),
            )
            [consumer, _] = wiring.consumers(agent_bus, "agent", h)
            assert consumer.spec == wiring.AGENT_IN
            consumer.spec = msgspec.structs.replace(consumer.spec, max_deliver=1)
            try:
                async with running(consumer):
                    [raw] = await read_subject(
                        bus,
                        subjects.STREAM_DLQ,
                        subjects.dead_letter(wiring.AGENT_IN.stream, wiring.AGENT_IN.durable),
                        1,
                        60,
                    )
                    [cut] = await _rows(infra.database_url, 1)
                    hooked = h.estimated._value.get()
                    # The operator replays the letter once the cause is gone. The copy's
                    # deliveries count from 1 again; its call must not take the id of the call
                    # billed by estimate, or its exact usage would replace that row.
                    await dlq.replay(infra.nats_url, raw.metadata.sequence.stream)
                    both = await _rows(infra.database_url, 2)
            finally:
                await agent_bus.close()
                await pool.close()
                await client.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        offline_model.update_settings(tokens_per_second=before["tokens_per_second"])
    letter = msgspec.json.decode(raw.data, type=m.DeadLetter)
    assert letter.reason.startswith("delivered 2 times without an outcome"), letter.reason
    assert msgspec.json.decode(letter.payload, type=m.UserMessagePersisted).message_id == (
        e.message_id
    )
    ledger = offline_model.calls()
    assert set(ledger) >= {first} and f"classify:{e.message_id}#2" not in ledger
    assert (cut["call_id"], cut["estimated"], cut["outcome"]) == (
        first,
        True,
        estimate.AGENT_OUTCOME,
    )
    assert _input(cut) == _served_input(ledger[first])
    assert cut["output_tokens"] == record.usage.output_tokens <= ledger[first]["output_tokens"]
    assert hooked == 1
    # The copy's call counts on from the letter's two deliveries: a row of its own, exact.
    replayed = f"classify:{e.message_id}#3"
    rows = {r["call_id"]: r for r in both}
    assert set(rows) == {first, replayed}
    assert rows[first]["estimated"] and rows[first]["input_tokens"] == cut["input_tokens"]
    _assert_exact(rows, offline_model.calls(), (replayed,))


class _OutlastedThenDies(AgentHandlers):
    """Delivery 1 waits before its call until ``go`` is set (the test sets it once delivery 2,
    sent again after the 2 s ack_wait and reading delivery 1's record before there is one, is
    decided and acked, or once delivery 2's timer ran too). Then delivery 1 makes its call, and
    its agent dies before billing it: ``_bill`` never returns, so its usage never goes out
    (``dead`` is set there)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.second_done = asyncio.Event()
        self.go = asyncio.Event()
        self.dead = asyncio.Event()

    async def user_message(self, e: m.UserMessagePersisted, msg: Any) -> str:
        out = await super().user_message(e, msg)
        if msg.metadata.num_delivered == 2:
            self.second_done.set()
        return out

    async def _classify(
        self,
        e: m.UserMessagePersisted,
        transcript: str,
        call_id: str,
        delivery: int,
        began: float,
    ) -> tuple[m.Decision | None, str, m.Usage, bool]:
        if call_id.endswith("#1"):
            await self.go.wait()
        return await super()._classify(e, transcript, call_id, delivery, began)

    async def _bill(
        self,
        e: m.UserMessagePersisted | m.ClassificationSettle,
        call_id: str,
        outcome: str,
        usage: m.Usage,
        estimated: bool = False,
    ) -> None:
        if call_id.endswith("#1") and not estimated:
            self.dead.set()
            await asyncio.Event().wait()  # the process is gone: nothing more happens here
        await super()._bill(e, call_id, outcome, usage, estimated)


class _Settles(AgentHandlers):
    """An agent's settle handler that says what each timer it ran came to."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.outcomes: dict[str, str] = {}
        self.at: dict[str, datetime] = {}
        self.ran = asyncio.Event()

    async def settle(self, t: m.ClassificationSettle, msg: Any) -> str:
        out = await super().settle(t, msg)  # a timer not due yet is handed back (Deferred)
        self.outcomes[t.event_id], self.at[t.event_id] = out, datetime.now(UTC)
        self.ran.set()
        return out


def _beats_all_but_the_first(consumer: Consumer[Any]) -> None:
    """The consumer's heartbeat, lost for first deliveries (a broker restart, or a loop too busy
    to send it): they are delivered again after ack_wait while they run; later ones are not."""

    async def beat(over: asyncio.Event) -> None:
        while not over.is_set():
            await asyncio.sleep(max(consumer.ack_wait_s / 3, 0.2))
            for msg in list(consumer.inflight.values()):
                if msg.metadata.num_delivered > 1:
                    with contextlib.suppress(Exception):
                        await msg.in_progress()

    consumer._heartbeat = beat  # type: ignore[method-assign]


@pytest.mark.parametrize("timer", ["redelivery", "late"])
async def test_a_call_of_a_delivery_that_outlasted_ack_wait_is_billed_when_it_dies_after_the_message_was_acked(
    infra: Infra, offline_model: OfflineModelProcess, timer: str
) -> None:
    """Found by the chaos suite on a busy machine: deliveries overlap, the later one reads the
    earlier one's record before it is written, the earlier one dies after its call, and the
    later one's ack means no delivery comes again to read it.

    ``redelivery``: the later delivery's settle timer, run after the earlier call's record,
    bills it. ``late``: the later delivery's timer ran first and found nothing (the earlier
    delivery was held up past it); the earlier call, its record late, sent a timer for itself,
    which bills it. Either way the later delivery's own call keeps its exact row."""
    # Delivered again 4 s after it began (no heartbeat): later deliveries, which send theirs,
    # would need a loop stalled for 4 s for a third to overlap them.
    await provision(infra.nats_url, ack_wait_s=4.0)
    e, first, second = _message("Which delivery pays?")
    if timer == "redelivery":
        # The second delivery's timer is due 10 s after it began, and runs once the first's
        # agent is gone (its consumer starts then). The first call's record is late only if the
        # second delivery took 10 s (a very busy machine): then it sends a timer of its own too.
        settings = Settings(model_timeout_s=10.0, settle_grace_s=0.0, settle_late_s=10.0)
    else:
        # Timers due a second after they are sent, run as main.py runs them: at once.
        settings = Settings(model_timeout_s=0.5, settle_grace_s=0.5, settle_late_s=1.0)
    agent_bus = await connect_bus(infra.nats_url, "agent")
    pool = await create_pool(infra.database_url)
    client = model.client(offline_model.url, "test-key", 10.0)
    classifier = Classifier(client, settings.model, settings.max_tokens)
    dying = _OutlastedThenDies(
        agent_bus, History(pool), classifier, settings, service_metrics("agent")
    )
    later = _Settles(agent_bus, History(pool), classifier, settings, service_metrics("agent"))
    [agent_in, _] = wiring.consumers(agent_bus, "agent", dying)
    _beats_all_but_the_first(agent_in)
    [_, settle] = wiring.consumers(agent_bus, "agent", later)
    timers_subject = subjects.agent_settle(e.project_id, e.conversation_id)
    own = runs.classification_settle_id(second)
    try:
        async with _persister(infra) as bus, contextlib.AsyncExitStack() as stack:
            if timer == "late":
                await stack.enter_async_context(running(settle))
            await stack.enter_async_context(running(agent_in))
            await bus.publish(
                subjects.chat_in(e.project_id, e.conversation_id), e, msg_id=e.message_id
            )
            [decision] = decode_all(
                await read_subject(bus, subjects.STREAM_DECISIONS, "agent.decision.>", 1),
                m.AgentDecision,
            )
            await asyncio.wait_for(dying.second_done.wait(), timeout=90)
            # The second delivery read the first's record before it was written, and its
            # message is acked: no delivery comes again to read it.
            estimated = dying.estimated._value.get()
            if timer == "late":
                await asyncio.wait_for(later.ran.wait(), timeout=90)
            early = {r["call_id"] for r in await _rows(infra.database_url, 1)}
            dying.go.set()
            await asyncio.wait_for(dying.dead.wait(), timeout=90)
            record = await _record(bus, first)
            for task in list(agent_in.inflight):
                task.cancel()  # the first delivery's agent is gone
            if timer == "redelivery":
                await stack.enter_async_context(running(settle))
            rows = await _rows(infra.database_url, having=(first, second), estimated=(first,))

            async def ran() -> bool | None:
                return own in later.outcomes or None

            await eventually(ran, timeout=90)
            sent = {
                t.event_id: t
                for t in decode_all(
                    await read_subject(bus, subjects.STREAM_DECISIONS, timers_subject, 1),
                    m.ClassificationSettle,
                )
            }
            finished = await _record(bus, second)
    finally:
        await agent_bus.close()
        await pool.close()
        await client.close()
    assert decision.call_id == second and early == {second} and estimated == 0
    assert sent[own].calls == (first, second) and sent[own].user_id == e.user_id
    late_id = runs.classification_settle_id(first, late=True)
    if timer == "late":
        # The second delivery's timer came too early for the first call: the late call's own
        # timer billed it.
        assert later.outcomes[own] == "settled:0"
        assert sent[late_id].calls == (first,)
        assert later.outcomes[late_id] == "settled:1"
    else:
        # It read the first call's record and billed it; not its own call (finished).
        assert later.outcomes[own] == "settled:1"
    assert record is not None and record.state == "started"
    ledger = offline_model.calls()
    assert ledger[first]["outcome"] == "completed"  # the provider served (and billed) it
    by_call = {r["call_id"]: r for r in rows}
    assert set(by_call) == {first, second}
    cut = by_call[first]
    assert (cut["estimated"], cut["outcome"], cut["purpose"], cut["user_id"]) == (
        True,
        estimate.AGENT_OUTCOME,
        "classification",
        e.user_id,
    )
    assert _input(cut) == _served_input(ledger[first])
    assert cut["output_tokens"] == record.usage.output_tokens <= ledger[first]["output_tokens"]
    # The second delivery's call wrote its "finished" record: no timer estimated it.
    assert finished is not None and finished.state == "finished"
    _assert_exact(by_call, ledger, (second,))


async def test_the_settle_consumer_dead_letters_timers_no_agent_sends_and_bills_a_call_once(
    infra: Infra, offline_model: OfflineModelProcess
) -> None:
    """Hostile, malformed and duplicate timers on ``agent.settle``: a timer naming another
    message's call, one due hours ahead, one whose subject names another conversation, and
    bytes that are not JSON are dead-lettered and bill nothing; a valid timer, its duplicate,
    the same timer under another id and one not yet due (handed back, then run) bill the
    started call once, and a named call that never started nothing."""
    await provision(infra.nats_url)
    e, first, second = _message("Settle me")
    subject = subjects.agent_settle(e.project_id, e.conversation_id)
    started = m.Usage(input_tokens=42, cache_read_tokens=3)
    settings = Settings()
    agent_bus = await connect_bus(infra.nats_url, "agent")
    pool = await create_pool(infra.database_url)
    h = _Settles(agent_bus, History(pool), None, settings, service_metrics("agent"))  # type: ignore[arg-type]
    [_, settle] = wiring.consumers(agent_bus, "agent", h)

    def timer(event_id: str, **changes: Any) -> m.ClassificationSettle:
        fields: dict[str, Any] = {
            "event_id": event_id,
            "message_id": e.message_id,
            "conversation_id": e.conversation_id,
            "project_id": e.project_id,
            "user_id": e.user_id,
            "due": datetime.now(UTC),
            "calls": (first, second),
        }
        return m.ClassificationSettle(**(fields | changes))

    valid = ("t-valid", "t-again", "t-later")
    try:
        async with _persister(infra) as bus:
            # The message is stored (its usage rows belong to it), and its first call started.
            await bus.publish(
                subjects.chat_in(e.project_id, e.conversation_id), e, msg_id=e.message_id
            )
            await read_subject(
                bus,
                subjects.STREAM_PERSISTED,
                subjects.persisted_user(e.project_id, e.conversation_id),
                1,
            )
            assert await deadcalls.write_record(
                agent_bus, first, f"classify:{e.message_id}", "started", started
            )
            hostile = [
                timer("t-other", message_id="another-message"),  # another message's calls
                timer("t-ahead", due=datetime.now(UTC) + timedelta(hours=3)),
            ]
            for t in hostile:
                await agent_bus.publish(subject, t, msg_id=t.event_id)
            # Billed to another conversation than the subject says.
            moved = timer("t-moved", conversation_id=str(uuid.uuid4()))
            await agent_bus.publish(subject, moved, msg_id=moved.event_id)
            await agent_bus.js.publish(
                subject, b'{"not": "a timer"', headers={"Nats-Msg-Id": "t-garbled"}
            )
            for _ in range(2):
                await agent_bus.publish(subject, timer(valid[0]), msg_id=valid[0])
            # The same timer again under another id (past the broker's dedup): billed once.
            await agent_bus.publish(subject, timer(valid[1]), msg_id=valid[1])
            due = datetime.now(UTC) + timedelta(seconds=2)
            await agent_bus.publish(subject, timer(valid[2], due=due), msg_id=valid[2])
            async with running(settle):
                letters = [
                    letter
                    for letter in decode_all(
                        await read_subject(
                            bus,
                            subjects.STREAM_DLQ,
                            subjects.dead_letter(
                                wiring.AGENT_SETTLE.stream, wiring.AGENT_SETTLE.durable
                            ),
                            4,
                            60,
                        ),
                        m.DeadLetter,
                    )
                    if letter.subject == subject
                ]

                async def all_ran() -> bool | None:
                    return set(valid) <= set(h.outcomes) or None

                await eventually(all_ran, timeout=60)
                # What the persister was sent is stored (its last timer's estimate included).
                rows = [
                    r for r in await _rows(infra.database_url, 1) if r["project_id"] == e.project_id
                ]
                con = await asyncpg.connect(infra.database_url)
                try:
                    totals = await con.fetchrow(
                        "SELECT * FROM project_usage WHERE project_id = $1", e.project_id
                    )
                finally:
                    await con.close()
    finally:
        await agent_bus.close()
        await pool.close()
    reasons = sorted(letter.reason for letter in letters)
    assert len(reasons) == 4, reasons
    assert any("are not deliveries of message another-message" in r for r in reasons), reasons
    assert any("not within the hour" in r for r in reasons), reasons
    assert any("another conversation than its subject" in r for r in reasons), reasons
    assert any("undecodable" in r for r in reasons), reasons
    # Each valid timer read the started call (the other never started), the late one when due.
    assert {t: h.outcomes[t] for t in valid} == dict.fromkeys(valid, "settled:1")
    assert h.at[valid[2]] >= due
    [row] = rows
    assert (row["call_id"], row["estimated"], row["outcome"]) == (
        first,
        True,
        estimate.AGENT_OUTCOME,
    )
    assert (row["input_tokens"], row["cache_read_tokens"]) == (42, 3)
    assert (totals["input_tokens"], totals["cache_read_tokens"]) == (42, 3)
