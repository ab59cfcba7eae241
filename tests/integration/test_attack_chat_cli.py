"""Attacks on ``baton chat`` through what it prints: a tool's output and the model's answer are
not the operator's, so they must not drive the operator's terminal.

The client against a real gateway (in process, real NATS and Postgres); the test plays the
services behind it, as test_gateway_tools does.
"""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest_asyncio

from baton.chat import Chat
from services.persister.adapters import Store
from shared import messages as m
from shared import runs as vocab
from shared import subjects
from tests.integration.conftest import Infra
from tests.integration.test_gateway_tools import (
    Run,
    ask,
    decisions,
    http,
    persist_result,
    result,
)
from tests.integration.test_gateway_ws import Gateway, _serve, auth
from tests.support import decode_all, read_subject, run_verdict

# Conceal all that follows (the next approval's arguments), move up and erase a line, CSI in
# its 8-bit form, a carriage return that writes over the line.
HOSTILE = "ok\x1b[8m\x1b[1A\x1b[2K\x9b2J\rgone\x07"


@pytest_asyncio.fixture
async def gateway(infra: Infra) -> AsyncIterator[Gateway]:
    async for g in _serve(infra):
        yield g


async def test_tool_output_and_model_text_cannot_drive_the_terminal(gateway: Gateway) -> None:
    token = auth()["Authorization"].removeprefix("Bearer ")
    out, notes = io.StringIO(), io.StringIO()
    chat = Chat(http(gateway), token, None, out=out, notes=notes, approve_all=True)
    sending = asyncio.create_task(chat.send("Please remind me to call John."))
    [accepted] = decode_all(
        await read_subject(gateway.bus, subjects.STREAM_CHAT_IN, "chat.in.>", 1),
        m.UserMessageAccepted,
    )
    await Store(gateway.pool).insert_user_message(accepted)
    await Store(gateway.pool).upsert_run(run_verdict(accepted, "requires_action"))
    run = Run(accepted)
    await ask(gateway, run)
    await decisions(gateway.bus, 1)
    await persist_result(gateway, run, result(run, content=HOSTILE))
    reply = m.AssistantMessagePersisted(
        event_id=vocab.persisted_id(run.id),
        message_id=str(uuid.uuid4()),
        conversation_id=run.cid,
        project_id="p1",
        run_id=run.id,
        reply_to=accepted.message_id,
        kind="answer",
        content=f"Done: {HOSTILE}",
        created_at=datetime.now(UTC),
        status="completed",
    )
    await gateway.bus.publish(
        subjects.persisted_assistant("p1", run.cid), reply, msg_id=reply.event_id
    )
    # The client still returns the stored text as it is; only what it prints is made visible.
    assert await asyncio.wait_for(sending, 30) == reply.content
    for shown in (out.getvalue(), notes.getvalue()):
        controls = [
            c for c in shown if (ord(c) < 0x20 and c not in "\n\t") or 0x7F <= ord(c) <= 0x9F
        ]
        assert controls == [], repr(shown)
    assert (
        "[tool create_task: ok] ok\\x1b[8m\\x1b[1A\\x1b[2K\\x9b2J\\x0dgone\\x07" in notes.getvalue()
    )
    assert out.getvalue() == "Done: ok\\x1b[8m\\x1b[1A\\x1b[2K\\x9b2J\\x0dgone\\x07\n"
