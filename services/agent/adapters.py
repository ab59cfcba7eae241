"""What the agent talks to: the conversation read model (read-only) and the small model."""

from __future__ import annotations

import uuid
from typing import Any

import anthropic

from services.agent import core

RECENT = """
SELECT role, content FROM messages
WHERE conversation_id = $1
  AND seq <= (SELECT seq FROM messages WHERE id = $2)
ORDER BY seq DESC
LIMIT $3
"""


class History:
    """Recent turns of one conversation; never auth data, never another conversation."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def recent(self, conversation_id: str, message_id: str, limit: int) -> list[core.Turn]:
        async with self.pool.acquire() as con:
            rows = await con.fetch(RECENT, uuid.UUID(conversation_id), uuid.UUID(message_id), limit)
        return [core.Turn(r["role"], r["content"]) for r in reversed(rows)]


class Classifier:
    """Asks the small model for a Decision through forced tool use."""

    def __init__(self, client: anthropic.AsyncAnthropic, model: str, max_tokens: int) -> None:
        self.client = client
        self.model = model
        self.max_tokens = max_tokens
        self.schema = core.tool_schema()

    async def classify(self, transcript: str) -> Any:
        response = await self.client.messages.create(
            model=self.model,
            max_tokens=self.max_tokens,
            system=core.SYSTEM_PROMPT,
            messages=[{"role": "user", "content": transcript}],
            tools=[
                {
                    "name": core.TOOL_NAME,
                    "description": "Record what the last user message needs.",
                    "input_schema": self.schema,
                }
            ],
            tool_choice={"type": "tool", "name": core.TOOL_NAME},
        )
        for block in response.content:
            if block.type == "tool_use" and block.name == core.TOOL_NAME:
                return block.input
        return None
