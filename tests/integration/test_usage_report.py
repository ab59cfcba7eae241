"""The usage report through the gateway's HTTP API on real Postgres: usage rows written by the
persister's own code, summed per day, user and model; bad queries are 400; projects never mix."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from services.gateway import usage
from services.persister.adapters import Store
from shared import messages as m
from shared import runs
from tests.integration.test_conversations import Gateway, gateway
from tests.support import SONNET_PRICES, user_event

__all__ = ["gateway"]


async def _call(
    store: Store,
    project: str,
    user: str,
    model: str,
    tokens: int,
    purpose: m.Purpose = "answer",
) -> m.UserMessageAccepted:
    """A stored user message and one model call made for it (the persister's own writes)."""
    e = user_event("question", project=project, user=user)
    await store.insert_user_message(e)
    await store.store_model_usage(
        m.ModelUsage(
            event_id=f"usage:{uuid.uuid4()}",
            message_id=e.message_id,
            conversation_id=e.conversation_id,
            project_id=project,
            call_id=f"call:{uuid.uuid4()}",
            run_id=runs.run_id(e.message_id),
            user_id=user,
            purpose=purpose,
            model=model,
            outcome="completed",
            usage=m.Usage(input_tokens=tokens, output_tokens=tokens // 10),
            prices=SONNET_PRICES,
        )
    )
    return e


async def _on_day(g: Gateway, e: m.UserMessageAccepted, day: str) -> None:
    """Move a call to noon of another UTC day (the rows are written with now())."""
    await g.pool.execute(
        "UPDATE usage SET created_at = ($1 || 'T12:00:00Z')::timestamptz WHERE run_id = $2",
        day,
        runs.run_id(e.message_id),
    )


@pytest.fixture
def store(gateway: Gateway) -> Store:
    return Store(gateway.pool)


async def _report(g: Gateway, query: str, **who: str) -> dict[str, Any]:
    r = await g.get(f"/api/usage?{query}", **who)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def test_usage_is_summed_per_day_user_and_model(gateway: Gateway, store: Store) -> None:
    a = await _call(store, "p1", "alice", "claude-sonnet-4-6", 1000)
    b = await _call(store, "p1", "bob", "claude-haiku-4-5", 200)
    c = await _call(store, "p1", "alice", "claude-haiku-4-5", 30, purpose="classification")
    await _on_day(gateway, a, "2026-11-01")
    await _on_day(gateway, b, "2026-11-02")
    await _on_day(gateway, c, "2026-11-02")

    by_day = await _report(gateway, "group_by=day")
    assert [(g["key"], g["input_tokens"], g["calls"], g["runs"]) for g in by_day["groups"]] == [
        ("2026-11-01", 1000, 1, 1),
        ("2026-11-02", 230, 2, 1),  # a classification is a call, not a run
    ]
    assert by_day["total"]["input_tokens"] == 1230
    by_user = await _report(gateway, "group_by=user")
    assert [(g["key"], g["input_tokens"]) for g in by_user["groups"]] == [
        ("alice", 1030),
        ("bob", 200),
    ]
    by_model = await _report(gateway, "group_by=model")
    assert [(g["key"], g["output_tokens"]) for g in by_model["groups"]] == [
        ("claude-haiku-4-5", 23),
        ("claude-sonnet-4-6", 100),
    ]
    # The report and the running totals agree.
    totals = (await gateway.get("/api/usage")).json()
    assert totals["input_tokens"] == 1230
    assert totals["cost_usd"] == pytest.approx(by_model["total"]["cost_usd"])


async def test_from_and_to_bound_the_report_a_bare_to_date_is_its_whole_day(
    gateway: Gateway, store: Store
) -> None:
    for day, tokens in [
        ("2026-10-31", 1),
        ("2026-11-01", 10),
        ("2026-11-30", 100),
        ("2026-12-01", 1000),
    ]:
        await _on_day(gateway, await _call(store, "p1", "u1", "claude-sonnet-4-6", tokens), day)
    november = await _report(gateway, "group_by=day&from=2026-11-01&to=2026-11-30")
    assert [g["key"] for g in november["groups"]] == ["2026-11-01", "2026-11-30"]
    assert (november["from"], november["to"]) == ("2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z")
    # Times: from inclusive, to exclusive, any offset.
    noon = await _report(
        gateway, "group_by=day&from=2026-11-30T12:00:00Z&to=2026-12-01T13:00:00%2B01:00"
    )
    assert [g["key"] for g in noon["groups"]] == ["2026-11-30"]
    only_from = await _report(gateway, "group_by=model&from=2026-11-30")
    assert only_from["total"]["input_tokens"] == 1100


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("group_by=week", "group_by must be one of"),
        ("group_by=", "group_by must be one of"),
        ("group_by=day&from=yesterday", "from must be a date"),
        ("group_by=day&from=20261101", "from must be a date"),
        ("group_by=day&to=2026-11-01T00:00:00", "to must be a date"),  # no offset
        ("group_by=day&from=2026-02-30", "not a real date"),
        ("group_by=day&from=2026-11-02&to=2026-11-01", "from must be before to"),
        ("group_by=day&from=2026-11-01T10:00:00Z&to=2026-11-01T10:00:00Z", "before to"),
        ("from=2026-11-01", "need group_by"),
        ("group_by=day&from=" + "9" * 50, "from must be a date"),
    ],
)
async def test_a_bad_report_query_is_400_invalid_query(
    gateway: Gateway, query: str, says: str
) -> None:
    r = await gateway.get(f"/api/usage?{query}")
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_query"
    assert says in error["message"]


async def test_a_report_shows_only_the_callers_project(gateway: Gateway, store: Store) -> None:
    await _call(store, "p1", "u1", "claude-sonnet-4-6", 500)
    await _call(store, "p2", "u1", "claude-sonnet-4-6", 7)  # same user name, other project
    for group_by in ("day", "user", "model"):
        mine = await _report(gateway, f"group_by={group_by}")
        theirs = await _report(gateway, f"group_by={group_by}", project="p2")
        assert (mine["total"]["input_tokens"], theirs["total"]["input_tokens"]) == (500, 7)
        assert (mine["project_id"], theirs["project_id"]) == ("p1", "p2")
    nobody = await _report(gateway, "group_by=user", project="p-not-yet-existing")
    assert nobody["groups"] == []
    assert nobody["total"]["input_tokens"] == 0
    r = await gateway.client.get("/api/usage?group_by=day")
    assert r.status_code == 401


async def test_a_report_keeps_the_user_of_a_call_whose_messages_are_gone(
    gateway: Gateway, store: Store
) -> None:
    e = await _call(store, "p1", "carol", "claude-sonnet-4-6", 40)
    # What a deletion or the retention sweep leaves: the usage row, without the content rows.
    await gateway.pool.execute(
        "DELETE FROM messages WHERE conversation_id = $1", uuid.UUID(e.conversation_id)
    )
    by_user = await _report(gateway, "group_by=user")
    assert [(g["key"], g["input_tokens"]) for g in by_user["groups"]] == [("carol", 40)]


async def test_the_report_reads_the_usage_rows_by_index(gateway: Gateway, store: Store) -> None:
    await _call(store, "p1", "u1", "claude-sonnet-4-6", 1)
    async with gateway.pool.acquire() as con:
        await con.execute("SET enable_seqscan = off")
        plan = "\n".join(
            r[0] for r in await con.fetch("EXPLAIN " + usage.sql("day"), "p1", None, None)
        )
    assert "usage_project_time" in plan, plan
