"""The persister against real NATS and Postgres: each write once, announced, poison dead-lettered."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import msgspec
import pytest

from services.persister import core
from services.persister.adapters import STORE_RESULT, Placed, Store
from services.persister.handlers import Handlers
from shared import messages as m
from shared import subjects, wiring
from shared.bus import Consumer
from shared.db import create_pool
from shared.errors import BadData
from tests.integration.conftest import Infra
from tests.support import (
    blocked_on_a_lock,
    connect_bus,
    decode_all,
    eventually,
    exec_result,
    read_subject,
    running,
    service_metrics,
    user_event,
)


async def _persister(infra: Infra):  # type: ignore[no-untyped-def]
    bus = await connect_bus(infra.nats_url, "persister")
    pool = await create_pool(infra.database_url)
    h = Handlers(bus, Store(pool), service_metrics("persister"))
    consumers = [
        Consumer(bus, wiring.PERSISTER_IN, m.UserMessageAccepted, h.user_message),
        Consumer(bus, wiring.PERSISTER_RESULTS, m.ExecResult, h.result),
        Consumer(bus, wiring.PERSISTER_FAILED, m.ExecFailed, h.failed_usage),
        Consumer(bus, wiring.PERSISTER_REPLIES, m.PolicyReply, h.reply),
        Consumer(bus, wiring.PERSISTER_VERDICTS, m.RunVerdict, h.verdict),
    ]
    return bus, pool, consumers


def _result(e: m.UserMessageAccepted, call: int, text: str = "the answer") -> m.ExecResult:
    usage = m.Usage(input_tokens=100, output_tokens=50, cache_read_tokens=10, cache_write_tokens=5)
    return exec_result(e, call, text, usage)


async def test_a_redelivered_user_message_is_stored_once_and_announced_once(infra: Infra) -> None:
    bus, pool, consumers = await _persister(infra)
    e = user_event()
    subject = subjects.chat_in(e.project_id, e.conversation_id)
    # Two publishes with distinct ids stand in for a redelivery after the dedup window.
    await bus.publish(subject, e, msg_id=e.message_id)
    await bus.publish(subject, e, msg_id=e.message_id + "-again")
    async with running(*consumers):
        found = await read_subject(bus, subjects.STREAM_PERSISTED, "chat.persisted.user.>", 1)
    assert [p.message_id for p in decode_all(found, m.UserMessagePersisted)] == [e.message_id]
    rows = await pool.fetch("SELECT id, content, role FROM messages")
    assert [(str(r["id"]), r["content"], r["role"]) for r in rows] == [
        (e.message_id, e.content, "user")
    ]
    await bus.close()
    await pool.close()


async def test_two_results_for_one_run_store_one_answer_and_count_both_calls(infra: Infra) -> None:
    bus, pool, consumers = await _persister(infra)
    e = user_event()
    await bus.publish(subjects.chat_in(e.project_id, e.conversation_id), e, msg_id=e.message_id)
    first, second = _result(e, 1, "first answer"), _result(e, 2, "second answer")
    async with running(*consumers):
        await read_subject(bus, subjects.STREAM_PERSISTED, "chat.persisted.user.>", 1)
        # The first result is stored first; a second call's result and a replay come later.
        await bus.publish(subjects.exec_result(e.project_id, e.conversation_id), first, msg_id="r1")
        found = await read_subject(bus, subjects.STREAM_PERSISTED, "chat.persisted.assistant.>", 1)
        for r, mid in ((second, "r2"), (first, "r1-again")):
            await bus.publish(subjects.exec_result(e.project_id, e.conversation_id), r, msg_id=mid)
        await eventually(lambda: pool.fetchval("SELECT count(*) = 2 FROM usage"))
        found = await read_subject(bus, subjects.STREAM_PERSISTED, "chat.persisted.assistant.>", 1)
    announced = decode_all(found, m.AssistantMessagePersisted)
    assert [(a.content, a.status, a.kind) for a in announced] == [
        ("first answer", "completed", "answer")
    ]
    replies = await pool.fetch("SELECT content FROM messages WHERE role = 'assistant'")
    assert [r["content"] for r in replies] == ["first answer"]
    totals = await pool.fetchrow("SELECT * FROM project_usage WHERE project_id = $1", e.project_id)
    assert (totals["input_tokens"], totals["output_tokens"], totals["runs"]) == (200, 100, 1)
    assert totals["cache_read_tokens"] == 20 and totals["cache_write_tokens"] == 10
    expected_cost = 2 * first.usage.cost_usd(first.prices)
    assert abs(float(totals["cost_usd"]) - expected_cost) < 1e-9
    run = await pool.fetchrow("SELECT status, attempts FROM runs")
    assert (run["status"], run["attempts"]) == ("completed", 1)
    await bus.close()
    await pool.close()


async def test_a_late_verdict_never_moves_a_completed_run_backwards(infra: Infra) -> None:
    bus, pool, consumers = await _persister(infra)
    e = user_event()
    run_id = f"run-{e.message_id}"
    verdict = m.RunVerdict(
        event_id="v1",
        message_id=e.message_id,
        conversation_id=e.conversation_id,
        project_id=e.project_id,
        run_id=run_id,
        user_id=e.user_id,
        verdict="approve",
        status="running",
        reason="intent=question",
        model="claude-sonnet-4-6",
        executor="chat",
        attempt=1,
        estimated_tokens=300,
    )
    async with running(*consumers):
        await bus.publish(subjects.chat_in(e.project_id, e.conversation_id), e, msg_id=e.message_id)
        await read_subject(bus, subjects.STREAM_PERSISTED, "chat.persisted.user.>", 1)
        r = _result(e, 1)
        await bus.publish(subjects.exec_result(e.project_id, e.conversation_id), r, msg_id="r1")
        await read_subject(bus, subjects.STREAM_PERSISTED, "chat.persisted.assistant.>", 1)
        await bus.publish(
            subjects.policy_verdict(e.project_id, e.conversation_id), verdict, msg_id="v1"
        )

        async def verdict_stored() -> asyncpg.Record | None:
            row = await pool.fetchrow("SELECT * FROM runs WHERE run_id = $1", run_id)
            return row if row is not None and row["verdict"] == "approve" else None

        row = await eventually(verdict_stored)
    assert (row["status"], row["reason"], row["estimated_tokens"]) == (
        "completed",
        "intent=question",
        300,
    )
    await bus.close()
    await pool.close()


async def test_poison_and_foreign_conversation_messages_are_dead_lettered_with_reasons(
    infra: Infra,
) -> None:
    bus, pool, consumers = await _persister(infra)
    owner = user_event(user="alice")
    intruder = user_event(user="mallory", conversation_id=owner.conversation_id)
    subject = subjects.chat_in("p1", owner.conversation_id)
    async with running(*consumers):
        # The owner's message is stored first; only then do the bad ones arrive.
        await bus.publish(subject, owner, msg_id=owner.message_id)
        await read_subject(bus, subjects.STREAM_PERSISTED, "chat.persisted.user.>", 1)
        await bus.js.publish(subject, b"{not json", headers={"Nats-Msg-Id": "garbage"})
        await bus.js.publish(
            subject, msgspec.json.encode({"v": 1}), headers={"Nats-Msg-Id": "partial"}
        )
        future = msgspec.structs.replace(user_event(), v=99)
        await bus.publish(subject, future, msg_id="future")
        await bus.publish(subject, intruder, msg_id=intruder.message_id)
        letters = decode_all(await read_subject(bus, subjects.STREAM_DLQ, "dlq.>", 4), m.DeadLetter)
    reasons = sorted(letter.reason.split(":")[0] for letter in letters)
    assert reasons == [
        "conversation belongs to another project or user",
        "undecodable payload",
        "undecodable payload",
        "unknown schema version 99",
    ]
    assert {letter.payload for letter in letters} >= {b"{not json"}
    assert all(letter.subject == subject and letter.deliveries == 1 for letter in letters)
    stored = await pool.fetch("SELECT user_id FROM messages")
    assert [r["user_id"] for r in stored] == ["alice"]
    await bus.close()
    await pool.close()


async def test_a_failed_call_still_counts_its_partial_usage_once(infra: Infra) -> None:
    bus, pool, consumers = await _persister(infra)
    e = user_event()
    run_id = f"run-{e.message_id}"
    failed = m.ExecFailed(
        event_id="f1",
        message_id=e.message_id,
        conversation_id=e.conversation_id,
        project_id=e.project_id,
        task_id=f"task:{run_id}:1",
        call_id=f"task:{run_id}:1#1",
        run_id=run_id,
        attempt=1,
        model="claude-sonnet-4-6",
        error_class="cut_stream",
        error="stream cut",
        usage=m.Usage(input_tokens=40, output_tokens=7),
        prices=m.Prices(input=3.0, output=15.0),
    )
    async with running(*consumers):
        for i in range(3):
            await bus.publish(
                subjects.exec_failed(e.project_id, e.conversation_id), failed, msg_id=f"f{i}"
            )
        await eventually(lambda: pool.fetchval("SELECT count(*) = 1 FROM usage"))
        await eventually(
            lambda: pool.fetchval(
                "SELECT output_tokens = 7 FROM project_usage WHERE project_id = $1", e.project_id
            )
        )
    assert await pool.fetchval("SELECT outcome FROM usage") == "cut_stream"
    await bus.close()
    await pool.close()


async def test_a_burst_is_written_in_few_transactions_and_a_foreign_message_fails_alone(
    infra: Infra,
) -> None:
    bus = await connect_bus(infra.nats_url, "persister")
    pool = await create_pool(infra.database_url)
    metrics = service_metrics("persister")
    h = Handlers(bus, Store(pool), metrics)
    owner = user_event(user="alice")
    await Store(pool).insert_user_message(owner)
    burst = [user_event(f"message {i}") for i in range(100)]
    intruder = user_event(user="mallory", conversation_id=owner.conversation_id)
    for e in [*burst[:50], intruder, *burst[50:]]:
        await bus.publish(subjects.chat_in(e.project_id, e.conversation_id), e, msg_id=e.message_id)
    consumer = Consumer(
        bus, wiring.PERSISTER_IN, m.UserMessageAccepted, h.user_message, batch=64, concurrency=64
    )
    async with running(consumer):
        await read_subject(bus, subjects.STREAM_PERSISTED, "chat.persisted.user.>", 100)
        letters = decode_all(await read_subject(bus, subjects.STREAM_DLQ, "dlq.>", 1), m.DeadLetter)
    stored = {str(r["id"]) for r in await pool.fetch("SELECT id FROM messages")}
    assert stored == {e.message_id for e in burst} | {owner.message_id}
    assert [letter.reason for letter in letters] == [
        "conversation belongs to another project or user"
    ]
    transactions = metrics.registry.get_sample_value("baton_persister_batch_size_count")
    # One transaction per message would be 101. How many batches the burst makes depends on how
    # fast the consumer's fetches come back: 21 on a machine running two suites at once.
    assert transactions is not None and transactions < 50
    await bus.close()
    await pool.close()


async def test_verdicts_arriving_out_of_order_leave_the_newest_verdict(infra: Infra) -> None:
    bus, pool, consumers = await _persister(infra)
    e = user_event()
    run_id = f"run-{e.message_id}"

    def verdict(verdict: m.Verdict, status: m.RunStatus, attempt: int) -> m.RunVerdict:
        return m.RunVerdict(
            event_id=f"v-{status}-{attempt}",
            message_id=e.message_id,
            conversation_id=e.conversation_id,
            project_id=e.project_id,
            run_id=run_id,
            user_id=e.user_id,
            verdict=verdict,
            status=status,
            reason=f"{verdict} {attempt}",
            model="claude-sonnet-4-6",
            executor="chat",
            attempt=attempt,
        )

    # Newest first, as they may arrive from different consumers; each waits for the last.
    newest_first = [
        verdict("stop", "failed", 3),
        verdict("approve", "running", 3),
        verdict("approve", "running", 2),
    ]
    async with running(*consumers):
        for v in newest_first:
            await bus.publish(
                subjects.policy_verdict(e.project_id, e.conversation_id), v, msg_id=v.event_id
            )
            await eventually(
                lambda v=v: pool.fetchval(  # type: ignore[misc]
                    "SELECT updated_at IS NOT NULL FROM runs WHERE run_id = $1 AND attempts >= $2",
                    run_id,
                    v.attempt,
                )
            )
            await asyncio.sleep(0.2)
    row = await pool.fetchrow("SELECT status, verdict, reason, attempts FROM runs")
    assert dict(row) == {"status": "failed", "verdict": "stop", "reason": "stop 3", "attempts": 3}
    await bus.close()
    await pool.close()


async def test_two_persister_replicas_give_each_conversation_gapless_unique_positions(
    infra: Infra,
) -> None:
    replicas = [await _persister(infra) for _ in range(2)]
    bus = replicas[0][0]
    convs = [str(uuid.uuid4()) for _ in range(3)]
    events = [user_event(f"m{i}", conversation_id=convs[i % 3]) for i in range(60)]
    for e in events:
        await bus.publish(subjects.chat_in(e.project_id, e.conversation_id), e, msg_id=e.message_id)
    # A redelivery must keep its first position.
    await bus.publish(subjects.chat_in("p1", convs[0]), events[0], msg_id="again")
    ins = [c for _, _, consumers in replicas for c in consumers if c.spec == wiring.PERSISTER_IN]
    async with running(*ins):
        found = decode_all(
            await read_subject(bus, subjects.STREAM_PERSISTED, "chat.persisted.user.>", 60),
            m.UserMessagePersisted,
        )
    pool = replicas[0][1]
    rows = await pool.fetch("SELECT id, conversation_id, position FROM messages")
    by_conv: dict[str, list[int]] = {}
    for r in rows:
        by_conv.setdefault(str(r["conversation_id"]), []).append(r["position"])
    assert {c: sorted(p) for c, p in by_conv.items()} == {c: list(range(1, 21)) for c in convs}
    stored = {str(r["id"]): r["position"] for r in rows}
    assert all(p.position == stored[p.message_id] for p in found)
    for b, pl, _ in replicas:
        await b.close()
        await pl.close()


async def test_the_announced_reply_carries_the_usage_of_every_attempt_of_its_run(
    infra: Infra,
) -> None:
    """Policy settles budgets with this usage: a failed attempt's partial usage must be in it."""
    bus, pool, consumers = await _persister(infra)
    e = user_event()
    answer = _result(e, 2)
    run_id = answer.run_id
    failed = m.ExecFailed(
        event_id="f1",
        message_id=e.message_id,
        conversation_id=e.conversation_id,
        project_id=e.project_id,
        task_id=f"task:{run_id}:0",
        call_id=f"task:{run_id}:0#1",
        run_id=run_id,
        attempt=0,
        model="claude-haiku-4-5",
        error_class="cut_stream",
        error="stream cut",
        usage=m.Usage(input_tokens=40, output_tokens=7),
        prices=m.Prices(input=1.0, output=5.0),
    )
    p, c = e.project_id, e.conversation_id
    async with running(*consumers):
        await bus.publish(subjects.chat_in(p, c), e, msg_id=e.event_id)
        await read_subject(bus, subjects.STREAM_PERSISTED, "chat.persisted.user.>", 1)
        await bus.publish(subjects.exec_failed(p, c), failed, msg_id="f1")
        await eventually(lambda: pool.fetchval("SELECT count(*) = 1 FROM usage"))
        await bus.publish(subjects.exec_result(p, c), answer, msg_id="r1")
        [done] = decode_all(
            await read_subject(bus, subjects.STREAM_PERSISTED, "chat.persisted.assistant.>", 1),
            m.AssistantMessagePersisted,
        )
    assert done.usage == m.Usage(
        input_tokens=140, output_tokens=57, cache_read_tokens=10, cache_write_tokens=5
    )
    cost = (40 * 1.0 + 7 * 5.0 + 100 * 3.0 + 50 * 15.0 + 10 * 0.3 + 5 * 3.75) / 1e6
    assert abs(done.cost_usd - cost) < 1e-9
    # And which calls it sums: policy adds a dead call the sum does not hold, once.
    assert done.calls is not None and sorted(done.calls) == sorted([failed.call_id, answer.call_id])
    await bus.close()
    await pool.close()


async def test_the_same_result_stored_concurrently_answers_and_bills_once(infra: Infra) -> None:
    # One statement per result: a delivery racing another sees the reply only once that one
    # committed, and must still come back with the stored reply and the run's whole usage.
    pool = await create_pool(infra.database_url, max_size=8)
    store = Store(pool)
    e = user_event()
    await store.insert_user_message(e)
    first, second = _result(e, 1, "first answer"), _result(e, 2, "second answer")
    stored = await asyncio.gather(*(store.store_result(r) for r in [first, second] * 8))
    assert sum(s.inserted for s in stored) == 1
    winner = next(s for s in stored if s.inserted)
    assert {(s.id, s.content, s.kind) for s in stored} == {(winner.id, winner.content, "answer")}
    # Whatever a delivery saw, the usage it reports is never more than the two calls made.
    assert all(s.usage.input_tokens in (100, 200) for s in stored)
    # The calls it names are the ones its sum holds (100 input tokens a call).
    calls = {first.call_id, second.call_id}
    assert all(
        s.calls is not None and set(s.calls) <= calls and len(s.calls) * 100 == s.usage.input_tokens
        for s in stored
    )
    totals = await pool.fetchrow("SELECT * FROM project_usage WHERE project_id = $1", e.project_id)
    assert (totals["input_tokens"], totals["output_tokens"], totals["runs"]) == (200, 100, 1)
    assert await pool.fetchval("SELECT count(*) FROM usage") == 2
    assert await pool.fetchval("SELECT count(*) FROM messages WHERE role = 'assistant'") == 1
    run = await pool.fetchrow("SELECT status, attempts, user_id FROM runs")
    assert (run["status"], run["attempts"], run["user_id"]) == ("completed", 1, e.user_id)
    # Stored again later (a redelivery), it reports both calls and inserts nothing.
    again = await store.store_result(first)
    assert (again.inserted, again.id, again.usage.input_tokens) == (False, winner.id, 200)
    assert again.calls is not None and set(again.calls) == calls
    assert again.cost_usd == pytest.approx(2 * first.usage.cost_usd(first.prices))
    await pool.close()


async def test_a_result_for_an_unknown_message_writes_nothing(infra: Infra) -> None:
    pool = await create_pool(infra.database_url)
    store = Store(pool)
    with pytest.raises(BadData, match="unknown message"):
        await store.store_result(_result(user_event(), 1))
    for table in ("usage", "messages", "runs", "project_usage"):
        assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 0
    await pool.close()


async def test_a_result_racing_one_that_commits_later_still_returns_the_stored_reply(
    infra: Infra,
) -> None:
    # Another delivery of the run has written its reply and usage but not committed yet: this
    # statement waits for it, cannot see it in its snapshot, and must read it afterwards.
    pool = await create_pool(infra.database_url, max_size=4)
    store = Store(pool)
    e = user_event()
    await store.insert_user_message(e)
    first, second = _result(e, 1, "first answer"), _result(e, 2, "second answer")
    other = await pool.acquire()
    tx = other.transaction()
    await tx.start()
    try:
        await other.execute(
            STORE_RESULT,
            uuid.UUID(e.message_id),
            first.call_id,
            first.task_id,
            first.run_id,
            1,
            e.project_id,
            first.model,
            100,
            50,
            10,
            5,
            first.usage.cost_usd(first.prices),
            core.assistant_message_id(first.run_id),
            first.text,
            uuid.UUID(e.conversation_id),
            core.rank("completed"),
            0,  # the round
        )
        racing = asyncio.create_task(store.store_result(second))
        await blocked_on_a_lock(pool)
        assert not racing.done()
        await tx.commit()
    finally:
        await pool.release(other)
    stored = await racing
    assert (stored.inserted, stored.content) == (False, "first answer")
    assert stored.usage.input_tokens == 200  # both calls, the one committed meanwhile too
    totals = await pool.fetchrow("SELECT * FROM project_usage WHERE project_id = $1", e.project_id)
    assert (totals["input_tokens"], totals["runs"]) == (200, 1)
    await pool.close()


async def test_a_batch_places_new_messages_after_stored_ones_and_copies_share_a_place(
    infra: Infra,
) -> None:
    pool = await create_pool(infra.database_url)
    store = Store(pool)
    stored = user_event("first")
    c = stored.conversation_id
    assert await store.insert_user_message(stored) == Placed(1, True)
    second, third = user_event("second", conversation_id=c), user_event("third", conversation_id=c)
    elsewhere = user_event("another conversation")
    intruder = user_event("not yours", user="mallory", conversation_id=c)
    batch = [second, stored, second, elsewhere, intruder, third]
    out = await store.insert_user_messages(batch)
    assert out[:4] == [Placed(2, True), Placed(1, False), Placed(2, True), Placed(1, True)]
    assert isinstance(out[4], BadData)
    assert out[5] == Placed(3, True)
    rows = await pool.fetch(
        "SELECT content, position FROM messages WHERE conversation_id = $1 ORDER BY position",
        uuid.UUID(c),
    )
    assert [(r["content"], r["position"]) for r in rows] == [
        ("first", 1),
        ("second", 2),
        ("third", 3),
    ]
    # The whole batch again (a redelivery): nothing new, every place as before.
    again = await store.insert_user_messages(batch)
    assert [p.position for p in again if isinstance(p, Placed)] == [2, 1, 2, 1, 3]
    assert not any(p.inserted for p in again if isinstance(p, Placed))
    await pool.close()
