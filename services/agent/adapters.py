"""What the agent talks to: the conversation read model (read-only) and the small model."""

from __future__ import annotations

from typing import Any

import anthropic

from services.agent import core


class Classifier:
    """Asks the small model for a Decision through forced tool use."""

    def __init__(self, client: anthropic.AsyncAnthropic, model: str, max_tokens: int) -> None:
        self.client = client
        self.model = model
        self.max_tokens = max_tokens
        self.schema = core.tool_schema()

    async def classify(self, transcript: str) -> tuple[bool, Any]:
        """Whether the model called the tool, and the input it gave (anything at all)."""
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
                return True, block.input
        return False, None
