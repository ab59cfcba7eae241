"""Replay: an SSE client reconnecting with ``Last-Event-ID`` to a conversation of 20 exchanges,
through the gateway, until the last event it missed arrives.

Two shapes of the same conversation: every run stored as ended ("settled"), and its last run
stored as running with its verdicts in POLICY and its tokens in CHAT_STREAM ("in flight", the
replay a client gets when it reconnects mid-answer). The bench seeds the database through the
persister's own statements and the streams as the services publish to them.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import msgspec
import nats

from baton import devtoken, permissions
from baton.bench.paging import latency
from baton.bench.stack import SECRET, Stack
from services.persister.adapters import Store
from services.persister.core import assistant_message_id
from shared import messages as m
from shared import runs as vocab
from shared import subjects
from shared.db import create_pool

PROJECT = "bench-replay"
USER = "reader"
Result = dict[str, Any]


def _user(cid: str, i: int) -> m.UserMessageAccepted:
    mid = str(uuid.uuid4())
    return m.UserMessageAccepted(
        event_id=mid,
        message_id=mid,
        conversation_id=cid,
        project_id=PROJECT,
        user_id=USER,
        content=f"question {i} of a conversation, about as long as a chat line is",
        content_hash=f"bench-{i}",
        created_at=datetime.now(UTC),
    )


def _verdict(e: m.UserMessageAccepted, status: str, attempt: int = 1) -> m.RunVerdict:
    rid = vocab.run_id(e.message_id)
    return m.RunVerdict(
        event_id=vocab.verdict_id(rid, attempt, status),
        message_id=e.message_id,
        conversation_id=e.conversation_id,
        project_id=PROJECT,
        run_id=rid,
        user_id=USER,
        verdict="approve",
        status=status,  # type: ignore[arg-type]
        reason="",
        model="bench",
        attempt=attempt,
    )


def _answer(e: m.UserMessageAccepted, text: str) -> m.ExecResult:
    rid = vocab.run_id(e.message_id)
    return m.ExecResult(
        event_id=f"result:{rid}",
        message_id=e.message_id,
        conversation_id=e.conversation_id,
        project_id=PROJECT,
        task_id=vocab.task_id(rid, 1),
        call_id=f"call:{rid}:1",
        run_id=rid,
        attempt=1,
        model="bench",
        text=text,
        usage=m.Usage(input_tokens=20, output_tokens=len(text.split())),
        prices=m.Prices(),
    )


async def seed(st: Stack, exchanges: int, tokens: int, in_flight: bool) -> Result:
    """One conversation: ``exchanges`` user messages, each answered but (``in_flight``) the
    last, whose run is stored as running; the last run's ``tokens`` deltas in CHAT_STREAM."""
    cid = str(uuid.uuid4())
    pool = await create_pool(st.dsn)
    nc = await nats.connect(st.nats.url, user=permissions.ADMIN, password=st.admin_password)
    js = nc.jetstream()

    async def publish(subject: str, event: msgspec.Struct, msg_id: str) -> None:
        await js.publish(subject, msgspec.json.encode(event), headers={"Nats-Msg-Id": msg_id})

    try:
        store = Store(pool)
        users: list[m.UserMessageAccepted] = []
        for i in range(exchanges):
            e = _user(cid, i)  # accepted now: each question after the answer before it
            users.append(e)
            await store.insert_user_message(e)
            await store.upsert_run(_verdict(e, "running"))
            if i < exchanges - 1 or not in_flight:
                await store.store_result(_answer(e, " ".join(f"w{k}" for k in range(tokens))))
        last = users[-1]
        rid = vocab.run_id(last.message_id)
        if in_flight:
            for status in ("queued", "running"):
                v = _verdict(last, status, 0 if status == "queued" else 1)
                await publish(subjects.policy_verdict(PROJECT, cid), v, f"bench:{v.event_id}")
        for seq in range(1, tokens + 1):
            delta = m.TokenDelta(conversation_id=cid, run_id=rid, attempt=1, seq=seq, text="w ")
            await publish(subjects.token_stream(PROJECT, cid), delta, f"bench:{rid}:{seq}")
    finally:
        await nc.close()
        await pool.close()
    middle = users[exchanges // 2].message_id
    # What the client missed, from the middle of the conversation: the last event is the last
    # run's last token (in flight) or its answer (settled).
    final = f"tok:{rid}:1:{tokens}" if in_flight else f"msg:{assistant_message_id(rid)}"
    return {"cid": cid, "from": f"msg:{middle}", "last": final}


def _replay_once(client: httpx.Client, token: str, case: Result) -> tuple[float, int]:
    """Seconds from the request to the last missed event, and the events replayed."""
    t0 = time.perf_counter()
    events = 0
    headers = {"Authorization": f"Bearer {token}", "Last-Event-ID": case["from"]}
    with client.stream("GET", f"/api/conversations/{case['cid']}/events", headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"replay: {r.status_code} {r.read()[:200]!r}")
        for line in r.iter_lines():
            if line.startswith("id: "):
                events += 1
                if line[4:] == case["last"]:
                    return time.perf_counter() - t0, events
    raise RuntimeError(f"replay ended before {case['last']}")


def replay(st: Stack, requests: int = 300, exchanges: int = 20, tokens: int = 100) -> Result:
    """Each shape's replay ``requests`` times (sequential, the shapes in turn, after 20 rounds
    of warm-up). Each resume is a connection of its own: leaving an SSE stream before it ends
    closes it, as a client that reconnects does."""
    cases = {
        "settled": asyncio.run(seed(st, exchanges, tokens, in_flight=False)),
        "in flight": asyncio.run(seed(st, exchanges, tokens, in_flight=True)),
    }
    token = devtoken.make_token(SECRET, PROJECT, USER)
    samples: dict[str, list[float]] = {k: [] for k in cases}
    sizes: dict[str, int] = {}
    with httpx.Client(base_url=st.gateway, timeout=10) as client:
        for i in range(requests + 20):
            for name, case in cases.items():
                elapsed, sizes[name] = _replay_once(client, token, case)
                if i >= 20:
                    samples[name].append(elapsed)
    return {
        "requests_per_case": requests,
        "cases": [
            {"case": f"{name}: {exchanges} exchanges, from the middle", "events": sizes[name]}
            | latency(samples[name])
            for name in cases
        ],
    }
