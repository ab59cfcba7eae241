"""What the agent talks to: the conversation read model (read-only) and the small model."""

from __future__ import annotations

from typing import Any

import anthropic
import msgspec

from services.agent import core
from shared import messages as m

# The offline model's ledger is keyed by this header, so usage can be reconciled call by call.
CALL_ID_HEADER = "x-baton-call-id"


# The fields of a Messages API reply the agent reads; anything else is skipped unread.
class _Block(msgspec.Struct):
    type: str
    name: str = ""
    input: Any = None


class _Usage(msgspec.Struct):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None


class _Reply(msgspec.Struct):
    content: list[_Block]
    usage: _Usage = msgspec.field(default_factory=_Usage)


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

    async def classify(self, transcript: str, call_id: str = "") -> tuple[bool, Any, m.Usage]:
        """Whether the model called the tool, the input it gave (anything at all), and what the
        call used (what the provider bills).

        A 2xx body that is not a Messages reply raises the SDK's ``APIResponseValidationError``.
        """
        raw = await self.client.messages.with_raw_response.create(
            model=self.model,
            max_tokens=self.max_tokens,
            system=core.SYSTEM_PROMPT,
            messages=[{"role": "user", "content": transcript}],
            tools=self.tools,
            tool_choice=self.tool_choice,
            extra_headers={CALL_ID_HEADER: call_id} if call_id else None,
        )
        response = raw.http_response
        try:
            reply = _reply.decode(await raw.read())
        except (msgspec.DecodeError, RecursionError) as exc:
            raise anthropic.APIResponseValidationError(
                response, None, message=f"unreadable Messages reply: {exc}"
            ) from None
        u = reply.usage
        usage = m.Usage(
            input_tokens=max(0, u.input_tokens),
            output_tokens=max(0, u.output_tokens),
            cache_read_tokens=max(0, u.cache_read_input_tokens or 0),
            cache_write_tokens=max(0, u.cache_creation_input_tokens or 0),
        )
        for block in reply.content:
            if block.type == "tool_use" and block.name == core.TOOL_NAME:
                return True, block.input, usage
        return False, None, usage
