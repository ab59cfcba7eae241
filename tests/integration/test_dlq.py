"""`baton dlq` against real dead letters made by the real persister: list, show, replay."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from baton import dlq
from services.persister.adapters import Store
from services.persister.handlers import Handlers
from shared import estimate, subjects, wiring
from shared import messages as m
from shared.bus import Bus, Consumer
from shared.db import create_pool
from tests.integration.conftest import Infra
from tests.support import (
    connect_bus,
    eventually,
    read_subject,
    running,
    service_metrics,
    user_event,
)

ROOT = Path(__file__).resolve().parents[2]


async def _persister_in(infra: Infra) -> tuple[Bus, Any, Consumer[m.UserMessageAccepted]]:
    bus = await connect_bus(infra.nats_url, "persister")
    pool = await create_pool(infra.database_url)
    h = Handlers(bus, Store(pool), service_metrics("persister"))
    return bus, pool, Consumer(bus, wiring.PERSISTER_IN, m.UserMessageAccepted, h.user_message)


async def _mine(url: str, subject: str) -> list[dlq.LetterInfo]:
    # Only this test's letters: under TEST_NATS_URL the stream is shared with other tests.
    return [x for x in await dlq.list_letters(url) if x.subject == subject]


async def _letters(url: str, subject: str, at_least: int) -> list[dlq.LetterInfo]:
    async def enough() -> list[dlq.LetterInfo] | None:
        found = await _mine(url, subject)
        return found if len(found) >= at_least else None

    return await eventually(enough)


async def _garbage_letters(infra: Infra, payloads: list[bytes]) -> tuple[str, list[int]]:
    """Dead-letters undecodable payloads through the persister; their subject and CHAT_IN seqs."""
    bus, pool, consumer = await _persister_in(infra)
    subject = subjects.chat_in("p1", str(uuid.uuid4()))
    seqs = []
    for i, payload in enumerate(payloads):
        ack = await bus.js.publish(subject, payload, headers={"Nats-Msg-Id": f"garbage-{i}"})
        seqs.append(ack.seq)
    async with running(consumer):
        await _letters(infra.nats_url, subject, len(payloads))
    await bus.close()
    await pool.close()
    return subject, seqs


async def _baton(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "baton",
        *args,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_a_poison_message_is_listed_and_shown_with_its_origin(infra: Infra) -> None:
    url = infra.nats_url
    subject, seqs = await _garbage_letters(infra, [b"{not json", b"\x1b[2J\xff", b"[]"])

    letters = await _mine(url, subject)
    assert [x.stream_seq for x in letters] == seqs  # oldest first
    first = letters[0]
    assert (first.stream, first.consumer, first.subject) == ("CHAT_IN", "persister-in", subject)
    assert first.reason.startswith("undecodable payload")
    assert (first.deliveries, first.size) == (1, len(b"{not json"))
    everything = await dlq.list_letters(url)
    assert await dlq.list_letters(url, limit=2) == everything[:2]
    assert set(letters) <= set(await dlq.list_letters(url, consumer="persister-in"))
    assert not set(letters) & set(await dlq.list_letters(url, consumer="executor"))

    shown = await dlq.show(url, letters[1].id)
    assert shown.payload == b"\x1b[2J\xff" and shown.headers["Nats-Msg-Id"] == "garbage-1"
    # The terminal never receives the raw escape sequence or the invalid byte.
    assert shown.preview() == "\\x1b[2J\\xff"
    with pytest.raises(dlq.UnknownLetter):
        await dlq.show(url, 999)


async def test_replay_after_the_cause_is_fixed_stores_the_message_once(infra: Infra) -> None:
    url = infra.nats_url
    bus, pool, consumer = await _persister_in(infra)
    e = user_event(user="alice")
    # Someone else's conversation with that id: the persister refuses alice's message.
    await pool.execute(
        "INSERT INTO conversations (id, project_id, user_id) VALUES ($1, 'p1', 'mallory')",
        uuid.UUID(e.conversation_id),
    )
    subject = subjects.chat_in(e.project_id, e.conversation_id)
    await bus.publish(subject, e, msg_id=e.message_id)
    async with running(consumer):
        [letter] = await _letters(url, subject, 1)
        assert letter.reason == "conversation belongs to another project or user"
        assert (letter.subject, letter.deliveries) == (subject, 1)

        # The cause goes away; the replayed copy now goes through.
        await pool.execute("DELETE FROM conversations")
        result = await dlq.replay(url, letter.id)
        assert result.msg_id == f"replay:CHAT_IN:{letter.stream_seq}:{letter.id}"
        assert (result.subject, result.stream, result.duplicate) == (subject, "CHAT_IN", False)
        # The copy's deliveries count on from the letter's one: its calls get ids of their own.
        copy = await bus.js.get_msg("CHAT_IN", seq=result.seq)
        assert (copy.headers or {}).get(estimate.DELIVERY_BASE_HEADER) == "1"
        announced = await read_subject(bus, subjects.STREAM_PERSISTED, "chat.persisted.user.>", 1)

    assert [msgspec.json.decode(x.data)["message_id"] for x in announced] == [e.message_id]
    rows = await pool.fetch("SELECT id, user_id FROM messages")
    assert [(str(r["id"]), r["user_id"]) for r in rows] == [(e.message_id, "alice")]
    assert await _mine(url, subject) == []
    # A second replay finds no letter; had it raced the first, dedup would drop its copy.
    with pytest.raises(dlq.UnknownLetter):
        await dlq.replay(url, letter.id)
    again = await bus.js.publish(subject, b"copy", headers={"Nats-Msg-Id": result.msg_id})
    assert again.duplicate
    await bus.close()
    await pool.close()


async def test_a_copy_dead_lettered_again_counts_its_deliveries_on_from_both_lives(
    infra: Infra,
) -> None:
    """Replayed before the cause is fixed, the copy is dead-lettered again; replayed again, its
    deliveries count on from both earlier lives, so a call of the third life cannot take the
    id of a call of either of the first two."""
    url = infra.nats_url
    bus, pool, consumer = await _persister_in(infra)
    e = user_event(user="alice")
    await pool.execute(
        "INSERT INTO conversations (id, project_id, user_id) VALUES ($1, 'p1', 'mallory')",
        uuid.UUID(e.conversation_id),
    )
    subject = subjects.chat_in(e.project_id, e.conversation_id)
    await bus.publish(subject, e, msg_id=e.message_id)
    async with running(consumer):
        [first] = await _letters(url, subject, 1)
        await dlq.replay(url, first.id)
        [second] = await _letters(url, subject, 1)
        assert second.id != first.id and second.deliveries == 1
        assert (await dlq.show(url, second.id)).headers[estimate.DELIVERY_BASE_HEADER] == "1"
        again = await dlq.replay(url, second.id)
        copy = await bus.js.get_msg("CHAT_IN", seq=again.seq)
        assert (copy.headers or {})[estimate.DELIVERY_BASE_HEADER] == "2"
        [third] = await _letters(url, subject, 1)
        assert third.id not in (first.id, second.id)
    await bus.close()
    await pool.close()


async def test_a_letter_replayed_past_the_delivery_bound_is_refused_and_kept(infra: Infra) -> None:
    """A copy counted on past ``MAX_DELIVERY_BASE`` would number its calls where no reader looks
    for them: the replay says so and keeps the letter."""
    url = infra.nats_url
    bus = await connect_bus(url, "persister")
    subject = subjects.chat_in("p1", str(uuid.uuid4()))
    letter = m.DeadLetter(
        stream="CHAT_IN",
        consumer="persister",
        subject=subject,
        stream_seq=1,
        deliveries=2,
        reason="handler failed",
        headers={estimate.DELIVERY_BASE_HEADER: str(estimate.MAX_DELIVERY_BASE - 1)},
        payload=b"{}",
        failed_at=datetime.now(UTC),
    )
    ack = await bus.publish(
        subjects.dead_letter("CHAT_IN", "persister"), letter, msg_id=f"dlq:{subject}"
    )
    with pytest.raises(dlq.DlqError, match="not replayed, letter kept"):
        await dlq.replay(url, ack.seq)
    assert (await dlq.show(url, ack.seq)).subject == subject
    await bus.js.delete_msg(subjects.STREAM_DLQ, ack.seq)  # the stream may be shared
    await bus.close()


async def test_replay_of_an_unknown_id_changes_nothing(infra: Infra) -> None:
    for bad in (0, -1, 10**9):
        with pytest.raises(dlq.UnknownLetter):
            await dlq.replay(infra.nats_url, bad)


async def test_the_cli_lists_shows_and_replays(infra: Infra) -> None:
    url = infra.nats_url
    nobody = f"nobody-{uuid.uuid4().hex[:8]}"
    empty = await _baton("dlq", "list", "--consumer", nobody, "--nats-url", url)
    assert empty == (0, "no dead letters\n", "")
    subject, _ = await _garbage_letters(infra, [b"{not json"])
    [letter] = await _mine(url, subject)

    # The URL from the environment, as an operator on the box would run it.
    code, out, _ = await _baton("dlq", "list", env={"BATON_NATS_URL": url})
    header, *rows = out.splitlines()
    [row] = [r for r in rows if r.split()[0] == str(letter.id)]
    assert code == 0 and header.split() == [
        "ID",
        "FAILED_AT",
        "CONSUMER",
        "SUBJECT",
        "DELIVERIES",
        "REASON",
    ]
    assert row.split()[:5] == [
        str(letter.id),
        letter.failed_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "CHAT_IN/persister-in",
        subject,
        "1",
    ]
    assert row.split(None, 5)[5] == letter.reason

    code, out, _ = await _baton("dlq", "list", "--json", "--nats-url", url)
    assert code == 0
    assert letter in [msgspec.json.decode(line, type=dlq.LetterInfo) for line in out.splitlines()]
    code, out, _ = await _baton("dlq", "show", str(letter.id), "--nats-url", url)
    assert code == 0 and "payload\n  {not json" in out and subject in out

    code, _, err = await _baton("dlq", "replay", "12345", "--nats-url", url)
    assert code == 2 and "no dead letter with id 12345" in err
    code, out, _ = await _baton("dlq", "replay", str(letter.id), "--nats-url", url)
    assert code == 0 and f"letter {letter.id} replayed to {subject}" in out
    code, _, err = await _baton("dlq", "replay", str(letter.id), "--nats-url", url)
    assert code == 2 and "no dead letter" in err
    assert await _mine(url, subject) == []
    empty = await _baton("dlq", "list", "--json", "--consumer", nobody, "--nats-url", url)
    assert empty == (0, "", "no dead letters\n")


def test_the_table_cuts_long_reasons_and_escapes_control_characters() -> None:
    letter = dlq.LetterInfo(
        id=7,
        consumer="executor",
        stream="EXEC_TASKS",
        subject="exec.task.p1.c1",
        stream_seq=3,
        deliveries=20,
        reason="max deliveries reached; last error:\n" + "x" * 200,
        failed_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        size=10,
    )
    header, row = dlq.format_table([letter]).splitlines()
    assert header.split()[0] == "ID" and row.startswith("7   2026-01-02T03:04:05Z  EXEC_TASKS/")
    reason = row.split("  ")[-1]
    assert len(reason) == 80 and reason.endswith("…") and "\\n" in reason


async def test_the_cli_fails_fast_without_nats() -> None:
    code, out, err = await _baton("dlq", "list", "--nats-url", "nats://127.0.0.1:1")
    assert (code, out) == (1, "") and "could not connect to NATS" in err
