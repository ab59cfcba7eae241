"""Paging: a page of a 100,000-message conversation and of a 10,000-conversation user's list,
against the same pages of ten, through the gateway (HTTP) and at the database (EXPLAIN ANALYZE).

The bench seeds its own database directly with COPY (one statement per table, as the
persister's rows look: same columns, the same statement trigger keeps the counts), because
100,000 messages through the whole pipeline would measure the pipeline, not the page.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx

from baton import devtoken
from baton.bench.stack import SECRET, Stack
from services.gateway import adapters, pages

PROJECT = "bench-paging"
Result = dict[str, Any]


async def _seed_conversation(con: Any, user: str, messages: int, at: datetime) -> str:
    cid = uuid.uuid4()
    await con.copy_records_to_table(
        "conversations",
        records=[(cid, PROJECT, user, at)],
        columns=["id", "project_id", "user_id", "created_at"],
    )
    await con.copy_records_to_table(
        "messages",
        records=(
            (
                uuid.uuid4(),
                cid,
                PROJECT,
                user,
                "user",
                "message",
                f"message {i} of a long conversation, about as long as a chat line is",
                at + timedelta(milliseconds=10 * i),
                i + 1,
            )
            for i in range(messages)
        ),
        columns=[
            "id",
            "conversation_id",
            "project_id",
            "user_id",
            "role",
            "kind",
            "content",
            "created_at",
            "position",
        ],
    )
    return str(cid)


async def _seed_conversations(con: Any, user: str, n: int, at: datetime) -> None:
    await con.copy_records_to_table(
        "conversations",
        records=(
            (uuid.uuid4(), PROJECT, user, at, at + timedelta(seconds=i), f"chat {i}", 2)
            for i in range(n)
        ),
        columns=[
            "id",
            "project_id",
            "user_id",
            "created_at",
            "last_activity_at",
            "title",
            "message_count",
        ],
    )


async def seed(dsn: str, big_messages: int, big_conversations: int, small: int) -> Result:
    """The four shapes: one long and one short conversation, one busy and one quiet user."""
    started = time.perf_counter()
    at = datetime.now(UTC) - timedelta(days=1)
    con = await asyncpg.connect(dsn)
    try:
        long_id = await _seed_conversation(con, "reader", big_messages, at)
        short_id = await _seed_conversation(con, "reader", small, at)
        await _seed_conversations(con, "busy", big_conversations, at)
        await _seed_conversations(con, "quiet", small, at)
        await con.execute("ANALYZE messages; ANALYZE conversations")
        middle = await con.fetchrow(
            "SELECT created_at, seq FROM messages WHERE conversation_id = $1 AND position = $2",
            uuid.UUID(long_id),
            big_messages // 2,
        )
        oldest = await con.fetchrow(
            "SELECT created_at, seq FROM messages WHERE conversation_id = $1 AND position = $2",
            uuid.UUID(long_id),
            101,
        )
        mid_conv = await con.fetchrow(
            "SELECT id, last_activity_at FROM conversations WHERE project_id = $1 AND "
            "user_id = 'busy' ORDER BY last_activity_at LIMIT 1 OFFSET $2",
            PROJECT,
            big_conversations // 2,
        )
    finally:
        await con.close()
    return {
        "long": long_id,
        "short": short_id,
        "middle": (middle["created_at"], middle["seq"]),
        "oldest": (oldest["created_at"], oldest["seq"]),
        "mid_conv": (mid_conv["last_activity_at"], mid_conv["id"]),
        "seed_s": round(time.perf_counter() - started, 2),
    }


def latency(samples: list[float]) -> Result:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p99_ms": round(p99 * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


def _http_rounds(
    client: httpx.Client, cases: list[tuple[str, str]], requests: int
) -> list[tuple[Result, int]]:
    """Every page once per round, round after round, so drift in the machine's load (it is
    shared) falls on every case alike; the first 20 rounds warm connections and caches."""
    samples: list[list[float]] = [[] for _ in cases]
    sizes = [0] * len(cases)
    for i in range(requests + 20):
        for k, (url, token) in enumerate(cases):
            t0 = time.perf_counter()
            r = client.get(url, headers={"Authorization": f"Bearer {token}"})
            elapsed = time.perf_counter() - t0
            if r.status_code != 200:
                raise RuntimeError(f"GET {url}: {r.status_code} {r.text[:200]}")
            if i >= 20:
                samples[k].append(elapsed)
            body = r.json()
            sizes[k] = len(body.get("messages", body.get("conversations", [])))
    return [(latency(s), n) for s, n in zip(samples, sizes, strict=True)]


async def _db(dsn: str, sql: str, args: tuple[Any, ...], runs: int) -> Result:
    """The statement alone: its execution time as the server reports it, and the index used."""
    con = await asyncpg.connect(dsn)
    try:
        times = []
        plan = ""
        for _ in range(runs):
            rows = await con.fetch(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args)
            doc = rows[0][0]
            parsed = doc if isinstance(doc, list) else json.loads(doc)
            times.append(parsed[0]["Execution Time"] / 1000)
            plan = _index_of(parsed[0]["Plan"]) or str(parsed[0]["Plan"]["Node Type"])
    finally:
        await con.close()
    return {**latency(times), "index": plan}


def _index_of(node: dict[str, Any]) -> str:
    if node.get("Index Name"):
        return str(node["Index Name"])
    for child in node.get("Plans", []):
        found = _index_of(child)
        if found:
            return found
    return ""


def paging(
    st: Stack,
    big_messages: int = 100_000,
    big_conversations: int = 10_000,
    small: int = 10,
    requests: int = 300,
) -> Result:
    """Each page many times over HTTP (one keep-alive connection, sequential, the pages in
    turn) and at the database."""
    s = asyncio.run(seed(st.dsn, big_messages, big_conversations, small))
    reader = devtoken.make_token(SECRET, PROJECT, "reader")
    busy = devtoken.make_token(SECRET, PROJECT, "busy")
    quiet = devtoken.make_token(SECRET, PROJECT, "quiet")
    mid = pages.encode("m", *s["middle"])
    old = pages.encode("m", *s["oldest"])
    mid_c = pages.encode("c", *s["mid_conv"])
    long_id, short_id = uuid.UUID(s["long"]), uuid.UUID(s["short"])
    cases: list[tuple[str, str, str, str, tuple[Any, ...]]] = [
        (
            f"messages: newest 100 of {big_messages:,}",
            f"/api/conversations/{long_id}/messages?limit=100",
            reader,
            adapters.MESSAGES_NEWEST,
            (long_id, 101),
        ),
        (
            f"messages: 100 from the middle of {big_messages:,}",
            f"/api/conversations/{long_id}/messages?limit=100&before={mid}",
            reader,
            adapters.MESSAGES_BEFORE,
            (long_id, *s["middle"], 101),
        ),
        (
            f"messages: oldest 100 of {big_messages:,}",
            f"/api/conversations/{long_id}/messages?limit=100&before={old}",
            reader,
            adapters.MESSAGES_BEFORE,
            (long_id, *s["oldest"], 101),
        ),
        (
            f"messages: all {small} of {small}",
            f"/api/conversations/{short_id}/messages?limit=100",
            reader,
            adapters.MESSAGES_NEWEST,
            (short_id, 101),
        ),
        (
            f"conversations: newest 20 of {big_conversations:,}",
            "/api/conversations?limit=20",
            busy,
            adapters.CONVERSATIONS_NEWEST,
            (PROJECT, "busy", 21),
        ),
        (
            f"conversations: 20 from the middle of {big_conversations:,}",
            f"/api/conversations?limit=20&cursor={mid_c}",
            busy,
            adapters.CONVERSATIONS_BEFORE,
            (PROJECT, "busy", *s["mid_conv"], 21),
        ),
        (
            f"conversations: newest 20 of {small}",
            "/api/conversations?limit=20",
            quiet,
            adapters.CONVERSATIONS_NEWEST,
            (PROJECT, "quiet", 21),
        ),
    ]
    out: list[Result] = []
    with httpx.Client(base_url=st.gateway, timeout=10) as client:
        measured = _http_rounds(client, [(url, token) for _, url, token, _, _ in cases], requests)
    for (name, _, _, sql, args), (http, size) in zip(cases, measured, strict=True):
        db = asyncio.run(_db(st.dsn, sql, args, min(requests, 100)))
        out.append({"case": name, "rows": size, "http": http, "db": db})
    return {"seed_s": s["seed_s"], "requests_per_case": requests, "cases": out}
