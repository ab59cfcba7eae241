"""A conversation's history as the model-facing services read it: read-only, one conversation."""

from __future__ import annotations

import uuid
from typing import Any

import msgspec

from shared.db import unavailable_is_transient
from shared.messages import ToolCall

# The conversation as it stands for one message: every earlier user message with its reply, in
# turn order, and the message itself. A reply stored after this message (its run was queued
# behind an earlier one) still belongs before it; this message's own reply never does.
UPTO = """
SELECT m.id, m.role, m.content, m.reply_to
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


# The tool exchanges of the runs of these user messages, round by round, with their results.
TOOL_TURNS = """
SELECT t.reply_to, t.round, t.content,
       COALESCE((SELECT jsonb_agg(jsonb_build_object(
                    'tool_use_id', r.tool_use_id, 'is_error', r.is_error, 'content', r.content))
                 FROM tool_results r WHERE r.run_id = t.run_id AND r.round = t.round), '[]')
       AS results
FROM tool_turns t
WHERE t.reply_to = ANY($1::uuid[]) AND NOT (t.run_id = $2 AND t.round >= $3)
ORDER BY t.reply_to, t.round
"""

# What the model is told for a tool_use whose result was never recorded (the run ended first):
# the API refuses a tool_use without its tool_result.
NO_RESULT = "no result was recorded for this call (the run ended before it finished)"


def assistant_blocks(
    text: str, calls: tuple[ToolCall, ...] | list[ToolCall]
) -> list[dict[str, Any]]:
    """An assistant turn as API content blocks: its text, then its tool_use blocks.

    An input that is not a JSON object (malformed model output) is sent back as ``{}``, as
    the API accepts only objects; its tool_result says why it did not run.
    """
    blocks: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    for c in calls:
        value = c.input if isinstance(c.input, dict) else {}
        blocks.append({"type": "tool_use", "id": c.id, "name": c.name, "input": value})
    return blocks


def tool_exchange(content: list[dict[str, Any]], results: list[dict[str, Any]]) -> list[Turn]:
    """One round as two turns: the assistant's blocks, then a user turn with a tool_result for
    each tool_use, in the same order (a missing result says so, marked as an error)."""
    by_id = {r.get("tool_use_id"): r for r in results}
    answers: list[dict[str, Any]] = []
    for block in content:
        if block.get("type") != "tool_use":
            continue
        r = by_id.get(block.get("id"))
        answers.append(
            {
                "type": "tool_result",
                "tool_use_id": block.get("id"),
                "content": str(r.get("content", "")) if r else NO_RESULT,
                "is_error": bool(r.get("is_error")) if r else True,
            }
        )
    said = " ".join(str(b.get("text", "")) for b in content if b.get("type") == "text")
    used = " ".join(
        f"{b.get('name')} {msgspec.json.encode(b.get('input')).decode()}"
        for b in content
        if b.get("type") == "tool_use"
    )
    heard = " ".join(str(a["content"]) for a in answers)
    return [
        Turn("assistant", (said + " " + used).strip(), tuple(content)),
        Turn("user", heard, tuple(answers)),
    ]


def interleave(
    rows: list[tuple[uuid.UUID, str, str, uuid.UUID | None]], exchanges: dict[uuid.UUID, list[Turn]]
) -> list[Turn]:
    """Message rows (id, role, content, reply_to) in turn order, with each run's tool exchanges
    right after its user message (before its final answer, if it has one)."""
    turns: list[Turn] = []
    for mid, role, content, _reply_to in rows:
        turns.append(Turn(role, content))
        if role == "user":
            turns.extend(exchanges.get(mid, ()))
    return turns


class History:
    """Turns of one conversation; never auth data, never another conversation."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def upto(
        self,
        conversation_id: str,
        message_id: str,
        limit: int,
        tools: bool = False,
        before: tuple[str, int] = ("", 0),
    ) -> list[Turn]:
        """At most ``limit`` newest messages up to and including ``message_id``, oldest first;
        with ``tools``, each run's tool exchanges too (content blocks). Without tools the
        history is text only: the API refuses tool blocks in a call that offers no tools.
        ``before``: (run id, round) of the call being made: that run's exchanges from that
        round on are left out, so a redelivered task's call sees what its first call saw, not
        its own round's stored turn (whose calls have no results yet)."""
        async with unavailable_is_transient("read history"), self.pool.acquire() as con:
            rows = await con.fetch(UPTO, uuid.UUID(conversation_id), uuid.UUID(message_id), limit)
            rows = list(reversed(rows))
            if not tools:
                return [Turn(r["role"], r["content"]) for r in rows]
            users = [r["id"] for r in rows if r["role"] == "user"]
            found = await con.fetch(TOOL_TURNS, users, *before)
        exchanges: dict[uuid.UUID, list[Turn]] = {}
        for t in found:
            content = _json(t["content"])
            exchanges.setdefault(t["reply_to"], []).extend(
                tool_exchange(content, _json(t["results"]))
            )
        return interleave(
            [(r["id"], r["role"], r["content"], r["reply_to"]) for r in rows], exchanges
        )

    async def system_prompt(self, conversation_id: str) -> str | None:
        """The conversation's own system prompt (set when it was created), if it has one."""
        async with unavailable_is_transient("read system prompt"), self.pool.acquire() as con:
            prompt: str | None = await con.fetchval(
                "SELECT system_prompt FROM conversations WHERE id = $1 AND deleted_at IS NULL",
                uuid.UUID(conversation_id),
            )
        return prompt


def _json(value: Any) -> Any:
    """asyncpg returns jsonb as text unless a codec is set; either way a Python value."""
    return msgspec.json.decode(value) if isinstance(value, str | bytes) else value
