"""A conversation's history as the model-facing services read it: read-only, one conversation."""

from __future__ import annotations

import uuid
from typing import Any

import msgspec

from shared.db import unavailable_is_transient

# The conversation as it stands for one message: every earlier user message with its reply, in
# turn order, and the message itself. A reply stored after this message (its run was queued
# behind an earlier one) still belongs before it; this message's own reply never does.
UPTO = """
SELECT m.role, m.content
FROM messages m
LEFT JOIN messages u ON u.id = m.reply_to
WHERE m.conversation_id = $1
  AND COALESCE(u.seq, m.seq) <= (SELECT seq FROM messages WHERE id = $2)
  AND m.reply_to IS DISTINCT FROM $2
ORDER BY COALESCE(u.seq, m.seq) DESC, (m.role = 'assistant') DESC
LIMIT $3
"""


class Turn(msgspec.Struct, frozen=True):
    role: str
    content: str
    # Anthropic content blocks when the turn is more than text (tool_use, tool_result); the
    # text above is then only what windowing counts.
    blocks: tuple[dict[str, Any], ...] = ()


def estimate_tokens(text: str) -> int:
    """A cheap upper-ish estimate (4 characters a token) used for windowing only."""
    return max(1, len(text) // 4)


def newest_within(turns: list[Turn], budget_tokens: int) -> list[Turn]:
    """Newest turns that fit the budget, oldest first; the newest is always kept."""
    chosen: list[Turn] = []
    used = 0
    for turn in reversed(turns):
        cost = estimate_tokens(turn.content)
        if chosen and used + cost > budget_tokens:
            break
        chosen.append(turn)
        used += cost
    chosen.reverse()
    return chosen


class History:
    """Turns of one conversation; never auth data, never another conversation."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def upto(self, conversation_id: str, message_id: str, limit: int) -> list[Turn]:
        """At most ``limit`` newest turns up to and including ``message_id``, oldest first."""
        async with unavailable_is_transient("read history"), self.pool.acquire() as con:
            rows = await con.fetch(UPTO, uuid.UUID(conversation_id), uuid.UUID(message_id), limit)
        return [Turn(r["role"], r["content"]) for r in reversed(rows)]
