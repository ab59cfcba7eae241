"""What the agent talks to: the conversation read model (read-only) and the small model."""

from __future__ import annotations

from typing import Any

import anthropic
import msgspec

from services.agent import core


# The fields of a Messages API reply the agent reads; anything else is skipped unread.
class _Block(msgspec.Struct):
    type: str
    name: str = ""
    input: Any = None


class _Reply(msgspec.Struct):
    content: list[_Block]


_reply = msgspec.json.Decoder(_Reply)


class Classifier:
    """Asks the small model for a Decision through forced tool use.

    The call goes through the anthropic SDK's client (auth, base URL, version header, timeouts,
    no retries, typed errors for non-2xx replies, its span) as a raw response whose body is
    decoded here with msgspec instead of into the SDK's pydantic models (docs/decisions.md).
    """

    def __init__(self, client: anthropic.AsyncAnthropic, model: str, max_tokens: int) -> None:
        self.client = client
        self.model = model
        self.max_tokens = max_tokens
        self.tools: Any = [
            {
                "name": core.TOOL_NAME,
                "description": "Record what the last user message needs.",
                "input_schema": core.tool_schema(),
            }
        ]
        self.tool_choice: Any = {"type": "tool", "name": core.TOOL_NAME}

    async def classify(self, transcript: str) -> tuple[bool, Any]:
        """Whether the model called the tool, and the input it gave (anything at all).

        A 2xx body that is not a Messages reply raises the SDK's ``APIResponseValidationError``.
        """
        raw = await self.client.messages.with_raw_response.create(
            model=self.model,
            max_tokens=self.max_tokens,
            system=core.SYSTEM_PROMPT,
            messages=[{"role": "user", "content": transcript}],
            tools=self.tools,
            tool_choice=self.tool_choice,
        )
        response = raw.http_response
        try:
            reply = _reply.decode(await raw.read())
        except (msgspec.DecodeError, RecursionError) as exc:
            raise anthropic.APIResponseValidationError(
                response, None, message=f"unreadable Messages reply: {exc}"
            ) from None
        for block in reply.content:
            if block.type == "tool_use" and block.name == core.TOOL_NAME:
                return True, block.input
        return False, None
